"""DP-SGD's noise drawn by several CPU threads (fedray.privacy.noise): the mechanism's
distribution, no one but the hospital's generator decides it, and without noise a step is
Opacus' own."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.optimizers import DPOptimizerFastGradientClipping

from fedray.privacy.noise import ThreadedNoiseOptimizer

SHAPES = [(300, 400), (1000,), (7, 11, 13, 17)]  # 138,017 + 1,000 + 17,017 coordinates


def _optimizer(cls, seed: int, noise: float, max_grad_norm: float = 0.5):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s)) for s in SHAPES]
    inner = torch.optim.SGD(params, lr=1.0)
    generator = torch.Generator().manual_seed(seed)
    return params, cls(inner, noise_multiplier=noise, max_grad_norm=max_grad_norm,
                       expected_batch_size=4, loss_reduction="mean", generator=generator)


def _step(params, optimizer, grads) -> list[torch.Tensor]:
    """One DP step from the clipped sums `grads`; returns the parameters' .grad after it."""
    for p, g in zip(params, grads):
        p.grad = g.clone()
    optimizer.pre_step()
    return [p.grad.clone() for p in params]


def _grads() -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(*s) for s in SHAPES]


@pytest.fixture(autouse=True)
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_the_noise_is_the_mechanisms_gaussian_in_every_chunk() -> None:
    """Each coordinate gets N(0, (sigma * C)^2) once scaled back, whichever thread drew it,
    and the chunks are not copies of one another."""
    params, optimizer = _optimizer(ThreadedNoiseOptimizer, seed=3, noise=1.4)
    grads = _grads()
    after = _step(params, optimizer, grads)
    noise = torch.cat([(a * 4 - g).flatten() for a, g in zip(after, grads)])  # mean reduction
    std = 1.4 * 0.5
    n = noise.numel()
    assert abs(noise.mean().item()) < 5 * std / math.sqrt(n)
    assert noise.std().item() == pytest.approx(std, rel=0.02)
    first, second = noise[: n // 2], noise[n // 2: n // 2 * 2]
    for half in (first, second):
        assert half.std().item() == pytest.approx(std, rel=0.03)
    assert abs(torch.corrcoef(torch.stack([first, second]))[0, 1].item()) < 0.02


def test_the_hospitals_generator_alone_decides_the_noise() -> None:
    """Same generator state, same noise (reproducible_noise reseeds it per step); another
    seed, other noise; and the next step draws afresh."""
    grads = _grads()
    a = _step(*_optimizer(ThreadedNoiseOptimizer, seed=11, noise=1.0), grads)
    b = _step(*_optimizer(ThreadedNoiseOptimizer, seed=11, noise=1.0), grads)
    c = _step(*_optimizer(ThreadedNoiseOptimizer, seed=12, noise=1.0), grads)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not any(torch.equal(x, z) for x, z in zip(a, c))
    params, optimizer = _optimizer(ThreadedNoiseOptimizer, seed=11, noise=1.0)
    first = _step(params, optimizer, grads)
    optimizer.zero_grad(set_to_none=True)
    second = _step(params, optimizer, grads)
    assert not any(torch.equal(x, y) for x, y in zip(first, second))


@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_a_step_is_opacus_step_but_for_the_noise_draws(noise: float) -> None:
    """Without noise the parameters move exactly as under Opacus' optimizer; with it, by the
    same clipped mean plus noise of the same size."""
    grads = _grads()
    ours = _optimizer(ThreadedNoiseOptimizer, seed=5, noise=noise)
    theirs = _optimizer(DPOptimizerFastGradientClipping, seed=5, noise=noise)
    for params, optimizer in (ours, theirs):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
    for p, q in zip(ours[0], theirs[0]):
        if noise == 0:
            assert torch.equal(p, q)
        else:
            assert (p - q).std().item() == pytest.approx(math.sqrt(2) * noise * 0.5 / 4, rel=0.1)
