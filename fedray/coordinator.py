"""The round loop: select, broadcast, gather (failures are data), aggregate, evaluate, checkpoint.

A plain class that owns the global model. It reaches hospitals only through a `HospitalPool`,
so the same loop runs in-process in unit tests (`LocalPool`) and on Ray (`runtime.RayPool`).
"""

from __future__ import annotations

import json
import time
import traceback
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader

from fedray import checkpoint, engine
from fedray.client import HospitalClient, input_size
from fedray.config import ExperimentConfig
from fedray.data.labels import CLASSES
from fedray.data.shards import ShardDataset, ShardSet
from fedray.data.transforms import eval_preset
from fedray.messages import Failure, FitIns, FitRes, to_numpy, to_torch
from fedray.metrics import classification_metrics
from fedray.models import build_model
from fedray.privacy.errors import PrivacyBudgetExhausted
from fedray.strategy import build_strategy


class HospitalPool(Protocol):
    """How the coordinator reaches hospitals; the only transport-aware seam."""

    names: list[str]

    def fit(self, weights: OrderedDict, instructions: dict[str, FitIns],
            timeout_s: float) -> tuple[list[FitRes], list[Failure]]: ...

    def restore(self, round_number: int) -> None: ...

    def save_local_models(self) -> None: ...


class LocalPool:
    """Hospitals as plain objects in this process: for tests and single-process debugging."""

    def __init__(self, clients: list[HospitalClient]) -> None:
        self.clients = {c.name: c for c in clients}
        self.names = sorted(self.clients)

    def fit(self, weights: OrderedDict, instructions: dict[str, FitIns],
            timeout_s: float) -> tuple[list[FitRes], list[Failure]]:
        del timeout_s
        results, failures = [], []
        for name, ins in instructions.items():
            try:
                results.append(self.clients[name].fit(weights, ins))
            except PrivacyBudgetExhausted as exc:
                failures.append(Failure(name, "budget", str(exc)))
            except Exception as exc:  # noqa: BLE001 - a failed hospital is data
                failures.append(Failure(name, "error", f"{name}: {exc!r}\n{traceback.format_exc()}"))
        return results, failures

    def restore(self, round_number: int) -> None:
        for client in self.clients.values():
            client.restore(round_number)

    def save_local_models(self) -> None:
        for client in self.clients.values():
            client.save_local_model()


class EarlyStop:
    """Patience on the global validation loss."""

    def __init__(self, patience: int | None) -> None:
        self.patience = patience
        self.best = float("inf")
        self.bad_rounds = 0

    def update(self, loss: float) -> bool:
        """Record a round's loss; True when it is the best so far."""
        if loss < self.best:
            self.best, self.bad_rounds = loss, 0
            return True
        self.bad_rounds += 1
        return False

    @property
    def triggered(self) -> bool:
        return self.patience is not None and self.bad_rounds >= self.patience


class Coordinator:
    """Owns the global model and the run's state; one call to `run_round` is one round."""

    def __init__(self, config: ExperimentConfig, run_dir: Path, pool: HospitalPool,
                 shards: ShardSet, num_threads: int | None = None) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        self.config = config
        self.run_dir = Path(run_dir)
        self.checkpoints = self.run_dir / "checkpoints"
        self.pool = pool
        fed, t = config.federation, config.training
        self.strategy = build_strategy(fed.strategy.name, fed.min_clients, fed.fraction,
                                       **fed.strategy.params())
        self.device = engine.pick_device(config.runtime.device)
        torch.manual_seed(config.seed)
        m = config.model
        self.model = build_model(m.backbone, pretrained=m.pretrained, freeze=m.freeze,
                                 dp_safe=m.dp_safe, dropout=m.dropout,
                                 weights_dir=m.weights_dir).to(self.device)
        self.weights = to_numpy(self.model.state_dict())
        self.best_weights = self.weights
        if getattr(self.strategy, "total_hospitals", 0) is None:  # DP-FedAvg's sampling rate
            self.strategy.total_hospitals = len(self.pool.names)
            self.strategy.seed = config.seed
        if hasattr(self.strategy, "norm_keys") and self.strategy.norm_keys is None:
            from fedray.strategy.fedbn import norm_parameter_names

            self.strategy.norm_keys = norm_parameter_names(self.model)
        size = input_size(config)
        self.eval_sets = {
            split: ShardDataset.from_parquet(shards.path(file), size, eval_preset(size))
            for split, file in (("val", shards.val), ("test", shards.test)) if file
        }
        self.round = 0
        self.history: list[dict] = []
        self.rng = np.random.default_rng(config.seed)
        self._lr_holder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=t.lr)
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self._lr_holder, mode="min", factor=t.plateau.factor,
            patience=t.plateau.patience, min_lr=t.plateau.min_lr)
        self.early = EarlyStop(t.early_stopping_patience)
        self.stop_reason: str | None = None
        self.best_round = 0
        self.exhausted: set[str] = set()

    # ---- the round -------------------------------------------------------------------
    @property
    def lr(self) -> float:
        return float(self._lr_holder.param_groups[0]["lr"])

    @property
    def finished(self) -> bool:
        return self.stop_reason is not None or self.round >= self.config.federation.rounds

    def _instructions(self, round_number: int, selected: list[str]) -> dict[str, FitIns]:
        seed = self.config.seed
        extra = self.strategy.configure(round_number)
        return {
            name: FitIns(round=round_number, lr=self.lr, extra=extra,
                         local_epochs=self.config.training.local_epochs,
                         seed=(seed * 1_000_003 + round_number * 1_009 + self.pool.names.index(name))
                         % 2**31)
            for name in selected
        }

    def run_round(self) -> dict | None:
        """Run the next round and return its record, or None when the run is over."""
        if self.finished:
            return None
        r = self.round + 1
        timings: dict[str, float] = {}
        available = [n for n in self.pool.names if n not in self.exhausted]
        selected = self.strategy.select(r, available, self.rng)
        start = time.perf_counter()
        results, failures = self.pool.fit(self.weights, self._instructions(r, selected),
                                          self.config.federation.round_timeout_s)
        timings["fit_s"] = time.perf_counter() - start
        timings.update(getattr(self.pool, "timings", {}))
        start = time.perf_counter()
        self.exhausted.update(f.hospital for f in failures if f.kind == "budget")
        new_weights = self.strategy.aggregate(r, self.weights, results, failures)
        timings["aggregate_s"] = time.perf_counter() - start
        counted = new_weights is not None
        if counted:
            self.weights = new_weights
        start = time.perf_counter()
        val = self._evaluate("val", self.weights) if "val" in self.eval_sets else None
        timings["evaluate_s"] = time.perf_counter() - start
        self.round = r
        record = self._record(r, selected, results, failures, counted, val, timings)
        if counted and hasattr(self.strategy, "last_round_report"):
            report = self.strategy.last_round_report()
            if report.get("epsilon") == float("inf"):
                report["epsilon"] = None  # no noise: no guarantee; JSON has no infinity
            record["server_dp"] = report
        self._after_round(val)
        if self.stop_reason is None:
            self._check_budgets()
        record["lr_next"] = self.lr
        record["stop_reason"] = self.stop_reason
        self.history.append(record)
        self._checkpoint()
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        return record

    def _after_round(self, val: dict | None) -> None:
        """Track the best round, step the LR schedule, and decide on early stopping."""
        if val is None or self.early.update(val["loss"]):
            self.best_weights, self.best_round = self.weights, self.round
        if val is None:
            return
        self.plateau.step(val["loss"])
        if self.early.triggered:
            self.stop_reason = (f"early stopping: validation loss did not improve for "
                                f"{self.early.patience} rounds")

    def _check_budgets(self) -> None:
        left = len(self.pool.names) - len(self.exhausted)
        if left < self.strategy.min_clients:
            self.stop_reason = (f"privacy budget spent: {left} hospital(s) can still train, "
                                f"min_clients is {self.strategy.min_clients} "
                                f"(exhausted: {', '.join(sorted(self.exhausted))})")

    def _record(self, r: int, selected: list[str], results: list[FitRes],
                failures: list[Failure], counted: bool, val: dict | None,
                timings: dict[str, float]) -> dict:
        return {
            "round": r,
            "selected": selected,
            "completed": sorted(res.hospital for res in results),
            "failures": [{"hospital": f.hospital, "kind": f.kind, "message": f.message[-2000:]}
                         for f in failures],
            "counted": counted,
            "lr": self.lr,
            "num_samples": int(sum(res.num_samples for res in results)),
            "hospitals": {res.hospital: {**res.metrics, "num_samples": res.num_samples}
                          for res in sorted(results, key=lambda x: x.hospital)},
            "val": _summary(val) if val else None,
            "timings": timings,
        }

    # ---- evaluation --------------------------------------------------------------------
    def _evaluate(self, split: str, weights: OrderedDict) -> dict:
        self.model.load_state_dict(to_torch(weights))
        t = self.config.training
        loader = DataLoader(self.eval_sets[split], batch_size=t.eval_batch_size, shuffle=False)
        pred = engine.predict(self.model, loader, self.device, amp=t.amp,
                              channels_last=t.channels_last)
        metrics = classification_metrics(pred.labels, pred.probs, list(CLASSES))
        metrics["loss"] = pred.loss
        return metrics

    def finish(self) -> dict:
        """Evaluate the best global model on val and test; write metrics.json and final weights."""
        final = {"rounds": self.round, "stop_reason": self.stop_reason or "completed all rounds",
                 "best_round": self.best_round}
        for split in self.eval_sets:
            final[split] = self._evaluate(split, self.best_weights)
        checkpoint.save_weights(self.best_weights, self.run_dir / "model.safetensors")
        self.pool.save_local_models()
        (self.run_dir / "metrics.json").write_text(json.dumps(final, indent=2))
        return final

    # ---- checkpoint / resume -------------------------------------------------------------
    def state(self) -> dict:
        return {
            "round": self.round,
            "history": self.history,
            "rng": self.rng.bit_generator.state,
            "plateau": self.plateau.state_dict(),
            "lr": self.lr,
            "early": {"best": self.early.best, "bad_rounds": self.early.bad_rounds},
            "best_round": self.best_round,
            "stop_reason": self.stop_reason,
            "exhausted": sorted(self.exhausted),
            "torch_rng": torch.get_rng_state().tolist(),
            "config": self.config.model_dump(mode="json"),
        }

    def _checkpoint(self) -> None:
        checkpoint.save_round(self.checkpoints, self.round, self.weights, self.state(),
                              keep=self.config.checkpoint_keep, protect=self.best_round,
                              trees={"strategy": self.strategy.state_dict()})

    def resume(self) -> int:
        """Continue from the last completed round on disk; returns that round (0 if none)."""
        rounds = checkpoint.completed_rounds(self.checkpoints)
        if not rounds:
            return 0
        weights, state = checkpoint.load_round(self.checkpoints, rounds[-1])
        order = list(self.weights)  # safetensors does not keep the model's key order
        weights = OrderedDict((k, weights[k]) for k in order)
        self.weights = weights
        self.round = state["round"]
        self.history = state["history"]
        self.rng.bit_generator.state = state["rng"]
        self.plateau.load_state_dict(state["plateau"])
        for group in self._lr_holder.param_groups:
            group["lr"] = state["lr"]
        self.early.best = state["early"]["best"]
        self.early.bad_rounds = state["early"]["bad_rounds"]
        self.best_round = state["best_round"]
        self.stop_reason = state["stop_reason"]
        self.exhausted = set(state.get("exhausted", []))
        self.strategy.load_state_dict(checkpoint.load_round_tree(self.checkpoints, rounds[-1], "strategy"))
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        if self.best_round:
            best = checkpoint.load_round(self.checkpoints, self.best_round)[0]
            self.best_weights = OrderedDict((k, best[k]) for k in order)
        else:
            self.best_weights = weights
        with open(self.run_dir / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps(rec) + "\n" for rec in self.history)
        self.pool.restore(self.round)
        return self.round


def _summary(metrics: dict) -> dict:
    keys = ("loss", "accuracy", "balanced_accuracy", "macro_f1", "weighted_f1",
            "roc_auc_macro", "kappa")
    return {k: metrics[k] for k in keys}
