"""Shared fixtures: one local Ray for the whole session (loopback only), tiny synthetic data."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# A replica whose constructor fails in a test fails for good: Serve's controller (which reads
# this at start) marks the deployment failed after one try, not three process starts.
os.environ.setdefault("RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from fedray.config import ExperimentConfig, load_config  # noqa: E402


@pytest.fixture(scope="session")
def ray_session():
    """The session's one local Ray; tests that need Ray take this fixture. Runs one after
    another share their hospitals' worker processes (fedray.federation.hosts.reusing), as a
    comparison's arms do, so the suite starts and imports them a few times, not per run."""
    import ray

    from fedray.federation import hosts

    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    with hosts.reusing():
        yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_table():
    from fedray.data import synth

    return synth.generate(n=240, size=32, seed=7, patients_per_class=6)


# A 2-hospital, 1-round, 32 px smallcnn experiment that trains in seconds, as dotted fields.
TINY: dict[str, object] = {
    "name": "tiny",
    "data.synth.n": 240,
    "data.synth.size": 32,
    "data.synth.patients_per_class": 6,
    "data.image_size": 32,
    "data.partition.min_per_hospital": 10,
    "model.backbone": "smallcnn",
    "training.batch_size": 32,
    "training.lr": 0.003,
    "federation.hospitals": 2,
    "federation.rounds": 1,
    "federation.min_clients": 1,
    "runtime.hospital_num_cpus": 1,
}


def tiny_config(tmp_path: Path, **overrides: object) -> ExperimentConfig:
    """TINY, writing under tmp_path, with `overrides` on top."""
    sets = {**TINY, "output_dir": str(tmp_path), **overrides}
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


def run_job_script(command: str, args: list[str], monkeypatch) -> int:
    """A jobs/ script run as Ray runs it (`python jobs/<command>.py ...`), in this process;
    returns its exit status."""
    import runpy
    import sys

    script = Path(__file__).resolve().parents[1] / "jobs" / f"{command}.py"
    monkeypatch.setattr(sys, "argv", [f"jobs/{command}.py", *args])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(script), run_name="__main__")
    return exc.value.code


def fit_in_grad_sample_modes(shard_dir: Path, modes: tuple[str, ...]) -> dict:
    """hospital_a's first DP round (reproducible noise, seed 5) from the same starting weights
    in each grad-sample mode: {mode: FitRes}. Same batches and noise draws in every mode."""
    from fedray.data.shards import ShardSet
    from fedray.federation.client import HospitalClient
    from fedray.federation.messages import FitIns

    shards = ShardSet.load(shard_dir)
    weights, results = None, {}
    for mode in modes:
        config = tiny_config(shard_dir, **{
            "model.dp_safe": "true", "privacy.enabled": "true", "privacy.noise_multiplier": 0.7,
            "privacy.max_grad_norm": 0.1, "privacy.grad_sample_mode": mode,
            "privacy.reproducible_noise": "true", "privacy.share_local_metrics": "true",
            "data.augment": "false"})
        client = HospitalClient("hospital_a", shards.path(shards.hospitals["hospital_a"]), config,
                                None, num_threads=1)
        if weights is None:
            weights = {k: v.numpy().copy() for k, v in client.model.state_dict().items()}
        results[mode] = client.fit(weights, FitIns(round=1, lr=1e-3, local_epochs=1, seed=5))
    return results


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, synth_table) -> Path:
    """Two hospitals' shards of the tiny synthetic table, shared by a test module."""
    from fedray.data.pipeline import build_shards

    out = tmp_path_factory.mktemp("shards")
    config = tiny_config(out)
    build_shards(synth_table, config.data, 2, config.seed, out)
    return out


def local_coordinator(run_dir: Path, shard_dir: Path, **overrides: object):
    """The round loop in this process (LocalPool): no Ray, same code path otherwise."""
    from fedray.federation.client import HospitalClient
    from fedray.federation.coordinator import Coordinator, LocalPool
    from fedray.data.shards import ShardSet

    config = tiny_config(run_dir, **overrides)
    shards = ShardSet.load(shard_dir)
    clients = [HospitalClient(name, shards.path(file), config, run_dir / "hospitals" / name,
                              num_threads=1)
               for name, file in shards.hospitals.items()]
    run_dir.mkdir(parents=True, exist_ok=True)
    return Coordinator(config, run_dir, LocalPool(clients), shards, num_threads=1)
