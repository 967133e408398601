"""The papers' comparison point: the same backbone and recipe trained on the union of the
hospital shards, data-parallel through Ray Train (TorchTrainer, one process per worker).

It sees the same images for the same number of epochs as a federated run (rounds x local
epochs), so the gap between the two is the cost of federation, not of a different budget.
On a real cluster `run_dir` must be storage every worker can reach.

In site mode (`run_centralized_sites`) the baseline is a simulation: the driver reads every
site folder, splits each exactly as its hospital does (`split_site`, same seed), trains on the
union of the local train splits and scores each site's local test split. No consortium could
run it; it bounds what pooling the data would buy.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from fedray import engine
from fedray.artifacts import checkpoint, run_folder
from fedray.models import input_size
from fedray.config import ExperimentConfig
from fedray.data.labels import CLASSES
from fedray.data.shards import ShardDataset, ShardSet
from fedray.data.transforms import eval_preset, train_preset
from fedray.federation.messages import to_numpy
from fedray.metrics import classification_metrics
from fedray.models import build_model


def _evaluate(model: torch.nn.Module, dataset: Dataset, config: ExperimentConfig,
              device: torch.device) -> dict:
    loader = DataLoader(dataset, batch_size=config.training.eval_batch_size)
    pred = engine.predict(model, loader, device)
    metrics = classification_metrics(pred.labels, pred.probs, list(CLASSES))
    metrics["loss"] = pred.loss
    return metrics


def train_loop(loop_config: dict) -> None:
    """What every Ray Train worker runs: plain engine epochs over its slice of the union."""
    import ray.train
    import ray.train.torch

    config = ExperimentConfig.model_validate(loop_config["config"])
    torch.set_num_threads(loop_config["threads"])
    files = loop_config["files"]
    run_dir = Path(loop_config["run_dir"])
    size, t, m = input_size(config), config.training, config.model

    def read(path: str) -> ShardDataset:
        return ShardDataset.from_parquet(Path(path), size, eval_preset(size))

    parts = [ShardDataset.from_parquet(Path(f), size, train_preset(size, config.data.augment),
                                       expand_flips=config.data.flip_x4) for f in files["train"]]
    counts = sum(p.class_counts() for p in parts)
    loader = ray.train.torch.prepare_data_loader(
        DataLoader(ConcatDataset(parts), batch_size=t.batch_size, shuffle=True))
    torch.manual_seed(config.seed)
    model = build_model(m.backbone, pretrained=m.pretrained, freeze=m.freeze, dp_safe=m.dp_safe,
                        dropout=m.dropout, weights_dir=m.weights_dir)
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    optimizer = engine.make_optimizer(model, t.lr, t.weight_decay)
    loss_fn = engine.make_loss(counts if t.class_weighted else None, t.label_smoothing).to(device)
    rank = ray.train.get_context().get_world_rank()
    val = ConcatDataset([read(f) for f in files["val"]]) if files["val"] else None
    plain = model.module if hasattr(model, "module") else model
    epochs = config.federation.rounds * t.local_epochs
    for epoch in range(1, epochs + 1):
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        stats = engine.train_one_epoch(model, loader, optimizer, loss_fn, device,
                                       grad_clip=t.grad_clip, amp=t.amp, channels_last=t.channels_last)
        record = {"epoch": epoch, "train_loss": stats.loss, "train_accuracy": stats.accuracy}
        if rank == 0:
            if val is not None:
                v = _evaluate(plain, val, config, device)
                record["val"] = {k: v[k] for k in ("loss", "accuracy", "balanced_accuracy", "macro_f1")}
            with open(run_dir / run_folder.METRICS_JSONL, "a") as f:
                f.write(json.dumps(record) + "\n")
        ray.train.report({"epoch": epoch, "train_loss": stats.loss})
    if rank == 0:
        final = {"rounds": epochs, "stop_reason": "completed all epochs (centralized)",
                 "best_round": epochs}
        if val is not None:
            final["val"] = _evaluate(plain, val, config, device)
        tests = {name: read(f) for name, f in files["test"].items()}
        final["test"] = _evaluate(plain, ConcatDataset(list(tests.values())), config, device)
        if files.get("sites"):
            final["sites"] = {name: {"test": _evaluate(plain, data, config, device)}
                              for name, data in tests.items()}
            worst = min(final["sites"], key=lambda h: (
                final["sites"][h]["test"]["balanced_accuracy"], h))
            final["worst_site"] = {"hospital": worst, "balanced_accuracy":
                                   final["sites"][worst]["test"]["balanced_accuracy"]}
        checkpoint.save_weights(to_numpy(plain.state_dict()), run_dir / run_folder.MODEL)
        (run_dir / run_folder.METRICS).write_text(json.dumps(final, indent=2))


def run_centralized(config: ExperimentConfig, shards: ShardSet, run_dir: Path,
                    workers: int = 2) -> dict:
    """Train centrally with `workers` Ray Train workers; returns what metrics.json holds."""
    root = shards.root.resolve()
    files = {"train": [str(root / f) for _, f in sorted(shards.hospitals.items())],
             "val": [str(root / shards.val)] if shards.val else [],
             "test": {"pooled": str(root / shards.test)}}
    return _fit(config, files, run_dir, workers)


def site_files(config: ExperimentConfig, out_dir: Path) -> dict:
    """Every site's local train/val/test split, made as its hospital makes it (same seed),
    written as parquet files for the Ray Train workers."""
    import pyarrow.parquet as pq

    from fedray.data.sites import read_site, split_site

    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict = {"train": [], "val": [], "test": {}, "sites": True}
    for name, site in sorted(config.data.sites.items()):
        table = read_site(site.path, config.data)
        local = split_site(table, config.data, config.seed, f"site {name} ({site.path})")
        for split, part in local.parts.items():
            if not part.num_rows:
                continue
            path = out_dir / f"{name}-{split}.parquet"
            pq.write_table(part.select(["path", "label", "group", "image"]), path)
            if split == "test":
                files["test"][name] = str(path.resolve())
            else:
                files[split].append(str(path.resolve()))
    return files


def run_centralized_sites(config: ExperimentConfig, run_dir: Path, workers: int = 2) -> dict:
    """The pooled baseline in site mode (a simulation: the driver reads every site folder):
    train on the union of the sites' local train splits, score every site's local test split
    (metrics.json: pooled `test`, `sites.<h>.test`, `worst_site`)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    return _fit(config, site_files(config, run_dir / "data"), run_dir, workers)


def _fit(config: ExperimentConfig, files: dict, run_dir: Path, workers: int) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from fedray.federation import hosts

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / run_folder.CONFIG).write_text(config.to_yaml())
    (run_dir / run_folder.METRICS_JSONL).write_text("")
    use_gpu = config.runtime.hospital_num_gpus > 0
    # Ray Train's workers need CPUs that idle hospital hosts of this driver may hold
    if use_gpu:
        hosts.forget_idle()
    else:
        hosts.make_room(workers)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": config.model_dump(mode="json"), "threads": 1,
                           "files": files, "run_dir": str(run_dir.resolve())},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": 1} if not use_gpu else None),
        run_config=RunConfig(name="centralized", storage_path=str((run_dir / "ray_train").resolve())),
    )
    start = time.perf_counter()
    trainer.fit()
    final = json.loads((run_dir / run_folder.METRICS).read_text())
    final["seconds"] = time.perf_counter() - start
    (run_dir / run_folder.METRICS).write_text(json.dumps(final, indent=2))
    return final
