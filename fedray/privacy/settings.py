"""A hospital's resolved DP-SGD parameters: the run's values, then its own overrides."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedray.config import ExperimentConfig, PrivacyConfig


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
        from opacus.accountants.utils import get_noise_multiplier

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
