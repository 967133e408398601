"""The strategy interface: configure a round, aggregate its results (and its failures)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Any

import numpy as np

from fedray.messages import Failure, FitRes


class Strategy(ABC):
    """Decides who trains each round and how their updates become the next global model."""

    def __init__(self, min_clients: int = 1, fraction: float = 1.0) -> None:
        self.min_clients = min_clients
        self.fraction = fraction

    def select(self, round_number: int, available: list[str], rng: np.random.Generator) -> list[str]:
        """A seeded sample of hospitals, sorted, of size max(min_clients, ceil(fraction * n))."""
        count = min(len(available), max(self.min_clients, math.ceil(self.fraction * len(available))))
        chosen = rng.choice(len(available), size=count, replace=False)
        return sorted(available[i] for i in chosen)

    @abstractmethod
    def aggregate(
        self, round_number: int, current: OrderedDict, results: list[FitRes], failures: list[Failure]
    ) -> OrderedDict | None:
        """New global weights, or None when the round does not count (too few results)."""

    def configure(self, round_number: int) -> dict[str, Any]:
        """Extra instructions for every hospital this round (they travel in `FitIns.extra`).

        A fresh dict on every call, so a caller may share or change it freely.
        """
        del round_number
        return {}

    def enough(self, results: list[FitRes]) -> bool:
        return len(results) >= self.min_clients

    @staticmethod
    def ordered(results: list[FitRes]) -> list[FitRes]:
        """Results sorted by hospital, so that sums (and so results) do not depend on arrival."""
        return sorted(results, key=lambda r: r.hospital)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state
