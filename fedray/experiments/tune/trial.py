"""One trial of a sweep: the resources it reserves, its config, its run (a complete federated
run reporting every round to Tune), and the sweep folder's storage (local or a URI)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import yaml

from fedray.config import ConfigError, ExperimentConfig, load_config
from fedray.experiments.tune.config import (
    FINAL_KEYS,
    VAL_KEYS,
    SweepError,
    _override,
    _plain,
)

# A hospital's CPUs in a sweep when runtime.hospital_num_cpus is unset: a trial's share must be
# fixed before it starts, not "the whole cluster" as in a single run.
HOSPITAL_CPUS = 1.0
# Ray refuses empty bundles; a coordinator asking for nothing (it evaluates while the hospitals
# are idle) still holds this much, with the trial driver beside it.
COORDINATOR_MIN_CPUS = 0.01


# ---------------------------------------------------------------- resources

def trial_resources(config: ExperimentConfig) -> list[dict[str, float]]:
    """The bundles one trial reserves: the coordinator's (held for the coordinator, which runs
    in the trial's own process unless it needs a GPU: runtime.coordinator_in_driver),
    then one per hospital, in hospital order; runtime.py puts hospital i in bundle i + 1."""
    from fedray.federation import runtime
    from fedray.data.partition import hospital_names

    rt = config.runtime
    names = hospital_names(config.federation.hospitals)
    pins = runtime.hospital_resources(rt, names)
    coordinator = {"CPU": max(rt.coordinator_num_cpus, COORDINATOR_MIN_CPUS),
                   "GPU": rt.coordinator_num_gpus}
    hospitals = [{"CPU": rt.hospital_num_cpus or HOSPITAL_CPUS, "GPU": rt.hospital_num_gpus,
                  **pins[name]} for name in names]
    return [{k: float(v) for k, v in b.items() if v > 0} for b in [coordinator, *hospitals]]


def unplaceable_trial(bundles: list[dict[str, float]],
                      nodes: list[dict[str, float]]) -> str | None:
    """Why no trial could ever start on nodes of these shapes (None: each bundle fits a node).

    The bundles of a placement group may sit on different nodes, so each is checked on its own;
    that they fit the cluster together is `trial_outgrows_cluster`'s warning, since an
    autoscaling cluster adds nodes for them. Tune would wait forever on a bundle no node fits.
    """
    from fedray.data.partition import hospital_names
    from fedray.federation.runtime import format_resources, unplaceable

    coordinator, hospitals = bundles[0], bundles[1:]
    if not any(all(n.get(k, 0.0) >= v for k, v in coordinator.items()) for n in nodes):
        return (f"the coordinator's bundle {format_resources(coordinator)} fits no node of the "
                "cluster; lower runtime.coordinator_num_cpus / coordinator_num_gpus")
    problems = unplaceable(dict(zip(hospital_names(len(hospitals)), hospitals)), nodes)
    return "\n".join(problems.values()) or None


def trial_outgrows_cluster(bundles: list[dict[str, float]],
                           nodes: list[dict[str, float]]) -> str | None:
    """Why one trial does not fit the cluster as it is now (None: it does), for a warning."""
    from fedray.federation.runtime import format_resources

    need: dict[str, float] = {}
    for bundle in bundles:
        for k, v in bundle.items():
            need[k] = need.get(k, 0.0) + v
    have = {k: sum(n.get(k, 0.0) for n in nodes) for k in need}
    if all(have[k] + 1e-9 >= v for k, v in need.items()):
        return None
    return (f"one trial reserves {format_resources(need)} (its coordinator and "
            f"{len(bundles) - 1} hospitals), but the cluster has {format_resources(have)} now: "
            "trials wait until an autoscaler adds nodes, and on a fixed cluster never start "
            "(lower runtime.hospital_num_cpus / hospital_num_gpus)")


# ---------------------------------------------------------------- one trial

def trial_config(base_yaml: str, params: dict[str, Any]) -> ExperimentConfig:
    """The base experiment with a trial's sampled values, validated by load_config."""
    values = {k: _plain(v) for k, v in sorted(params.items())}
    try:
        return load_config(yaml.safe_load(base_yaml), values)
    except ConfigError as exc:
        sets = " ".join(_override(k, v) for k, v in values.items())
        raise ConfigError(f"the trial's values {sets} do not make a valid "
                          f"experiment:\n{exc}") from None


def round_metrics(record: dict, run_dir: str) -> dict:
    """What one round reports to Tune: flat numbers (NaN where missing), the run folder."""
    hospitals = record["hospitals"].values()
    losses = [h["loss"] for h in hospitals]
    eps = [h["epsilon"] for h in hospitals if h.get("epsilon") is not None]
    server = (record.get("server_dp") or {}).get("epsilon")
    eps += [server] if server is not None else []
    val = record["val"] or {}
    return {
        "round": record["round"],
        "run_dir": run_dir,
        "counted": record["counted"],
        "train_loss": sum(losses) / len(losses) if losses else math.nan,
        "epsilon_max": max(eps) if eps else math.nan,
        **{f"val_{k}": math.nan if val.get(k) is None else float(val[k]) for k in VAL_KEYS},
    }


def trial_folder(trial_id: str) -> str:
    return f"trial_{trial_id}"


def _trial_dirname(trial: Any) -> str:
    return trial_folder(trial.trial_id)


def last_run(folder: Path) -> Path | None:
    """The run folder a trial left before an interruption (resumed, not started anew)."""
    runs = [p.parent for p in folder.glob("*/config.yaml")]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def fetch_last_run(uploaded: str, into: Path) -> Path | None:
    """With remote storage: the run folder a trial uploaded before an interruption, downloaded
    into `into` (its new working directory: Tune restores checkpoints, not a trial's files)."""
    from pyarrow import fs

    filesystem, root = fs.FileSystem.from_uri(uploaded)
    found = filesystem.get_file_info(fs.FileSelector(root, allow_not_found=True))
    configs = filesystem.get_file_info([f"{d.path}/config.yaml" for d in found
                                        if d.type == fs.FileType.Directory])
    runs = [c for c in configs if c.type == fs.FileType.File]
    if not runs:
        return None
    newest = max(runs, key=lambda c: (c.mtime_ns or 0, c.path)).path.rsplit("/", 2)[-2]
    local = into / newest
    fs.copy_files(f"{root}/{newest}", str(local), source_filesystem=filesystem,
                  destination_filesystem=fs.LocalFileSystem())
    return local


def _is_uri(location: str) -> bool:
    return "://" in location


def run_trial(params: dict[str, Any], *, base_yaml: str, sweep_dir: str,
              shard_root: str | None) -> None:
    """One trial: the base config with its sampled values, run through experiment.run to the
    end (or until ASHA stops it) in the trial's folder, each round reported to Tune.

    A trial that was interrupted continues its own run folder from the last completed round.
    With remote storage the run folder is written in the trial's working directory (where Tune
    runs it), which Tune uploads into the trial's folder (sync_artifacts); the run folder it
    reports is that upload's URI.
    """
    from ray import tune

    from fedray.experiments import experiment
    from fedray.data.shards import ShardSet

    context = tune.get_context()
    config = trial_config(base_yaml, params)
    folder = trial_folder(context.get_trial_id())
    if _is_uri(sweep_dir):  # Tune uploads the working directory into the trial's folder
        output, uploaded = Path.cwd(), f"{sweep_dir}/{folder}"
        resume = last_run(output) or fetch_last_run(uploaded, output)
    else:
        output, uploaded = Path(sweep_dir) / folder, None
        resume = last_run(output)
    if shard_root and not (Path(shard_root) / "shards.json").is_file():
        raise SweepError(f"the sweep's shards ({shard_root}) are not on this node: a local sweep "
                         "folder must be on storage every node mounts; or give --output-dir a "
                         "URI (s3://...), and each trial makes its own shards")
    state: dict[str, Any] = {}

    def on_start(run_dir: Path) -> None:
        state["run_dir"] = (f"{uploaded}/{run_dir.relative_to(output).as_posix()}" if uploaded
                            else str(run_dir))

    def on_round(record: dict) -> None:
        metrics = round_metrics(record, state["run_dir"])
        if record["stop_reason"] or record["round"] >= config.federation.rounds:
            state["last"] = metrics  # reported after the final evaluation, below
        else:
            tune.report(metrics)

    result = experiment.run(config, output_dir=output, resume=resume,
                            on_start=on_start, on_round=on_round,
                            shards=ShardSet.load(Path(shard_root)) if shard_root else None)
    if "last" in state:
        # The last round reports once the run has evaluated and saved its model, so an ASHA
        # rung at the last round cannot stop the trial before its final evaluation.
        tune.report({**state["last"], **final_metrics(result.final)})


def final_metrics(final: dict) -> dict[str, float]:
    """The run's final evaluation (its saved model on val and test), flat for Tune, with the
    round that model is from."""
    return {"final_round": final.get("best_round", math.nan),
            **{f"final_{split}_{k}": math.nan if final[split].get(k) is None
               else float(final[split][k])
               for split in ("val", "test") if split in final for k in FINAL_KEYS}}


# ---------------------------------------------------------------- storage

def resolve_storage(storage: str | Path, cwd: Path | None = None) -> str:
    """A local folder as an absolute path (relative ones against `cwd`); URIs as given."""
    text = str(storage)
    if _is_uri(text):
        return text.rstrip("/")
    path = Path(text).expanduser()
    return str(path if path.is_absolute() else ((cwd or Path.cwd()) / path).resolve())


def _new_folder(storage: str, name: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if _is_uri(storage):
        return f"{storage}/{name}-{stamp}"
    folder, suffix = Path(storage) / f"{name}-{stamp}", 1
    while folder.exists():
        suffix += 1
        folder = Path(storage) / f"{name}-{stamp}-{suffix}"
    folder.mkdir(parents=True)
    return str(folder)


def _put(folder: str, name: str, data: bytes) -> str:
    """Write one file into the sweep folder, local or remote (pyarrow filesystems)."""
    from pyarrow import fs

    filesystem, root = fs.FileSystem.from_uri(folder)
    filesystem.create_dir(root, recursive=True)
    with filesystem.open_output_stream(f"{root}/{name}") as out:
        out.write(data)
    return f"{folder}/{name}"


def _get(location: str) -> bytes | None:
    from pyarrow import fs

    try:
        filesystem, path = fs.FileSystem.from_uri(location)
        with filesystem.open_input_stream(path) as f:
            return f.read()
    except (FileNotFoundError, OSError):
        return None
