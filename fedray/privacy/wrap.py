"""Opacus wiring: a hospital's model, optimizer and loader are wrapped once, when it starts.

engine.py never imports Opacus; the training loop stays plain.

The Gaussian noise and the Poisson sampling draw from two generators of their own, seeded from
the operating system's entropy when the hospital starts: never from the config, never written
to disk, never sent. Anyone holding the config and the released weights could otherwise
regenerate the noise and subtract it. `privacy.reproducible_noise` (debugging only) seeds them
from the config's seed and the hospital's name instead; `privacy.secure_mode` draws both from
torchcsprng's cryptographic generator, as Opacus does.
"""

from __future__ import annotations

import copy
import hashlib
import secrets
import warnings
from dataclasses import dataclass

import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.data_loader import wrap_collate_with_empty
from fedray.privacy.noise import ThreadedNoiseOptimizer
from opacus.validators import ModuleValidator
from torch import Tensor, nn
from torch.utils.data import DataLoader

from fedray.privacy import ghost_norms  # noqa: F401 - registers Conv2d ghost norms with Opacus
from fedray.privacy.bookkeeping import BookKeepingLoss, BookKeepingModule
from fedray.privacy.errors import PrivacyBudgetExhausted
from fedray.privacy.ledger import PrivacyLedger
from fedray.privacy.settings import PrivacySettings
from fedray.privacy.units import UnitBatchSampler, UnitDPOptimizer


@dataclass
class PrivateTraining:
    """The wrapped objects a hospital trains with; `module` is the plain model inside."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    ledger: PrivacyLedger
    settings: PrivacySettings
    loss_fn: nn.Module | None = None  # the loss to train with; None: the hospital's own

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

    def report(self) -> dict[str, float | str | bool]:
        """Cumulative epsilon for one privacy unit (`unit`); sample_rate is the unit's."""
        s = self.settings
        out: dict[str, float | str | bool] = {
            "epsilon": self.ledger.epsilon(s.delta), "delta": s.delta,
            "noise_multiplier": s.noise_multiplier, "max_grad_norm": s.max_grad_norm,
            "sample_rate": s.sample_rate, "dp_steps": self.ledger.steps, "unit": s.unit}
        if s.reproducible_noise:
            out["reproducible_noise"] = True  # the noise can be recomputed: no guarantee
        return out


class NoiseSource:
    """The noise generator (on the model's device) and the sampling generator (CPU).

    Seeded once from OS entropy. With reproducible_noise, both are instead reseeded before
    each batch from (config seed, hospital, DP steps the ledger holds), so a resumed hospital
    draws exactly what an uninterrupted one would.
    """

    def __init__(self, device: torch.device, ledger: PrivacyLedger, reproducible: bool,
                 hospital: str, seed: int | None) -> None:
        if reproducible and seed is None:
            raise ValueError("privacy.reproducible_noise needs the config's seed")
        self.noise = torch.Generator(device=device)
        self.sampling = torch.Generator()
        self.ledger, self.reproducible = ledger, reproducible
        self.hospital, self.seed = hospital, seed
        if not reproducible:
            self.noise.manual_seed(secrets.randbits(63))
            self.sampling.manual_seed(secrets.randbits(63))
        self.before_batch()

    def before_batch(self) -> None:
        if self.reproducible:
            step = self.ledger.steps
            self.noise.manual_seed(_derived_seed(self.seed, self.hospital, "noise", step))
            self.sampling.manual_seed(_derived_seed(self.seed, self.hospital, "sampling", step))


def _derived_seed(seed: int | None, hospital: str, stream: str, step: int) -> int:
    digest = hashlib.sha256(f"{seed}/{hospital}/{stream}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _secure_engine(settings: PrivacySettings) -> PrivacyEngine:
    if settings.secure_mode:
        try:
            import torchcsprng  # noqa: F401
        except ImportError as exc:
            raise RuntimeError(
                "privacy.secure_mode: true draws noise and sampling from torchcsprng, which "
                "cannot be imported here; install torchcsprng for this torch, or set "
                "privacy.secure_mode: false (torch's generators, seeded from OS entropy)") from exc
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        return PrivacyEngine(accountant=settings.accountant, secure_mode=settings.secure_mode)


class PerRecordMean(nn.Module):
    """The hospital's loss as the plain mean of its per-record losses.

    A weighted mean (class weights) divides by the batch's total weight, so with per-record
    gradients from the batch loss each record's gradient would scale with the other records'
    labels and clipping would no longer bound one record's (or unit's) influence. Opacus' ghost
    clipping and book-keeping clipping take per-record losses themselves; the other modes get
    this loss.
    """

    def __init__(self, loss_fn: nn.Module) -> None:
        super().__init__()
        self.per_record = copy.copy(loss_fn)
        self.per_record.reduction = "none"

    def forward(self, *args, **kwargs) -> Tensor:
        return self.per_record(*args, **kwargs).mean()


def _per_record_mean(loss_fn: nn.Module | None) -> nn.Module | None:
    if loss_fn is None or getattr(loss_fn, "reduction", None) != "mean":
        return None
    return PerRecordMean(loss_fn)


def _unit_loader(loader: DataLoader, sampler: UnitBatchSampler) -> DataLoader:
    """The hospital's loader drawing batches from `sampler`; empty batches keep their shape."""
    first = loader.dataset[0]
    collate = wrap_collate_with_empty(
        collate_fn=loader.collate_fn,
        sample_empty_shapes=[(0, *getattr(x, "shape", ())) for x in first],
        dtypes=[getattr(x, "dtype", type(x)) for x in first])
    return DataLoader(loader.dataset, batch_sampler=sampler, collate_fn=collate,
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory)


def make_private(module: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                 settings: PrivacySettings, loss_fn: nn.Module | None = None, *,
                 unit_ids: Tensor | None = None, hospital: str = "",
                 seed: int | None = None) -> PrivateTraining:
    """Wrap model, optimizer and loader once; the ledger is the engine's accountant.

    grad_sample_mode "ghost" (ghost clipping) also wraps `loss_fn`: its backward runs twice,
    once for per-sample norms and once for the clipped sum, and the wrapped loss must be used.
    "bk" (book-keeping clipping, fedray.privacy.bookkeeping) wraps it too, with a backward
    that runs once. The other modes return `loss_fn` as a mean of per-record losses
    (PerRecordMean), to be used instead of it.
    With `settings.grouped`, `unit_ids` (one per record of the loader's dataset) name each
    record's privacy unit and clipping is per unit (fedray.privacy.units). `hospital` and `seed`
    (the config's) are read only with reproducible_noise. Batches are Poisson-sampled at
    `settings.sample_rate`; without poisson_sampling, shuffled into as many batches as
    `loader` has (records) or 1 / sample_rate (grouped units).
    """
    engine = _secure_engine(settings)
    ledger = PrivacyLedger(settings.accountant)
    engine.accountant = ledger.accountant
    # Opacus' hooks fire on modules whose inputs need no gradient (the first layer): harmless,
    # and printed once per process by every hospital.
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
    device = next(module.parameters()).device
    if settings.secure_mode:
        noise = sampling = engine.secure_rng
        before_batch = None
    else:
        source = NoiseSource(device, ledger, settings.reproducible_noise, hospital, seed)
        noise, sampling, before_batch = source.noise, source.sampling, source.before_batch
    if settings.grouped and (unit_ids is None or len(unit_ids) != len(loader.dataset)):
        raise ValueError(f"privacy.unit {settings.unit}: one unit id per record is needed")
    units = unit_ids if settings.grouped else torch.arange(len(loader.dataset))
    steps = (settings.steps_per_epoch if settings.poisson_sampling or settings.grouped
             else len(loader))
    sampler = UnitBatchSampler(units, settings.sample_rate, steps, generator=sampling,
                               poisson=settings.poisson_sampling, before_batch=before_batch,
                               track=settings.grouped)
    loader = _unit_loader(loader, sampler)
    if settings.grouped:
        if sampler.num_units != settings.num_units:
            raise ValueError(f"{sampler.num_units} units in the shard, settings for "
                             f"{settings.num_units}")
        model, optimizer = _make_unit_private(module, optimizer, settings, ledger, sampler, noise)
        return PrivateTraining(model, optimizer, loader, ledger, settings,
                               _per_record_mean(loss_fn))
    if settings.grad_sample_mode == "bk":
        if loss_fn is None:
            raise ValueError("grad_sample_mode 'bk' needs the hospital's loss function")
        model, optimizer = _make_bk_private(module, optimizer, settings, ledger, loader, noise)
        return PrivateTraining(model, optimizer, loader, ledger, settings,
                               BookKeepingLoss(model, loss_fn))
    # Sampling is this hospital's own (above); Opacus gets the loader as it must be used.
    options = dict(module=module, optimizer=optimizer, data_loader=loader,
                   noise_multiplier=settings.noise_multiplier, max_grad_norm=settings.max_grad_norm,
                   poisson_sampling=False, grad_sample_mode=settings.grad_sample_mode,
                   noise_generator=None if settings.secure_mode else noise)
    if settings.grad_sample_mode == "ghost":
        if loss_fn is None:
            raise ValueError("grad_sample_mode 'ghost' needs the hospital's loss function")
        model, optimizer, private_loss, loader = engine.make_private(criterion=loss_fn, **options)
    else:
        model, optimizer, loader = engine.make_private(**options)
        private_loss = _per_record_mean(loss_fn)
    if settings.poisson_sampling:
        model.forbid_grad_accumulation()
    return PrivateTraining(model, optimizer, loader, ledger, settings, private_loss)


def _make_unit_private(module: nn.Module, optimizer: torch.optim.Optimizer,
                       settings: PrivacySettings, ledger: PrivacyLedger,
                       sampler: UnitBatchSampler, noise: torch.Generator,
                       ) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Per-record gradients by Opacus' hooks, summed per unit, clipped and noised by Opacus."""
    ModuleValidator.validate(module, strict=True)
    model = GradSampleModule(module, batch_first=True, loss_reduction="mean")
    if settings.poisson_sampling:
        model.forbid_grad_accumulation()
    dp_optimizer = UnitDPOptimizer(
        optimizer, sampler=sampler, noise_multiplier=settings.noise_multiplier,
        max_grad_norm=settings.max_grad_norm, expected_batch_size=settings.expected_units,
        generator=noise, secure_mode=settings.secure_mode)
    dp_optimizer.attach_step_hook(
        ledger.accountant.get_optimizer_hook_fn(sample_rate=settings.sample_rate))
    return model, dp_optimizer


def _make_bk_private(module: nn.Module, optimizer: torch.optim.Optimizer,
                     settings: PrivacySettings, ledger: PrivacyLedger, loader: DataLoader,
                     noise: torch.Generator) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Book-keeping clipping: one backward leaves the clipped sum in .grad (as the ghost
    mode's two do), and Opacus' ghost-mode optimizer noises it (on the CPU by several threads,
    fedray.privacy.noise), averages it and accounts.

    The noise generator is the hospital's (Opacus' cryptographic one in secure mode, which
    is what its engine hands the optimizer then). The divisor is Opacus' for the ghost mode,
    int(records / batches per epoch), so the two modes take the same steps.
    """
    model = BookKeepingModule(module, max_grad_norm=settings.max_grad_norm)
    dp_optimizer = ThreadedNoiseOptimizer(
        optimizer, noise_multiplier=settings.noise_multiplier,
        max_grad_norm=settings.max_grad_norm,
        expected_batch_size=int(len(loader.dataset) * (1 / len(loader))), loss_reduction="mean",
        generator=noise, secure_mode=settings.secure_mode)
    dp_optimizer.attach_step_hook(
        ledger.accountant.get_optimizer_hook_fn(sample_rate=settings.sample_rate))
    return model, dp_optimizer
