"""Aggregation strategies: pure objects that know nothing of Ray or of the network."""

from fedray.strategy.base import Strategy
from fedray.strategy.fedavg import FedAvg


def build_strategy(name: str, min_clients: int, fraction: float) -> Strategy:
    strategies = {"fedavg": FedAvg}
    if name not in strategies:
        raise ValueError(f"unknown strategy {name!r}; known: {sorted(strategies)}")
    return strategies[name](min_clients=min_clients, fraction=fraction)


__all__ = ["FedAvg", "Strategy", "build_strategy"]
