"""Ghost clipping for convolutions: the norms are exact, and a DP step equals the hooks mode's."""

from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedray.privacy import ghost_norms
from fedray.models import build_model

from conftest import fit_in_grad_sample_modes


@pytest.mark.parametrize("force_ghost", [False, True])
@pytest.mark.parametrize("cin, cout, k, stride, pad, size, groups", [
    (3, 8, 3, 1, 1, 8, 1), (16, 32, 3, 2, 1, 8, 1), (4, 6, 1, 1, 0, 5, 1), (8, 8, 3, 1, 1, 6, 8),
    (3, 4, 7, 2, 3, 12, 1),
])
def test_conv_norms_equal_per_sample_gradient_norms(monkeypatch, force_ghost, cin, cout, k, stride,
                                                     pad, size, groups):
    if force_ghost:
        monkeypatch.setattr(ghost_norms, "ghost_is_cheaper", lambda *a: True)
    torch.manual_seed(0)
    layer = nn.Conv2d(cin, cout, k, stride, pad, groups=groups)
    x = torch.randn(5, cin, size, size)
    g = torch.randn_like(layer(x))
    norms = ghost_norms.compute_conv2d_norm_sample(layer, [x], g)
    # Oracle independent of Opacus' grad samplers: autograd, one sample at a time.
    for i in range(5):
        w_grad, b_grad = torch.autograd.grad(layer(x[i:i + 1]), (layer.weight, layer.bias), g[i:i + 1])
        assert torch.allclose(norms[layer.weight][i], w_grad.norm(), rtol=1e-4, atol=1e-6)
        assert torch.allclose(norms[layer.bias][i], b_grad.norm(), rtol=1e-4, atol=1e-6)


def test_cost_rule_prefers_ghost_on_small_maps_with_many_parameters():
    assert ghost_norms.ghost_is_cheaper(locations=4, in_features=4608, out_features=512)
    assert not ghost_norms.ghost_is_cheaper(locations=1024, in_features=147, out_features=64)


def _one_dp_step(mode: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,)))
    model = build_model("resnet18", dp_safe=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loss_fn = nn.CrossEntropyLoss()
    options = dict(module=model, optimizer=optimizer, data_loader=DataLoader(data, batch_size=8),
                   noise_multiplier=0.0, max_grad_norm=0.05, poisson_sampling=False,
                   grad_sample_mode=mode)
    if mode == "ghost":
        dp_model, dp_opt, loss_fn, loader = PrivacyEngine().make_private(criterion=loss_fn, **options)
    else:
        dp_model, dp_opt, loader = PrivacyEngine().make_private(**options)
    x, y = next(iter(loader))
    dp_opt.zero_grad()
    loss_fn(dp_model(x), y).backward()
    dp_opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_ghost_step_equals_hooks_step_with_clipping_active():
    # max_grad_norm 0.05 clips every sample, so any error in a norm changes the update.
    ghost, hooks = _one_dp_step("ghost"), _one_dp_step("hooks")
    torch.manual_seed(0)  # the seed _one_dp_step builds with: the starting weights
    start = build_model("resnet18", dp_safe=True).state_dict()
    moved = max((hooks[k] - start[k]).abs().max().item() for k in hooks)
    assert moved > 1e-4
    for key in hooks:
        assert torch.allclose(ghost[key], hooks[key], atol=1e-6, rtol=1e-4), key


def test_hospital_trains_with_ghost_clipping(shard_dir: Path):
    results = fit_in_grad_sample_modes(shard_dir, ("ghost", "hooks"))
    ghost, hooks = results["ghost"], results["hooks"]
    assert ghost.metrics["epsilon"] == pytest.approx(hooks.metrics["epsilon"])
    assert np.isfinite(ghost.metrics["loss"])
    # Same seed, same Poisson batches and noise draws: the same weights up to float error.
    for key in ghost.weights:
        np.testing.assert_allclose(ghost.weights[key], hooks.weights[key], atol=1e-4, rtol=1e-3)
