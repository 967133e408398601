"""Adaptive server optimisers (Reddi et al. 2021, "Adaptive Federated Optimization").

Each round the server treats delta = weighted_average(results) - current as a pseudo-gradient
and takes one step of a server optimiser with moments m, v kept between rounds:

    m <- beta1 * m + (1 - beta1) * delta
    v <- second_moment(v, delta)             (Adam, Yogi or Adagrad, below)
    x <- x + server_lr * m / (sqrt(v) + tau)

as Flower's fedadam.py / fedyogi.py / fedadagrad.py: m and v start at zero and there is no
bias correction. Only parameters take the step: buffers (BatchNorm's running mean and variance,
which `bind` learns from the model) are statistics the hospitals measured, not gradients'
integrals, and take the weighted average, as do integer tensors (num_batches_tracked). A step
of the server's size would leave running statistics near their initial values, and the global
model in eval mode at chance. Arithmetic is float64; the moments are stored
in the tensor's dtype promoted to at least float32, and the step uses the stored moments, so a
run resumed from `state_dict()` continues bit for bit.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections import OrderedDict
from typing import Any

import numpy as np

from fedray.federation.messages import Failure, FitRes
from fedray.strategy.aggregate import weighted_average
from fedray.strategy.base import Strategy


def adam_second_moment(v: np.ndarray, delta: np.ndarray, beta2: float) -> np.ndarray:
    return beta2 * v + (1.0 - beta2) * delta * delta


def yogi_second_moment(v: np.ndarray, delta: np.ndarray, beta2: float) -> np.ndarray:
    square = delta * delta
    return v - (1.0 - beta2) * square * np.sign(v - square)


def adagrad_second_moment(v: np.ndarray, delta: np.ndarray, beta2: float) -> np.ndarray:
    del beta2
    return v + delta * delta


def _check(name: str, value: float, low: float, high: float, low_open: bool) -> float:
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and value < high
    if not ok:
        bound = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bound}{low}, {high}), got {value!r}")
    return float(value)


class FedOpt(Strategy):
    """Server-side adaptive optimiser over the FedAvg pseudo-gradient; subclasses pick v's rule."""

    def __init__(self, min_clients: int = 1, fraction: float = 1.0, *, server_lr: float = 1e-2,
                 beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__(min_clients=min_clients, fraction=fraction)
        self.server_lr = _check("server_lr", server_lr, 0.0, math.inf, low_open=True)
        self.beta1 = _check("beta1", beta1, 0.0, 1.0, low_open=False)
        self.beta2 = _check("beta2", beta2, 0.0, 1.0, low_open=False)
        self.tau = _check("tau", tau, 0.0, math.inf, low_open=True)
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}
        self.buffers: frozenset[str] = frozenset()

    def bind(self, hospitals: list[str], model: Any, noise_seed: int | None) -> None:
        """Learn which state_dict entries are buffers (averaged, never stepped)."""
        del hospitals, noise_seed
        if model is not None and hasattr(model, "named_buffers"):
            self.buffers = frozenset(name for name, _ in model.named_buffers())

    @abstractmethod
    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """The new v from the old one (float64, zeros at the start) and this round's delta."""

    def aggregate(
        self, round_number: int, current: OrderedDict, results: list[FitRes], failures: list[Failure]
    ) -> OrderedDict | None:
        del round_number, failures
        if not self.enough(results):
            return None
        average = weighted_average([(r.weights, r.num_samples) for r in self.ordered(results)])
        if list(average.keys()) != list(current.keys()):
            raise ValueError("results and the current global model disagree on parameter names")
        out: OrderedDict = OrderedDict()
        m_new: dict[str, np.ndarray] = {}
        v_new: dict[str, np.ndarray] = {}
        for name, avg in average.items():
            x = np.asarray(current[name])
            if x.shape != avg.shape:
                raise ValueError(f"results and the current model disagree on the shape of {name!r}")
            if not np.issubdtype(x.dtype, np.floating) or name in self.buffers:
                out[name] = avg
                continue
            x64 = x.astype(np.float64)
            delta = avg.astype(np.float64) - x64
            store = np.promote_types(x.dtype, np.float32)
            m = (self.beta1 * self._moment(self.m, name, x.shape)
                 + (1.0 - self.beta1) * delta).astype(store)
            v = self.second_moment(self._moment(self.v, name, x.shape), delta).astype(store)
            root = np.sqrt(v.astype(np.float64))
            step = self.server_lr * m.astype(np.float64) / (root + self.tau)
            out[name] = (x64 + step).astype(x.dtype)
            m_new[name], v_new[name] = m, v
        self.m, self.v = m_new, v_new  # only once the whole round succeeded
        return out

    @staticmethod
    def _moment(moments: dict[str, np.ndarray], name: str, shape: tuple) -> np.ndarray:
        if name not in moments:
            return np.zeros(shape, dtype=np.float64)
        value = np.asarray(moments[name], dtype=np.float64)
        if value.shape != shape:
            raise ValueError(f"server state for {name!r} has shape {value.shape}, "
                             f"the model has {shape}")
        return value

    def state_dict(self) -> dict[str, Any]:
        """{"m": {name: array}, "v": {name: array}}: copies of the server moments.

        Only floating-point tensors have moments; both dicts are empty before the first round.
        """
        return {"m": {k: a.copy() for k, a in self.m.items()},
                "v": {k: a.copy() for k, a in self.v.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`'s moments; an empty dict resets them. Lists are accepted too."""
        m, v = state.get("m", {}), state.get("v", {})
        if set(m) != set(v):
            raise ValueError("server state: m and v disagree on parameter names")
        self.m = {k: np.array(a) for k, a in m.items()}
        self.v = {k: np.array(a) for k, a in v.items()}
