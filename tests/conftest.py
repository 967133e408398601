"""Shared fixtures: one local Ray for the whole session (loopback only), tiny synthetic data."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from fedray.config import ExperimentConfig, load_config  # noqa: E402


@pytest.fixture(scope="session")
def ray_session():
    """The session's one local Ray; tests that need Ray take this fixture."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_table():
    from fedray.data import synth

    return synth.generate(n=240, size=32, seed=7, patients_per_class=6)


def tiny_config(tmp_path: Path, **overrides: object) -> ExperimentConfig:
    """A 2-hospital, 1-round, 32 px smallcnn experiment that trains in seconds."""
    sets = {
        "name": "tiny",
        "output_dir": str(tmp_path),
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
    sets.update({k: v for k, v in overrides.items()})
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])
