"""FedAvg (McMahan et al. 2017): the sample-weighted mean of the hospitals' weights."""

from __future__ import annotations

from collections import OrderedDict

from fedray.federation.messages import Failure, FitRes
from fedray.strategy.aggregate import weighted_average
from fedray.strategy.base import Strategy


class FedAvg(Strategy):
    def aggregate(
        self, round_number: int, current: OrderedDict, results: list[FitRes], failures: list[Failure]
    ) -> OrderedDict | None:
        del round_number, current, failures
        if not self.enough(results):
            return None
        return weighted_average([(r.weights, r.num_samples) for r in self.ordered(results)])
