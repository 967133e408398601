"""The strategy interface: configure a round, aggregate its results (and its failures)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Any

import numpy as np

from fedray.federation.messages import Failure, FitRes, RoundConfig


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

    def bind(self, hospitals: list[str], model: Any, noise_seed: int | None) -> None:
        """Learn the run the strategy serves, once, before round 1: the hospitals that can be
        sampled, the global model (its parameter names), and the seed of any server-side noise
        (None: OS entropy). Strategies that need none of it ignore it."""
        del hospitals, model, noise_seed

    def configure(self, round_number: int) -> RoundConfig:
        """What every hospital is asked to do this round beyond training (typed fields)."""
        del round_number
        return RoundConfig()

    def round_report(self) -> dict[str, Any]:
        """Fields the strategy adds to the last counted round's record (empty: none)."""
        return {}

    def privacy(self) -> dict[str, Any] | None:
        """The strategy's own privacy accounting for metrics.json, or None without any."""
        return None

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
