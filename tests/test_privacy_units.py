"""What one epsilon protects (an image, a patient, a record) and where the noise comes from."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedray import privacy
from fedray.federation.client import HospitalClient
from fedray.config import ConfigError
from fedray.data.shards import ShardSet
from fedray.federation.messages import FitIns

from conftest import tiny_config

DP = {"model.dp_safe": "true", "privacy.enabled": "true", "privacy.noise_multiplier": 1.0,
      "privacy.max_grad_norm": 1.0}


def client(shard_dir: Path, **overrides) -> HospitalClient:
    shards = ShardSet.load(shard_dir)
    config = tiny_config(shard_dir, **overrides)
    return HospitalClient("hospital_a", shards.path(shards.hospitals["hospital_a"]), config,
                          None, num_threads=1)


def start_weights(shard_dir: Path) -> dict[str, np.ndarray]:
    """One set of global weights, handed to every client a test compares."""
    torch.manual_seed(0)
    c = client(shard_dir, **{"model.dp_safe": "true"})
    return {k: v.numpy().copy() for k, v in c.model.state_dict().items()}


def one_fit(c: HospitalClient, weights: dict[str, np.ndarray] | None = None, seed: int = 5,
            epochs: int = 1):
    if weights is None:
        weights = {k: v.numpy().copy() for k, v in c.model.state_dict().items()}
    return c.fit(copy.deepcopy(weights), FitIns(round=1, lr=1e-3, local_epochs=epochs, seed=seed))


def same_weights(a, b) -> bool:
    return all(np.array_equal(a.weights[k], b.weights[k]) for k in a.weights)


def settings(unit_count: int, sample_rate: float, noise: float, clip: float,
             poisson: bool = True) -> privacy.PrivacySettings:
    return privacy.PrivacySettings(
        noise_multiplier=noise, max_grad_norm=clip, delta=1e-5, budget=None,
        sample_rate=sample_rate, accountant="rdp", poisson_sampling=poisson, secure_mode=False,
        grad_sample_mode="ghost", unit="patient", grouped=True, num_units=unit_count)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3))


# Twelve records from five patients of 1 to 4 images each.
PATIENTS = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 4, 4])


def patient_data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    n = len(PATIENTS)
    return TensorDataset(torch.randn(n, 3, 6, 6, generator=g),
                         torch.randint(0, 3, (n,), generator=g),
                         torch.arange(n))


# --- where the noise comes from -------------------------------------------------------------

def test_two_dp_runs_of_one_config_release_different_weights(shard_dir: Path) -> None:
    w = start_weights(shard_dir)
    a, b = one_fit(client(shard_dir, **DP), w), one_fit(client(shard_dir, **DP), w)
    assert not same_weights(a, b)
    assert "reproducible_noise" not in a.metrics


def test_reproducible_noise_releases_identical_weights_and_says_so(shard_dir: Path) -> None:
    rep = {**DP, "privacy.reproducible_noise": "true"}
    w = start_weights(shard_dir)
    a, b = one_fit(client(shard_dir, **rep), w), one_fit(client(shard_dir, **rep), w)
    assert same_weights(a, b)
    assert a.metrics["reproducible_noise"] is True


def test_plain_training_stays_bit_reproducible(shard_dir: Path) -> None:
    plain = {"model.dp_safe": "true"}
    w = start_weights(shard_dir)
    a, b = one_fit(client(shard_dir, **plain), w), one_fit(client(shard_dir, **plain), w)
    assert same_weights(a, b)


def test_noise_ignores_the_global_seed() -> None:
    """Seeding torch's global generator (as every round does) fixes no DP noise."""
    grads = []
    for _ in range(2):
        model = tiny_model()
        data = patient_data()
        s = privacy.PrivacySettings(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5,
                                    budget=None, sample_rate=1.0, accountant="rdp",
                                    poisson_sampling=False, secure_mode=False,
                                    grad_sample_mode="hooks")
        private = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                       DataLoader(data, batch_size=len(data)), s)
        torch.manual_seed(0)
        x, y, _ = next(iter(private.loader))
        nn.functional.cross_entropy(private.model(x), y).backward()
        private.optimizer.step()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert not torch.equal(grads[0], grads[1])


def test_secure_mode_without_torchcsprng_names_the_setting(shard_dir: Path) -> None:
    try:
        import torchcsprng  # noqa: F401
        pytest.skip("torchcsprng is installed here")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match="privacy.secure_mode"):
        client(shard_dir, **DP, **{"privacy.secure_mode": "true"})


# --- per-unit clipping ----------------------------------------------------------------------

def per_patient_grads(model: nn.Module, x, y, index, weight) -> dict[int, list[torch.Tensor]]:
    """Each patient's summed gradient by plain autograd, one record at a time."""
    out: dict[int, list[torch.Tensor]] = {}
    for i in range(len(index)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1], weight=weight,
                                    label_smoothing=0.1, reduction="sum").backward()
        g = [p.grad.clone() for p in model.parameters()]
        patient = int(PATIENTS[index[i]])
        out[patient] = [a + b for a, b in zip(out[patient], g)] if patient in out else g
    return out


@pytest.mark.parametrize("weighted", [False, True])
def test_per_patient_clipping_matches_per_sample_autograd(weighted: bool) -> None:
    """One DP step with zero noise: each patient's summed gradient clipped to C, the clipped
    sum over the batch's patients divided by the expected number of patients. With class
    weights a record's gradient is its own weighted loss's, whatever else is in the batch."""
    data = patient_data()
    weight = torch.tensor([0.5, 1.0, 3.0]) if weighted else None
    grads = per_patient_grads(tiny_model(), *data.tensors, weight)
    norms = sorted(float(torch.sqrt(sum((t ** 2).sum() for t in g))) for g in grads.values())
    clip = (norms[1] + norms[2]) / 2  # two patients within the bound, three clipped
    model = tiny_model()
    private = privacy.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(data, batch_size=4),
        settings(5, 1.0, 0.0, clip, poisson=False), nn.CrossEntropyLoss(weight=weight,
                                                                        label_smoothing=0.1),
        unit_ids=PATIENTS)
    (x, y, index), = list(private.loader)  # q = 1: every patient in the one batch
    assert sorted(index.tolist()) == list(range(len(PATIENTS)))
    private.loss_fn(private.model(x), y).backward()
    private.optimizer.step()

    total = [torch.zeros_like(p) for p in model.parameters()]
    for g in grads.values():
        norm = float(torch.sqrt(sum((t ** 2).sum() for t in g)))
        factor = min(1.0, clip / (norm + 1e-6))
        total = [t + factor * gi for t, gi in zip(total, g)]
    for got, want in zip((p.grad for p in model.parameters()), total):
        torch.testing.assert_close(got, want / 5, rtol=1e-4, atol=1e-7)


def test_unit_sampler_draws_whole_units_at_the_unit_rate() -> None:
    from fedray.privacy.units import UnitBatchSampler

    units = torch.arange(400).repeat_interleave(3)  # 400 units of 3 records
    sampler = UnitBatchSampler(units, 0.1, 200, generator=torch.Generator().manual_seed(0))
    sizes = []
    for batch in sampler:
        drawn = units[batch]
        assert (torch.bincount(drawn)[drawn.unique()] == 3).all()
        assert torch.equal(sampler.next_units(), drawn)
        sizes.append(len(drawn.unique()))
    mean = sum(sizes) / len(sizes)  # Binomial(400, 0.1): mean 40, sd of the mean 0.42
    assert abs(mean - 40) < 2.5, mean


@pytest.mark.parametrize("unit", ["patient", "image"])
def test_zero_noise_infinite_clip_equals_plain_training_per_unit(unit: str) -> None:
    """On the same batches, DP-SGD over units with no noise and no clipping is SGD on the summed
    loss over the expected number of units per batch. In float64: the batches are drawn at
    random, and in float32 about 1 draw in 100 let rounding cross a ReLU and grow past the
    tolerance within the run."""
    data = patient_data()
    data = TensorDataset(data.tensors[0].double(), *data.tensors[1:])
    units = PATIENTS if unit == "patient" else torch.arange(len(PATIENTS)) % 3  # 3 images x4
    count = int(units.max()) + 1
    q = 0.5
    model = tiny_model().double()
    plain = copy.deepcopy(model)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.5)
    private = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=0.5),
                                   DataLoader(data, batch_size=4),
                                   settings(count, q, 0.0, 1e9), unit_ids=units)
    steps = 0
    for _ in range(3):
        for x, y, _ in private.loader:
            private.optimizer.zero_grad()
            nn.functional.cross_entropy(private.model(x), y).backward()
            private.optimizer.step()
            plain_opt.zero_grad()
            (nn.functional.cross_entropy(plain(x), y, reduction="sum") / (q * count)).backward()
            plain_opt.step()
            steps += len(y) > 0
    assert steps >= 3
    for a, b in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)
    moved = max((a - b).abs().max() for a, b in zip(plain.parameters(),
                                                     tiny_model().double().parameters()))
    assert moved > 1e-3


@pytest.mark.parametrize("mode", [{"privacy.unit": "patient"},
                                  {"privacy.unit": "image", "data.flip_x4": "true"}])
def test_client_zero_noise_infinite_clip_equals_plain_training(shard_dir: Path, mode) -> None:
    """A hospital in patient (or image with flip_x4) mode, every unit in every batch (q = 1),
    no noise and no clipping, trains as the plain hospital does. AdamW is blind to the constant
    scale between the record mean and the sum over the expected units."""
    big = 10_000
    # No dropout: the unit sampler orders a batch by unit, so masks would fall on other records.
    common = {"model.dp_safe": "true", "training.grad_clip": "null", "data.augment": "false",
              "model.dropout": 0.0, "training.batch_size": big, **mode}
    private = client(shard_dir, **common, **{"privacy.enabled": "true",
                                             "privacy.noise_multiplier": 0.0,
                                             "privacy.max_grad_norm": 1e9})
    plain = client(shard_dir, **common)
    assert private.private.settings.sample_rate == 1.0
    w0 = start_weights(shard_dir)
    a, b = one_fit(private, w0, seed=3, epochs=2), one_fit(plain, w0, seed=3, epochs=2)
    diff = np.sqrt(sum(((a.weights[n] - b.weights[n]) ** 2).sum() for n in w0))
    step = np.sqrt(sum(((b.weights[n] - w0[n]) ** 2).sum() for n in w0))
    assert step > 1e-3 and diff < 0.01 * step, (diff, step)


# --- accounting -----------------------------------------------------------------------------

@pytest.mark.parametrize("unit", ["patient", "image"])
def test_epsilon_matches_an_independent_accountant(shard_dir: Path, unit: str) -> None:
    """Google's dp-accounting recomputes epsilon from the reported (sigma, q, steps, delta)."""
    import dp_accounting

    c = client(shard_dir, **DP, **{"privacy.unit": unit, "training.batch_size": 16})
    m = one_fit(c, epochs=2).metrics
    sigma, q, steps, delta = m["noise_multiplier"], m["sample_rate"], m["dp_steps"], m["delta"]
    assert 0 < q < 1 and steps == 2 * round(1 / q)
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(
        q, dp_accounting.GaussianDpEvent(sigma)), steps)
    assert m["epsilon"] == pytest.approx(accountant.get_epsilon(delta), rel=0.01)


def test_patient_unit_trains_and_reports_patient_level_figures(shard_dir: Path) -> None:
    c = client(shard_dir, **DP, **{"privacy.unit": "patient", "training.batch_size": 16})
    patients = len(set(c.dataset.groups))
    records = len(c.dataset)
    assert 1 < patients < records
    expected = max(1.0, 16 * patients / records)
    batches = math.ceil(patients / expected)
    res = one_fit(c)
    m = res.metrics
    assert m["unit"] == "patient"
    assert m["sample_rate"] == pytest.approx(1 / batches)
    assert m["dp_steps"] == batches == c.private.steps_per_round(1)
    assert m["delta"] == pytest.approx(0.1 / patients)
    assert m["epsilon"] > 0 and all(np.isfinite(w).all() for w in res.weights.values())
    assert not any(k.startswith("_module.") for k in res.weights)


def test_target_epsilon_is_solved_for_unit_level_steps(shard_dir: Path) -> None:
    c = client(shard_dir, **DP, **{"privacy.unit": "patient", "privacy.target_epsilon": 4.0,
                                   "federation.rounds": 3, "training.batch_size": 16})
    s = c.private.settings
    planned = privacy.epsilon_for(s.noise_multiplier, s.sample_rate,
                                  3 * c.private.steps_per_round(1), s.delta)
    assert planned == pytest.approx(4.0, abs=0.05)


def test_flip_copies_are_one_unit(shard_dir: Path) -> None:
    c = client(shard_dir, **DP, **{"data.flip_x4": "true"})
    s = c.private.settings
    records = len(c.dataset)
    images = records // 4
    assert s.unit == "image" and s.grouped and s.num_units == images
    batches = math.ceil(images / max(1.0, 32 * images / records))
    assert s.sample_rate == pytest.approx(1 / batches)
    sampler = c.private.loader.batch_sampler
    for batch in sampler:  # every drawn image comes with its four copies
        sources = c.dataset.sources[batch]
        assert (torch.bincount(sources)[sources.unique()] == 4).all()
    m = one_fit(c).metrics
    assert m["dp_steps"] == batches and m["delta"] == pytest.approx(0.1 / images)


def test_record_unit_with_flips_is_refused(shard_dir: Path) -> None:
    with pytest.raises(ConfigError, match="data.flip_x4"):
        client(shard_dir, **DP, **{"data.flip_x4": "true", "privacy.unit": "record"})
