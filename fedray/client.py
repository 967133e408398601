"""A hospital: holds its own shard, trains locally, and sends back only weights and counts.

A plain class. runtime.py turns it into a Ray actor; unit tests construct it directly.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from fedray import checkpoint, engine, privacy
from fedray.config import ExperimentConfig
from fedray.data.shards import ShardDataset
from fedray.data.transforms import train_preset
from fedray.messages import FitIns, FitRes, to_numpy, to_torch
from fedray.models import BACKBONES, build_model


def input_size(config: ExperimentConfig) -> int:
    return config.data.image_size or BACKBONES[config.model.backbone].input_size


class HospitalClient:
    """One hospital's persistent training state: decoded shard, model, optimizer, loss."""

    def __init__(
        self,
        name: str,
        shard_path: str | Path,
        config: ExperimentConfig,
        state_dir: str | Path | None = None,
        num_threads: int | None = None,
    ) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        self.name = name
        self.config = config
        self.state_dir = Path(state_dir) if state_dir else None
        self.device = engine.pick_device(config.runtime.device)
        size = input_size(config)
        self.dataset = ShardDataset.from_parquet(
            Path(shard_path), size, train_preset(size, config.data.augment),
            expand_flips=config.data.flip_x4,
        )
        m, t = config.model, config.training
        # `model` is the plain module: weights come in and go out through it, never with
        # Opacus's `_module.` prefixes. `train_model` is what the loop runs (wrapped under DP).
        self.model = build_model(
            m.backbone, pretrained=m.pretrained, freeze=m.freeze, dp_safe=m.dp_safe,
            dropout=m.dropout, weights_dir=m.weights_dir,
        ).to(self.device)
        if t.channels_last and self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.base_optimizer = engine.make_optimizer(self.model, t.lr, t.weight_decay)
        counts = self.dataset.class_counts() if t.class_weighted else None
        self.loss_fn = engine.make_loss(counts, t.label_smoothing).to(self.device)
        self.generator = torch.Generator()
        self._norm_keys: set[str] | None = None
        loader = DataLoader(self.dataset, batch_size=t.batch_size, shuffle=True,
                            generator=self.generator, pin_memory=self.device.type == "cuda")
        settings = privacy.resolve(config, name, len(self.dataset))
        self.private: privacy.PrivateTraining | None = None
        if settings is None:
            self.train_model, self.optimizer, self.loader = self.model, self.base_optimizer, loader
        else:
            self.private = privacy.make_private(self.model, self.base_optimizer, loader, settings,
                                                self.loss_fn)
            self.loss_fn = self.private.loss_fn or self.loss_fn
            self.train_model = self.private.model
            self.optimizer, self.loader = self.private.optimizer, self.private.loader
        # A hospital restarted after a crash picks up its own last state (optimizer moments,
        # privacy ledger) so epsilon never resets; a new run's folder is empty.
        self.restore(round_number=2**31)

    def info(self) -> dict:
        counts = self.dataset.class_counts().tolist()
        return {"hospital": self.name, "num_samples": len(self.dataset), "class_counts": counts,
                "device": str(self.device), "threads": torch.get_num_threads(), "pid": os.getpid()}

    def fit(self, weights: OrderedDict, ins: FitIns) -> FitRes:
        """Load the global weights, train E local epochs, return the new weights."""
        start = time.perf_counter()
        if self.private is not None:
            self.private.check_budget(self.name, ins.local_epochs)
        self._load_global(weights, ins.extra.get("local_layers"))
        proximal = None
        if ins.extra.get("proximal_mu"):
            anchors = [p.detach().clone() for p in self.model.parameters() if p.requires_grad]
            proximal = (float(ins.extra["proximal_mu"]), anchors)
        for group in self.base_optimizer.param_groups:
            group["lr"] = ins.lr
        torch.manual_seed(ins.seed)
        self.generator.manual_seed(ins.seed)
        t = self.config.training
        # Under DP, per-sample clipping to max_grad_norm replaces batch gradient clipping.
        grad_clip = t.grad_clip if self.private is None else None
        stats = None
        for _ in range(ins.local_epochs):
            stats = engine.train_one_epoch(
                self.train_model, self.loader, self.optimizer, self.loss_fn, self.device,
                grad_clip=grad_clip, amp=t.amp, channels_last=t.channels_last, proximal=proximal,
            )
        self._save_state(ins.round)
        metrics = {"loss": stats.loss, "accuracy": stats.accuracy,
                   "seconds": time.perf_counter() - start, "epochs": ins.local_epochs}
        if self.private is not None:
            metrics.update(self.private.report())
        return FitRes(self.name, to_numpy(self.model.state_dict()), len(self.dataset), metrics)

    def _load_global(self, weights: OrderedDict, local_layers: str | None) -> None:
        """Take the global weights; with FedBN ("norm") keep this hospital's own norm layers."""
        incoming = to_torch(weights)
        if local_layers == "norm":
            from fedray.strategy.fedbn import norm_parameter_names

            if self._norm_keys is None:
                self._norm_keys = norm_parameter_names(self.model)
            own = self.model.state_dict()
            incoming.update({k: own[k] for k in self._norm_keys if k in own})
        self.model.load_state_dict(incoming)

    def save_local_model(self) -> str | None:
        """Keep this hospital's last locally trained weights (for cross-site evaluation)."""
        if self.state_dir is None:
            return None
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.state_dir / "local_model.safetensors"
        checkpoint.save_weights(to_numpy(self.model.state_dict()), path)
        return str(path)

    # Local state (optimizer moments, privacy ledger) stays at the hospital, in its own folder.
    def _state_path(self, round_number: int) -> Path:
        return self.state_dir / f"state_{round_number:04d}"

    def _save_state(self, round_number: int) -> None:
        if self.state_dir is None:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        state = {"optimizer": self.base_optimizer.state_dict()}
        if self.private is not None:
            state["ledger"] = self.private.ledger.state_dict()
        checkpoint.save_tree(state, self._state_path(round_number))
        for old in sorted(self.state_dir.glob("state_*.json"))[:-3]:
            old.unlink()
            old.with_suffix(".safetensors").unlink(missing_ok=True)

    def restore(self, round_number: int) -> bool:
        """Reload the optimizer state (and privacy ledger) this hospital had after its last
        round <= round_number."""
        if self.state_dir is None:
            return False
        kept = [int(p.stem.split("_")[1]) for p in self.state_dir.glob("state_*.json")]
        usable = [r for r in kept if r <= round_number]
        if not usable:
            return False
        state = checkpoint.load_tree(self._state_path(max(usable)))
        self.base_optimizer.load_state_dict(state["optimizer"])
        if self.private is not None and "ledger" in state:
            self.private.ledger.load_state_dict(state["ledger"])
        return True
