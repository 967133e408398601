"""What crosses the wire between the coordinator and a hospital: weights, counts, metrics.

Weights travel as an ordered mapping of parameter name to numpy array: Ray stores numpy arrays
zero-copy in the object store, and the aggregation math stays plain numpy.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from typing import Literal

import numpy as np
import torch



@dataclass(frozen=True)
class RoundConfig:
    """What a strategy asks of every hospital this round, beyond the weights."""

    proximal_mu: float | None = None  # FedProx: mu/2 ||w - w_global||^2 in the local loss
    local_layers: Literal["norm"] | None = None  # FedBN: keep the hospital's own norm layers


@dataclass(frozen=True)
class FitIns:
    """The instructions a hospital gets with the global weights for one round."""

    round: int
    lr: float
    local_epochs: int
    seed: int
    proximal_mu: float | None = None
    local_layers: Literal["norm"] | None = None


@dataclass
class FitRes:
    """All that leaves a hospital after local training: weights, sample count, local metrics."""

    hospital: str
    weights: OrderedDict
    num_samples: int
    metrics: dict[str, float]


class FailureKind(str, Enum):
    """Why a hospital did not deliver a round (a str: records serialise as plain text)."""

    ERROR = "error"  # it raised
    TIMEOUT = "timeout"  # it missed the round's deadline
    DIED = "died"  # its process is gone
    BUDGET = "budget"  # its next round would exceed its privacy budget
    UNAVAILABLE = "unavailable"  # still restarting after the wait

    def __str__(self) -> str:
        return self.value


@dataclass
class Failure:
    """A hospital that did not deliver this round, and why (errors are data, not crashes)."""

    hospital: str
    kind: FailureKind
    message: str

    def __post_init__(self) -> None:
        self.kind = FailureKind(self.kind)  # a name outside the enum is a bug, caught here


def to_numpy(state: dict[str, torch.Tensor]) -> OrderedDict:
    return OrderedDict((k, v.detach().cpu().numpy().copy()) for k, v in state.items())


def to_torch(weights: dict[str, np.ndarray]) -> OrderedDict:
    return OrderedDict((k, torch.from_numpy(np.asarray(v).copy())) for k, v in weights.items())
