"""Evaluate a finished (or stopped) run's global model on one of its held-out shards."""

from __future__ import annotations

import json
from pathlib import Path

from torch.utils.data import DataLoader

from fedray import engine
from fedray.artifacts import checkpoint
from fedray.client import input_size
from fedray.config import load_config
from fedray.data.labels import CLASSES
from fedray.data.shards import ShardDataset, ShardSet
from fedray.data.transforms import eval_preset
from fedray.messages import to_torch
from fedray.metrics import classification_metrics
from fedray.models import build_model


def run_weights(run_dir: Path) -> Path:
    """The run's final model, or the newest round checkpoint of a run that has not finished."""
    final = run_dir / "model.safetensors"
    if final.is_file():
        return final
    rounds = checkpoint.completed_rounds(run_dir / "checkpoints")
    if not rounds:
        raise FileNotFoundError(f"{run_dir}: no model.safetensors and no round checkpoints")
    return checkpoint.round_dir(run_dir / "checkpoints", rounds[-1]) / "global.safetensors"


def evaluate_run(run_dir: Path, split: str = "test") -> dict:
    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.yaml")
    shards = ShardSet.load(run_dir / "data")
    file = shards.test if split == "test" else shards.val
    if file is None:
        raise ValueError(f"{run_dir}: the run has no '{split}' split")
    size = input_size(config)
    dataset = ShardDataset.from_parquet(shards.path(file), size, eval_preset(size))
    m = config.model
    model = build_model(m.backbone, dp_safe=m.dp_safe, dropout=m.dropout)
    model.load_state_dict(to_torch(checkpoint.load_weights(run_weights(run_dir))))
    device = engine.pick_device(config.runtime.device)
    pred = engine.predict(model.to(device), DataLoader(dataset, batch_size=128), device)
    metrics = classification_metrics(pred.labels, pred.probs, list(CLASSES))
    metrics["loss"] = pred.loss
    (run_dir / f"evaluation_{split}.json").write_text(json.dumps(metrics, indent=2))
    return metrics



