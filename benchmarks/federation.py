"""The whole `fedray train` process vs a plain PyTorch process and Flower's simulation engine.

Workload: 4 hospitals x ~512 synthetic 64 px images (a prepared dataset of 3072 images, split
by image 2/3 train, 1/6 val, 1/6 test, iid partition), resnet18, 1 local epoch of batch 32,
3 rounds, every hospital every round, the global model evaluated on the validation split
every round and on val and test at the end.

Each side is timed as a process, from spawn to exit, with the dataset already on disk:
  fedray  `fedray train --config <workload.yaml>`, as a user runs it: it starts its own local
          Ray, splits and shards the data, trains, evaluates and shuts Ray down. Its run
          folder's startup.json says where the start-up went.
  plain   one Python process, no Ray, all cores, the same sample-steps on the same shards
          (the compute limit).
  flower  benchmarks/peers/flower_fedavg.py on Flower's simulation engine, in its own
          environment (`make bench-peers` builds .venv-peers); left out, and said so, without it.
The shards of plain and Flower are built here from the same config and seed as fedray's; a
fedray that divides a pooled source into site folders (site mode) trains on the same images in
shards of the same sizes, split at each hospital ("fedray_data": "sites" in the result).

Writes benchmarks/results/federation.json ({"fedray_s", "limit_s", "flower_s", "ratio", ...});
each process's output goes to benchmarks/results/federation-<side>.log.

    python benchmarks/federation.py [--peers .venv-peers] [--rounds 3] [--per-hospital 512]
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

import pyarrow.parquet as pq
import torch
import yaml
from torch.utils.data import DataLoader

from fedray import engine
from fedray.config import load_config
from fedray.data import synth
from fedray.data.labels import CLASSES
from fedray.data.pipeline import build_shards, load_source
from fedray.data.shards import ShardDataset, ShardSet
from fedray.data.transforms import eval_preset, train_preset
from fedray.federation.messages import to_numpy, to_torch
from fedray.metrics import classification_metrics
from fedray.models import build_model
from fedray.strategy.aggregate import weighted_average

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FLOWER = ROOT / "benchmarks" / "peers" / "flower_fedavg.py"


def write_dataset(directory: Path, n: int, size: int) -> Path:
    """A prepared dataset (`data.source: prepared`): one manifest holding the image bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(synth.generate(n=n, size=size, seed=1), directory / "manifest.parquet")
    return directory


def write_config(path: Path, data: Path, runs: Path, args: argparse.Namespace) -> Path:
    """The workload as the YAML file a user would write."""
    config = {
        "name": "bench", "seed": 0, "output_dir": str(runs),
        "data": {"source": "prepared", "path": str(data), "image_size": args.size,
                 "split": {"train": 0.666666, "val": 0.166667, "test": 0.166667,
                           "group_aware": False},
                 "partition": {"scheme": "iid"}},
        "model": {"backbone": args.backbone},
        "training": {"local_epochs": 1, "batch_size": 32, "eval_batch_size": 128,
                     "early_stopping_patience": None},
        "federation": {"hospitals": args.hospitals, "rounds": args.rounds,
                       "min_clients": args.hospitals},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    load_config(path)  # fails here, not in a subprocess, if the workload is not a valid config
    return path


def timed(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> dict:
    """Run `cmd` to its end; its wall time from spawn to exit, and when each line came."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    lines: list[tuple[float, str]] = []
    start = time.perf_counter()
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            lines.append((time.perf_counter() - start, line.rstrip("\n")))
    wall = time.perf_counter() - start
    log.write_text("".join(f"{t:8.2f}  {text}\n" for t, text in lines))
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited {proc.returncode}; see {log}")
    return {"wall_s": wall, "lines": lines}


def last_json(lines: list[tuple[float, str]]) -> dict:
    """The last JSON object a process printed (its result; log lines may follow it)."""
    return json.loads(next(text for _, text in reversed(lines) if text.startswith("{")))


def first_line(lines: list[tuple[float, str]], prefix: str) -> tuple[float, str] | None:
    return next(((t, text) for t, text in lines if text.startswith(prefix)), None)


def run_fedray(config: Path, log: Path) -> dict:
    """`fedray train` as a user runs it, from spawn to exit."""
    script = Path(sys.executable).with_name("fedray")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "fedray.cli"]
    out = timed(cmd + ["train", "--config", str(config)], log)
    folder = first_line(out["lines"], "run folder: ")
    outputs = first_line(out["lines"], "outputs: ")
    run_dir = Path(outputs[1].removeprefix("outputs: "))
    startup = json.loads((run_dir / "startup.json").read_text())
    history = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = json.loads((run_dir / "metrics.json").read_text())
    if (run_dir / "data" / "shards.json").is_file():
        data, counts = "shards", ShardSet.load(run_dir / "data").counts
    else:  # site mode: the images divided into site folders, each split at its hospital
        data = "sites"
        counts = json.loads((run_dir / "data" / "sites.json").read_text())["sites"]
    return {
        "fedray_s": out["wall_s"],
        "fedray_to_run_folder_s": folder[0],
        "fedray_to_first_round_s": startup["process_to_first_round_s"],
        "fedray_rounds_s": sum(r["timings"]["fit_s"] + r["timings"]["aggregate_s"]
                               + r["timings"]["evaluate_s"] for r in history),
        "fedray_fit_s": sum(r["timings"]["fit_s"] for r in history),
        "fedray_fit_s_per_round": [r["timings"]["fit_s"] for r in history],
        "fedray_epsilon_max": max((h["epsilon"] for h in ((final.get("privacy") or {})
                                                          .get("hospitals") or {}).values()),
                                  default=None),
        "fedray_after_outputs_s": out["wall_s"] - outputs[0],
        "fedray_startup": startup,
        "val_accuracy": (history[-1].get("val") or {}).get("accuracy"),
        "test_accuracy": (final.get("test") or {}).get("accuracy"),
        "fedray_data": data,
        "shard_counts": counts,
    }


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
    test_pred = engine.predict(model, DataLoader(test, batch_size=t.eval_batch_size), device)
    return {"limit_compute_s": time.perf_counter() - start,
            "limit_val_accuracy": float((pred.probs.argmax(1) == pred.labels).mean()),
            "limit_test_accuracy": float((test_pred.probs.argmax(1) == test_pred.labels).mean())}


def run_limit_process(config: Path, shards: ShardSet, log: Path) -> dict:
    """The limit in a fresh interpreter, timed from spawn to exit."""
    out = timed([sys.executable, __file__, "--limit-only", str(shards.root),
                 "--config", str(config)], log)
    return {"limit_s": out["wall_s"], **last_json(out["lines"])}


def run_flower(peers: Path, shards: ShardSet, args: argparse.Namespace, log: Path) -> dict:
    """Flower's simulation engine in its own environment, timed from spawn to exit."""
    path = os.pathsep.join([str(ROOT), str(FLOWER.parent)])
    out = timed([str(peers / "bin" / "python"), str(FLOWER), "--shards", str(shards.root),
                 "--rounds", str(args.rounds), "--size", str(args.size),
                 "--backbone", args.backbone], log, env={"PYTHONPATH": path})
    result = last_json(out["lines"])
    return {"flower_s": out["wall_s"], **{f"flower_{k}": v for k, v in result.items()}}


def peers_version(peers: Path) -> str | None:
    try:
        return subprocess.run([str(peers / "bin" / "python"), "-c",
                               "import flwr; print(flwr.__version__)"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


WORKLOAD = ("hospitals", "per_hospital", "rounds", "size", "backbone")


def add_workload_args(parser: argparse.ArgumentParser, hospitals: int = 4,
                      per_hospital: int = 512) -> None:
    """The workload's flags (write_config reads them), shared with benchmarks/dp_round.py."""
    parser.add_argument("--hospitals", type=int, default=hospitals)
    parser.add_argument("--per-hospital", type=int, default=per_hospital)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--backbone", default="resnet18")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(parser)
    parser.add_argument("--peers", type=Path, default=ROOT / ".venv-peers",
                        help="the environment with Flower (make bench-peers)")
    parser.add_argument("--output", type=Path, default=RESULTS / "federation.json")
    parser.add_argument("--limit-only", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.limit_only:
        print(json.dumps(run_limit(load_config(args.config), ShardSet.load(args.limit_only))))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    flwr_version = peers_version(args.peers)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        n = args.hospitals * args.per_hospital * 3 // 2  # train is 2/3 of the images
        data = write_dataset(root / "prepared", n, args.size)
        config_path = write_config(root / "workload.yaml", data, root / "runs", args)
        config = load_config(config_path)
        shards = build_shards(load_source(config.data, config.seed), config.data,
                              args.hospitals, config.seed, root / "shards")
        limit = run_limit_process(config_path, shards, RESULTS / "federation-plain.log")
        print(f"plain PyTorch process: {limit['limit_s']:.1f}s "
              f"({limit['limit_compute_s']:.1f}s after its imports)")
        fed = run_fedray(config_path, RESULTS / "federation-fedray.log")
        if fed["fedray_data"] == "shards" and fed["shard_counts"] != shards.counts:
            raise RuntimeError("fedray's shards differ from the ones the peers trained on")
        if fed["fedray_data"] == "sites":
            print("fedray divided the same images into site folders and split each at its "
                  "hospital: the same sizes as the peers' shards, not the same rows")
        print(f"fedray train (local Ray, {args.hospitals} hospitals): "
              f"{fed['fedray_s']:.1f}s; first round after {fed['fedray_to_first_round_s']:.1f}s; "
              f"rounds {fed['fedray_rounds_s']:.1f}s; exit {fed['fedray_after_outputs_s']:.1f}s "
              "after its last line")
        flower = None
        if flwr_version:
            flower = run_flower(args.peers, shards, args, RESULTS / "federation-flower.log")
            print(f"Flower {flwr_version} simulation: {flower['flower_s']:.1f}s")
        else:
            print(f"Flower left out: no Flower in {args.peers} (make bench-peers builds it)")
    result = {**fed, **limit, **(flower or {}),
              "ratio": fed["fedray_s"] / limit["limit_s"],
              "ratio_compute": fed["fedray_s"] / limit["limit_compute_s"],
              "flower_ratio": flower["flower_s"] / limit["limit_s"] if flower else None,
              "fedray_vs_flower": fed["fedray_s"] / flower["flower_s"] if flower else None,
              "flower_version": flwr_version,
              "workload": {k: v for k, v in vars(args).items() if k in WORKLOAD},
              "load_average": {"before": load_before, "after": os.getloadavg()},
              "cpus": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__}
    line = f"fedray/plain {result['ratio']:.2f}"
    if flower:
        line += f"; Flower/plain {result['flower_ratio']:.2f}; fedray/Flower " \
                f"{result['fedray_vs_flower']:.2f}"
    print(line)
    result["command"] = " ".join(["python", "benchmarks/federation.py", *sys.argv[1:]])
    args.output.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
