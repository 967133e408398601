"""A run as the report reads it from its folder alone, and the models it runs on its shards."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from torch.utils.data import DataLoader

from fedray import engine
from fedray.artifacts import checkpoint
from fedray.client import input_size
from fedray.config import ExperimentConfig, load_config
from fedray.data.shards import ShardDataset, ShardSet
from fedray.data.transforms import eval_preset
from fedray.messages import to_torch
from fedray.models import build_model


@dataclass
class Run:
    """Everything a report reads from one run folder; model predictions come later, lazily."""

    dir: Path
    config: ExperimentConfig
    shards: ShardSet
    records: list[dict]
    final: dict

    @classmethod
    def load(cls, run_dir: Path) -> Run:
        run_dir = Path(run_dir)
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"{run_dir}: no config.yaml (is it a run folder?)")
        jsonl = run_dir / "metrics.jsonl"
        records = ([json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
                   if jsonl.is_file() else [])
        final_path = run_dir / "metrics.json"
        final = json.loads(final_path.read_text()) if final_path.is_file() else {}
        return cls(run_dir, load_config(run_dir / "config.yaml"),
                   ShardSet.load(run_dir / "data"), records, final)

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def hospitals(self) -> list[str]:
        return sorted(self.shards.hospitals)


class Evaluator:
    """Decodes each shard once and runs models on it, on the run's configured device."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.size = input_size(run.config)
        self.device = engine.pick_device(run.config.runtime.device)
        self._datasets: dict[str, ShardDataset] = {}

    def dataset(self, file: str) -> ShardDataset:
        if file not in self._datasets:
            self._datasets[file] = ShardDataset.from_parquet(
                self.run.shards.path(file), self.size, eval_preset(self.size))
        return self._datasets[file]

    def model(self, weights: Path) -> nn.Module:
        m = self.run.config.model
        model = build_model(m.backbone, dp_safe=m.dp_safe, dropout=m.dropout)
        model.load_state_dict(to_torch(checkpoint.load_weights(weights)))
        return model.to(self.device).eval()

    def predict(self, model: nn.Module, file: str) -> engine.Predictions:
        loader = DataLoader(self.dataset(file), batch_size=self.run.config.training.eval_batch_size)
        return engine.predict(model, loader, self.device, amp=self.run.config.training.amp)
