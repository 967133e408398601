"""FedAdam (Reddi et al. 2021): Adam on the server over the FedAvg pseudo-gradient."""

from __future__ import annotations

import numpy as np

from fedray.strategy.fedopt import FedOpt, adam_second_moment


class FedAdam(FedOpt):
    """Server Adam; params server_lr (1e-2), beta1 (0.9), beta2 (0.99), tau (1e-3)."""

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return adam_second_moment(v, delta, self.beta2)
