"""Opacus wiring: a hospital's model, optimizer and loader are wrapped once, when it starts.

engine.py never imports Opacus; the training loop stays plain.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader

from fedray.privacy import ghost_norms  # noqa: F401 - registers Conv2d ghost norms with Opacus
from fedray.privacy.errors import PrivacyBudgetExhausted
from fedray.privacy.ledger import PrivacyLedger
from fedray.privacy.settings import PrivacySettings


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
