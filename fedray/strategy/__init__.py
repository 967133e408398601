"""Aggregation strategies: pure objects that know nothing of Ray or of the network."""

from __future__ import annotations

import inspect
from typing import Any

from fedray.strategy.base import Strategy
from fedray.strategy.dpfedavg import DPFedAvg
from fedray.strategy.fedadagrad import FedAdagrad
from fedray.strategy.fedadam import FedAdam
from fedray.strategy.fedavg import FedAvg
from fedray.strategy.fedbn import FedBN
from fedray.strategy.fedmedian import FedMedian
from fedray.strategy.fedopt import FedOpt
from fedray.strategy.fedprox import FedProx
from fedray.strategy.fedtrimmedavg import FedTrimmedAvg
from fedray.strategy.fedyogi import FedYogi

STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedbn": FedBN,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "dpfedavg": DPFedAvg,
}


def strategy_params(name: str) -> list[str]:
    """The parameters strategy `name` takes besides min_clients and fraction."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known: {sorted(STRATEGIES)}")
    signature = inspect.signature(STRATEGIES[name].__init__)
    return [p for p in signature.parameters if p not in ("self", "min_clients", "fraction")]


def build_strategy(name: str, min_clients: int, fraction: float, **params: Any) -> Strategy:
    """Strategy `name` with its own parameters; a parameter it does not take is a ValueError."""
    accepted = strategy_params(name)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"strategy {name!r} takes no parameter {', '.join(map(repr, unknown))}; "
                         f"it takes: {', '.join(accepted) or 'none'}")
    return STRATEGIES[name](min_clients=min_clients, fraction=fraction, **params)


__all__ = ["STRATEGIES", "DPFedAvg", "FedAdagrad", "FedAdam", "FedAvg", "FedBN", "FedMedian",
           "FedOpt", "FedProx", "FedTrimmedAvg", "FedYogi", "Strategy", "build_strategy",
           "strategy_params"]
