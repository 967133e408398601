"""DPFedAvg (client-level DP on the server) against numpy oracles and Opacus' own accountant."""

from __future__ import annotations

import itertools
from collections import OrderedDict

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from fedray.artifacts import checkpoint
from fedray.federation.messages import Failure, FitRes
from fedray.strategy import DPFedAvg, build_strategy, strategy_params
from fedray.strategy.aggregate import weighted_average

DELTA = 1e-5


def model(rng: np.random.Generator, scale: float = 1.0) -> OrderedDict:
    return OrderedDict([
        ("conv.weight", (rng.normal(size=(4, 3, 3, 3)) * scale).astype(np.float32)),
        ("bn.num_batches_tracked", np.array(rng.integers(0, 100), dtype=np.int64)),
        ("fc.bias", (rng.normal(size=5) * scale).astype(np.float64)),
    ])


def results(n: int, seed: int = 0, scale: float = 1.0) -> list[FitRes]:
    rng = np.random.default_rng(seed)
    return [FitRes(f"hospital_{i}", model(rng, scale), int(rng.integers(5, 500)), {})
            for i in range(n)]


def floats(weights: dict) -> list[str]:
    return [k for k, v in weights.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]


def global_norm(weights: dict, names: list[str]) -> float:
    return float(np.sqrt(sum(np.sum(np.asarray(weights[n], dtype=np.float64) ** 2)
                             for n in names)))


def assert_bitwise_equal(a: OrderedDict, b: OrderedDict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype
        assert a[name].tobytes() == b[name].tobytes(), name


def dp(**kwargs) -> DPFedAvg:
    """A seeded strategy (reproducible noise) for the math; runs draw from OS entropy."""
    params = {"clip_norm": 1.0, "noise_multiplier": 1.0, "total_hospitals": 10, "delta": DELTA,
              "seed": 0}
    params.update(kwargs)
    return DPFedAvg(**params)


# ---- aggregation math --------------------------------------------------------------------

def test_no_noise_and_huge_clip_is_the_unweighted_mean_of_updates() -> None:
    current = model(np.random.default_rng(99))
    res = results(5, seed=1)
    out = dp(clip_norm=1e9, noise_multiplier=0.0).aggregate(1, current, res, [])
    weighted = weighted_average([(r.weights, r.num_samples) for r in res])
    for name in current:
        ref = np.asarray(current[name])
        stack = np.stack([np.asarray(r.weights[name], dtype=np.float64) for r in res])
        assert out[name].dtype == ref.dtype and out[name].shape == ref.shape
        if name == "bn.num_batches_tracked":
            assert out[name] == np.rint(stack.mean(axis=0))
            continue
        oracle = ref.astype(np.float64) + (stack - ref.astype(np.float64)).mean(axis=0)
        np.testing.assert_allclose(out[name], oracle, rtol=1e-6, atol=1e-6)
        # The sample counts differ, so a sample-weighted mean would be told apart here.
        assert not np.allclose(out[name], weighted[name], rtol=1e-3, atol=1e-3)


def test_clipping_uses_the_global_norm_of_the_whole_update() -> None:
    current = model(np.random.default_rng(3))
    names = floats(current)
    direction = {n: np.random.default_rng(4 + i).normal(size=np.shape(current[n]))
                 for i, n in enumerate(names)}
    norm = global_norm(direction, names)
    weights = OrderedDict(current)
    for n in names:  # an update of global norm 10, spread over a float32 and a float64 tensor
        weights[n] = (np.asarray(current[n], dtype=np.float64)
                      + direction[n] * (10.0 / norm)).astype(current[n].dtype)
    update_norm = global_norm({n: weights[n].astype(np.float64) - current[n] for n in names},
                              names)
    assert update_norm == pytest.approx(10.0, rel=1e-5)
    # Each tensor alone has a norm above 1: clipping tensor by tensor would give sqrt(2)-ish.
    assert all(global_norm(direction, [n]) / norm * 10.0 > 1.0 for n in names)

    strategy = dp(clip_norm=1.0, noise_multiplier=0.0)
    out = strategy.aggregate(1, current, [FitRes("h0", weights, 100, {})], [])
    step = {n: out[n].astype(np.float64) - current[n].astype(np.float64) for n in names}
    assert global_norm(step, names) == pytest.approx(1.0, rel=1e-5)
    for n in names:  # the same direction, scaled down
        expected = (weights[n].astype(np.float64) - current[n]) / update_norm
        np.testing.assert_allclose(step[n], expected, rtol=1e-4, atol=1e-6)
    assert out["bn.num_batches_tracked"] == current["bn.num_batches_tracked"]
    assert strategy.last_round_report()["clipped"] == 1

    # An update already inside the ball is left alone, and not counted as clipped.
    small = OrderedDict(current)
    for n in names:
        small[n] = (np.asarray(current[n], dtype=np.float64)
                    + direction[n] * (0.5 / norm)).astype(current[n].dtype)
    out = strategy.aggregate(2, current, [FitRes("h0", small, 100, {})], [])
    for n in names:
        np.testing.assert_allclose(out[n], small[n], rtol=1e-6, atol=1e-6)
    assert strategy.last_round_report()["clipped"] == 0


def test_noise_std_is_noise_multiplier_times_clip_over_m() -> None:
    size, m, sigma, clip = 200_000, 4, 0.8, 2.0
    current = OrderedDict([("w", np.zeros(size, dtype=np.float64)),
                           ("steps", np.array(0, dtype=np.int64))])
    res = [FitRes(f"h{i}", OrderedDict([("w", np.zeros(size)),
                                        ("steps", np.array(i, dtype=np.int64))]), 1, {})
           for i in range(m)]
    strategy = dp(clip_norm=clip, noise_multiplier=sigma)
    out = strategy.aggregate(1, current, res, [])
    expected = sigma * clip / m
    assert out["w"].std() == pytest.approx(expected, rel=0.03)
    assert abs(out["w"].mean()) < 5 * expected / np.sqrt(size)
    assert out["steps"] == 2  # rint(mean(0, 1, 2, 3)): integers take no noise
    report = strategy.last_round_report()
    assert report["noise_std"] == pytest.approx(expected)
    assert report["clip_norm"] == clip and report["noise_multiplier"] == sigma
    assert report["aggregated"] == m and report["clipped"] == 0


def test_unseeded_noise_comes_from_entropy_and_differs_every_time() -> None:
    """Without a seed nobody can recompute the server's noise: the same inputs, twice, give
    two different releases (the clipped mean is the same; only the noise differs)."""
    current = model(np.random.default_rng(8))
    res = results(3, seed=6)
    params = {"clip_norm": 1.0, "noise_multiplier": 1.0, "total_hospitals": 10, "delta": DELTA}
    first = DPFedAvg(**params).aggregate(1, current, res, [])
    second = DPFedAvg(**params).aggregate(1, current, res, [])
    assert DPFedAvg(**params).seed is None
    assert not np.array_equal(first["conv.weight"], second["conv.weight"])
    assert DPFedAvg(**params).state_dict()["seed"] is None


def test_noise_depends_on_seed_and_round_only() -> None:
    current = model(np.random.default_rng(5))
    res = results(3, seed=6)
    first = dp(seed=1).aggregate(4, current, res, [])
    assert_bitwise_equal(first, dp(seed=1).aggregate(4, current, res, []))
    again = dp(seed=1)
    again.aggregate(1, current, res, [])  # earlier rounds do not shift round 4's noise
    assert_bitwise_equal(first, again.aggregate(4, current, res, []))
    other_round = dp(seed=1).aggregate(5, current, res, [])
    other_seed = dp(seed=2).aggregate(4, current, res, [])
    assert not np.array_equal(first["fc.bias"], other_round["fc.bias"])
    assert not np.array_equal(first["fc.bias"], other_seed["fc.bias"])


# ---- accounting --------------------------------------------------------------------------

def test_epsilon_equals_opacus_rdp_over_rounds() -> None:
    sigma, total, m, k = 1.1, 10, 3, 4
    strategy = dp(noise_multiplier=sigma, total_hospitals=total)
    current = model(np.random.default_rng(0))
    for r in range(1, k + 1):
        current = strategy.aggregate(r, current, results(m, seed=r), [])
    oracle = RDPAccountant()
    oracle.history = [(sigma, m / total, k)]
    assert strategy.epsilon() == pytest.approx(oracle.get_epsilon(DELTA), rel=1e-12)
    assert strategy.epsilon(1e-3) == pytest.approx(oracle.get_epsilon(1e-3), rel=1e-12)
    assert strategy.epsilon(1e-3) < strategy.epsilon()
    report = strategy.last_round_report()
    assert report["epsilon"] == strategy.epsilon() and report["delta"] == DELTA
    assert report["sample_rate"] == pytest.approx(m / total) and report["dp_rounds"] == k


def test_sample_rate_counts_the_selected_not_only_the_results() -> None:
    current = model(np.random.default_rng(0))
    # No select() call: hospitals that answered plus those that failed were selected.
    strategy = dp(noise_multiplier=1.3, total_hospitals=10)
    strategy.aggregate(1, current, results(3), [Failure("hospital_9", "timeout", "")])
    assert strategy.state_dict()["accountant"]["history"] == [[1.3, 0.4, 1]]
    # With select(): what it drew, out of the pool it drew from (never more than the total).
    strategy = dp(noise_multiplier=1.3, total_hospitals=10, fraction=0.5)
    available = [f"hospital_{i}" for i in range(6)]  # four hospitals excluded this round
    chosen = strategy.select(1, available, np.random.default_rng(0))
    assert len(chosen) == 3
    strategy.aggregate(1, current, [r for r in results(6) if r.hospital in chosen][:2], [])
    assert strategy.state_dict()["accountant"]["history"] == [[1.3, 0.5, 1]]


def test_epsilon_grows_with_rounds() -> None:
    strategy = dp(noise_multiplier=1.0, total_hospitals=5)
    assert strategy.epsilon() == 0.0
    current = model(np.random.default_rng(0))
    eps = []
    for r in range(1, 6):
        current = strategy.aggregate(r, current, results(2, seed=r), [])
        eps.append(strategy.epsilon())
    assert all(0 < a < b for a, b in zip(eps, eps[1:]))


def test_unknown_total_hospitals_is_a_clear_error() -> None:
    strategy = dp(total_hospitals=None)
    with pytest.raises(ValueError, match="total_hospitals"):
        strategy.aggregate(1, model(np.random.default_rng(0)), results(2), [])
    assert strategy.epsilon() == 0.0 and strategy.last_round_report() == {}
    strategy.total_hospitals = 4  # as the coordinator does before round 1
    assert strategy.aggregate(1, model(np.random.default_rng(0)), results(2), []) is not None
    assert strategy.state_dict()["accountant"]["history"] == [[1.0, 0.5, 1]]


# ---- resume ------------------------------------------------------------------------------

def test_state_round_trip_continues_identically(tmp_path) -> None:
    current = model(np.random.default_rng(0))
    a = dp(noise_multiplier=0.7, clip_norm=0.5, seed=11, total_hospitals=8)
    for r in (1, 2):
        current = a.aggregate(r, current, results(3, seed=r, scale=2.0), [])
    checkpoint.save_tree(a.state_dict(), tmp_path / "strategy")
    # A different seed and no total: the checkpoint must bring both back.
    b = dp(noise_multiplier=0.7, clip_norm=0.5, seed=0, total_hospitals=None)
    b.load_state_dict(checkpoint.load_tree(tmp_path / "strategy"))
    assert b.epsilon() == a.epsilon() > 0 and b.total_hospitals == 8
    res = results(3, seed=3, scale=2.0)
    out_a = a.aggregate(3, current, res, [])
    out_b = b.aggregate(3, current, res, [])
    assert_bitwise_equal(out_a, out_b)
    assert b.epsilon() == a.epsilon()
    assert b.state_dict() == a.state_dict()
    assert b.last_round_report() == a.last_round_report()


# ---- common strategy behaviour -----------------------------------------------------------

def test_min_clients_respected() -> None:
    current = model(np.random.default_rng(42))
    strategy = dp(min_clients=3)
    before = strategy.state_dict()
    assert strategy.aggregate(1, current, results(2), []) is None
    assert strategy.state_dict() == before and strategy.epsilon() == 0.0  # nothing released
    assert strategy.last_round_report() == {}
    assert strategy.aggregate(1, current, results(3), []) is not None
    assert strategy.epsilon() > 0 and strategy.last_round_report()["aggregated"] == 3


def test_results_order_does_not_matter() -> None:
    current = model(np.random.default_rng(42))
    res = results(5, seed=6, scale=3.0)  # updates far outside the clip ball, noise on
    a, b = dp(clip_norm=0.3), dp(clip_norm=0.3)
    out_a = a.aggregate(1, current, res, [])
    out_b = b.aggregate(1, current, list(reversed(res)), [])
    assert_bitwise_equal(out_a, out_b)
    assert a.last_round_report() == b.last_round_report()
    assert a.last_round_report()["clipped"] == 5


def test_results_order_does_not_matter_even_where_float_sums_would() -> None:
    # (1e16 + 1) - 1e16 == 0 but (1e16 - 1e16) + 1 == 1: only a fixed order gives one answer.
    current = OrderedDict([("w", np.zeros(1))])
    res = [FitRes(f"h{i}", OrderedDict([("w", np.array([v]))]), 1, {})
           for i, v in enumerate([1e16, 1.0, -1e16])]
    outs = [dp(clip_norm=1e17, noise_multiplier=0.0).aggregate(1, current, list(p), [])["w"]
            for p in itertools.permutations(res)]
    assert len({o.tobytes() for o in outs}) == 1


def test_mismatched_weights_are_rejected() -> None:
    current = model(np.random.default_rng(0))
    bad = results(2)
    del bad[1].weights["fc.bias"]
    with pytest.raises(ValueError, match="parameter names"):
        dp().aggregate(1, current, bad, [])


# ---- construction ------------------------------------------------------------------------

def test_build_strategy_passes_the_dp_params() -> None:
    assert set(strategy_params("dpfedavg")) == {
        "clip_norm", "noise_multiplier", "delta", "total_hospitals", "seed", "accountant"}
    s = build_strategy("dpfedavg", 2, 0.5, clip_norm=0.3, noise_multiplier=1.2, delta=1e-6,
                       total_hospitals=7, seed=5)
    assert type(s) is DPFedAvg and s.min_clients == 2 and s.fraction == 0.5
    assert (s.clip_norm, s.noise_multiplier, s.delta, s.total_hospitals, s.seed) == (
        0.3, 1.2, 1e-6, 7, 5)
    with pytest.raises(TypeError, match="clip_norm"):
        build_strategy("dpfedavg", 1, 1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match=r"'dpfedavg'.*'mu'"):
        build_strategy("dpfedavg", 1, 1.0, clip_norm=1.0, noise_multiplier=1.0, mu=0.1)


@pytest.mark.parametrize(("field", "value"), [
    ("clip_norm", 0.0), ("clip_norm", float("nan")), ("noise_multiplier", -0.1),
    ("delta", 0.0), ("delta", 1.0), ("total_hospitals", 0), ("seed", -1),
    ("accountant", "nope"),
])
def test_bad_parameters_are_rejected(field: str, value) -> None:
    with pytest.raises(ValueError):
        dp(**{field: value})
