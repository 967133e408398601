"""FedProx (Li et al. 2020): FedAvg aggregation; hospitals add mu/2 * ||w - w_global||^2 locally."""

from __future__ import annotations

import math

from fedray.federation.messages import RoundConfig
from fedray.strategy.fedavg import FedAvg


class FedProx(FedAvg):
    """FedAvg on the server; `configure` tells every hospital the proximal weight `mu`."""

    def __init__(self, min_clients: int = 1, fraction: float = 1.0, *, mu: float = 0.01) -> None:
        super().__init__(min_clients=min_clients, fraction=fraction)
        if not (math.isfinite(mu) and mu >= 0):
            raise ValueError(f"FedProx mu must be a finite number >= 0, got {mu!r}")
        self.mu = float(mu)

    def configure(self, round_number: int) -> RoundConfig:
        del round_number
        return RoundConfig(proximal_mu=self.mu)
