"""FedMedian (Yin et al. 2018): the coordinate-wise median of the hospitals' weights.

Unweighted, so one hospital with a bad update cannot drag the result far (with 3+ hospitals).
"""

from __future__ import annotations

from collections import OrderedDict

from fedray.federation.messages import Failure, FitRes
from fedray.strategy.aggregate import coordinate_median
from fedray.strategy.base import Strategy


class FedMedian(Strategy):
    def aggregate(
        self, round_number: int, current: OrderedDict, results: list[FitRes], failures: list[Failure]
    ) -> OrderedDict | None:
        del round_number, current, failures
        if not self.enough(results):
            return None
        return coordinate_median([r.weights for r in self.ordered(results)])
