"""What crosses the wire between the coordinator and a hospital: weights, counts, metrics.

Weights travel as an ordered mapping of parameter name to numpy array: Ray stores numpy arrays
zero-copy in the object store, and the aggregation math stays plain numpy.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch



@dataclass(frozen=True)
class FitIns:
    """The instructions a hospital gets with the global weights for one round."""

    round: int
    lr: float
    local_epochs: int
    seed: int
    extra: dict = field(default_factory=dict)


@dataclass
class FitRes:
    """All that leaves a hospital after local training: weights, sample count, local metrics."""

    hospital: str
    weights: OrderedDict
    num_samples: int
    metrics: dict[str, float]


@dataclass
class Failure:
    """A hospital that did not deliver this round, and why (errors are data, not crashes)."""

    hospital: str
    kind: str  # "error" | "timeout" | "died"
    message: str


def to_numpy(state: dict[str, torch.Tensor]) -> OrderedDict:
    return OrderedDict((k, v.detach().cpu().numpy().copy()) for k, v in state.items())


def to_torch(weights: dict[str, np.ndarray]) -> OrderedDict:
    return OrderedDict((k, torch.from_numpy(np.asarray(v).copy())) for k, v in weights.items())
