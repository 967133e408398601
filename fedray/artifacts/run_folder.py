"""The run folder: the names of what a run writes there, and a run's config, model and
evaluation read back from the folder alone (so they work on runs copied from another machine).
Light at import (torch and the checkpoint format load when a model does).

    RUN/config.yaml            the resolved experiment          CONFIG
    RUN/metrics.jsonl          one record per round             METRICS_JSONL
    RUN/metrics.json           the final evaluation             METRICS
    RUN/model.safetensors      the saved global model           MODEL
    RUN/checkpoints/round_N/   global.safetensors, state        CHECKPOINTS, GLOBAL_WEIGHTS
    RUN/hospitals/<name>/      a hospital's ledger, state       hospital_dir()
    RUN/data/                  the shards (shards.json)         DATA, SHARDS
    RUN/report/                `fedray report`                  REPORT
    RUN/shards_used.json       shards shared from elsewhere     SHARDS_USED
    RUN/startup.json           where each process started       STARTUP
    RUN/sites/<name>/          simulated site folders           SITES
    RUN/data/sites.json        the counts each site sent        DATA, SITE_COUNTS
    RUN/server_ledger.json     DP-FedAvg's ledger               SERVER_LEDGER
    RUN/ood.json, ood_centroids.safetensors  federated OOD      OOD_CALIBRATION, OOD_CENTROIDS
    RUN/evaluation_<split>.json  `fedray evaluate`              evaluation_path()
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from torch import nn

    from fedray.config import ExperimentConfig, ModelConfig

CONFIG = "config.yaml"
METRICS_JSONL = "metrics.jsonl"
METRICS = "metrics.json"
MODEL = "model.safetensors"
CHECKPOINTS = "checkpoints"
GLOBAL_WEIGHTS = "global.safetensors"
HOSPITALS = "hospitals"
DATA = "data"
SHARDS = "shards.json"
REPORT = "report"
SHARDS_USED = "shards_used.json"
STARTUP = "startup.json"
LOCAL_MODEL = "local_model.safetensors"  # in a hospital's state folder
SITES = "sites"  # RUN/sites/<name>/: a pooled source divided into site folders (simulation)
SITE_COUNTS = "sites.json"  # RUN/data/sites.json: the counts each site sent
SERVER_LEDGER = "server_ledger.json"  # DP-FedAvg's client-level ledger
OOD_CALIBRATION = "ood.json"  # a site-mode run's federated OOD calibration
OOD_CENTROIDS = "ood_centroids.safetensors"


def is_run(folder: Path) -> bool:
    return (Path(folder) / CONFIG).is_file()


def hospital_dir(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / HOSPITALS / name


def evaluation_path(run_dir: Path, split: str) -> Path:
    return Path(run_dir) / f"evaluation_{split}.json"


def load_run_config(run_dir: Path) -> ExperimentConfig:
    from fedray.config import load_config

    return load_config(Path(run_dir) / CONFIG)


def run_weights(run_dir: Path) -> Path:
    """The run's final model, or the newest round checkpoint of a run that has not finished."""
    from fedray.artifacts import checkpoint

    run_dir = Path(run_dir)
    final = run_dir / MODEL
    if final.is_file():
        return final
    rounds = checkpoint.completed_rounds(run_dir / CHECKPOINTS)
    if not rounds:
        raise FileNotFoundError(f"{run_dir}: no {MODEL} and no round checkpoints")
    return checkpoint.round_dir(run_dir / CHECKPOINTS, rounds[-1]) / GLOBAL_WEIGHTS


def build_run_model(model: ModelConfig) -> nn.Module:
    """The architecture a run's ModelConfig names, to load the run's weights into."""
    from fedray.models import build_model

    return build_model(model.backbone, dp_safe=model.dp_safe, dropout=model.dropout)


def load_weights_into(model: nn.Module, weights: Path) -> nn.Module:
    from fedray.artifacts import checkpoint
    from fedray.federation.messages import to_torch

    model.load_state_dict(to_torch(checkpoint.load_weights(weights)))
    return model


def model_from_run(run_dir: Path, which: Literal["best"] | Path = "best") -> nn.Module:
    """The run's model with its weights: "best" is the model the run saved (the round of lowest
    validation loss; the newest checkpoint of an unfinished run), or a weights file."""
    run_dir = Path(run_dir)
    weights = run_weights(run_dir) if which == "best" else Path(which)
    return load_weights_into(build_run_model(load_run_config(run_dir).model), weights)


def evaluate_run(run_dir: Path, split: str = "test") -> dict:
    """Evaluate a finished (or stopped) run's global model on one of its held-out shards."""
    from torch.utils.data import DataLoader

    from fedray import engine
    from fedray.models import input_size
    from fedray.data.labels import CLASSES
    from fedray.data.shards import ShardDataset, ShardSet
    from fedray.data.transforms import eval_preset
    from fedray.metrics import classification_metrics

    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    if config.data.source == "sites" and not (run_dir / DATA / SHARDS).is_file():
        raise ValueError(f"{run_dir}: a site-mode run is evaluated at its sites "
                         "(fedray.experiments.experiment.evaluate_run, `fedray evaluate`)")
    shards = ShardSet.load(run_dir / DATA)
    file = shards.test if split == "test" else shards.val
    if file is None:
        raise ValueError(f"{run_dir}: the run has no '{split}' split")
    size = input_size(config)
    dataset = ShardDataset.from_parquet(shards.path(file), size, eval_preset(size))
    model = load_weights_into(build_run_model(config.model), run_weights(run_dir))
    device = engine.pick_device(config.runtime.device)
    pred = engine.predict(model.to(device), DataLoader(dataset, batch_size=128), device)
    metrics = classification_metrics(pred.labels, pred.probs, list(CLASSES))
    metrics["loss"] = pred.loss
    evaluation_path(run_dir, split).write_text(json.dumps(metrics, indent=2))
    return metrics
