"""FedTrimmedAvg (Yin et al. 2018): per coordinate, drop the int(beta * n) largest and smallest
values, then average the rest (unweighted). Robust to a bad hospital once int(beta * n) >= 1."""

from __future__ import annotations

import math
from collections import OrderedDict

from fedray.federation.messages import Failure, FitRes
from fedray.strategy.aggregate import trimmed_mean
from fedray.strategy.base import Strategy


class FedTrimmedAvg(Strategy):
    def __init__(self, min_clients: int = 1, fraction: float = 1.0, *, beta: float = 0.2) -> None:
        super().__init__(min_clients=min_clients, fraction=fraction)
        if not (math.isfinite(beta) and 0.0 <= beta < 0.5):
            raise ValueError(f"FedTrimmedAvg beta must be in [0, 0.5), got {beta!r}")
        self.beta = float(beta)

    def aggregate(
        self, round_number: int, current: OrderedDict, results: list[FitRes], failures: list[Failure]
    ) -> OrderedDict | None:
        del round_number, current, failures
        if not self.enough(results):
            return None
        return trimmed_mean([r.weights for r in self.ordered(results)], self.beta)
