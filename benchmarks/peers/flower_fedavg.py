"""Flower's simulation engine on the federation benchmark's workload, as a Flower user writes it.

A ClientApp (one per hospital shard) and a ServerApp running Flower's FedAvg, started with
`flwr.simulation.run_simulation` on Flower's Ray backend with its default client resources.
The work per step is fedray's: the same shards, model (`fedray.models.build_model`),
presets, AdamW, class-weighted loss and epoch loop (`fedray.engine.train_one_epoch`), so only
the federation machinery differs. Each simulated hospital keeps its decoded shard, model and
optimizer in its actor between rounds, as fedray's hospitals do. The server evaluates the
global model on the validation shard every round, and on validation and test at the end.

benchmarks/federation.py runs it in its own environment (`make bench-peers` builds
.venv-peers), with the repository on PYTHONPATH, and times the process from spawn to exit:

    PYTHONPATH=.:benchmarks/peers .venv-peers/bin/python benchmarks/peers/flower_fedavg.py \
        --shards SHARD_DIR [--rounds 3]

Prints one JSON line: val/test accuracy, and the seconds from the start of this process until
the server was ready (`server_ready_s`) and until the first round was aggregated.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

STARTED = time.perf_counter()
SETTINGS = "FEDRAY_FLOWER_BENCH"  # the run's settings, read by every ClientApp's process

_hospitals: dict[int, dict] = {}  # per actor process: partition id -> shard, model, optimizer


def settings() -> dict:
    return json.loads(os.environ[SETTINGS])


def _hospital(partition: int) -> dict:
    """This actor's state for one hospital, built on its first round."""
    if partition not in _hospitals:
        import torch

        from fedray import engine
        from fedray.data.shards import ShardDataset, ShardSet
        from fedray.data.transforms import train_preset
        from fedray.models import build_model

        s = settings()
        torch.set_num_threads(s["threads"])
        shards = ShardSet.load(Path(s["shards"]))
        name = sorted(shards.hospitals)[partition]
        data = ShardDataset.from_parquet(shards.path(shards.hospitals[name]), s["size"],
                                         train_preset(s["size"]))
        model = build_model(s["backbone"], dropout=s["dropout"])
        _hospitals[partition] = {
            "data": data, "model": model, "generator": torch.Generator(),
            "optimizer": engine.make_optimizer(model, s["lr"], s["weight_decay"]),
            "loss": engine.make_loss(data.class_counts(), s["label_smoothing"]),
        }
    return _hospitals[partition]


def make_client_app():
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        import torch
        from torch.utils.data import DataLoader

        from fedray import engine

        s = settings()
        partition = int(context.node_config["partition-id"])
        h = _hospital(partition)
        h["model"].load_state_dict(msg.content["arrays"].to_torch_state_dict())
        server_round = int(msg.content["config"]["server-round"])
        h["generator"].manual_seed(server_round * 1_009 + partition)
        loader = DataLoader(h["data"], batch_size=s["batch_size"], shuffle=True,
                            generator=h["generator"])
        stats = None
        for _ in range(s["local_epochs"]):
            stats = engine.train_one_epoch(h["model"], loader, h["optimizer"], h["loss"],
                                           torch.device("cpu"), grad_clip=s["grad_clip"])
        metrics = MetricRecord({"train_loss": stats.loss, "num-examples": len(h["data"])})
        content = RecordDict({"arrays": ArrayRecord(h["model"].state_dict()), "metrics": metrics})
        return Message(content=content, reply_to=msg)

    return app


def make_server_app(result: dict):
    from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        import torch
        from torch.utils.data import DataLoader

        from fedray import engine
        from fedray.data.shards import ShardDataset, ShardSet
        from fedray.data.transforms import eval_preset
        from fedray.models import build_model

        s = settings()
        torch.manual_seed(s["seed"])
        shards = ShardSet.load(Path(s["shards"]))
        model = build_model(s["backbone"], dropout=s["dropout"])
        evals = {split: ShardDataset.from_parquet(shards.path(f), s["size"], eval_preset(s["size"]))
                 for split, f in (("val", shards.val), ("test", shards.test))}

        def accuracy(split: str, arrays: ArrayRecord) -> float:
            model.load_state_dict(arrays.to_torch_state_dict())
            pred = engine.predict(model, DataLoader(evals[split], batch_size=s["eval_batch_size"]),
                                  torch.device("cpu"))
            return float((pred.probs.argmax(1) == pred.labels).mean())

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            if server_round == 0:  # the initial model, before round 1 is sent out
                result["server_ready_s"] = time.perf_counter() - STARTED
                return MetricRecord({})
            if server_round == 1:
                result["first_round_done_s"] = time.perf_counter() - STARTED
            return MetricRecord({"val_accuracy": accuracy("val", arrays)})

        hospitals = len(shards.hospitals)
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=hospitals,
                          min_available_nodes=hospitals)
        final = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
                               num_rounds=s["rounds"], evaluate_fn=evaluate,
                               train_config=ConfigRecord({}))
        result["val_accuracy"] = accuracy("val", final.arrays)
        result["test_accuracy"] = accuracy("test", final.arrays)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, required=True, help="a fedray shard folder")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads per ClientApp (Flower's default: 2 CPUs a client)")
    args = parser.parse_args()
    from fedray.data.shards import ShardSet

    hospitals = len(ShardSet.load(args.shards).hospitals)
    # fedray's defaults for the benchmark's config (benchmarks/federation.py writes it).
    os.environ[SETTINGS] = json.dumps({
        "shards": str(args.shards.resolve()), "rounds": args.rounds, "size": args.size,
        "backbone": args.backbone, "threads": args.threads, "seed": 0, "dropout": 0.2,
        "lr": 1e-4, "weight_decay": 1e-4, "label_smoothing": 0.1, "grad_clip": 1.0,
        "batch_size": 32, "eval_batch_size": 128, "local_epochs": 1})
    from flwr.simulation import run_simulation

    result: dict = {}
    run_simulation(server_app=make_server_app(result), client_app=make_client_app(),
                   num_supernodes=hospitals)
    print(json.dumps(result))


if __name__ == "__main__":
    # Run as the importable module (benchmarks/peers on PYTHONPATH), so the ClientApp's
    # functions and its per-process state pickle by reference into Flower's actors.
    import flower_fedavg

    flower_fedavg.main()
