"""The strategies beyond FedAvg, against numpy/scipy oracles and formulas worked by hand."""

from collections import OrderedDict

import numpy as np
import pytest
import scipy.stats
import torch
import torchvision

from fedray.artifacts import checkpoint
from fedray.federation.messages import FitRes
from fedray.models import build_model
from fedray.strategy import (FedAdagrad, FedAdam, FedAvg, FedBN, FedMedian, FedProx,
                             FedTrimmedAvg, FedYogi, Strategy, build_strategy)
from fedray.strategy.aggregate import coordinate_median, trimmed_mean
from fedray.strategy.fedbn import norm_parameter_names

ALL = ["fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedbn", "fedmedian",
       "fedtrimmedavg"]


def weights(rng: np.random.Generator, shift: float = 0.0) -> OrderedDict:
    return OrderedDict([
        ("conv.weight", (rng.normal(size=(4, 3, 3, 3)) + shift).astype(np.float32)),
        ("bn.running_mean", (rng.normal(size=4) + shift).astype(np.float32)),
        ("bn.num_batches_tracked", np.array(rng.integers(0, 100), dtype=np.int64)),
        ("fc.bias", (rng.normal(size=4) + shift).astype(np.float64)),
    ])


def results(n: int, seed: int = 0, shift: float = 0.0) -> list[FitRes]:
    rng = np.random.default_rng(seed)
    return [FitRes(f"hospital_{i}", weights(rng, shift), int(rng.integers(5, 50)), {})
            for i in range(n)]


def stack(updates: list[dict], name: str) -> np.ndarray:
    return np.stack([np.asarray(u[name], dtype=np.float64) for u in updates])


def one_tensor(value, num_samples: int = 1, hospital: str = "h0", name: str = "w") -> FitRes:
    return FitRes(hospital, OrderedDict([(name, np.asarray(value, dtype=np.float64))]),
                  num_samples, {})


def assert_bitwise_equal(a: OrderedDict, b: OrderedDict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype
        assert a[name].tobytes() == b[name].tobytes(), name


# ---- pure aggregation functions ----------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 5, 6])
def test_coordinate_median_matches_numpy(n: int) -> None:
    updates = [r.weights for r in results(n, seed=n)]
    out = coordinate_median(updates)
    assert list(out) == list(updates[0])
    for name in out:
        oracle = np.median(stack(updates, name), axis=0)
        assert out[name].dtype == updates[0][name].dtype and out[name].shape == oracle.shape
        if name == "bn.num_batches_tracked":
            assert out[name] == np.rint(oracle)
        else:
            np.testing.assert_allclose(out[name], oracle, rtol=1e-6)


@pytest.mark.parametrize(("n", "beta"), [(1, 0.2), (5, 0.2), (10, 0.3), (7, 0.0), (9, 0.45)])
def test_trimmed_mean_matches_scipy(n: int, beta: float) -> None:
    updates = [r.weights for r in results(n, seed=10 + n)]
    out = trimmed_mean(updates, beta)
    for name in out:
        oracle = scipy.stats.trim_mean(stack(updates, name), beta, axis=0)
        assert out[name].dtype == updates[0][name].dtype
        if name == "bn.num_batches_tracked":
            assert out[name] == np.rint(oracle)
        else:
            np.testing.assert_allclose(out[name], oracle, rtol=1e-6)


def test_trimmed_mean_cuts_per_coordinate() -> None:
    # each coordinate has its own extremes: [0,1,2,3,100] -> mean(1,2,3); [-50,5,5,5,5] -> 5
    pairs = [(3, 5), (100, 5), (0, -50), (2, 5), (1, 5)]
    updates = [OrderedDict(x=np.array([v, w])) for v, w in pairs]
    np.testing.assert_array_equal(trimmed_mean(updates, 0.2)["x"], [2.0, 5.0])
    np.testing.assert_array_equal(coordinate_median(updates)["x"], [2, 5])


def test_integer_tensors_are_rounded_back() -> None:
    updates = [OrderedDict(n=np.array(v, dtype=np.int64)) for v in (1, 2, 4, 8)]
    assert coordinate_median(updates)["n"].dtype == np.int64
    assert coordinate_median(updates)["n"] == 3  # median 3.0
    assert trimmed_mean(updates, 0.25)["n"] == 3  # mean(2, 4)
    assert trimmed_mean(updates, 0.0)["n"] == 4  # 3.75 rounded


@pytest.mark.parametrize("fn", [coordinate_median, lambda u: trimmed_mean(u, 0.2)])
def test_robust_functions_are_order_independent_bit_for_bit(fn) -> None:
    updates = [r.weights for r in results(7, seed=3)]
    reference = fn(updates)
    for perm in np.random.default_rng(0).permutation(np.tile(np.arange(7), (4, 1)), axis=1):
        assert_bitwise_equal(fn([updates[i] for i in perm]), reference)


def test_robust_functions_reject_bad_input() -> None:
    for fn in (coordinate_median, lambda u: trimmed_mean(u, 0.1)):
        with pytest.raises(ValueError, match="at least one"):
            fn([])
        with pytest.raises(ValueError, match="names"):
            fn([OrderedDict(x=np.zeros(1)), OrderedDict(y=np.zeros(1))])
        with pytest.raises(ValueError, match="shape"):
            fn([OrderedDict(x=np.zeros(1)), OrderedDict(x=np.zeros(2))])
    two = [OrderedDict(x=np.zeros(1)), OrderedDict(x=np.ones(1))]
    with pytest.raises(ValueError, match="nothing"):
        trimmed_mean(two, 0.5)
    with pytest.raises(ValueError, match="nothing"):
        trimmed_mean([OrderedDict(x=np.zeros(1))] * 4, 0.5)
    with pytest.raises(ValueError, match="beta"):
        trimmed_mean(two, -0.1)
    assert trimmed_mean(two, 0.49)["x"] == 0.5  # int(0.98) = 0: nothing cut


# ---- configure ---------------------------------------------------------------------------

def test_configure_outputs() -> None:
    from fedray.federation.messages import RoundConfig

    assert FedAvg().configure(1) == RoundConfig()
    assert FedProx(mu=0.1).configure(3) == RoundConfig(proximal_mu=0.1)
    assert FedBN().configure(1) == RoundConfig(local_layers="norm")
    for cls in (FedAdam, FedYogi, FedAdagrad, FedMedian, FedTrimmedAvg):
        assert cls().configure(2) == RoundConfig()
    with pytest.raises(AttributeError):  # frozen: a caller cannot change the next round's
        FedProx(mu=0.5).configure(1).proximal_mu = 99.0


def test_base_strategy_configure_is_empty() -> None:
    class Minimal(Strategy):
        def aggregate(self, round_number, current, results, failures):
            return None

    from fedray.federation.messages import RoundConfig

    assert Minimal().configure(7) == RoundConfig()


def test_fedprox_aggregates_like_fedavg_and_checks_mu() -> None:
    res = results(4)
    assert_bitwise_equal(FedProx(mu=1.0).aggregate(1, OrderedDict(), res, []),
                         FedAvg().aggregate(1, OrderedDict(), res, []))
    with pytest.raises(ValueError, match="mu"):
        FedProx(mu=-1.0)


# ---- adaptive server optimisers ----------------------------------------------------------

def test_fedadam_one_and_two_steps_by_hand() -> None:
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    strategy = FedAdam(server_lr=eta, beta1=b1, beta2=b2, tau=tau)
    current = OrderedDict(w=np.array([1.0, -2.0]))
    # round 1: weighted average (1*1.5 + 3*1.5)/4 = 1.5 -> delta 0.5 on coordinate 0;
    # coordinate 1: average of -2.5 and -1.5 weighted 1:3 = -1.75 -> delta 0.25
    res = [one_tensor([1.5, -2.5], 1, "a"), one_tensor([1.5, -1.5], 3, "b")]
    out1 = strategy.aggregate(1, current, res, [])
    d = np.array([0.5, 0.25])
    m, v = (1 - b1) * d, (1 - b2) * d**2
    x1 = np.array([1.0, -2.0]) + eta * m / (np.sqrt(v) + tau)
    assert x1[0] == pytest.approx(1.0 + 0.1 * 0.05 / (0.05 + 0.001))  # 1.09803921...
    np.testing.assert_allclose(out1["w"], x1, rtol=1e-14)
    # round 2 from the new global: delta -0.2 on both coordinates
    out2 = strategy.aggregate(2, out1, [one_tensor(x1 - 0.2, 1, "a")], [])
    d2 = np.array([-0.2, -0.2])
    m = b1 * m + (1 - b1) * d2
    v = b2 * v + (1 - b2) * d2**2
    np.testing.assert_allclose(out2["w"], x1 + eta * m / (np.sqrt(v) + tau), rtol=1e-14)


def test_fedyogi_one_and_two_steps_by_hand() -> None:
    eta, b1, b2, tau = 0.05, 0.8, 0.9, 1e-2
    strategy = FedYogi(server_lr=eta, beta1=b1, beta2=b2, tau=tau)
    x0 = np.array([0.0, 3.0])
    out1 = strategy.aggregate(1, OrderedDict(w=x0), [one_tensor(x0 + [1.0, -0.1])], [])
    d = np.array([1.0, -0.1])
    m = (1 - b1) * d
    v = 0 - (1 - b2) * d**2 * np.sign(0 - d**2)  # = (1 - b2) d^2 from v = 0
    x1 = x0 + eta * m / (np.sqrt(v) + tau)
    np.testing.assert_allclose(out1["w"], x1, rtol=1e-14)
    # round 2: coordinate 0 has v > d^2 (v shrinks), coordinate 1 has v < d^2 (v grows)
    d2 = np.array([0.1, 2.0])
    out2 = strategy.aggregate(2, out1, [one_tensor(x1 + d2)], [])
    m = b1 * m + (1 - b1) * d2
    v_yogi = v - (1 - b2) * d2**2 * np.sign(v - d2**2)
    assert v_yogi[0] == pytest.approx(0.1 - 0.1 * 0.01) and v_yogi[1] == pytest.approx(0.001 + 0.4)
    np.testing.assert_allclose(out2["w"], x1 + eta * m / (np.sqrt(v_yogi) + tau), rtol=1e-14)
    # and that differs from what Adam's v would have given
    v_adam = b2 * v + (1 - b2) * d2**2
    assert not np.allclose(out2["w"], x1 + eta * m / (np.sqrt(v_adam) + tau), rtol=1e-6)


def test_fedadagrad_accumulates_squares() -> None:
    eta, tau = 0.1, 1e-3
    strategy = FedAdagrad(server_lr=eta, tau=tau)  # beta1 = 0 by default, as Flower
    out1 = strategy.aggregate(1, OrderedDict(w=np.array([0.0])), [one_tensor([0.3])], [])
    np.testing.assert_allclose(out1["w"], [eta * 0.3 / (0.3 + tau)], rtol=1e-14)
    out2 = strategy.aggregate(2, out1, [one_tensor(out1["w"] - 0.4)], [])
    step = eta * -0.4 / (np.sqrt(0.3**2 + 0.4**2) + tau)  # v = 0.09 + 0.16
    np.testing.assert_allclose(out2["w"], out1["w"] + step, rtol=1e-14)


@pytest.mark.parametrize("cls", [FedAdam, FedYogi, FedAdagrad])
def test_fedopt_keeps_dtypes_and_averages_integer_tensors(cls) -> None:
    res = results(3, seed=4)
    current = results(1, seed=99)[0].weights
    out = cls().aggregate(1, current, res, [])
    for name in current:
        assert out[name].dtype == current[name].dtype
    average = FedAvg().aggregate(1, current, res, [])
    assert out["bn.num_batches_tracked"] == average["bn.num_batches_tracked"]
    assert not np.allclose(out["conv.weight"], average["conv.weight"])  # a server step, not FedAvg


@pytest.mark.parametrize("cls", [FedAdam, FedYogi, FedAdagrad])
def test_fedopt_averages_running_statistics_and_steps_parameters(cls) -> None:
    import torch

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    names = [n for n, _ in model.named_buffers()]
    assert {"1.running_mean", "1.running_var"} <= set(names)
    current = OrderedDict((k, v.detach().numpy().copy()) for k, v in model.state_dict().items())
    res = []
    for k, n in ((1, 10), (2, 30)):
        w = OrderedDict((name, (a + 0.5 * k).astype(a.dtype)) for name, a in current.items())
        res.append(FitRes(f"h{k}", w, n, {}))
    strategy = cls()
    strategy.bind(["h1", "h2"], model, None)
    out = strategy.aggregate(1, current, res, [])
    average = FedAvg().aggregate(1, current, res, [])
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        np.testing.assert_array_equal(out[name], average[name])  # what the hospitals measured
    for name in ("0.weight", "1.weight"):
        assert not np.allclose(out[name], average[name])  # a server step


def _rounds(seed: int) -> list[list[FitRes]]:
    return [results(3, seed=seed + r, shift=0.1 * r) for r in range(3)]


@pytest.mark.parametrize("cls", [FedAdam, FedYogi, FedAdagrad])
def test_fedopt_resumes_identically(cls, tmp_path) -> None:
    initial = results(1, seed=50)[0].weights
    rounds = _rounds(7)
    straight, w = cls(), initial
    for r, res in enumerate(rounds, 1):
        w = straight.aggregate(r, w, res, [])

    first, w2 = cls(), initial
    for r, res in enumerate(rounds[:2], 1):
        w2 = first.aggregate(r, w2, res, [])
    state = first.state_dict()
    assert set(state["m"]) == set(state["v"]) == {"conv.weight", "bn.running_mean", "fc.bias"}
    for path, tree in (("direct", state), ("disk", None)):
        if tree is None:  # through the checkpoint's safetensors tree format
            checkpoint.save_tree(state, tmp_path / "strategy")
            tree = checkpoint.load_tree(tmp_path / "strategy")
        resumed = cls()
        resumed.load_state_dict(tree)
        assert_bitwise_equal(resumed.aggregate(3, w2, rounds[2], []), w)
    # without the state, the third round is different (so the check above can fail)
    fresh = cls().aggregate(3, w2, rounds[2], [])
    assert fresh["conv.weight"].tobytes() != w["conv.weight"].tobytes()


def test_fedopt_state_dict_is_a_copy_and_empty_resets() -> None:
    strategy = FedAdam()
    assert strategy.state_dict() == {"m": {}, "v": {}}
    strategy.aggregate(1, OrderedDict(w=np.zeros(2)), [one_tensor([1.0, 1.0])], [])
    state = strategy.state_dict()
    state["m"]["w"][:] = 123.0
    assert not np.any(strategy.m["w"] == 123.0)
    strategy.load_state_dict({})
    assert strategy.m == {} and strategy.v == {}


def test_fedopt_rejects_mismatched_state_and_params() -> None:
    strategy = FedAdam()
    strategy.load_state_dict({"m": {"w": np.zeros(3)}, "v": {"w": np.zeros(3)}})
    with pytest.raises(ValueError, match="shape"):
        strategy.aggregate(1, OrderedDict(w=np.zeros(2)), [one_tensor([1.0, 1.0])], [])
    with pytest.raises(ValueError, match="names"):
        FedAdam().aggregate(1, OrderedDict(v=np.zeros(2)), [one_tensor([1.0, 1.0])], [])
    with pytest.raises(ValueError, match="m and v"):
        FedAdam().load_state_dict({"m": {"w": np.zeros(2)}, "v": {}})
    with pytest.raises(ValueError, match="beta1"):
        FedAdam(beta1=1.0)
    with pytest.raises(ValueError, match="tau"):
        FedYogi(tau=0.0)
    with pytest.raises(ValueError, match="server_lr"):
        FedAdagrad(server_lr=-1.0)


def test_failed_round_leaves_server_state_unchanged() -> None:
    strategy = FedAdam()
    strategy.aggregate(1, OrderedDict(w=np.zeros(2)), [one_tensor([1.0, 1.0])], [])
    before = strategy.state_dict()
    bad = FitRes("h0", OrderedDict(w=np.ones(2), extra=np.ones(1)), 1, {})
    with pytest.raises(ValueError):
        strategy.aggregate(2, OrderedDict(w=np.zeros(2)), [bad], [])
    after = strategy.state_dict()
    np.testing.assert_array_equal(after["m"]["w"], before["m"]["w"])


# ---- FedBN -------------------------------------------------------------------------------

def _as_results(state: OrderedDict, n: int, seed: int) -> tuple[OrderedDict, list[FitRes]]:
    rng = np.random.default_rng(seed)
    current = OrderedDict((k, v.numpy().copy()) for k, v in state.items())
    res = []
    for i in range(n):
        w = OrderedDict()
        for k, v in current.items():
            if np.issubdtype(v.dtype, np.integer):
                w[k] = v + rng.integers(1, 100)
            else:
                w[k] = v + rng.normal(size=v.shape).astype(v.dtype)
        res.append(FitRes(f"h{i}", w, int(rng.integers(10, 100)), {}))
    return current, res


@pytest.mark.parametrize("model_name", ["resnet18", "smallcnn"])
def test_fedbn_keeps_norm_layers_and_averages_the_rest(model_name: str) -> None:
    if model_name == "resnet18":
        model = torchvision.models.resnet18(weights=None)
        expected = {k for k in model.state_dict()
                    if k.split(".")[-2].startswith("bn") or ".downsample.1." in k}
        assert len(expected) == 20 * 5  # 20 BatchNorm2d layers
    else:
        model = build_model("smallcnn")
        expected = {f"features.{i}.1.{p}" for i in range(4) for p in
                    ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    keys = norm_parameter_names(model)
    assert keys == expected

    current, res = _as_results(model.state_dict(), 3, seed=1)
    out = FedBN(norm_keys=keys, norm_in_global="keep").aggregate(1, current, res, [])
    average = FedAvg().aggregate(1, current, res, [])
    evaluable = FedBN(norm_keys=keys).aggregate(1, current, res, [])
    for name in current:  # default: the global copy of norm layers is the hospitals' average
        np.testing.assert_array_equal(evaluable[name], average[name])
    assert list(out) == list(current)
    for name in current:
        assert out[name].dtype == current[name].dtype
        if name in keys:
            np.testing.assert_array_equal(out[name], current[name])
        else:
            np.testing.assert_array_equal(out[name], average[name])
    head = "fc.weight" if model_name == "resnet18" else "classifier.1.weight"
    assert not np.array_equal(out[head], current[head])  # the shared layers did move


def test_norm_parameter_names_covers_group_and_layer_norm() -> None:
    dp = build_model("smallcnn", dp_safe=True)  # BatchNorm replaced by GroupNorm
    assert norm_parameter_names(dp) == {f"features.{i}.1.{p}" for i in range(4)
                                        for p in ("weight", "bias")}
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4),
                                torch.nn.BatchNorm1d(4, affine=False), torch.nn.Linear(4, 2))
    assert norm_parameter_names(model) == {"1.weight", "1.bias", "2.running_mean", "2.running_var",
                                           "2.num_batches_tracked"}
    shared = torch.nn.BatchNorm1d(2)
    twice = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)  # one layer, two state_dict names
    assert norm_parameter_names(twice) == {k for k in twice.state_dict()}
    assert {"0.weight", "2.weight"} <= norm_parameter_names(twice)


def test_fedbn_needs_valid_norm_keys() -> None:
    current, res = _as_results(build_model("smallcnn").state_dict(), 2, seed=2)
    with pytest.raises(ValueError, match="norm_keys"):
        FedBN().aggregate(1, current, res, [])
    with pytest.raises(ValueError, match="not in the current model"):
        FedBN(norm_keys={"bn1.weight"}).aggregate(1, current, res, [])
    strategy = FedBN(norm_in_global="keep")
    strategy.norm_keys = {"features.0.1.weight"}  # may be set after construction
    out = strategy.aggregate(1, current, res, [])
    np.testing.assert_array_equal(out["features.0.1.weight"], current["features.0.1.weight"])


# ---- robustness --------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [FedMedian, FedTrimmedAvg])
def test_one_bad_hospital_barely_moves_robust_strategies(cls) -> None:
    honest = results(4, seed=8)
    bad = FitRes("hospital_evil", OrderedDict((k, np.full_like(v, 10**6)) for k, v in
                                              honest[0].weights.items()), 1000, {})
    robust = cls().aggregate(1, OrderedDict(), honest + [bad], [])
    dragged = FedAvg().aggregate(1, OrderedDict(), honest + [bad], [])
    for name in ("conv.weight", "bn.running_mean", "fc.bias"):
        spread = stack([r.weights for r in honest], name)
        # robust result stays inside the honest hospitals' range, FedAvg is pulled far outside
        assert np.all(robust[name] >= spread.min(axis=0) - 1e-6)
        assert np.all(robust[name] <= spread.max(axis=0) + 1e-6)
        assert np.all(dragged[name] > 1e5)


def test_fedtrimmedavg_checks_beta() -> None:
    for beta in (-0.1, 0.5, float("nan")):
        with pytest.raises(ValueError, match="beta"):
            FedTrimmedAvg(beta=beta)


# ---- common behaviour --------------------------------------------------------------------

def _strategy(name: str, min_clients: int = 1) -> Strategy:
    strategy = build_strategy(name, min_clients, 1.0)
    if isinstance(strategy, FedBN):
        strategy.norm_keys = {"bn.running_mean", "bn.num_batches_tracked"}
    return strategy


@pytest.mark.parametrize("name", ALL)
def test_every_strategy_respects_min_clients(name: str) -> None:
    current = results(1, seed=42)[0].weights
    strategy = _strategy(name, min_clients=3)
    assert strategy.aggregate(1, current, results(2), []) is None
    assert strategy.state_dict() == _strategy(name, min_clients=3).state_dict()  # untouched
    assert strategy.aggregate(1, current, results(3), []) is not None


@pytest.mark.parametrize("name", ALL)
def test_every_strategy_is_order_independent_bit_for_bit(name: str) -> None:
    current = results(1, seed=42)[0].weights
    res = results(5, seed=6)
    a = _strategy(name).aggregate(1, current, res, [])
    b = _strategy(name).aggregate(1, current, list(reversed(res)), [])
    assert_bitwise_equal(a, b)


# ---- build_strategy ----------------------------------------------------------------------

def test_build_strategy_names_and_params() -> None:
    expected = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedyogi": FedYogi,
                "fedadagrad": FedAdagrad, "fedbn": FedBN, "fedmedian": FedMedian,
                "fedtrimmedavg": FedTrimmedAvg}
    for name, cls in expected.items():
        strategy = build_strategy(name, 2, 0.5)
        assert type(strategy) is cls and strategy.min_clients == 2 and strategy.fraction == 0.5
    assert build_strategy("fedprox", 1, 1.0, mu=0.3).configure(1).proximal_mu == 0.3
    yogi = build_strategy("fedyogi", 1, 1.0, server_lr=0.5, beta1=0.1, beta2=0.2, tau=0.3)
    assert (yogi.server_lr, yogi.beta1, yogi.beta2, yogi.tau) == (0.5, 0.1, 0.2, 0.3)
    adam = build_strategy("fedadam", 1, 1.0)
    assert (adam.server_lr, adam.beta1, adam.beta2, adam.tau) == (1e-2, 0.9, 0.99, 1e-3)
    assert build_strategy("fedtrimmedavg", 1, 1.0, beta=0.1).beta == 0.1
    assert build_strategy("fedbn", 1, 1.0, norm_keys=["a"]).norm_keys == {"a"}


def test_build_strategy_rejects_unknown_params() -> None:
    with pytest.raises(ValueError, match=r"'fedavg'.*'mu'"):
        build_strategy("fedavg", 1, 1.0, mu=0.1)
    with pytest.raises(ValueError, match=r"'fedadagrad'.*'beta2'"):
        build_strategy("fedadagrad", 1, 1.0, beta2=0.9)
    with pytest.raises(ValueError, match=r"'fedprox'.*'beta', 'tau'"):
        build_strategy("fedprox", 1, 1.0, mu=0.1, tau=1.0, beta=0.2)
    with pytest.raises(ValueError, match="unknown strategy"):
        build_strategy("fedsomething", 1, 1.0)
