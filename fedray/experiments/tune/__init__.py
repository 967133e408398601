"""Hyperparameter sweeps with Ray Tune: one trial is one complete federated run.

A sweep YAML names a base experiment and a search space over its dotted fields. Each trial's
config goes through `load_config` like any run; each trial reserves one placement group (the
coordinator's bundle, then one per hospital), so trials sit side by side without
oversubscribing; every round reports the global validation metrics, on which ASHA stops the
weak trials early. Ray Tune is imported inside the functions that run a sweep, never at import.

config.py holds the sweep's schema and loading, trial.py one trial (its resources, config, run
and the sweep folder's storage), results.py the table, plot and best trial.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from fedray.config import ExperimentConfig
from fedray.experiments.tune.config import (
    BASE_FILE,
    FINAL_KEYS,
    FIXED_FIELDS,
    KINDS,
    METRICS,
    PATH_FIELDS,
    RANKED,
    SHARD_FIELDS,
    SWEEP_FILE,
    VAL_KEYS,
    AshaConfig,
    Dimension,
    Sweep,
    SweepConfig,
    SweepError,
    load_sweep,
)
from fedray.experiments.tune.results import (
    SweepResult,
    best_trial,
    ranked_on,
    summarize,
    sweep_privacy_total,
    trial_row,
)
from fedray.experiments.tune.trial import (
    COORDINATOR_MIN_CPUS,
    HOSPITAL_CPUS,
    _get,
    _is_uri,
    _new_folder,
    _put,
    _trial_dirname,
    fetch_last_run,
    final_metrics,
    last_run,
    resolve_storage,
    round_metrics,
    run_trial,
    trial_config,
    trial_folder,
    trial_outgrows_cluster,
    trial_resources,
    unplaceable_trial,
)

__all__ = [
    "BASE_FILE", "COORDINATOR_MIN_CPUS", "FINAL_KEYS", "FIXED_FIELDS", "HOSPITAL_CPUS", "KINDS",
    "METRICS", "PATH_FIELDS", "RANKED", "SHARD_FIELDS", "SWEEP_FILE", "VAL_KEYS", "AshaConfig",
    "Dimension", "Sweep", "SweepConfig", "SweepError", "SweepResult", "add_cli", "best_trial",
    "cmd_tune", "fetch_last_run", "final_metrics", "last_run", "load_saved", "load_sweep",
    "ranked_on", "resolve_storage", "resume_sweep", "round_metrics", "run_sweep", "run_trial",
    "search_space", "summarize", "sweep_privacy_total", "trial_config", "trial_folder",
    "trial_outgrows_cluster", "trial_resources", "trial_row", "unplaceable_trial",
]


# ---------------------------------------------------------------- the sweep

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


def _shared_shards(sweep: Sweep, folder: str, log: Callable[[str], None]) -> str | None:
    """One set of shards for every trial (same split, same partition), made once in the sweep
    folder, when the space leaves them alone and that folder is local: trials on other nodes
    read it there, so it must be storage they all mount. With remote storage (a URI) each
    trial makes its own shards in its run folder."""
    if not sweep.shares_shards() or _is_uri(folder):
        return None
    from fedray.experiments import experiment

    experiment.prepare_data(sweep.base, Path(folder), log)
    return str(Path(folder) / "data")


def run_sweep(sweep: Sweep, *, output_dir: str | Path | None = None, verbose: int = 1,
              log: Callable[[str], None] = print) -> SweepResult:
    """Run every trial of the sweep on the connected (or a new local) Ray; write the table."""
    from ray import tune

    from fedray.federation import hosts, runtime

    storage = resolve_storage(output_dir if output_dir is not None else sweep.config.storage)
    runtime.init_ray(sweep.base.runtime)
    hosts.forget_idle()  # the trials' placement groups need the CPUs idle hosts hold
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

    from fedray.federation import hosts, runtime

    folder = resolve_storage(folder)
    sweep = load_saved(folder)
    runtime.init_ray(sweep.base.runtime)
    hosts.forget_idle()  # the trials' placement groups need the CPUs idle hosts hold
    if not tune.Tuner.can_restore(folder):
        raise SweepError(f"{folder}: no Tune experiment state to resume")
    shard_root = _shared_shards(sweep, folder, log)
    tuner = tune.Tuner.restore(folder, trainable=_trainable(sweep, folder, shard_root),
                               resume_unfinished=True, resume_errored=True)
    log(f"resuming sweep: {folder}")
    return summarize(folder, tuner.fit(), sweep, log)


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
