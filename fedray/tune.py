"""Hyperparameter sweeps with Ray Tune: one trial is one complete federated run.

A sweep YAML names a base experiment and a search space over its dotted fields. Each trial's
config goes through `load_config` like any run; each trial reserves one placement group (the
coordinator's bundle, then one per hospital), so trials sit side by side without
oversubscribing; every round reports the global validation metrics, on which ASHA stops the
weak trials early. Ray Tune is imported inside the functions that run a sweep, never at import.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import tempfile
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedray.config import (
    ConfigError,
    ExperimentConfig,
    format_validation_error,
    load_config,
    parse_override,
)

if TYPE_CHECKING:
    import pandas as pd


class SweepError(ConfigError):
    """A sweep config or folder that cannot be used; the message names the field or path."""


# What every round reports to Tune besides `round` and `run_dir`: the global validation
# metrics (the coordinator's summary), the hospitals' mean training loss and the largest epsilon.
VAL_KEYS = ("loss", "accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "roc_auc_macro",
            "kappa")
METRICS = tuple(f"val_{k}" for k in VAL_KEYS) + ("train_loss",)
# What a sweep may rank trials on: a validation metric, which the run's final evaluation of its
# saved model (the round of lowest validation loss) reports too, as final_val_*.
RANKED = tuple(f"val_{k}" for k in VAL_KEYS)
FINAL_KEYS = VAL_KEYS

# A hospital's CPUs in a sweep when runtime.hospital_num_cpus is unset: a trial's share must be
# fixed before it starts, not "the whole cluster" as in a single run.
HOSPITAL_CPUS = 1.0
# Ray refuses empty bundles; a coordinator asking for nothing (it evaluates while the hospitals
# are idle) still holds this much, with the trial driver beside it.
COORDINATOR_MIN_CPUS = 0.01

# Fields that change the shards (split, partition, source): trials share one set of shards
# unless the space touches one of these. Fields fixed for the whole sweep: the placement.
SHARD_FIELDS = ("seed", "federation.hospitals", "data.source", "data.path", "data.synth",
                "data.split", "data.partition", "data.include_segmented", "data.skip_bad",
                "data.max_file_mb")
FIXED_FIELDS = ("federation.hospitals", "runtime")
# Fields holding paths: a relative value is the launcher's, made absolute when the sweep loads
# (trials run in folders of their own).
PATH_FIELDS = ("data.path", "model.weights_dir")

BASE_FILE, SWEEP_FILE = "base.yaml", "sweep.yaml"


# ---------------------------------------------------------------- the sweep config

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


class Dimension(_Strict):
    """One searched field: exactly one of grid (every value), choice (sampled), uniform,
    loguniform or randint (both ends included)."""

    grid: list[Any] | None = Field(None, min_length=1)
    choice: list[Any] | None = Field(None, min_length=1)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Dimension:
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(KINDS)} (got "
                             f"{', '.join(given) or 'none'})")
        if self.kind in ("uniform", "loguniform", "randint"):
            low, high = getattr(self, self.kind)
            if low > high or (low == high and self.kind != "randint"):
                raise ValueError(f"{self.kind}: the low end must be below the high end, "
                                 f"got [{low}, {high}]")
            if self.kind == "loguniform" and low <= 0:
                raise ValueError(f"loguniform: both ends must be > 0, got [{low}, {high}]")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    @property
    def discrete(self) -> bool:
        return self.kind in ("grid", "choice")

    def extremes(self) -> list[Any]:
        """Every value of a list, the two ends of a range: what the sweep validates up front."""
        return list(getattr(self, self.kind))


class AshaConfig(_Strict):
    """Asynchronous successive halving over rounds: at each rung a trial below the cut stops."""

    enabled: bool = True
    grace_period: int = Field(1, ge=1, description="rounds every trial runs before it can stop")
    reduction_factor: float = Field(2.0, gt=1)
    max_t: int | None = Field(None, ge=1, description="None: the sweep's largest federation.rounds")


class SweepConfig(_Strict):
    name: str = "sweep"
    base: Path = Field(description="experiment YAML, relative to the sweep file")
    overrides: dict[str, Any] = Field(default_factory=dict,
                                      description="dotted field: value, applied to the base")
    space: dict[str, Dimension] = Field(min_length=1, description="dotted field: dimension")
    search: Literal["random", "grid", "optuna"] = "random"
    seed: int = 0
    num_samples: int = Field(1, ge=1, description="random/optuna: trials; grid: repeats")
    max_concurrent_trials: int | None = Field(None, ge=1)
    metric: str = "val_balanced_accuracy"
    mode: Literal["max", "min"] = "max"
    asha: AshaConfig = AshaConfig()
    placement_strategy: Literal["PACK", "SPREAD"] = "PACK"
    storage: str = Field("sweeps", description="local folder (relative: to the working "
                                               "directory) or a pyarrow URI such as s3://...")

    @model_validator(mode="after")
    def _searchable(self) -> SweepConfig:
        if self.metric not in RANKED:
            raise ValueError(f"metric {self.metric!r} is not reported as a validation metric; "
                             f"choose one of {', '.join(RANKED)}")
        for key, dim in self.space.items():
            fixed = next((f for f in FIXED_FIELDS if _under(key, f)), None)
            if fixed:
                raise ValueError(f"space.{key}: {fixed} fixes each trial's placement group, "
                                 "so it is the same for the whole sweep; set it in overrides")
            if self.search == "grid" and not dim.discrete:
                raise ValueError(f"space.{key}: search grid takes grid or choice lists, not "
                                 f"{dim.kind}")
            if self.search == "optuna" and dim.kind == "grid":
                raise ValueError(f"space.{key}: search optuna samples; use choice, not grid")
        return self


def _under(key: str, field: str) -> bool:
    return key == field or key.startswith(field + ".")


@dataclass
class Sweep:
    """A validated sweep: its config and the resolved base experiment every trial starts from."""

    config: SweepConfig
    base: ExperimentConfig

    @property
    def base_yaml(self) -> str:
        return self.base.to_yaml()

    def max_rounds(self) -> int:
        dim = self.config.space.get("federation.rounds")
        return max(dim.extremes()) if dim else self.base.federation.rounds

    def shares_shards(self) -> bool:
        """Trials train on the same shards unless the space changes how they are made."""
        return not any(_under(k, f) for k in self.config.space for f in SHARD_FIELDS)


def _override(key: str, value: Any) -> str:
    """`key=value` as `--set` reads it back (YAML): 1e-05 stays a float, 'on' a string."""
    if hasattr(value, "item"):  # numpy scalars from Tune's samplers
        value = value.item()
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
    return f"{key}={text.removesuffix('...').strip()}"


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise SweepError(f"sweep config not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SweepError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: the top level must be a mapping")
    return raw


def load_sweep(path: Path, overrides: list[str] | None = None) -> Sweep:
    """Read a sweep YAML, apply `--set` overrides to its base, and validate every searched
    value (each list item, both ends of each range) as part of the base experiment, so a bad
    value fails here, naming its field, rather than in a trial an hour in."""
    path = Path(path)
    try:
        config = SweepConfig.model_validate(_read_yaml(path))
    except ValidationError as err:
        raise SweepError(format_validation_error(err, f"invalid sweep config ({path})",
                                                 "see configs/sweep-demo.yaml")) from None
    base_path = config.base if config.base.is_absolute() else path.parent / config.base
    if not base_path.is_file():
        raise SweepError(f"{path}: base: {base_path} not found (relative to the sweep file)")
    config.base = base_path.resolve()
    _check_space_types(path, config)
    for item in overrides or []:
        keys, value = parse_override(item)
        config.overrides = {**config.overrides, ".".join(keys): value}
    sets = [_override(k, v) for k, v in config.overrides.items()]
    base = _absolute_paths(load_config(config.base, sets))
    if not base.data.split.val > 0:
        raise SweepError("a sweep ranks trials on validation metrics: the base's "
                         "data.split.val must be > 0")
    for key, dim in config.space.items():
        for value in dim.extremes():
            try:
                load_config(config.base, sets + [_override(key, value)])
            except ConfigError as exc:
                raise SweepError(f"{path}: space.{key}: {value!r} does not make a valid "
                                 f"experiment:\n{exc}") from None
    _check_backbones(config, base)
    sweep = Sweep(config, base)
    asha = config.asha
    if asha.enabled and asha.grace_period > (asha.max_t or sweep.max_rounds()):
        raise SweepError(f"{path}: asha.grace_period ({asha.grace_period}) exceeds the rounds a "
                         f"trial runs ({asha.max_t or sweep.max_rounds()})")
    if config.search == "optuna" and importlib.util.find_spec("optuna") is None:
        raise SweepError(f"{path}: search: optuna needs the optuna package, which is not "
                         "installed (pip install optuna); or use search: random or grid")
    return sweep


def _absolute_paths(config: ExperimentConfig) -> ExperimentConfig:
    """Trials run in folders of their own: relative data and weight paths are the launcher's."""
    if config.data.path is not None and not config.data.path.is_absolute():
        config.data.path = config.data.path.expanduser().resolve()
    if config.model.weights_dir is not None and not config.model.weights_dir.is_absolute():
        config.model.weights_dir = config.model.weights_dir.expanduser().resolve()
    return config


def _absolute(value: Any) -> Any:
    return value if value is None else str(Path(str(value)).expanduser().resolve())


def _field_type(key: str) -> Any:
    """The annotation of the experiment field at a dotted key (None: no such field)."""
    model: Any = ExperimentConfig
    annotation = None
    for part in key.split("."):
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        model = annotation = fields[part].annotation
    return annotation


def _check_space_types(path: Path, config: SweepConfig) -> None:
    """Path values become absolute, as the base's do; a continuous range on a whole-number
    field is refused: its ends may be whole, but the values sampled between them are not."""
    for key, dim in config.space.items():
        if key in PATH_FIELDS and dim.discrete:
            setattr(dim, dim.kind, [_absolute(v) for v in getattr(dim, dim.kind)])
        annotation = _field_type(key)
        types = set(typing.get_args(annotation)) or {annotation}
        if not dim.discrete and dim.kind != "randint" and int in types and float not in types:
            raise SweepError(f"{path}: space.{key}: takes whole numbers, but {dim.kind} samples "
                             "fractions; use randint [low, high] or a grid / choice list")


def _check_backbones(config: SweepConfig, base: ExperimentConfig) -> None:
    from fedray.models import BACKBONES, available_backbones

    dim = config.space.get("model.backbone")
    names = dim.extremes() if dim else [base.model.backbone]
    usable = available_backbones()
    for name in names:
        if name not in usable:
            where = "space.model.backbone" if dim else "model.backbone"
            hint = " (its library is not installed)" if name in BACKBONES else ""
            raise SweepError(f"{where}: {name!r} is not a usable backbone{hint}; the registry "
                             f"has {', '.join(usable)}")


# ---------------------------------------------------------------- resources

def trial_resources(config: ExperimentConfig) -> list[dict[str, float]]:
    """The bundles one trial reserves: the coordinator's (the trial driver sits in it too),
    then one per hospital, in hospital order; runtime.py puts hospital i in bundle i + 1."""
    from fedray import runtime
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
    from fedray.runtime import format_resources, unplaceable

    coordinator, hospitals = bundles[0], bundles[1:]
    if not any(all(n.get(k, 0.0) >= v for k, v in coordinator.items()) for n in nodes):
        return (f"the coordinator's bundle {format_resources(coordinator)} fits no node of the "
                "cluster; lower runtime.coordinator_num_cpus / coordinator_num_gpus")
    problems = unplaceable(dict(zip(hospital_names(len(hospitals)), hospitals)), nodes)
    return "\n".join(problems.values()) or None


def trial_outgrows_cluster(bundles: list[dict[str, float]],
                           nodes: list[dict[str, float]]) -> str | None:
    """Why one trial does not fit the cluster as it is now (None: it does), for a warning."""
    from fedray.runtime import format_resources

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
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / BASE_FILE
        path.write_text(base_yaml)
        sets = [_override(k, v) for k, v in sorted(params.items())]
        try:
            return load_config(path, sets)
        except ConfigError as exc:
            raise ConfigError(f"the trial's values {' '.join(sets)} do not make a valid "
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

    from fedray import experiment
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


# ---------------------------------------------------------------- the sweep

def resolve_storage(storage: str | Path, cwd: Path | None = None) -> str:
    """A local folder as an absolute path (relative ones against `cwd`); URIs as given."""
    text = str(storage)
    if _is_uri(text):
        return text.rstrip("/")
    path = Path(text).expanduser()
    return str(path if path.is_absolute() else ((cwd or Path.cwd()) / path).resolve())


def search_space(config: SweepConfig) -> dict[str, Any]:
    """Tune's param_space: flat dotted keys, so a trial's params map straight to `--set`."""
    from ray import tune

    space = {}
    for key, dim in config.space.items():
        kind, values = dim.kind, getattr(dim, dim.kind)
        if kind == "grid" or (kind == "choice" and config.search == "grid"):
            space[key] = tune.grid_search(list(values))
        elif kind == "choice":
            space[key] = tune.choice(list(values))
        elif kind == "uniform":
            space[key] = tune.uniform(*values)
        elif kind == "loguniform":
            space[key] = tune.loguniform(*values)
        else:
            space[key] = tune.randint(values[0], values[1] + 1)
    return space


def _trainable(sweep: Sweep, folder: str, shard_root: str | None) -> Any:
    from ray import tune

    bundles = trial_resources(sweep.base)
    resources = tune.PlacementGroupFactory([{}, *bundles],
                                           strategy=sweep.config.placement_strategy)
    trainable = tune.with_parameters(run_trial, base_yaml=sweep.base_yaml, sweep_dir=folder,
                                     shard_root=shard_root)
    return tune.with_resources(trainable, resources)


def _tune_config(sweep: Sweep) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    c = sweep.config
    limit = c.max_concurrent_trials
    if c.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=c.seed)
    else:  # seeded, so the same sweep samples the same values; it applies the limit itself
        searcher = BasicVariantGenerator(random_state=c.seed, max_concurrent=limit or 0)
        limit = None
    scheduler = None
    if c.asha.enabled:
        scheduler = ASHAScheduler(time_attr="round", max_t=c.asha.max_t or sweep.max_rounds(),
                                  grace_period=c.asha.grace_period,
                                  reduction_factor=c.asha.reduction_factor)
    return tune.TuneConfig(metric=c.metric, mode=c.mode, search_alg=searcher,
                           scheduler=scheduler, num_samples=c.num_samples,
                           max_concurrent_trials=limit,
                           trial_dirname_creator=_trial_dirname)


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


def _shared_shards(sweep: Sweep, folder: str, log: Callable[[str], None]) -> str | None:
    """One set of shards for every trial (same split, same partition), made once in the sweep
    folder, when the space leaves them alone and that folder is local: trials on other nodes
    read it there, so it must be storage they all mount. With remote storage (a URI) each
    trial makes its own shards in its run folder."""
    if not sweep.shares_shards() or _is_uri(folder):
        return None
    from fedray import experiment

    experiment.prepare_data(sweep.base, Path(folder), log)
    return str(Path(folder) / "data")


@dataclass
class SweepResult:
    folder: str
    table: pd.DataFrame
    best: dict | None


def run_sweep(sweep: Sweep, *, output_dir: str | Path | None = None, verbose: int = 1,
              log: Callable[[str], None] = print) -> SweepResult:
    """Run every trial of the sweep on the connected (or a new local) Ray; write the table."""
    from ray import tune

    from fedray import runtime

    storage = resolve_storage(output_dir if output_dir is not None else sweep.config.storage)
    runtime.init_ray(sweep.base.runtime)
    bundles, nodes = trial_resources(sweep.base), runtime.live_nodes()
    problem = unplaceable_trial(bundles, nodes)
    if problem:
        raise SweepError(problem)
    short = trial_outgrows_cluster(bundles, nodes)
    if short:
        log(f"warning: {short}")
    folder = _new_folder(storage, sweep.config.name)
    log(f"sweep folder: {folder}")
    record = sweep.config.model_dump(mode="json", exclude_none=True)
    _put(folder, SWEEP_FILE, yaml.safe_dump(record, sort_keys=False).encode())
    _put(folder, BASE_FILE, sweep.base_yaml.encode())
    shard_root = _shared_shards(sweep, folder, log)
    tuner = tune.Tuner(
        _trainable(sweep, folder, shard_root),
        param_space=search_space(sweep.config),
        tune_config=_tune_config(sweep),
        run_config=tune.RunConfig(name=folder.rstrip("/").rsplit("/", 1)[-1], storage_path=storage,
                                  verbose=verbose,
                                  sync_config=tune.SyncConfig(sync_artifacts=_is_uri(folder))),
    )
    return summarize(folder, tuner.fit(), sweep, log)


def load_saved(folder: str) -> Sweep:
    """The sweep as it was started in `folder`: its config and resolved base experiment."""
    raw_sweep, raw_base = _get(f"{folder}/{SWEEP_FILE}"), _get(f"{folder}/{BASE_FILE}")
    if raw_sweep is None or raw_base is None:
        raise SweepError(f"{folder}: not a sweep folder (no {SWEEP_FILE} and {BASE_FILE}; "
                         "give the folder `fedray tune` printed)")
    config = SweepConfig.model_validate(yaml.safe_load(raw_sweep))
    return Sweep(config, ExperimentConfig.model_validate(yaml.safe_load(raw_base)))


def resume_sweep(folder: str | Path, *, verbose: int = 1,
                 log: Callable[[str], None] = print) -> SweepResult:
    """Continue an interrupted sweep: finished trials stay as they are, unfinished and errored
    ones continue (each from its run folder's last completed round)."""
    from ray import tune

    from fedray import runtime

    folder = resolve_storage(folder)
    sweep = load_saved(folder)
    runtime.init_ray(sweep.base.runtime)
    if not tune.Tuner.can_restore(folder):
        raise SweepError(f"{folder}: no Tune experiment state to resume")
    shard_root = _shared_shards(sweep, folder, log)
    tuner = tune.Tuner.restore(folder, trainable=_trainable(sweep, folder, shard_root),
                               resume_unfinished=True, resume_errored=True)
    log(f"resuming sweep: {folder}")
    return summarize(folder, tuner.fit(), sweep, log)


# ---------------------------------------------------------------- results

def _history(frame: pd.DataFrame | None) -> list[dict]:
    """One row per round (the last report wins, should a resumed trial report one twice)."""
    if frame is None or frame.empty or "round" not in frame:
        return []
    frame = frame.dropna(subset=["round"]).drop_duplicates("round", keep="last")
    return frame.sort_values("round").to_dict("records")


def _number(value: Any) -> Any:
    """None for a missing value (None or NaN), else the value."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def ranked_on(config: SweepConfig) -> str:
    """The column trials are ranked on: the sweep's metric of the model each run saved."""
    return f"final_{config.metric}"


def _peak(history: list[dict], metric: str, mode: str) -> tuple[int | None, float | None]:
    """The best value of the metric in any round, and its round."""
    scored = [(h[metric], int(h["round"])) for h in history if _number(h.get(metric)) is not None]
    if not scored:
        return None, None
    pick = max if mode == "max" else min
    value = pick(v for v, _ in scored)
    return next(r for v, r in scored if v == value), float(value)


def trial_row(trial_id: str, params: dict, history: list[dict], final: dict | None,
              error: str | None, config: SweepConfig) -> dict:
    """One row of the results table, from what a trial reported and its final evaluation
    (`final_metrics` of the run; None when the trial stopped early or failed).

    Trials rank on final_<metric>: the metric of the model the run saved (the round of lowest
    validation loss, `saved_round`), which is what `fedray export` packages. peak_<metric> is
    the metric's best value in any round (`peak_round`), the only score of a stopped trial.
    """
    peak_round, peak_value = _peak(history, config.metric, config.mode)
    last = history[-1] if history else {}
    eps = [h["epsilon_max"] for h in history if _number(h.get("epsilon_max")) is not None]
    status = "error" if error else "completed" if final else "stopped" if history else "not run"
    finals = {f"final_{split}_{k}": _number((final or {}).get(f"final_{split}_{k}"))
              for split in ("val", "test") for k in FINAL_KEYS}
    saved_round = _number((final or {}).get("final_round"))
    return {"trial_id": trial_id, "status": status,
            **{key: params.get(key) for key in config.space},
            "rounds": int(last["round"]) if last else 0,
            ranked_on(config): finals.pop(ranked_on(config)),
            "saved_round": None if saved_round is None else int(saved_round),
            f"peak_{config.metric}": peak_value, "peak_round": peak_round, **finals,
            "epsilon_max": max(eps) if eps else None, "seconds": last.get("time_total_s"),
            "run_dir": last.get("run_dir"), "error": error}


def _final(history: list[dict]) -> dict | None:
    """The final evaluation a trial reported with its last round, or else its run's
    metrics.json (a trial whose run had finished before the sweep was interrupted)."""
    if not history:
        return None
    reported = {k: v for k, v in history[-1].items()
                if k.startswith("final_") and _number(v) is not None}
    if reported:
        return reported
    raw = _get(f"{history[-1]['run_dir']}/metrics.json") if history[-1].get("run_dir") else None
    return final_metrics(json.loads(raw)) if raw else None


def _arrow(table: pd.DataFrame) -> Any:
    import pyarrow as pa

    try:
        return pa.Table.from_pandas(table, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # a searched field of mixed types
        mixed = table.astype({c: str for c in table.columns if table[c].dtype == object})
        return pa.Table.from_pandas(mixed, preserve_index=False)


def _plot(curves: dict[str, tuple[list[dict], str]], metric: str) -> bytes:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    for label, (history, status) in curves.items():
        ax.plot([h["round"] for h in history], [h[metric] for h in history], marker="o",
                linestyle="-" if status == "completed" else "--", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per round (dashed: stopped early or failed)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=7, loc="best")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def summarize(folder: str, grid: Any, sweep: Sweep,
              log: Callable[[str], None] = print) -> SweepResult:
    """The results table (printed; results.csv and results.parquet), curves.png and best.json."""
    import pandas as pd
    import pyarrow.parquet as pq

    c = sweep.config
    rows, curves = [], {}
    for result in grid:
        trial_id = Path(str(result.path)).name.removeprefix("trial_")
        history = _history(result.metrics_dataframe)
        error = str(result.error).strip().splitlines()[-1][:300] if result.error else None
        row = trial_row(trial_id, result.config, history, _final(history), error, c)
        rows.append(row)
        if history:
            label = trial_id + " " + " ".join(f"{k.rsplit('.', 1)[-1]}={row[k]}"
                                              for k in c.space)
            curves[label] = (history, row["status"])
    table = pd.DataFrame(rows)
    if not table.empty:  # finished trials by their saved model, then stopped ones by their peak
        table = table.sort_values([ranked_on(c), f"peak_{c.metric}", "trial_id"],
                                  ascending=[c.mode == "min", c.mode == "min", True],
                                  na_position="last")
    _put(folder, "results.csv", table.to_csv(index=False).encode())
    buffer = io.BytesIO()
    pq.write_table(_arrow(table), buffer)
    _put(folder, "results.parquet", buffer.getvalue())
    _put(folder, "curves.png", _plot(curves, c.metric))
    best = best_trial(rows, c)
    if best:
        best["epsilon_trial"] = next((r["epsilon_max"] for r in rows
                                      if r["trial_id"] == best["trial_id"]), None)
        best["privacy_total"] = sweep_privacy_total(rows)
        _put(folder, "best.json", json.dumps(best, indent=2).encode())
    log(_console_table(table, folder, c))
    for row in rows:
        if row["error"]:
            log(f"trial {row['trial_id']} failed: {row['error']}")
    if best:
        log(f"best: trial {best['trial_id']} {best['ranked_on']} {best['value']:.4f} (the model "
            f"of round {best['round']}); run folder {best['run_dir']}")
    log(f"results: {folder}/results.csv, results.parquet, curves.png"
        + (", best.json" if best else ""))
    return SweepResult(folder, table, best)


def sweep_privacy_total(rows: list[dict]) -> dict | None:
    """Every trial trained on the same hospitals' data: their ledgers composed (see
    fedray.privacy.totals). Trials on remote storage are read where they were downloaded to;
    a trial folder that cannot be read locally is named in `unread`."""
    from fedray.privacy.totals import total_epsilon

    local = [r["run_dir"] for r in rows if r.get("run_dir") and not _is_uri(r["run_dir"])
             and Path(r["run_dir"]).is_dir()]
    total = total_epsilon([Path(d) for d in local])
    unread = [r["run_dir"] for r in rows if r.get("run_dir") and r["run_dir"] not in local]
    if total is not None and unread:
        total["unread"] = unread
    return total


def _console_table(table: pd.DataFrame, folder: str, config: SweepConfig) -> str:
    """The table as printed: the sweep's metric among the final ones (all are in the CSV)."""
    if table.empty:
        return "no trials"
    name = config.metric.removeprefix("val_")
    columns = ["trial_id", "status", *config.space, "rounds", ranked_on(config), "saved_round",
               f"final_test_{name}", f"peak_{config.metric}", "peak_round", "epsilon_max",
               "seconds", "run_dir"]
    shown = table[columns].copy()
    shown["run_dir"] = [str(r).removeprefix(folder + "/") if isinstance(r, str) else r
                        for r in shown["run_dir"]]
    return shown.to_string(index=False, float_format=lambda x: f"{x:.4g}")


def best_trial(rows: list[dict], config: SweepConfig) -> dict | None:
    """The trial whose saved model scores best on the sweep's metric (its final validation
    evaluation); when no trial finished, the stopped one with the best value in any round
    (`ranked_on` says which)."""
    pick = max if config.mode == "max" else min
    for key, round_key in ((ranked_on(config), "saved_round"),
                           (f"peak_{config.metric}", "peak_round")):
        pool = [r for r in rows if _number(r[key]) is not None]
        if pool:
            row = pick(pool, key=lambda r: r[key])
            return {"trial_id": row["trial_id"], "run_dir": row["run_dir"],
                    "status": row["status"], "metric": config.metric, "mode": config.mode,
                    "ranked_on": key, "value": row[key], "round": row[round_key],
                    "params": {k: row[k] for k in config.space}}
    return None


# ---------------------------------------------------------------- the command line

def add_cli(sub: argparse._SubParsersAction) -> None:
    tune = sub.add_parser("tune", help="a Ray Tune sweep of federated runs (ASHA, resumable)")
    tune.add_argument("--config", type=Path, metavar="SWEEP_YAML", help="the sweep to run")
    tune.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="KEY=VALUE", help="override a field of the base experiment")
    tune.add_argument("--resume", metavar="SWEEP_DIR", help="continue an interrupted sweep")
    tune.add_argument("--output-dir", metavar="DIR_OR_URI",
                      help="where the sweep folder goes (default: the sweep's storage)")
    tune.set_defaults(func=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> int:
    if args.resume:
        if args.config or args.overrides or args.output_dir:
            raise SweepError("--resume continues the sweep as it was started; drop --config, "
                             "--set and --output-dir")
        result = resume_sweep(args.resume)
    else:
        if not args.config:
            raise SweepError("give --config SWEEP_YAML (or --resume SWEEP_DIR)")
        result = run_sweep(load_sweep(args.config, args.overrides), output_dir=args.output_dir)
    print(f"sweep: {result.folder}")
    failed = int((result.table["status"] == "error").sum()) if not result.table.empty else 0
    if failed:
        print(f"{failed} trial(s) failed; once fixed, continue with: "
              f"fedray tune --resume {result.folder}")
        return 1
    return 0
