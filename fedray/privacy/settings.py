"""A hospital's resolved DP-SGD parameters: the run's values, then its own overrides."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedray.config import ConfigError, ExperimentConfig, PrivacyConfig


@dataclass(frozen=True)
class PrivacySettings:
    """One hospital's resolved DP-SGD parameters.

    `sample_rate` is the rate at which one privacy unit enters a batch, the rate the ledger
    accounts with. `grouped` is set when a unit can hold several records (a patient's images,
    or the flip_x4 copies of one image): each unit's gradient is then clipped as one, and
    `num_units` counts the units of the shard. `reproducible_noise` marks a debugging run whose
    noise and sampling were seeded from the config: its epsilon protects nothing.
    """

    noise_multiplier: float
    max_grad_norm: float
    delta: float
    budget: float | None
    sample_rate: float
    accountant: str
    poisson_sampling: bool
    secure_mode: bool
    grad_sample_mode: str
    unit: str = "record"
    reproducible_noise: bool = False
    grouped: bool = False
    num_units: int | None = None

    @property
    def steps_per_epoch(self) -> int:
        return round(1 / self.sample_rate)

    @property
    def expected_units(self) -> float:
        """Units per batch on average: what the noised gradient sum is divided by."""
        return self.sample_rate * (self.num_units or 0)


def groups_records(config: ExperimentConfig) -> bool:
    """Whether the run's privacy unit can hold several records of a shard."""
    unit = config.privacy.unit
    return unit == "patient" or (unit == "image" and config.data.flip_x4)


def resolve(config: ExperimentConfig, hospital: str, num_samples: int,
            num_units: int | None = None) -> PrivacySettings | None:
    """This hospital's settings (run-wide values, then its overrides), or None when DP is off.

    `num_samples` counts the shard's records (flip_x4 copies included), `num_units` its privacy
    units (patients, or source images under flip_x4); it is needed when `groups_records`.
    Units are Poisson-sampled at q = expected units per batch / units, where a batch of
    `training.batch_size` records holds batch_size / (records per unit) units on average, at
    least one; q is rounded to one over a whole number of batches per epoch, as Opacus does.
    delta defaults to 0.1 / n with n the number of units (patients for `patient`). With a
    target epsilon the noise is solved for the whole planned run, rounds x local epochs of
    unit-level steps, as `make_private_with_epsilon` does for one training.
    """
    p = config.privacy
    if not p.enabled:
        return None
    if p.unit == "record" and config.data.flip_x4:
        raise ConfigError(
            "privacy.unit: record needs each record to be its own source image, but "
            "data.flip_x4 makes four copies of every training image; use privacy.unit: image "
            "(the copies count as one unit) or set data.flip_x4: false")
    if p.reproducible_noise and p.secure_mode:
        raise ConfigError("privacy.reproducible_noise seeds the noise from the config, "
                          "privacy.secure_mode draws it from a cryptographic generator: "
                          "choose one")
    override = p.hospitals.get(hospital)
    merged: PrivacyConfig = p.model_copy(
        update=override.model_dump(exclude_none=True) if override else {})
    grouped = groups_records(config)
    records = max(num_samples, 1)
    if grouped:
        if not num_units:
            raise ValueError(f"privacy.unit {p.unit}: the hospital's number of units is needed")
        units = num_units
        expected = max(1.0, config.training.batch_size * units / records)
        batches = math.ceil(units / expected)
    else:
        units = records
        batches = math.ceil(records / config.training.batch_size)
    sample_rate = 1.0 / batches
    delta = merged.delta if merged.delta is not None else 0.1 / units
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
        grad_sample_mode=merged.grad_sample_mode, unit=p.unit,
        reproducible_noise=p.reproducible_noise, grouped=grouped, num_units=units)
