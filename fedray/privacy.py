"""Opacus wiring and the per-hospital privacy ledger.

A hospital's model, optimizer and loader are wrapped once, when the hospital starts, and its
accountant (the ledger) lives for the whole run: it is saved with the hospital's own state
after every round and restored on resume, so epsilon only ever grows. Building a new
PrivacyEngine each round, as several federated examples do, silently resets epsilon to zero.
engine.py never imports Opacus; the training loop stays plain.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.accountants.utils import create_accountant, get_noise_multiplier
from torch import nn
from torch.utils.data import DataLoader

from fedray import ghost_norms  # noqa: F401 - registers Conv2d ghost norms with Opacus
from fedray.config import ExperimentConfig, PrivacyConfig


class PrivacyBudgetExhausted(RuntimeError):
    """The hospital's next round would take its epsilon past the budget; it does not train."""

    def __init__(self, hospital: str, spent: float, projected: float, budget: float) -> None:
        super().__init__(hospital, spent, projected, budget)  # args as given: survives pickling
        self.hospital, self.spent, self.projected, self.budget = hospital, spent, projected, budget

    def __str__(self) -> str:
        return (f"hospital {self.hospital}: privacy budget exhausted (epsilon spent "
                f"{self.spent:.3f}, next round would reach {self.projected:.3f} > budget "
                f"{self.budget:.3f})")


@dataclass(frozen=True)
class PrivacySettings:
    """One hospital's resolved DP-SGD parameters."""

    noise_multiplier: float
    max_grad_norm: float
    delta: float
    budget: float | None
    sample_rate: float
    accountant: str
    poisson_sampling: bool
    secure_mode: bool
    grad_sample_mode: str


def resolve(config: ExperimentConfig, hospital: str, num_samples: int) -> PrivacySettings | None:
    """This hospital's settings (run-wide values, then its overrides), or None when DP is off.

    With a target epsilon the noise is solved for the whole planned run, rounds x local
    epochs, as `make_private_with_epsilon` does for one training.
    """
    p = config.privacy
    if not p.enabled:
        return None
    override = p.hospitals.get(hospital)
    merged: PrivacyConfig = p.model_copy(
        update=override.model_dump(exclude_none=True) if override else {})
    # The rate Opacus itself accounts with: one over the number of batches per epoch.
    sample_rate = 1.0 / math.ceil(max(num_samples, 1) / config.training.batch_size)
    delta = merged.delta if merged.delta is not None else 0.1 / max(num_samples, 1)
    if merged.target_epsilon is not None:
        epochs = config.federation.rounds * config.training.local_epochs
        noise = get_noise_multiplier(target_epsilon=merged.target_epsilon, target_delta=delta,
                                     sample_rate=sample_rate, epochs=epochs,
                                     accountant=merged.accountant)
        budget = merged.budget if merged.budget is not None else merged.target_epsilon
    else:
        noise, budget = merged.noise_multiplier, merged.budget
    return PrivacySettings(
        noise_multiplier=float(noise), max_grad_norm=merged.max_grad_norm, delta=delta,
        budget=budget, sample_rate=sample_rate, accountant=merged.accountant,
        poisson_sampling=merged.poisson_sampling, secure_mode=merged.secure_mode,
        grad_sample_mode=merged.grad_sample_mode)


class PrivacyLedger:
    """The hospital's one accountant for the whole run."""

    def __init__(self, accountant: str) -> None:
        self.accountant = create_accountant(mechanism=accountant)

    def epsilon(self, delta: float) -> float:
        return float(self.accountant.get_epsilon(delta)) if self.accountant.history else 0.0

    def projected(self, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
        """Epsilon after `steps` more steps, computed on a copy: the ledger itself is untouched."""
        trial = copy.deepcopy(self.accountant)
        trial.history.append((noise_multiplier, sample_rate, steps))
        return float(trial.get_epsilon(delta))

    @property
    def steps(self) -> int:
        return int(sum(entry[2] for entry in self.accountant.history))

    def state_dict(self) -> dict[str, Any]:
        state = self.accountant.state_dict()
        return {"history": [list(h) for h in state["history"]], "mechanism": state["mechanism"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accountant.load_state_dict(
            {"history": [tuple(h) for h in state["history"]], "mechanism": state["mechanism"]})


@dataclass
class PrivateTraining:
    """The wrapped objects a hospital trains with; `module` is the plain model inside."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    ledger: PrivacyLedger
    settings: PrivacySettings
    loss_fn: nn.Module | None = None  # ghost clipping's two-pass loss; None: the hospital's own

    def steps_per_round(self, local_epochs: int) -> int:
        return local_epochs * len(self.loader)

    def check_budget(self, hospital: str, local_epochs: int) -> None:
        s = self.settings
        if s.budget is None:
            return
        projected = self.ledger.projected(s.noise_multiplier, s.sample_rate,
                                          self.steps_per_round(local_epochs), s.delta)
        if projected > s.budget:
            raise PrivacyBudgetExhausted(hospital, self.ledger.epsilon(s.delta), projected, s.budget)

    def report(self) -> dict[str, float]:
        s = self.settings
        return {"epsilon": self.ledger.epsilon(s.delta), "delta": s.delta,
                "noise_multiplier": s.noise_multiplier, "max_grad_norm": s.max_grad_norm,
                "sample_rate": s.sample_rate, "dp_steps": self.ledger.steps}


def make_private(module: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                 settings: PrivacySettings, loss_fn: nn.Module | None = None) -> PrivateTraining:
    """Wrap model, optimizer and loader once; the ledger is the engine's accountant.

    grad_sample_mode "ghost" (ghost clipping) also wraps `loss_fn`: its backward runs twice,
    once for per-sample norms and once for the clipped sum, and the wrapped loss must be used.
    """
    if settings.secure_mode:
        try:
            import torchcsprng  # noqa: F401
        except ImportError as exc:
            raise RuntimeError("privacy.secure_mode needs the torchcsprng package") from exc
    engine = PrivacyEngine(accountant=settings.accountant, secure_mode=settings.secure_mode)
    ledger = PrivacyLedger(settings.accountant)
    engine.accountant = ledger.accountant
    # Opacus' hooks fire on modules whose inputs need no gradient (the first layer): harmless,
    # and printed once per process by every hospital.
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
    options = dict(module=module, optimizer=optimizer, data_loader=loader,
                   noise_multiplier=settings.noise_multiplier, max_grad_norm=settings.max_grad_norm,
                   poisson_sampling=settings.poisson_sampling,
                   grad_sample_mode=settings.grad_sample_mode)
    if settings.grad_sample_mode == "ghost":
        if loss_fn is None:
            raise ValueError("grad_sample_mode 'ghost' needs the hospital's loss function")
        model, optimizer, private_loss, loader = engine.make_private(criterion=loss_fn, **options)
        return PrivateTraining(model, optimizer, loader, ledger, settings, private_loss)
    model, optimizer, loader = engine.make_private(**options)
    return PrivateTraining(model, optimizer, loader, ledger, settings)


def epsilon_for(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                accountant: str = "rdp") -> float:
    """Epsilon of a fixed (sigma, q, steps) schedule, for planning and for tests."""
    ledger = PrivacyLedger(accountant)
    return ledger.projected(noise_multiplier, sample_rate, steps, delta) if steps else 0.0
