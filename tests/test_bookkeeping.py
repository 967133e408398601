"""Book-keeping clipping (grad_sample_mode "bk"): per-sample norms are exact, one backward
leaves the clipped sum Opacus' hooks and ghost modes compute, and every backbone trains."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.profiler import profile
from torch.utils.data import DataLoader, TensorDataset

from fedray import privacy
from fedray.config import PrivacyConfig
from fedray.models import BACKBONES, available_backbones, build_model
from fedray.privacy import bookkeeping, ghost_norms
from fedray.privacy.bookkeeping import BookKeepingLoss, BookKeepingModule

from conftest import fit_in_grad_sample_modes

pytestmark = pytest.mark.filterwarnings("ignore:Secure RNG turned off",
                                        "ignore:Full backward hook is firing",
                                        "ignore:Using padding='same' with even kernel")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from a second thread on a shared 2-core box."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _settings(mode: str = "bk", **changes) -> privacy.PrivacySettings:
    base = dict(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, budget=None,
                sample_rate=0.5, accountant="rdp", poisson_sampling=False, secure_mode=False,
                grad_sample_mode=mode)
    return privacy.PrivacySettings(**{**base, **changes})


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Within 1e-4 of each element, or of the tensor's largest element for the elements that
    float32 sums leave near zero."""
    atol = 1e-4 * expected.abs().max().item() + 1e-12
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=atol,
                               msg=lambda m: f"{what}: {m}" if what else m)


def _per_sample_loss(out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A per-sample loss whose output gradient differs between samples and positions."""
    out = out.flatten(1)
    return (out * weights.flatten(1)).sum(1) + 0.5 * out.square().sum(1)


def _oracle(layer: nn.Module, x: torch.Tensor,
            weights: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Each sample's gradient by autograd, one sample at a time (no Opacus involved)."""
    params = dict((n, p) for n, p in layer.named_parameters() if p.requires_grad)
    grads = []
    for i in range(len(x)):
        loss = _per_sample_loss(layer(x[i:i + 1]), weights[i:i + 1]).sum()
        grads.append(dict(zip(params, torch.autograd.grad(loss, list(params.values())))))
    return grads


def _bk_grads(layer: nn.Module, x: torch.Tensor, weights: torch.Tensor, max_grad_norm: float):
    model = BookKeepingModule(layer, max_grad_norm=max_grad_norm)
    model.clipped_backward(_per_sample_loss(model(x), weights))
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
    model.remove_hooks()
    return model.per_sample_gradient_norms, grads


LAYERS = {
    "linear": (lambda: nn.Linear(7, 5), (6, 7)),
    "linear-3d": (lambda: nn.Linear(7, 5), (6, 4, 7)),
    "linear-4d-no-bias": (lambda: nn.Linear(3, 9, bias=False), (6, 2, 5, 3)),
    "conv": (lambda: nn.Conv2d(3, 8, 3, padding=1), (5, 3, 8, 8)),
    "conv-stride-no-bias": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False),
                            (5, 4, 9, 9)),
    "conv-dilation": (lambda: nn.Conv2d(3, 4, 3, padding=2, dilation=2), (5, 3, 10, 10)),
    "conv-groups": (lambda: nn.Conv2d(6, 9, 3, padding=1, groups=3), (5, 6, 7, 7)),
    "conv-depthwise-stride": (lambda: nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False),
                              (5, 8, 8, 8)),
    "conv-1x1-rect": (lambda: nn.Conv2d(5, 7, (1, 3), stride=(2, 1), padding=(0, 1)), (5, 5, 6, 4)),
    "conv-same-even": (lambda: nn.Conv2d(3, 4, 4, padding="same"), (5, 3, 7, 7)),
    "conv-valid": (lambda: nn.Conv2d(3, 4, 3, padding="valid"), (5, 3, 7, 7)),
    "groupnorm": (lambda: nn.GroupNorm(2, 6), (5, 6, 4, 4)),
    "groupnorm-2d": (lambda: nn.GroupNorm(3, 6), (5, 6)),
    "layernorm": (lambda: nn.LayerNorm(6), (5, 6)),
    "layernorm-3d": (lambda: nn.LayerNorm(6), (5, 3, 6)),
    "layernorm-2dims-no-bias": (lambda: nn.LayerNorm((3, 4), bias=False), (5, 2, 3, 4)),
}


# Layers whose norm takes the cheaper of the ghost norm and the per-sample gradient.
CHOOSING = [k for k in LAYERS if k.startswith(("linear-", "conv"))]


@pytest.mark.parametrize("kind, force", [(k, None) for k in LAYERS]
                         + [(k, f) for k in CHOOSING for f in (True, False)])
def test_norms_and_clipped_sum_equal_per_sample_autograd(monkeypatch, kind: str, force) -> None:
    """Norms equal each sample's gradient norm; .grad equals the sum of the clipped gradients,
    with the clip bound between the smallest and largest norm (some clipped, some not). `force`
    makes the Linear / Conv2d rule take the ghost norm (True) or the per-sample gradient."""
    if force is not None:
        monkeypatch.setattr(bookkeeping, "ghost_is_cheaper", lambda *a: force)
        monkeypatch.setattr(ghost_norms, "ghost_is_cheaper", lambda *a: force)
    torch.manual_seed(0)
    build, shape = LAYERS[kind]
    layer = build()
    if isinstance(layer, (nn.GroupNorm, nn.LayerNorm)):  # not the identity affine map
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_()
    x = torch.randn(shape)
    weights = torch.randn_like(layer(x))
    oracle = _oracle(layer, x, weights)
    true_norms = torch.stack([torch.cat([g.flatten() for g in s.values()]).norm() for s in oracle])
    bound = true_norms.median().item()
    norms, grads = _bk_grads(layer, x, weights, bound)
    torch.testing.assert_close(norms, true_norms, rtol=1e-4, atol=1e-6)
    coef = (bound / (true_norms + 1e-6)).clamp(max=1.0)
    assert (coef < 1).any() and (coef == 1).any()
    for name, grad in grads.items():
        expected = sum(c * s[name] for c, s in zip(coef, oracle))
        _assert_close(grad, expected, name)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("ghost", [True, False])
def test_conv_norms_read_channels_last_inputs(monkeypatch, ghost: bool, groups: int) -> None:
    """CUDA runs train channels_last; Opacus' unfold2d reads NCHW strides, so both the ghost
    mode's Conv2d norms and book-keeping's must not hand it a channels_last tensor as is."""
    monkeypatch.setattr(ghost_norms, "ghost_is_cheaper", lambda *a: ghost)
    monkeypatch.setattr(bookkeeping, "ghost_is_cheaper", lambda *a: ghost)
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 6, 3, padding=1, groups=groups)
    x = torch.randn(5, 4, 7, 7)
    x_last = x.contiguous(memory_format=torch.channels_last)
    weights = torch.randn_like(layer(x))
    oracle = _oracle(layer, x, weights)
    true_norms = torch.stack([torch.cat([g.flatten() for g in s.values()]).norm() for s in oracle])
    norms, grads = _bk_grads(layer, x_last, weights, 1e6)
    torch.testing.assert_close(norms, true_norms, rtol=1e-4, atol=1e-6)
    _assert_close(grads["weight"], sum(s["weight"] for s in oracle))
    g = torch.randn_like(layer(x))
    ghost_mode = ghost_norms.compute_conv2d_norm_sample(
        layer, [x_last], g.contiguous(memory_format=torch.channels_last))
    expected = ghost_norms.compute_conv2d_norm_sample(layer, [x], g)
    for p in (layer.weight, layer.bias):
        torch.testing.assert_close(ghost_mode[p], expected[p])


def test_frozen_weight_trainable_bias() -> None:
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, 3)
    layer.weight.requires_grad_(False)
    x = torch.randn(4, 3, 6, 6)
    weights = torch.randn_like(layer(x))
    oracle = _oracle(layer, x, weights)
    norms, grads = _bk_grads(layer, x, weights, 1e6)
    torch.testing.assert_close(norms, torch.stack([s["bias"].norm() for s in oracle]))
    assert list(grads) == ["bias"] and layer.weight.grad is None
    torch.testing.assert_close(grads["bias"], sum(s["bias"] for s in oracle))


# ---------------------------------------------------------------- whole models against Opacus


def _batch(n: int = 6, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(n, 3, size, size), torch.randint(0, 4, (n,))


def _hooks_clipped_sum(name: str, max_grad_norm: float) -> dict[str, torch.Tensor]:
    """Opacus' hooks mode: the sum of the clipped per-sample gradients, before noise."""
    torch.manual_seed(0)
    model = build_model(name, dp_safe=True)
    x, y = _batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dp_model, dp_opt, _ = PrivacyEngine().make_private(
        module=model, optimizer=optimizer,
        data_loader=DataLoader(TensorDataset(x, y), batch_size=6),
        noise_multiplier=0.0, max_grad_norm=max_grad_norm, poisson_sampling=False,
        grad_sample_mode="hooks")
    torch.manual_seed(2)  # the dropout mask _bk_sum draws
    nn.CrossEntropyLoss()(dp_model(x), y).backward()
    dp_opt.clip_and_accumulate()
    return {n: p.summed_grad.clone() for n, p in model.named_parameters()}


def _bk_sum(name: str, max_grad_norm: float) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = build_model(name, dp_safe=True)
    x, y = _batch()
    bk = BookKeepingModule(model, max_grad_norm=max_grad_norm)
    torch.manual_seed(2)  # the dropout mask _hooks_clipped_sum draws
    BookKeepingLoss(bk, nn.CrossEntropyLoss())(bk(x), y).backward()
    return bk, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name, max_grad_norm", [  # every sample clipped / none
    ("smallcnn", 0.05), ("smallcnn", 1e4), ("resnet18", 0.05), ("resnet18", 1e4),
    ("mobilenet_v3_small", 0.05), ("densenet121", 0.05),  # depthwise convs, SE blocks; concat
])
def test_bk_gradient_equals_hooks_clipped_sum(name: str, max_grad_norm: float) -> None:
    hooks = _hooks_clipped_sum(name, max_grad_norm)
    bk, grads = _bk_sum(name, max_grad_norm)
    if max_grad_norm < 1:
        assert (bk.per_sample_gradient_norms > max_grad_norm).all()
    else:
        assert (bk.per_sample_gradient_norms < max_grad_norm).all()
    assert set(grads) == set(hooks)
    for key in hooks:
        _assert_close(grads[key], hooks[key], key)


def test_bk_gradient_equals_a_second_backward_of_the_clipped_loss() -> None:
    """.grad after the one backward is sum_i c_i grad(l_i), what Opacus' second ghost backward
    leaves; stale gradients are replaced, not added to."""
    torch.manual_seed(0)
    model = build_model("smallcnn", dp_safe=True, dropout=0.0)  # two forwards see one model
    twin = copy.deepcopy(model)
    x, y = _batch()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)  # what a missing zero_grad would leave
    bk = BookKeepingModule(model, max_grad_norm=0.5)
    BookKeepingLoss(bk, nn.CrossEntropyLoss())(bk(x), y).backward()
    coef = (0.5 / (bk.per_sample_gradient_norms + 1e-6)).clamp(max=1.0)
    assert (coef < 1).any()
    (coef * nn.CrossEntropyLoss(reduction="none")(twin(x), y)).sum().backward()
    for (key, p), q in zip(model.named_parameters(), twin.parameters()):
        _assert_close(p.grad, q.grad, key)


def test_the_one_backward_computes_no_weight_gradient_of_its_own(monkeypatch) -> None:
    """Asked for the layers' output gradients only, autograd runs each convolution's input
    gradient and never its weight gradient, and fills no .grad; the weight gradients are
    the book-keeping ones, one per layer (ghost norms forced: with per-sample gradients the
    sum is taken from them and no convolution_backward computes it)."""
    monkeypatch.setattr(bookkeeping, "ghost_is_cheaper", lambda *a: True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, stride=2), nn.Flatten(), nn.Linear(8 * 3 * 3, 4))
    bk = BookKeepingModule(model, max_grad_norm=1.0)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))
    fired = []
    for p in model.parameters():
        p.register_hook(lambda g: fired.append(g))
    loss = BookKeepingLoss(bk, nn.CrossEntropyLoss())(bk(x), y)
    with profile(record_shapes=True) as prof:
        loss.backward()
    masks = [e.concrete_inputs[-1] for e in prof.events() if e.name == "aten::convolution_backward"]
    assert not fired  # no AccumulateGrad ran: .grad came from book-keeping alone
    assert sorted(map(tuple, masks)) == [(False, True, True), (False, True, True),
                                         (True, False, False)]
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------- through make_private


def _one_bk_step(model: nn.Module, size: int, batch: int = 2) -> privacy.PrivateTraining:
    data = TensorDataset(torch.randn(2 * batch, 3, size, size), torch.randint(0, 4, (2 * batch,)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    private = privacy.make_private(model, optimizer, DataLoader(data, batch_size=batch),
                                   _settings(), loss_fn)
    before = [p.detach().clone() for p in trainable]
    x, y = next(iter(private.loader))
    private.optimizer.zero_grad(set_to_none=True)
    loss = private.loss_fn(private.model(x), y)
    loss.backward()
    assert np.isfinite(loss.item())
    private.optimizer.step()
    assert private.ledger.steps == 1
    assert all(not torch.equal(b, p) for b, p in zip(before, trainable))
    return private


@pytest.mark.parametrize("name", available_backbones())
def test_every_backbone_takes_a_bk_step(name: str) -> None:
    torch.manual_seed(0)
    _one_bk_step(build_model(name, dp_safe=True), max(BACKBONES[name].min_input_size, 32))


def test_frozen_backbone_takes_a_bk_step() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", dp_safe=True, freeze=True)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    _one_bk_step(model, 32)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)


def test_empty_poisson_batch_steps_on_zero_gradients_plus_noise() -> None:
    """Poisson sampling can draw no record: the step still runs, on noise alone."""
    for mode in ("bk", "ghost"):
        torch.manual_seed(0)
        model = build_model("smallcnn", dp_safe=True)
        data = TensorDataset(torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,)))
        private = privacy.make_private(
            model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(data, batch_size=2),
            _settings(mode, poisson_sampling=True, sample_rate=0.25), nn.CrossEntropyLoss())
        before = [p.detach().clone() for p in model.parameters()]
        private.optimizer.zero_grad(set_to_none=True)
        loss = private.loss_fn(private.model(torch.zeros(0, 3, 16, 16)),
                               torch.zeros(0, dtype=torch.long))
        loss.backward()
        assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters()), mode
        if mode == "bk":
            assert loss.item() == 0.0
        private.optimizer.step()
        assert private.ledger.steps == 1
        assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters())), mode


def test_loss_arithmetic_scales_the_per_sample_losses() -> None:
    torch.manual_seed(0)
    model = build_model("smallcnn", dp_safe=True, dropout=0.0)  # two forwards see one model
    twin = copy.deepcopy(model)
    x, y = _batch(4, 16)
    bk = BookKeepingModule(model, max_grad_norm=1e6)
    loss = BookKeepingLoss(bk, nn.CrossEntropyLoss())(bk(x), y)
    scaled = 1.0 + 3 * (loss / 2) - 0.5
    assert scaled.item() == pytest.approx(1.5 * loss.item() + 0.5, rel=1e-6)
    assert torch.allclose(scaled.detach(), 1.5 * loss.detach() + 0.5)
    scaled.backward()
    (1.5 * nn.CrossEntropyLoss(reduction="none")(twin(x), y)).sum().backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        _assert_close(p.grad, q.grad)


def test_class_weighted_loss_stays_per_record() -> None:
    """The batch loss is the plain mean of weighted per-record losses, as in the ghost mode."""
    torch.manual_seed(0)
    model = build_model("smallcnn", dp_safe=True, dropout=0.0)
    x, y = _batch(4, 16)
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0, 4.0]))
    bk = BookKeepingModule(model, max_grad_norm=1.0)
    loss = BookKeepingLoss(bk, weighted)(bk(x), y)
    per_record = nn.CrossEntropyLoss(weight=weighted.weight, reduction="none")(model(x), y)
    assert loss.item() == pytest.approx(per_record.mean().item(), rel=1e-6)
    assert weighted.reduction == "mean"  # the hospital's own loss is left alone


# ---------------------------------------------------------------- refusals


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def test_unsupported_trainable_layers_are_refused_by_name() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 4), _Scaled())
    with pytest.raises(ValueError, match=r"3 \(_Scaled\).*grad_sample_mode: ghost"):
        BookKeepingModule(model, max_grad_norm=1.0)
    model[3].scale.requires_grad_(False)  # frozen: nothing to clip
    BookKeepingModule(model, max_grad_norm=1.0)
    emb = nn.Sequential(nn.Embedding(10, 4))
    with pytest.raises(ValueError, match=r"0 \(Embedding\)"):
        BookKeepingModule(emb, max_grad_norm=1.0)
    reflect = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="padding_mode 'reflect'"):
        BookKeepingModule(reflect, max_grad_norm=1.0)


def test_batchnorm_is_refused() -> None:
    from opacus.validators.errors import UnsupportedModuleError

    with pytest.raises(UnsupportedModuleError):
        BookKeepingModule(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), max_grad_norm=1.0)


def test_shared_layers_and_in_place_outputs_are_refused() -> None:
    shared = nn.Linear(4, 4)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = shared

        def forward(self, x):
            return self.fc(self.fc(x))

    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x).relu_()

    x, y = torch.randn(3, 4), torch.randint(0, 4, (3,))
    for module, error, text in ((Twice(), NotImplementedError, "fc .Linear. was called more"),
                                (InPlace(), RuntimeError, "fc .Linear. was modified in place")):
        bk = BookKeepingModule(module, max_grad_norm=1.0)
        with pytest.raises(error, match=text):
            BookKeepingLoss(bk, nn.CrossEntropyLoss())(bk(x), y).backward()


def test_config_accepts_bk() -> None:
    assert PrivacyConfig(grad_sample_mode="bk").grad_sample_mode == "bk"


# ---------------------------------------------------------------- a hospital


def test_hospital_trained_with_bk_equals_ghost(shard_dir: Path, monkeypatch) -> None:
    """Clipping compared with the same noise: bk draws it with Opacus' own optimizer here
    (its threaded draw is tests/test_dp_noise.py's)."""
    from opacus.optimizers import DPOptimizerFastGradientClipping

    from fedray.privacy import wrap

    monkeypatch.setattr(wrap, "ThreadedNoiseOptimizer", DPOptimizerFastGradientClipping)
    results = fit_in_grad_sample_modes(shard_dir, ("bk", "ghost"))
    bk, ghost = results["bk"], results["ghost"]
    assert bk.metrics["epsilon"] == pytest.approx(ghost.metrics["epsilon"])
    assert bk.metrics["dp_steps"] == ghost.metrics["dp_steps"]
    assert np.isfinite(bk.metrics["loss"])
    assert bk.metrics["loss"] == pytest.approx(ghost.metrics["loss"], rel=1e-4)
    # Same seed, same Poisson batches and noise draws: the same weights up to float error.
    for key in bk.weights:
        np.testing.assert_allclose(bk.weights[key], ghost.weights[key], atol=1e-4, rtol=1e-3)
