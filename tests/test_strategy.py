from collections import OrderedDict

import numpy as np
import pytest

from fedray.federation.messages import Failure, FitRes
from fedray.strategy import FedAvg, build_strategy
from fedray.strategy.aggregate import weighted_average


def weights(rng: np.random.Generator) -> OrderedDict:
    return OrderedDict([("conv.weight", rng.normal(size=(4, 3, 3, 3)).astype(np.float32)),
                        ("fc.bias", rng.normal(size=4).astype(np.float32)),
                        ("bn.num_batches_tracked", np.array(rng.integers(0, 100), dtype=np.int64))])


def test_weighted_average_matches_numpy_oracle() -> None:
    rng = np.random.default_rng(0)
    updates = [(weights(rng), n) for n in (10, 30, 60)]
    out = weighted_average(updates)
    for name in out:
        stack = np.stack([np.asarray(w[name], dtype=np.float64) for w, _ in updates])
        oracle = np.average(stack, axis=0, weights=[n for _, n in updates])
        if name == "bn.num_batches_tracked":
            assert out[name].dtype == np.int64 and out[name] == np.rint(oracle)
        else:
            assert out[name].dtype == np.float32
            np.testing.assert_allclose(out[name], oracle, rtol=1e-6)


def test_identical_hospitals_give_that_hospital() -> None:
    w = weights(np.random.default_rng(1))
    out = weighted_average([(w, 5), (w, 500)])
    for name in w:
        np.testing.assert_array_equal(out[name], w[name])


def test_weights_follow_sample_counts() -> None:
    a = OrderedDict(x=np.zeros(3, np.float32))
    b = OrderedDict(x=np.ones(3, np.float32))
    np.testing.assert_allclose(weighted_average([(a, 3), (b, 1)])["x"], 0.25)
    np.testing.assert_allclose(weighted_average([(a, 1), (b, 3)])["x"], 0.75)


def test_weighted_average_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="at least one"):
        weighted_average([])
    with pytest.raises(ValueError, match="names"):
        weighted_average([(OrderedDict(x=np.zeros(1)), 1), (OrderedDict(y=np.zeros(1)), 1)])
    with pytest.raises(ValueError, match="positive"):
        weighted_average([(OrderedDict(x=np.zeros(1)), 0)])


def _results(n: int, seed: int = 0) -> list[FitRes]:
    rng = np.random.default_rng(seed)
    return [FitRes(f"hospital_{i}", weights(rng), int(rng.integers(5, 50)), {}) for i in range(n)]


def test_fedavg_is_order_independent_bit_for_bit() -> None:
    results = _results(5)
    strategy = FedAvg(min_clients=1)
    a = strategy.aggregate(1, OrderedDict(), results, [])
    b = strategy.aggregate(1, OrderedDict(), list(reversed(results)), [])
    for name in a:
        assert a[name].tobytes() == b[name].tobytes()


def test_fedavg_refuses_round_below_min_clients() -> None:
    strategy = FedAvg(min_clients=3)
    failures = [Failure("hospital_2", "died", "killed")]
    assert strategy.aggregate(1, OrderedDict(), _results(2), failures) is None
    assert strategy.aggregate(1, OrderedDict(), _results(3), []) is not None


def test_selection_is_seeded_sorted_and_sized() -> None:
    names = [f"h{i}" for i in range(10)]
    strategy = FedAvg(min_clients=2, fraction=0.3)
    a = strategy.select(1, names, np.random.default_rng(5))
    b = strategy.select(1, names, np.random.default_rng(5))
    assert a == b == sorted(a) and len(a) == 3 and set(a) <= set(names)
    assert len(FedAvg(min_clients=4, fraction=0.1).select(1, names, np.random.default_rng(0))) == 4
    assert FedAvg(fraction=1.0).select(1, names, np.random.default_rng(0)) == names


def test_build_strategy_by_name() -> None:
    assert isinstance(build_strategy("fedavg", 1, 1.0), FedAvg)
    with pytest.raises(ValueError, match="unknown strategy"):
        build_strategy("fedsomething", 1, 1.0)


def test_strategy_contract_is_explicit() -> None:
    """bind() instead of attributes set from outside; typed round instructions; a report hook;
    failure kinds from one enum."""
    import pytest
    from torch import nn

    from fedray.federation.messages import Failure, FailureKind, RoundConfig
    from fedray.strategy import build_strategy

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.LazyLinear(4))
    fedbn = build_strategy("fedbn", 1, 1.0)
    fedbn.bind(["a", "b"], model, None)
    assert fedbn.norm_keys and all(k.startswith("1.") for k in fedbn.norm_keys)
    assert fedbn.configure(1) == RoundConfig(local_layers="norm")
    assert build_strategy("fedprox", 1, 1.0, mu=0.5).configure(1) == RoundConfig(proximal_mu=0.5)
    dp = build_strategy("dpfedavg", 1, 1.0, clip_norm=1.0, noise_multiplier=1.0)
    dp.bind(["a", "b", "c"], model, None)
    assert dp.total_hospitals == 3 and dp.seed is None and dp.round_report() == {}
    assert dp.privacy()["unit"] == "hospital"
    assert build_strategy("fedavg", 1, 1.0).round_report() == {}
    assert {k.value for k in FailureKind} == {"error", "timeout", "died", "budget", "unavailable"}
    assert Failure("a", "budget", "x").kind is FailureKind.BUDGET
    with pytest.raises(ValueError):
        Failure("a", "exploded", "x")
