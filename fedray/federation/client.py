"""A hospital: holds its own data, trains locally, and sends back only weights and counts.

A plain class. runtime.py turns it into a Ray actor; unit tests construct it directly. With
`data.source: sites` it reads and splits only its own site folder, evaluates models there and
returns sufficient statistics (counts), never images, labels or scores.
"""

from __future__ import annotations

import os
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from fedray import engine, privacy
from fedray.artifacts import checkpoint
from fedray.artifacts import run_folder as rf
from fedray.config import ExperimentConfig, SiteConfig
from fedray.data.labels import CLASSES
from fedray.data.shards import ShardDataset
from fedray.data.transforms import eval_preset, train_preset
from fedray.federation.faults import FaultInjector
from fedray.federation.messages import FitIns, FitRes, to_numpy, to_torch
from fedray.models import build_model, input_size  # noqa: F401 - input_size: importers


def same_weights(a: OrderedDict, b: OrderedDict) -> bool:
    """Whether two state dicts (numpy arrays) hold the same names, shapes and values."""
    return a.keys() == b.keys() and all(
        np.shape(a[k]) == np.shape(b[k]) and np.array_equal(a[k], b[k]) for k in a)


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
        self.site = config.data.sites.get(name) if config.data.source == "sites" else None
        self.eval_data: dict[str, ShardDataset] = {}
        self.split_counts: dict[str, dict[str, int]] = {}
        self.hashes: list[str] = []
        self._eval_model: torch.nn.Module | None = None
        self._ood_features: tuple[OrderedDict, torch.Tensor] | None = None
        if self.site is not None:
            self.dataset = self._load_site(self.site, size)
        else:
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
        self.faults = FaultInjector(name, config.runtime.fault_injection)
        self.releases: list[dict] = []  # every update this hospital sent, with its DP steps
        self.skipped: list[str] = []  # torn state files passed over by restore
        loader = DataLoader(self.dataset, batch_size=t.batch_size, shuffle=True,
                            generator=self.generator, pin_memory=self.device.type == "cuda")
        settings = privacy.resolve(config, name, len(self.dataset),
                                   self.dataset.num_units(config.privacy.unit))
        self.private: privacy.PrivateTraining | None = None
        if settings is None:
            self.train_model, self.optimizer, self.loader = self.model, self.base_optimizer, loader
        else:
            # Noise and sampling draw from OS entropy; hospital and seed are read only with
            # privacy.reproducible_noise (debugging).
            self.private = privacy.make_private(
                self.model, self.base_optimizer, loader, settings, self.loss_fn,
                unit_ids=self.dataset.unit_ids(settings.unit), hospital=name, seed=config.seed)
            self.loss_fn = self.private.loss_fn or self.loss_fn
            self.train_model = self.private.model
            self.optimizer, self.loader = self.private.optimizer, self.private.loader
        # A hospital restarted after a crash picks up its own last state (optimizer moments,
        # privacy ledger) so epsilon never resets; a new run's folder is empty.
        self.restore(round_number=2**31)

    def _load_site(self, site: SiteConfig, size: int) -> ShardDataset:
        """Read, split (first, before anything else) and decode this hospital's own folder."""
        from fedray.data import sites

        where = f"hospital {self.name} ({site.path})"
        table = sites.read_site(site.path, self.config.data)
        split = self.config.data.split
        fold = (split.fold, split.folds) if split.folds else None
        local = sites.split_site(table, self.config.data, self.config.seed, where, fold=fold)
        self.split_counts = local.counts()
        if self.config.data.cross_site_duplicates:
            self.hashes = local.hashes()
        for part in ("val", "test"):
            if local.parts[part].num_rows:
                self.eval_data[part] = ShardDataset.from_table(
                    local.parts[part], size, eval_preset(size), where=f"{where} {part}")
        return ShardDataset.from_table(local.parts["train"], size,
                                       train_preset(size, self.config.data.augment),
                                       expand_flips=self.config.data.flip_x4,
                                       where=f"{where} train")

    def evaluate(self, weights: OrderedDict, split: str) -> dict | None:
        """Sufficient statistics of `weights` on this site's local `split` (loss sum, count,
        confusion matrix, per-class score histograms), or None when the site has no such split."""
        from fedray.metrics import sufficient_stats

        data = self.eval_data.get(split)
        if data is None:
            return None
        model = self._model_with(weights)
        t = self.config.training
        loader = DataLoader(data, batch_size=t.eval_batch_size, shuffle=False)
        pred = engine.predict(model, loader, self.device, amp=t.amp, channels_last=t.channels_last)
        return sufficient_stats(pred.labels, pred.probs, pred.loss * len(pred.labels), len(CLASSES))

    def _model_with(self, weights: OrderedDict) -> torch.nn.Module:
        """A model for evaluation with `weights`; the training model keeps its own state."""
        if self._eval_model is None:
            m = self.config.model
            self._eval_model = build_model(m.backbone, dp_safe=m.dp_safe,
                                           dropout=m.dropout).to(self.device)
        incoming = to_torch(weights)
        if self._norm_keys:  # FedBN: the global model with this hospital's own norm layers
            own = self.model.state_dict()
            incoming.update({k: own[k] for k in self._norm_keys if k in own})
        self._eval_model.load_state_dict(incoming)
        return self._eval_model.eval()

    def ood_class_sums(self, weights: OrderedDict) -> dict | None:
        """First OOD-calibration message: per-class sums of unit features on the local
        validation split, and counts (fedray.artifacts.ood)."""
        from fedray.artifacts import ood

        data = self.eval_data.get("val")
        if data is None:
            return None
        unit, labels = ood.unit_features(self._model_with(weights), data)
        self._ood_features = (weights, unit)  # what the second message scores
        return ood.class_sums(unit, labels, len(CLASSES))

    def ood_histogram(self, weights: OrderedDict, centroids) -> list[int] | None:
        """Second message: the local validation images' OOD scores as counts over fixed bins.
        Their features are the first message's when it had the same weights and this
        hospital has not trained since (one forward pass over the split, not two)."""
        from fedray.artifacts import ood

        data = self.eval_data.get("val")
        if data is None:
            return None
        cached, self._ood_features = self._ood_features, None
        if cached is not None and same_weights(cached[0], weights):
            unit = cached[1]
        else:
            unit, _ = ood.unit_features(self._model_with(weights), data)
        return ood.score_histogram(unit, centroids)

    def image_hashes(self) -> list[str]:
        """The sha256 of this site's images (opt-in: data.cross_site_duplicates), never images."""
        return list(self.hashes)

    @property
    def shares_local_metrics(self) -> bool:
        """Un-noised local loss, accuracy and class counts leave only when allowed: by
        default not under DP (privacy.share_local_metrics)."""
        share = self.config.privacy.share_local_metrics
        return share if share is not None else self.private is None

    def info(self) -> dict:
        info = {"hospital": self.name, "num_samples": len(self.dataset),
                "device": str(self.device), "threads": torch.get_num_threads(), "pid": os.getpid()}
        if self.shares_local_metrics:
            info["class_counts"] = self.dataset.class_counts().tolist()
        if self.split_counts:  # site mode: the local split's class table, counts only
            info["splits"] = (self.split_counts if self.shares_local_metrics else
                              {k: {"total": sum(v.values())} for k, v in self.split_counts.items()})
        return info

    def fit(self, weights: OrderedDict, ins: FitIns) -> FitRes:
        """Load the global weights, train E local epochs, return the new weights.

        Under DP the ledger is written (atomically) before the update leaves: a crash at any
        point can over-count a release, never under-count one.
        """
        start = time.perf_counter()
        self._ood_features = None  # training changes this hospital's own (FedBN) layers
        self.faults.at("before_fit", ins.round)
        if self.private is not None:
            self.private.check_budget(self.name, ins.local_epochs)
        self._load_global(weights, ins.local_layers)
        proximal = None
        if ins.proximal_mu:
            anchors = [p.detach().clone() for p in self.model.parameters() if p.requires_grad]
            proximal = (float(ins.proximal_mu), anchors)
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
        self.faults.at("after_fit", ins.round)
        self._save_state(ins.round)
        self.faults.at("after_state_saved", ins.round)
        metrics = {"seconds": time.perf_counter() - start, "epochs": ins.local_epochs}
        if self.shares_local_metrics:
            metrics.update(loss=stats.loss, accuracy=stats.accuracy)
        if self.private is not None:
            metrics.update(self.private.report())
        return FitRes(self.name, to_numpy(self.model.state_dict()), len(self.dataset), metrics)

    def privacy_ledger(self) -> dict | None:
        """This hospital's ledger as it stands (every release, including rounds whose update
        arrived too late to count), or None without DP."""
        if self.private is None:
            return None
        return {**self.private.report(), "releases": len(self.releases),
                "accountant": self.private.settings.accountant,
                "history": self.private.ledger.state_dict()["history"]}

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
        path = self.state_dir / rf.LOCAL_MODEL
        checkpoint.save_weights(to_numpy(self.model.state_dict()), path,
                                self.faults.write_hook(None))
        return str(path)

    # Local state (optimizer moments, privacy ledger) stays at the hospital, in its own folder.
    def _state_path(self, round_number: int) -> Path:
        return self.state_dir / f"state_{round_number:04d}"

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / privacy.LEDGER_FILE

    def _save_state(self, round_number: int) -> None:
        """The ledger first, then the optimizer state; both atomic, before the update leaves."""
        if self.state_dir is None:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        hook = self.faults.write_hook(round_number)
        state = {"optimizer": self.base_optimizer.state_dict(), "round": round_number}
        if self.private is not None:
            self.releases.append({"round": round_number, "dp_steps": self.private.ledger.steps})
            self.private.ledger.save(self.ledger_path, self.releases, hook)
            state["ledger"] = self.private.ledger.state_dict()
        checkpoint.save_tree(state, self._state_path(round_number), hook)
        kept = sorted(self.state_dir.glob("state_*.safetensors"))
        for old in kept[:-3]:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)

    def restore(self, round_number: int) -> dict:
        """Roll the optimizer state back to the one this hospital had after its last round
        <= round_number; never roll the privacy ledger back.

        A torn or unreadable state file is passed over for the next older one and named in
        `skipped`. The ledger is the newest of: the one in memory, the ledger file, and the
        copies inside the state files, whichever records the most steps.
        """
        result = {"hospital": self.name, "restored_round": None, "skipped": []}
        if self.state_dir is None:
            return result
        kept = sorted((int(p.stem.split("_")[1]), p) for p in self.state_dir.glob("state_*.safetensors"))
        for number, path in reversed(kept):
            if number > round_number:
                continue
            try:
                state = checkpoint.load_tree(path.with_suffix(""))
                self.base_optimizer.load_state_dict(state["optimizer"])
            except checkpoint.UNREADABLE as exc:
                result["skipped"].append(str(path))
                print(f"hospital {self.name}: skipped unreadable state file {path} ({exc!r})",
                      file=sys.stderr, flush=True)
                continue
            result["restored_round"] = number
            break
        else:
            self.base_optimizer.state.clear()  # no state that old: as a fresh hospital
        if self.private is not None:
            self._restore_ledger(kept, result["skipped"])
        self.skipped.extend(p for p in result["skipped"] if p not in self.skipped)
        result["skipped"] = list(self.skipped)  # those passed over when it started, too
        return result

    def _restore_ledger(self, kept: list[tuple[int, Path]], skipped: list[str]) -> None:
        on_disk = privacy.read_ledger(self.ledger_path)
        if on_disk is None and self.ledger_path.exists():
            skipped.append(str(self.ledger_path))
            print(f"hospital {self.name}: skipped unreadable ledger {self.ledger_path}",
                  file=sys.stderr, flush=True)
        if on_disk is not None:
            if self.private.ledger.absorb(on_disk):
                self.releases = list(on_disk.get("releases", []))
        for _, path in kept:  # a copy newer than a torn ledger file
            try:
                self.private.ledger.absorb(checkpoint.load_tree(path.with_suffix("")).get("ledger"))
            except checkpoint.UNREADABLE:
                continue
