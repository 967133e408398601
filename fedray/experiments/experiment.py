"""One federated run from a config: run folder, shards, Ray, the round loop, the final table.

Shared by the CLI, the Ray job entrypoints and the benchmarks, so all of them run the same path.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fedray.artifacts import atomic
from fedray.artifacts import run_folder as rf
from fedray.config import ConfigError, ExperimentConfig, load_config
from fedray.data.labels import CLASSES
from fedray.metrics import format_table

if TYPE_CHECKING:  # torch, scikit-learn: imported once the hospitals' processes are starting
    from fedray.data.shards import ShardSet

# Where a run given shards made elsewhere (a sweep's, cross-validation's) records their counts;
# a run that makes its own keeps them in data/shards.json.
SHARDS_USED = rf.SHARDS_USED
# Where each run records how long it took to reach its first round, and why.
STARTUP = rf.STARTUP


@dataclass
class RunResult:
    run_dir: Path
    final: dict
    history: list[dict]
    seconds: float
    startup: dict = field(default_factory=dict)


def new_run_dir(config: ExperimentConfig, output_dir: Path | None = None) -> Path:
    parent = Path(output_dir or config.output_dir).expanduser().resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = parent / f"{config.name}-{stamp}"
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = parent / f"{config.name}-{stamp}-{suffix}"
    run_dir.mkdir(parents=True)
    return run_dir


def load_run_config(run_dir: Path, overrides: list[str] | None = None) -> ExperimentConfig:
    path = run_dir / rf.CONFIG
    if not path.is_file():
        raise ConfigError(f"cannot resume {run_dir}: no config.yaml there (is it a run folder?)")
    return load_config(path, overrides)


def prepare_data(config: ExperimentConfig, run_dir: Path,
                 log: Callable[[str], None]) -> ShardSet | None:
    """The run's shards; None in site mode, where each hospital reads its own folder and the
    driver opens no image."""
    from fedray.data.pipeline import build_shards, counts_table, load_source
    from fedray.data.shards import ShardSet

    if config.data.source == "sites":
        log(f"data: {len(config.data.sites)} sites; each hospital reads, splits and evaluates "
            "on its own folder")
        return None
    shard_dir = run_dir / rf.DATA
    if (shard_dir / "shards.json").is_file():
        return ShardSet.load(shard_dir)
    start = time.perf_counter()
    table = load_source(config.data, config.seed)
    shards = build_shards(table, config.data, config.federation.hospitals, config.seed, shard_dir)
    log(f"data: {table.num_rows} images from '{config.data.source}' split and sharded "
        f"in {time.perf_counter() - start:.1f}s ({config.data.partition.scheme} partition)")
    log(counts_table(shards))
    return shards


SIMULATED_SITES = rf.SITES


def simulate_sites(config: ExperimentConfig, run_dir: Path,
                   log: Callable[[str], None]) -> ExperimentConfig:
    """One training path: a pooled source (synth, folder, prepared) is divided into one site
    folder per hospital inside the run (`fedray data split-sites`, the simulation tool), and
    the run goes on in site mode, each hospital reading only its folder. A resumed run finds
    its site folders in place."""
    from fedray.config import SiteConfig
    from fedray.data import partition, sites
    from fedray.data.pipeline import load_source

    root = run_dir / SIMULATED_SITES
    names = partition.hospital_names(config.federation.hospitals)
    if not all((root / name / sites.MANIFEST).is_file() for name in names):
        start = time.perf_counter()
        table = load_source(config.data, config.seed)
        sites.split_sites(table, config.data, config.federation.hospitals, config.seed, root)
        log(f"data: {table.num_rows} images from '{config.data.source}' divided into "
            f"{len(names)} site folders in {time.perf_counter() - start:.1f}s "
            f"({config.data.partition.scheme} partition; whole patients per site)")
    data = config.data.model_copy(update={
        "source": "sites",
        "sites": {n: SiteConfig(path=root / n, state_dir=rf.hospital_dir(run_dir, n)) for n in names}})
    return config.model_copy(update={"data": data})


def record_shards(shards: ShardSet, run_dir: Path) -> None:
    """Note which shards a run trained on, and what they hold, in its own folder (the model
    card's per-hospital table reads it)."""
    record = {"root": str(Path(shards.root).resolve()), "counts": shards.counts}
    atomic.write_json(run_dir / SHARDS_USED, record)


def site_table(hospitals: dict[str, dict]) -> str | None:
    """Each site's local split as counts (all a site sends of its data), for the console."""
    rows = [(f"{name} {split}", counts) for name, info in sorted(hospitals.items())
            for split, counts in (info.get("splits") or {}).items()]
    if not rows:
        return None
    width = max(len(n) for n, _ in rows) + 2
    columns = list(CLASSES) if all(set(c) <= set(CLASSES) for _, c in rows) else ["total"]
    lines = ["site split".ljust(width) + "".join(c.rjust(8) for c in columns) + "total".rjust(8)]
    for name, counts in rows:
        cells = "".join(str(counts.get(c, 0)).rjust(8) for c in columns) if columns != ["total"] else ""
        lines.append(name.ljust(width) + cells + str(sum(counts.values())).rjust(8))
    return "\n".join(lines)


def evaluate_at_sites(config: ExperimentConfig, weights: dict, split: str = "test",
                      work_dir: Path | None = None) -> dict[str, dict]:
    """Score one model at every site (see fedray.federation.runtime.evaluate_at_sites)."""
    from fedray.federation import runtime

    return runtime.evaluate_at_sites(config, weights, split, work_dir)


def record_sites(hospitals: dict[str, dict], run_dir: Path) -> None:
    """The sites' class tables (counts, as they sent them) in the run folder (data/sites.json)."""
    counts = {name: info.get("splits") for name, info in sorted(hospitals.items())}
    atomic.write_json(run_dir / rf.DATA / rf.SITE_COUNTS, {"sites": counts})


def progress_line(record: dict, rounds: int) -> str:
    done = len(record["completed"])
    asked = len(record["selected"])
    losses = [h["loss"] for h in record["hospitals"].values() if "loss" in h]
    parts = [f"round {record['round']}/{rounds}", f"hospitals {done}/{asked}"]
    if losses:  # not shared under DP unless privacy.share_local_metrics
        parts.append(f"train loss {sum(losses) / len(losses):.4f}")
    if record["val"]:
        v = record["val"]
        parts.append(f"val loss {v['loss']:.4f} acc {v['accuracy']:.4f} "
                     f"bacc {v['balanced_accuracy']:.4f}")
    eps = [h["epsilon"] for h in record["hospitals"].values() if "epsilon" in h]
    if eps:
        parts.append(f"eps max {max(eps):.2f}")
    if record.get("dp_warning"):
        parts.append("EPSILON IS NOT A GUARANTEE (privacy.reproducible_noise)")
    parts.append(f"lr {record['lr']:.2e}")
    t = record["timings"]
    parts.append(f"{t['fit_s'] + t['aggregate_s'] + t['evaluate_s']:.1f}s")
    if not record["counted"]:
        parts.append("NOT COUNTED (too few hospitals)")
    for f in record["failures"]:
        parts.append(f"[{f['hospital']} {f['kind']}]")
    return " | ".join(parts)


def startup_line(startup: dict) -> str:
    """One line: how long the run took to reach its first round, and where the time went."""
    parts = [f"start-up: first round after {startup['to_first_round_s']:.1f}s"]
    if startup.get("process_to_first_round_s") is not None:
        parts[0] += f" ({startup['process_to_first_round_s']:.1f}s since the process started)"
    parts.append(f"data {startup['data_s']:.1f}s, Ray {startup['ray_s']:.1f}s")
    hospitals = startup.get("hospitals") or {}
    if hospitals:
        name, slow = max(hospitals.items(), key=lambda kv: kv[1]["ready_s"])
        parts.append(f"hospitals ready {slow['ready_s']:.1f}s after launch (slowest {name}: "
                     f"{slow['to_init_s']:.1f}s to start and import, {slow['init_s']:.1f}s "
                     "to load its shard and model)")
    coordinator = startup.get("coordinator")
    if coordinator:
        parts.append(f"coordinator in the {startup['coordinator_in']}, built in "
                     f"{coordinator['build_s']:.1f}s")
    return "; ".join(parts)


def run(config: ExperimentConfig, *, output_dir: Path | None = None, resume: Path | None = None,
        log: Callable[[str], None] = print,
        on_round: Callable[[dict], None] | None = None,
        shards: ShardSet | None = None,
        on_start: Callable[[Path], None] | None = None) -> RunResult:
    """Train (or resume) one federated run and evaluate its best global model.

    `shards` skips data preparation with shards made elsewhere (benchmarks, cross-validation,
    sweeps); the run folder records their counts.
    `on_start` learns the run folder before the first round (a sweep's trial reports it).
    """
    from fedray.federation import hosts, placement

    start = time.perf_counter()
    run_dir = Path(resume).resolve() if resume else new_run_dir(config, output_dir)
    atomic.write_text(run_dir / rf.CONFIG, config.to_yaml())  # a failed start can resume
    # Ray, then the hospitals' processes first: they start and import torch while this
    # process imports its own and reads the data
    ray_start = time.perf_counter()
    placement.init_ray(config.runtime)
    ray_s = time.perf_counter() - ray_start
    plan = placement.plan_hosts(config, placement.hospital_names(
        config, list(shards.hospitals) if shards is not None else None))
    if plan.group is None:  # a Tune trial's processes start in its placement group, later
        hosts.prestart(plan.options, plan.takes_idle)
    from fedray.federation import runtime

    try:
        if shards is None and config.data.source != "sites":
            config = simulate_sites(config, run_dir, log)
            atomic.write_text(run_dir / rf.CONFIG, config.to_yaml())
        log(f"run folder: {run_dir}")
        if on_start:
            on_start(run_dir)
        data_start = time.perf_counter()
        if shards is None:
            shards = prepare_data(config, run_dir, log)
        else:
            record_shards(shards, run_dir)
        data_s = time.perf_counter() - data_start
    except BaseException:
        hosts.discard_prestarted()  # the processes started for this run, which will not launch
        raise
    launched = time.perf_counter()
    coordinator = runtime.launch_coordinator(config, run_dir, shards, resume=resume is not None,
                                             plan=plan)
    try:
        first = coordinator.start_round()
        process = runtime.process_started()
        startup = {
            "to_first_round_s": time.perf_counter() - start,
            "process_to_first_round_s": time.time() - process if process else None,
            "data_s": data_s, "ray_s": ray_s,
            "launch_to_first_round_s": time.perf_counter() - launched,
            "coordinator_in": coordinator.where, **coordinator.startup()}
        atomic.write_json(run_dir / STARTUP, startup)
        log(startup_line(startup))
        if shards is None:
            hospitals = coordinator.hospitals()
            record_sites(hospitals, run_dir)
            table = site_table(hospitals)
            if table:
                log(table)
        if resume:
            log(f"resuming after round {first}")
        while True:
            record = coordinator.run_round()
            if record is None:
                break
            log(progress_line(record, config.federation.rounds))
            if on_round:
                on_round(record)
        final = coordinator.finish()
    finally:
        coordinator.close()
    history = [json.loads(line) for line in (run_dir / rf.METRICS_JSONL).read_text().splitlines()]
    seconds = time.perf_counter() - start
    log(f"finished: {final['stop_reason']}; best round {final['best_round']}; {seconds:.1f}s, "
        f"{startup['to_first_round_s']:.1f}s of it to the first round")
    log(format_table({k: final[k] for k in ("val", "test") if k in final}))
    if final.get("worst_site"):
        w = final["worst_site"]
        log(f"worst site: {w['hospital']} (test balanced accuracy {w['balanced_accuracy']:.4f})")
    return RunResult(run_dir, final, history, seconds, startup)


def evaluate_run(run_dir: Path, split: str = "test") -> dict:
    """A run's saved model on one of its held-out splits: its shards, or, for a site-mode run,
    at its sites, where each hospital scores it on its local split and sends counts (pooled
    metrics, with `sites` beside them); written to evaluation_<split>.json."""
    from fedray.artifacts import checkpoint, run_folder

    run_dir = Path(run_dir)
    config = run_folder.load_run_config(run_dir)
    if config.data.source != "sites" or (run_dir / run_folder.DATA / run_folder.SHARDS).is_file():
        return run_folder.evaluate_run(run_dir, split)
    from fedray.federation import runtime

    weights = checkpoint.load_weights(run_folder.run_weights(run_dir))
    scores = runtime.evaluate_at_sites(config, weights, split, work_dir=run_dir)
    if "pooled" not in scores:
        raise ValueError(f"{run_dir}: no site holds a local '{split}' split")
    metrics = {**scores.pop("pooled"), "sites": scores}
    atomic.write_json(run_folder.evaluation_path(run_dir, split), metrics)
    return metrics
