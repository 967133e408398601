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

from fedray import engine
from fedray.artifacts import checkpoint
from fedray.artifacts import run_folder as rf
from fedray.artifacts import atomic
from fedray.federation.client import HospitalClient
from fedray.models import input_size
from fedray.config import ExperimentConfig
from fedray.data.labels import CLASSES
from fedray.data.shards import ShardDataset, ShardSet
from fedray.data.transforms import eval_preset
from fedray.federation.faults import FaultInjected, FaultInjector
from fedray.federation.messages import Failure, FitIns, FitRes, to_numpy, to_torch
from fedray.metrics import add_stats, classification_metrics, metrics_from_stats
from fedray.models import build_model
from fedray.privacy.errors import PrivacyBudgetExhausted
from fedray.privacy.ledger import recorded_steps
from fedray.strategy import build_strategy


class HospitalPool(Protocol):
    """How the coordinator reaches hospitals; the only transport-aware seam."""

    names: list[str]

    def fit(self, weights: OrderedDict, instructions: dict[str, FitIns], timeout_s: float
            ) -> tuple[list[FitRes], list[Failure], dict[str, float]]: ...

    def restore(self, round_number: int) -> list[dict]: ...

    def save_local_models(self) -> None: ...

    def ledgers(self) -> dict[str, dict | None]: ...

    def evaluate(self, weights: OrderedDict, split: str) -> dict[str, dict | None]: ...

    def ask(self, method: str, *args) -> dict[str, object]: ...


class LocalPool:
    """Hospitals as plain objects in this process: for tests and single-process debugging."""

    def __init__(self, clients: list[HospitalClient]) -> None:
        self.clients = {c.name: c for c in clients}
        self.names = sorted(self.clients)

    def fit(self, weights: OrderedDict, instructions: dict[str, FitIns], timeout_s: float
            ) -> tuple[list[FitRes], list[Failure], dict[str, float]]:
        del timeout_s
        results, failures = [], []
        for name, ins in instructions.items():
            try:
                results.append(self.clients[name].fit(weights, ins))
            except PrivacyBudgetExhausted as exc:
                failures.append(Failure(name, "budget", str(exc)))
            except FaultInjected:
                raise  # in-process hospitals share the process's fate: the whole run stops
            except Exception as exc:  # noqa: BLE001 - a failed hospital is data
                failures.append(Failure(name, "error", f"{name}: {exc!r}\n{traceback.format_exc()}"))
        return results, failures, {}

    def restore(self, round_number: int) -> list[dict]:
        return [client.restore(round_number) for client in self.clients.values()]

    def save_local_models(self) -> None:
        for client in self.clients.values():
            client.save_local_model()

    def ledgers(self) -> dict[str, dict | None]:
        return {name: client.privacy_ledger() for name, client in self.clients.items()}

    def evaluate(self, weights: OrderedDict, split: str) -> dict[str, dict | None]:
        return {name: client.evaluate(weights, split) for name, client in self.clients.items()}

    def ask(self, method: str, *args) -> dict[str, object]:
        return {name: getattr(client, method)(*args) for name, client in self.clients.items()}

    def image_hashes(self) -> dict[str, list[str]]:
        return {name: client.image_hashes() for name, client in self.clients.items()}


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
                 shards: ShardSet | None = None, num_threads: int | None = None) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        self.config = config
        self.run_dir = Path(run_dir)
        self.checkpoints = self.run_dir / rf.CHECKPOINTS
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
        # Server-side noise from OS entropy unless a debugging run asks to recompute it.
        self.noise_seed = config.seed if config.privacy.reproducible_noise else None
        self.strategy.bind(list(self.pool.names), self.model, self.noise_seed)
        self.faults = FaultInjector("coordinator", config.runtime.fault_injection)
        self.skipped: list[str] = []  # torn files passed over on resume
        size = input_size(config)
        # Site mode: every hospital evaluates on its own local splits and sends counts; the
        # coordinator opens no site image (only an optional central cohort of its own).
        self.federated = config.data.source == "sites"
        self.eval_sets: dict[str, ShardDataset] = {}
        if self.federated:
            if config.data.central_test is not None:
                self.eval_sets["central_test"] = _central_set(config, size)
        elif shards is not None:
            self.eval_sets = {
                split: ShardDataset.from_parquet(shards.path(file), size, eval_preset(size))
                for split, file in (("val", shards.val), ("test", shards.test)) if file}
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
        self.best_val: dict | None = None  # the best round's validation metrics, this session
        self._answered_all = True  # whether every hospital answered the last evaluation
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
        asked = self.strategy.configure(round_number)
        return {
            name: FitIns(round=round_number, lr=self.lr, proximal_mu=asked.proximal_mu,
                         local_layers=asked.local_layers,
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
        results, failures, transport = self.pool.fit(
            self.weights, self._instructions(r, selected), self.config.federation.round_timeout_s)
        timings["fit_s"] = time.perf_counter() - start
        timings.update(transport)
        start = time.perf_counter()
        self.exhausted.update(f.hospital for f in failures if f.kind == "budget")
        new_weights = self.strategy.aggregate(r, self.weights, results, failures)
        timings["aggregate_s"] = time.perf_counter() - start
        counted = new_weights is not None
        if counted:
            self.weights = new_weights
        start = time.perf_counter()
        val = self._evaluate("val", self.weights) if self._has("val") else None
        timings["evaluate_s"] = time.perf_counter() - start
        self.round = r
        record = self._record(r, selected, results, failures, counted, val, timings)
        if counted:
            record.update(self.strategy.round_report())
        self._after_round(val)
        if self.stop_reason is None:
            self._check_budgets()
        record["lr_next"] = self.lr
        record["stop_reason"] = self.stop_reason
        if self.reproducible_noise:
            record["dp_warning"] = NOT_A_GUARANTEE
        self.history.append(record)
        self._save_server_ledger()
        self._checkpoint()
        atomic.append_line(self.run_dir / rf.METRICS_JSONL, json.dumps(record))
        return record

    @property
    def reproducible_noise(self) -> bool:
        dp = self.config.privacy.enabled or self.config.federation.strategy.name == "dpfedavg"
        return dp and self.config.privacy.reproducible_noise

    @property
    def server_ledger_path(self) -> Path:
        return self.run_dir / SERVER_LEDGER

    def _save_server_ledger(self) -> None:
        """DP-FedAvg's ledger, written before the round's model leaves the coordinator and
        never replaced by an older one (a resume from an older checkpoint keeps it)."""
        state = self.strategy.state_dict().get("accountant")
        if state is None or "history" not in state:
            return
        on_disk = _read_json(self.server_ledger_path)
        steps = recorded_steps(state)
        if on_disk is not None and recorded_steps(on_disk) > steps:
            return
        atomic.write_json(self.server_ledger_path, {**state, "steps": steps},
                          self.faults.write_hook(self.round))

    def _after_round(self, val: dict | None) -> None:
        """Track the best round, step the LR schedule, and decide on early stopping."""
        if val is None or self.early.update(val["loss"]):
            self.best_weights, self.best_round = self.weights, self.round
            # every site answered: finish reuses it while no round has trained since
            self.best_val = val if self._answered_all else None
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
            **({"val_sites": {h: _summary(m) for h, m in val["sites"].items()}}
               if val and "sites" in val else {}),
            "timings": timings,
        }

    # ---- evaluation --------------------------------------------------------------------
    def _has(self, split: str) -> bool:
        return (self.federated and split in ("val", "test")) or split in self.eval_sets

    def _evaluate(self, split: str, weights: OrderedDict) -> dict:
        if self.federated and split in ("val", "test"):
            return self._evaluate_at_sites(split, weights)
        self.model.load_state_dict(to_torch(weights))
        t = self.config.training
        loader = DataLoader(self.eval_sets[split], batch_size=t.eval_batch_size, shuffle=False)
        pred = engine.predict(self.model, loader, self.device, amp=t.amp,
                              channels_last=t.channels_last)
        metrics = classification_metrics(pred.labels, pred.probs, list(CLASSES))
        metrics["loss"] = pred.loss
        return metrics

    def _evaluate_at_sites(self, split: str, weights: OrderedDict) -> dict | None:
        """Pooled metrics computed exactly from the sites' sufficient statistics, with each
        site's own metrics under `sites`; the pooled loss drives the schedule. None when no
        site holds a local `split` (a validation fraction of 0)."""
        answers = self.pool.evaluate(weights, split)
        self._answered_all = len(answers) == len(self.pool.names)
        stats = {h: st for h, st in sorted(answers.items()) if st}
        if not stats:
            if split == "val":
                return None
            raise RuntimeError(f"no hospital could evaluate on its local {split} split")
        total = add_stats(list(stats.values()))
        pooled = metrics_from_stats(total, list(CLASSES))
        pooled["sites"] = {h: metrics_from_stats(st, list(CLASSES)) for h, st in stats.items()}
        pooled["stats"] = total  # the pooled counts: the report draws ROC curves from them
        return pooled

    def finish(self) -> dict:
        """Evaluate the best global model on val and test; write metrics.json and final weights."""
        final = {"rounds": self.round, "stop_reason": self.stop_reason or "completed all rounds",
                 "best_round": self.best_round}
        splits = (["val", "test"] if self.federated else []) + list(self.eval_sets)
        for split in splits:
            if split == "val" and self.best_val is not None and self.best_round == self.round:
                # the best round was the last: its validation was this model on these sites
                final[split] = dict(self.best_val)
                continue
            result = self._evaluate(split, self.best_weights)
            if result is not None:
                final[split] = result
        if self.federated:
            final.update(_per_site(final))
            if self.config.data.cross_site_duplicates:
                final["cross_site_duplicates"] = cross_site_duplicates(self.pool.image_hashes())
            self._calibrate_ood()
        final["privacy"] = self.privacy_summary()
        if self.skipped:
            final["resume_skipped"] = self.skipped
        checkpoint.save_weights(self.best_weights, self.run_dir / rf.MODEL)
        self.pool.save_local_models()
        atomic.write_json(self.run_dir / rf.METRICS, final)
        return final

    def _calibrate_ood(self) -> None:
        """Federated OOD calibration of the best model on the sites' validation splits (two
        messages of counts and sums per site); `fedray export` reads ood.json from the run."""
        from fedray.artifacts import ood

        sums = [p for p in self.pool.ask("ood_class_sums", self.best_weights).values() if p]
        if not sums:
            return
        centroids, present = ood.centroids_from_sums(sums)
        hists = [h for h in self.pool.ask("ood_histogram", self.best_weights,
                                          centroids).values() if h]
        checkpoint.save_weights({"centroids": centroids}, self.run_dir / OOD_CENTROIDS)
        atomic.write_json(self.run_dir / OOD_CALIBRATION, {
            "classes": [CLASSES[c] for c in present], "histogram": np.sum(hists, axis=0).tolist(),
            "bins": ood.SCORE_BINS, "score_max": ood.SCORE_MAX, "sites": len(hists)})

    def privacy_summary(self) -> dict:
        """What the run's DP means, read from the hospitals' own ledgers (which count every
        release, a late one too), not from metrics.jsonl."""
        p = self.config.privacy
        summary: dict = {"dp_sgd": p.enabled, "unit": p.unit if p.enabled else None}
        if p.enabled:
            ledgers = self.pool.ledgers()
            summary.update(
                accountant=p.accountant, reproducible_noise=p.reproducible_noise,
                guarantee=not p.reproducible_noise,
                hospitals={name: ledger for name, ledger in sorted(ledgers.items()) if ledger})
        server = self.strategy.privacy()
        if server is not None:
            summary["client_level"] = {**server, "reproducible_noise": p.reproducible_noise}
        if self.reproducible_noise:
            summary["warning"] = NOT_A_GUARANTEE
        return summary

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
        self.faults.at("before_checkpoint", self.round)
        checkpoint.save_round(self.checkpoints, self.round, self.weights, self.state(),
                              keep=self.config.checkpoint_keep, protect=self.best_round,
                              trees={"strategy": self.strategy.state_dict()},
                              hook=self.faults.write_hook(self.round))
        self.faults.at("after_checkpoint", self.round)

    def _newest_readable_round(self) -> tuple[int, OrderedDict, dict, dict] | None:
        """The newest round checkpoint that reads whole; torn ones are named in `skipped`."""
        for number in reversed(checkpoint.completed_rounds(self.checkpoints)):
            try:
                weights, state = checkpoint.load_round(self.checkpoints, number)
                strategy = checkpoint.load_round_tree(self.checkpoints, number, "strategy")
                best = int(state.get("best_round") or 0)
                if best and best != number:  # the best model must read whole too
                    checkpoint.load_round(self.checkpoints, best)
            except checkpoint.UNREADABLE as exc:
                folder = checkpoint.round_dir(self.checkpoints, number)
                self.skipped.append(str(folder))
                print(f"resume: skipped unreadable checkpoint {folder} ({exc!r})", flush=True)
                continue
            return number, weights, state, strategy
        return None

    def resume(self) -> int:
        """Continue from the last readable round on disk; returns that round (0 if none).

        Hospitals roll their optimizer state back to that round, never their ledgers.
        """
        found = self._newest_readable_round()
        if found is None:
            self._restore_server_ledger()
            self._rewrite_metrics()
            self._restore_pool()
            return 0
        _, weights, state, strategy_state = found
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
        self.strategy.load_state_dict(strategy_state)
        self.strategy.bind(list(self.pool.names), self.model, self.noise_seed)  # not the saved seed
        self._restore_server_ledger()
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        if self.best_round:
            best = checkpoint.load_round(self.checkpoints, self.best_round)[0]
            self.best_weights = OrderedDict((k, best[k]) for k in order)
        else:
            self.best_weights = weights
        self._rewrite_metrics()
        self._restore_pool()
        return self.round

    def _rewrite_metrics(self) -> None:
        atomic.write_text(self.run_dir / rf.METRICS_JSONL,
                          "".join(json.dumps(rec) + "\n" for rec in self.history))

    def _restore_pool(self) -> None:
        for report in self.pool.restore(self.round) or []:
            self.skipped.extend(p for p in (report or {}).get("skipped", []) if p not in self.skipped)

    def _restore_server_ledger(self) -> None:
        """A server ledger newer than the checkpoint (the crash window) wins: it never goes back."""
        on_disk = _read_json(self.server_ledger_path)
        state = self.strategy.state_dict()
        if on_disk is None or "accountant" not in state:
            return
        if recorded_steps(on_disk) > recorded_steps(state["accountant"]):
            state["accountant"] = {"mechanism": on_disk["mechanism"], "history": on_disk["history"]}
            self.strategy.load_state_dict(state)


SERVER_LEDGER = rf.SERVER_LEDGER
OOD_CALIBRATION, OOD_CENTROIDS = rf.OOD_CALIBRATION, rf.OOD_CENTROIDS
NOT_A_GUARANTEE = ("privacy.reproducible_noise is on: the DP noise can be recomputed from the "
                   "config, so epsilon is NOT a privacy guarantee (debugging only)")


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _central_set(config: ExperimentConfig, size: int) -> ShardDataset:
    """The coordinator's own held-out cohort (data.central_test), read and evaluated whole."""
    from fedray.data.sites import read_site

    table = read_site(config.data.central_test, config.data)
    return ShardDataset.from_table(table, size, eval_preset(size),
                                   where=f"data.central_test ({config.data.central_test})")


def cross_site_duplicates(hashes: dict[str, list[str]]) -> dict:
    """Images held by more than one site, from the sha256 lists the sites sent (never images):
    how many, and per pair of sites."""
    holders: dict[str, list[str]] = {}
    for site, digests in sorted(hashes.items()):
        for digest in set(digests):
            holders.setdefault(digest, []).append(site)
    pairs: dict[str, int] = {}
    for sites in holders.values():
        for i, a in enumerate(sites):
            for b in sites[i + 1:]:
                pairs[f"{a}|{b}"] = pairs.get(f"{a}|{b}", 0) + 1
    return {"checked": True, "sites": sorted(hashes),
            "duplicates": sum(1 for s in holders.values() if len(s) > 1), "pairs": pairs}


def _per_site(final: dict) -> dict:
    """metrics.json's `sites` ({hospital: {val, test}}) and `worst_site` (lowest test balanced
    accuracy), moved out of the pooled splits."""
    sites: dict[str, dict] = {}
    for split in ("val", "test"):
        for h, m in (final.get(split) or {}).pop("sites", {}).items():
            sites.setdefault(h, {})[split] = m
    tested = {h: m["test"]["balanced_accuracy"] for h, m in sites.items() if "test" in m}
    worst = min(tested, key=lambda h: (tested[h], h)) if tested else None
    return {"sites": sites, "worst_site": None if worst is None else
            {"hospital": worst, "balanced_accuracy": tested[worst]}}


def _summary(metrics: dict) -> dict:
    keys = ("loss", "accuracy", "balanced_accuracy", "macro_f1", "weighted_f1",
            "roc_auc_macro", "kappa")
    return {k: metrics[k] for k in keys}
