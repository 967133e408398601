"""A run as the report reads it from its folder alone, and the models it runs on its shards."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from torch.utils.data import DataLoader

from fedray import engine
from fedray.artifacts import run_folder
from fedray.models import input_size
from fedray.config import ExperimentConfig
from fedray.data.shards import ShardDataset, ShardSet
from fedray.data.transforms import eval_preset


@dataclass
class Run:
    """Everything a report reads from one run folder; model predictions come later, lazily."""

    dir: Path
    config: ExperimentConfig
    shards: ShardSet | None
    records: list[dict]
    final: dict

    @classmethod
    def load(cls, run_dir: Path) -> Run:
        run_dir = Path(run_dir)
        if not run_folder.is_run(run_dir):
            raise FileNotFoundError(f"{run_dir}: no config.yaml (is it a run folder?)")
        jsonl = run_dir / run_folder.METRICS_JSONL
        records = ([json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
                   if jsonl.is_file() else [])
        final_path = run_dir / run_folder.METRICS
        final = json.loads(final_path.read_text()) if final_path.is_file() else {}
        data = run_dir / run_folder.DATA
        shards = (ShardSet.load(data) if (data / run_folder.SHARDS).is_file()
                  else None)  # a site-mode run holds no shard: the sites kept their data
        return cls(run_dir, run_folder.load_run_config(run_dir), shards, records, final)

    @property
    def site_mode(self) -> bool:
        return self.shards is None and self.config.data.source == "sites"

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def hospitals(self) -> list[str]:
        if self.shards is None:
            return sorted(self.config.data.sites)
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
        model = run_folder.build_run_model(self.run.config.model)
        return run_folder.load_weights_into(model, weights).to(self.device).eval()

    def predict(self, model: nn.Module, file: str) -> engine.Predictions:
        loader = DataLoader(self.dataset(file), batch_size=self.run.config.training.eval_batch_size)
        return engine.predict(model, loader, self.device, amp=self.run.config.training.amp)
