"""DP-SGD inside hospitals: the ledger's epsilon, its persistence, budgets, and equivalences."""

from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from fedray import privacy
from fedray.federation.client import HospitalClient
from fedray.config import ConfigError
from fedray.data.shards import ShardSet
from fedray.federation.messages import FitIns

from conftest import local_coordinator, tiny_config

DP = {"model.dp_safe": "true", "privacy.enabled": "true", "privacy.noise_multiplier": 1.0,
      "privacy.max_grad_norm": 1.0}


def client(shard_dir: Path, state_dir: Path | None, **overrides) -> HospitalClient:
    shards = ShardSet.load(shard_dir)
    config = tiny_config(state_dir or shard_dir, **overrides)
    return HospitalClient("hospital_a", shards.path(shards.hospitals["hospital_a"]), config,
                          state_dir, num_threads=1)


coordinator = local_coordinator


def test_reported_epsilon_equals_opacus_accountant(shard_dir: Path) -> None:
    c = client(shard_dir, None, **DP)
    weights = {k: v.numpy().copy() for k, v in c.model.state_dict().items()}
    res = c.fit(weights, FitIns(round=1, lr=1e-3, local_epochs=2, seed=0))
    q = 1 / len(c.loader)  # Poisson sampling: expected batch / n, one over batches per epoch
    steps = 2 * len(c.loader)
    oracle = RDPAccountant()
    oracle.history = [(1.0, q, steps)]
    assert res.metrics["dp_steps"] == steps
    assert res.metrics["epsilon"] == pytest.approx(oracle.get_epsilon(res.metrics["delta"]), rel=1e-9)
    assert res.metrics["delta"] == pytest.approx(0.1 / len(c.dataset))
    assert not any(k.startswith("_module.") for k in res.weights)
    assert privacy.epsilon_for(1.0, q, steps, res.metrics["delta"]) == pytest.approx(res.metrics["epsilon"])


def test_zero_noise_infinite_clip_equals_plain_training(shard_dir: Path) -> None:
    # Opacus averages over the expected batch size, so every batch must be full: one batch
    # per epoch of the whole shard, two epochs.
    n = sum(ShardSet.load(shard_dir).counts["hospital_a"].values())
    # No dropout: the DP loader shuffles with its own generator, so masks fall on other records.
    common = {"model.dp_safe": "true", "training.grad_clip": "null", "data.augment": "false",
              "model.dropout": 0.0, "training.batch_size": n}
    private = client(shard_dir, None, **common, **{
        "privacy.enabled": "true", "privacy.noise_multiplier": 0.0,
        "privacy.max_grad_norm": 1e9, "privacy.poisson_sampling": "false"})
    plain = client(shard_dir, None, **common)
    weights = {k: v.numpy().copy() for k, v in plain.model.state_dict().items()}
    ins = FitIns(round=1, lr=1e-3, local_epochs=2, seed=3)
    a, b = private.fit(weights, ins), plain.fit(weights, ins)
    # Equal up to float summation order, which Adam can amplify for near-zero gradients: the
    # two runs must differ by under 1% of how far training moved the weights.
    diff = np.sqrt(sum(((a.weights[n] - b.weights[n]) ** 2).sum() for n in weights))
    step = np.sqrt(sum(((b.weights[n] - weights[n]) ** 2).sum() for n in weights))
    assert diff < 0.01 * step, (diff, step)
    moved = max(np.abs(b.weights[n] - weights[n]).max() for n in weights)
    assert moved > 1e-4  # training really happened


def test_epsilon_grows_and_survives_resume(tmp_path: Path, shard_dir: Path) -> None:
    # Reproducible noise, so that the resumed run can be compared weight for weight: noise and
    # sampling are then seeded per DP step from (seed, hospital, steps in the ledger).
    settings = {**DP, "federation.rounds": 3, "privacy.reproducible_noise": "true"}
    full = coordinator(tmp_path / "full", shard_dir, **settings)
    eps = [full.run_round()["hospitals"]["hospital_a"]["epsilon"] for _ in range(3)]
    assert 0 < eps[0] < eps[1] < eps[2]

    part = coordinator(tmp_path / "part", shard_dir, **settings)
    part.run_round(), part.run_round()
    resumed = coordinator(tmp_path / "part", shard_dir, **settings)
    assert resumed.resume() == 2
    record = resumed.run_round()
    assert record["hospitals"]["hospital_a"]["epsilon"] == pytest.approx(eps[2], rel=1e-12)
    for name in full.weights:
        assert np.array_equal(full.weights[name], resumed.weights[name]), name


def test_spent_budget_stops_that_hospital_and_then_the_run(tmp_path: Path, shard_dir: Path) -> None:
    probe = coordinator(tmp_path / "probe", shard_dir, **DP)
    first = probe.run_round()["hospitals"]

    def eps_after(hospital: str, rounds: int) -> float:
        h = first[hospital]
        return privacy.epsilon_for(h["noise_multiplier"], h["sample_rate"], rounds * h["dp_steps"],
                                   h["delta"])

    budget_a = (eps_after("hospital_a", 1) + eps_after("hospital_a", 2)) / 2  # one round only
    budget_b = (eps_after("hospital_b", 2) + eps_after("hospital_b", 3)) / 2  # two rounds
    coord = coordinator(tmp_path / "run", shard_dir, **DP, **{
        "federation.rounds": 5, "federation.min_clients": 1, "privacy.budget": budget_a,
        "privacy.hospitals": "{hospital_b: {budget: %r}}" % budget_b})
    records = []
    while (rec := coord.run_round()) is not None:
        records.append(rec)
    assert records[0]["completed"] == ["hospital_a", "hospital_b"]
    assert records[1]["completed"] == ["hospital_b"]
    assert records[1]["failures"][0]["hospital"] == "hospital_a"
    assert records[1]["failures"][0]["kind"] == "budget"
    assert "privacy budget exhausted" in records[1]["failures"][0]["message"]
    assert records[2]["selected"] == [] or "hospital_a" not in records[2]["selected"]
    assert "privacy budget spent" in records[-1]["stop_reason"]
    assert len(records) == 3
    for rec in records:
        for h in rec["hospitals"].values():
            assert h["epsilon"] <= (budget_a if h is rec["hospitals"].get("hospital_a") else budget_b)


def test_target_epsilon_solves_noise_for_the_whole_run(shard_dir: Path) -> None:
    c = client(shard_dir, None, **{**DP, "privacy.target_epsilon": 3.0, "federation.rounds": 4,
                                   "training.local_epochs": 2})
    s = c.private.settings
    epochs = 4 * 2
    planned = privacy.epsilon_for(s.noise_multiplier, s.sample_rate,
                                  int(epochs / s.sample_rate), s.delta)
    assert planned == pytest.approx(3.0, abs=0.05) and s.budget == 3.0


def test_privacy_requires_dp_safe_model() -> None:
    with pytest.raises(ConfigError, match="model.dp_safe"):
        tiny_config(Path("."), **{"privacy.enabled": "true"})


def test_hospital_wraps_once(shard_dir: Path) -> None:
    c = client(shard_dir, None, **DP)
    hooks_before = len(c.model._forward_hooks)
    for r in (1, 2):
        c.fit({k: v.numpy().copy() for k, v in c.model.state_dict().items()},
              FitIns(round=r, lr=1e-3, local_epochs=1, seed=r))
    assert len(c.model._forward_hooks) == hooks_before
    assert isinstance(c.train_model, torch.nn.Module) and c.train_model is not c.model
