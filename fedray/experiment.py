"""One federated run from a config: run folder, shards, Ray, the round loop, the final table.

Shared by the CLI, the Ray job entrypoints and the benchmarks, so all of them run the same path.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedray.config import ConfigError, ExperimentConfig, load_config
from fedray.data.pipeline import build_shards, counts_table, load_source
from fedray.data.shards import ShardSet
from fedray.metrics import format_table

# Where a run given shards made elsewhere (a sweep's, cross-validation's) records their counts;
# a run that makes its own keeps them in data/shards.json.
SHARDS_USED = "shards_used.json"


@dataclass
class RunResult:
    run_dir: Path
    final: dict
    history: list[dict]
    seconds: float


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
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"cannot resume {run_dir}: no config.yaml there (is it a run folder?)")
    return load_config(path, overrides)


def prepare_data(config: ExperimentConfig, run_dir: Path, log: Callable[[str], None]) -> ShardSet:
    shard_dir = run_dir / "data"
    if (shard_dir / "shards.json").is_file():
        return ShardSet.load(shard_dir)
    start = time.perf_counter()
    table = load_source(config.data, config.seed)
    shards = build_shards(table, config.data, config.federation.hospitals, config.seed, shard_dir)
    log(f"data: {table.num_rows} images from '{config.data.source}' split and sharded "
        f"in {time.perf_counter() - start:.1f}s ({config.data.partition.scheme} partition)")
    log(counts_table(shards))
    return shards


def record_shards(shards: ShardSet, run_dir: Path) -> None:
    """Note which shards a run trained on, and what they hold, in its own folder (the model
    card's per-hospital table reads it)."""
    record = {"root": str(Path(shards.root).resolve()), "counts": shards.counts}
    (run_dir / SHARDS_USED).write_text(json.dumps(record, indent=2))


def progress_line(record: dict, rounds: int) -> str:
    done = len(record["completed"])
    asked = len(record["selected"])
    losses = [h["loss"] for h in record["hospitals"].values()]
    train_loss = sum(losses) / len(losses) if losses else float("nan")
    parts = [f"round {record['round']}/{rounds}", f"hospitals {done}/{asked}",
             f"train loss {train_loss:.4f}"]
    if record["val"]:
        v = record["val"]
        parts.append(f"val loss {v['loss']:.4f} acc {v['accuracy']:.4f} "
                     f"bacc {v['balanced_accuracy']:.4f}")
    eps = [h["epsilon"] for h in record["hospitals"].values() if "epsilon" in h]
    if eps:
        parts.append(f"eps max {max(eps):.2f}")
    parts.append(f"lr {record['lr']:.2e}")
    t = record["timings"]
    parts.append(f"{t['fit_s'] + t['aggregate_s'] + t['evaluate_s']:.1f}s")
    if not record["counted"]:
        parts.append("NOT COUNTED (too few hospitals)")
    for f in record["failures"]:
        parts.append(f"[{f['hospital']} {f['kind']}]")
    return " | ".join(parts)


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
    import ray

    from fedray import runtime

    start = time.perf_counter()
    run_dir = Path(resume).resolve() if resume else new_run_dir(config, output_dir)
    (run_dir / "config.yaml").write_text(config.to_yaml())
    log(f"run folder: {run_dir}")
    if on_start:
        on_start(run_dir)
    if shards is None:
        shards = prepare_data(config, run_dir, log)
    else:
        record_shards(shards, run_dir)
    runtime.init_ray(config.runtime)
    coordinator = runtime.launch_coordinator(config, run_dir, shards, resume=resume is not None)
    try:
        first = runtime.call(coordinator.start_round)
        if resume:
            log(f"resuming after round {first}")
        while True:
            record = runtime.call(coordinator.run_round)
            if record is None:
                break
            log(progress_line(record, config.federation.rounds))
            if on_round:
                on_round(record)
        final = runtime.call(coordinator.finish)
    finally:
        ray.kill(coordinator)
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    seconds = time.perf_counter() - start
    log(f"finished: {final['stop_reason']}; best round {final['best_round']}; {seconds:.1f}s")
    log(format_table({k: final[k] for k in ("val", "test") if k in final}))
    return RunResult(run_dir, final, history, seconds)

