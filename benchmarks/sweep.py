"""A sweep through Ray Tune vs the same runs one after another through experiment.run.

Workload: the trials of configs/sweep-demo.yaml (4: two learning rates x smallcnn/resnet18,
2 hospitals, 32 px synthetic smears) with ASHA off, so both sides train every round of every
trial. Tune runs them side by side as their placement groups allow (two at once on 2 cores);
the sequential side runs the same configs, validated the same way, on the same running Ray.
Both sides make their shards once and share them between the runs, and both are timed from
the shards to the last run's final evaluation. Writes benchmarks/results/sweep.json:
{"tune_s", "sequential_s", "ratio" (target <= 1.15), "failed_for_resources", ...}.

    python benchmarks/sweep.py [--config configs/sweep-demo.yaml] [--set federation.rounds=1 ...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import fedray  # noqa: F401  (loopback Ray defaults before Ray is imported)

from fedray.experiments import experiment
from fedray.federation import runtime
from fedray.experiments import tune as sweeps

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 1.15
# What a trial that could not get its resources fails with (runtime.StartupError, the sweep's
# own check before it starts).
RESOURCE_ERRORS = ("did not start within", "fits no node", "one trial reserves", "can host")


def trial_params(sweep: sweeps.Sweep) -> list[dict]:
    """Every grid point of the sweep: the trials Tune runs."""
    space = sweep.config.space
    if sweep.config.search != "grid":
        raise SystemExit("the benchmark needs a grid sweep (search: grid), so both sides run "
                         "the same trials")
    return [dict(zip(space, values))
            for values in itertools.product(*(dim.extremes() for dim in space.values()))]


def run_sequential(sweep: sweeps.Sweep, out: Path) -> dict:
    start = time.perf_counter()
    shards = experiment.prepare_data(sweep.base, out, lambda _: None)
    results = [experiment.run(sweeps.trial_config(sweep.base_yaml, params),
                              output_dir=out / "runs", shards=shards, log=lambda _: None)
               for params in trial_params(sweep)]
    return {"sequential_s": time.perf_counter() - start,
            "sequential_val_balanced_accuracy": [r.history[-1]["val"]["balanced_accuracy"]
                                                 for r in results]}


def run_tune(sweep: sweeps.Sweep, out: Path) -> dict:
    start = time.perf_counter()
    try:
        result = sweeps.run_sweep(sweep, output_dir=out, verbose=0, log=lambda _: None)
    except sweeps.SweepError as exc:  # no trial fits the cluster
        return {"tune_s": None, "failed_for_resources": True, "trial_errors": [str(exc)]}
    seconds = time.perf_counter() - start
    table = result.table
    errors = [e for e in table["error"] if isinstance(e, str)]
    return {"tune_s": seconds, "trial_status": list(table["status"]), "trial_errors": errors,
            "failed_for_resources": any(k in e for e in errors for k in RESOURCE_ERRORS),
            "trial_seconds": [float(s) for s in table["seconds"]]}


def _shown(path: Path) -> str:
    """The config as the repository names it (results files hold no machine's paths)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return Path(path).name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "sweep-demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a field of the base experiment")
    parser.add_argument("--output", type=Path, default=RESULTS / "sweep.json")
    args = parser.parse_args()
    sweep = sweeps.load_sweep(args.config, args.overrides)
    sweep.config.asha.enabled = False  # the same work on both sides
    import ray

    runtime.init_ray(sweep.base.runtime)
    ray.get(ray.remote(lambda: 0).remote())  # cluster warm, as on a running cluster
    with tempfile.TemporaryDirectory() as tmp:
        sequential = run_sequential(sweep, Path(tmp) / "sequential")
        print(f"sequential ({len(trial_params(sweep))} runs through experiment.run): "
              f"{sequential['sequential_s']:.1f}s")
        tuned = run_tune(sweep, Path(tmp) / "tune")
        print(f"ray tune ({len(trial_params(sweep))} trials, "
              f"{sweeps.trial_resources(sweep.base)} each): "
              + (f"{tuned['tune_s']:.1f}s" if tuned["tune_s"] else "did not run"))
    ratio = tuned["tune_s"] / sequential["sequential_s"] if tuned["tune_s"] else None
    result = {**tuned, **sequential, "ratio": ratio, "target": TARGET,
              "within_target": ratio is not None and ratio <= TARGET,
              "workload": {"config": _shown(args.config), "overrides": args.overrides,
                           "trials": trial_params(sweep),
                           "bundles": sweeps.trial_resources(sweep.base),
                           "rounds": sweep.base.federation.rounds},
              "cpus": os.cpu_count(), "cluster": ray.cluster_resources(),
              "machine": platform.machine()}
    if ratio is not None:
        print(f"ratio tune/sequential: {ratio:.3f} (target <= {TARGET})")
    print(f"failed for lack of resources: {tuned['failed_for_resources']}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    result["command"] = " ".join(["python", "benchmarks/sweep.py", *sys.argv[1:]])
    args.output.write_text(json.dumps(result, indent=2))
    ray.shutdown()


if __name__ == "__main__":
    main()
