"""fedray's wall time vs a plain PyTorch process doing the same sample-steps (the compute limit).

Workload: 4 hospitals x 512 synthetic 64 px images, resnet18, 1 local epoch of batch 32,
3 rounds, every hospital every round, global evaluation on 512 images each round.
Both sides are timed as whole jobs on a running Ray: fedray from `experiment.run` (actor
start-up, shard decoding, rounds, final evaluation) to its return; the limit as a fresh Python
process, from spawn to exit (imports, decoding, the same steps). `limit_compute_s` is the
limit's time after its imports, and `ratio_compute` compares against that stricter figure.
Writes benchmarks/results/federation.json: {"fedray_s", "limit_s", "ratio", ...}.

    python benchmarks/federation.py [--rounds 3] [--per-hospital 512]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fedray  # noqa: F401  (loopback Ray defaults before Ray is imported)

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader

from fedray import engine
from fedray.config import load_config
from fedray.data import synth
from fedray.data.labels import CLASSES
from fedray.data.shards import ShardDataset, ShardSet, write_shard
from fedray.data.transforms import eval_preset, train_preset
from fedray.messages import to_numpy, to_torch
from fedray.metrics import classification_metrics
from fedray.models import build_model
from fedray.strategy.aggregate import weighted_average

RESULTS = Path(__file__).resolve().parent / "results"


def make_shards(root: Path, hospitals: int, per_hospital: int, eval_n: int, size: int) -> ShardSet:
    table = synth.generate(n=hospitals * per_hospital + 2 * eval_n, size=size, seed=1)
    order = np.random.default_rng(0).permutation(table.num_rows)
    table = table.take(pa.array(order))
    files = {}
    for h in range(hospitals):
        name = f"hospital_{chr(97 + h)}"
        write_shard(table.slice(h * per_hospital, per_hospital), root / f"{name}.parquet")
        files[name] = f"{name}.parquet"
    start = hospitals * per_hospital
    write_shard(table.slice(start, eval_n), root / "val.parquet")
    write_shard(table.slice(start + eval_n, eval_n), root / "test.parquet")
    shards = ShardSet(root=root, hospitals=files, val="val.parquet", test="test.parquet")
    shards.save()
    return shards


def bench_config(out: Path, hospitals: int, rounds: int, size: int, backbone: str):
    return load_config(None, [
        "name=bench", f"output_dir={out}", f"data.image_size={size}", f"model.backbone={backbone}",
        "training.local_epochs=1", "training.batch_size=32", "training.eval_batch_size=128",
        f"federation.hospitals={hospitals}", f"federation.rounds={rounds}",
        f"federation.min_clients={hospitals}", "training.early_stopping_patience=null",
    ])


def run_fedray(config, shards: ShardSet) -> dict:
    import ray

    from fedray import experiment, runtime

    runtime.init_ray(config.runtime)
    ray.get(ray.remote(lambda: 0).remote())  # cluster warm, as on a running cluster
    start = time.perf_counter()
    result = experiment.run(config, shards=shards, log=lambda _: None)
    wall = time.perf_counter() - start
    fit = sum(r["timings"]["fit_s"] for r in result.history)
    evaluate = sum(r["timings"]["evaluate_s"] for r in result.history)
    ray.shutdown()
    return {"fedray_s": wall, "fedray_fit_s": fit, "fedray_eval_s": evaluate,
            "val_accuracy": result.history[-1]["val"]["accuracy"]}


def run_limit(config, shards: ShardSet) -> dict:
    """Same sample-steps in one process, all cores, no Ray: decode, train, average, evaluate."""
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    size, t = config.data.image_size, config.training
    datasets = {n: ShardDataset.from_parquet(shards.path(f), size, train_preset(size))
                for n, f in sorted(shards.hospitals.items())}
    val = ShardDataset.from_parquet(shards.path(shards.val), size, eval_preset(size))
    test = ShardDataset.from_parquet(shards.path(shards.test), size, eval_preset(size))
    torch.manual_seed(config.seed)
    model = build_model(config.model.backbone)
    optimizers = {n: engine.make_optimizer(model, t.lr, t.weight_decay) for n in datasets}
    losses = {n: engine.make_loss(d.class_counts(), t.label_smoothing) for n, d in datasets.items()}
    weights = to_numpy(model.state_dict())
    device = torch.device("cpu")
    for r in range(config.federation.rounds):
        updates = []
        for name, data in datasets.items():
            model.load_state_dict(to_torch(weights))
            loader = DataLoader(data, batch_size=t.batch_size, shuffle=True,
                                generator=torch.Generator().manual_seed(r))
            engine.train_one_epoch(model, loader, optimizers[name], losses[name], device,
                                   grad_clip=t.grad_clip)
            updates.append((to_numpy(model.state_dict()), len(data)))
        weights = weighted_average(updates)
        model.load_state_dict(to_torch(weights))
        pred = engine.predict(model, DataLoader(val, batch_size=t.eval_batch_size), device)
        classification_metrics(pred.labels, pred.probs, list(CLASSES))
    pred = engine.predict(model, DataLoader(val, batch_size=t.eval_batch_size), device)
    engine.predict(model, DataLoader(test, batch_size=t.eval_batch_size), device)
    return {"limit_compute_s": time.perf_counter() - start,
            "limit_val_accuracy": float((pred.probs.argmax(1) == pred.labels).mean())}


def run_limit_process(args: argparse.Namespace, shards: ShardSet, runs: Path) -> dict:
    """The limit in a fresh interpreter, timed from spawn to exit."""
    cmd = [sys.executable, __file__, "--limit-only", str(shards.root), "--runs", str(runs),
           "--hospitals", str(args.hospitals), "--rounds", str(args.rounds),
           "--size", str(args.size), "--backbone", args.backbone]
    start = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return {"limit_s": time.perf_counter() - start, **json.loads(out.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hospitals", type=int, default=4)
    parser.add_argument("--per-hospital", type=int, default=512)
    parser.add_argument("--eval", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--output", type=Path, default=RESULTS / "federation.json")
    parser.add_argument("--limit-only", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.limit_only:
        config = bench_config(args.runs, args.hospitals, args.rounds, args.size, args.backbone)
        print(json.dumps(run_limit(config, ShardSet.load(args.limit_only))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = make_shards(root / "shards", args.hospitals, args.per_hospital, args.eval, args.size)
        config = bench_config(root / "runs", args.hospitals, args.rounds, args.size, args.backbone)
        limit = run_limit_process(args, shards, root / "runs")
        print(f"limit (one plain PyTorch process): {limit['limit_s']:.1f}s "
              f"({limit['limit_compute_s']:.1f}s after imports)")
        fed = run_fedray(config, shards)
        print(f"fedray (Ray, {args.hospitals} hospital actors + coordinator): {fed['fedray_s']:.1f}s")
    result = {**fed, **limit, "ratio": fed["fedray_s"] / limit["limit_s"],
              "ratio_compute": fed["fedray_s"] / limit["limit_compute_s"],
              "workload": {k: v for k, v in vars(args).items() if k in (
                  "hospitals", "per_hospital", "eval", "rounds", "size", "backbone")},
              "cpus": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__}
    print(f"ratio fedray/limit: {result['ratio']:.3f} "
          f"(against the limit's post-import time: {result['ratio_compute']:.3f})")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
