"""FedAdagrad (Reddi et al. 2021): Adagrad on the server over the FedAvg pseudo-gradient."""

from __future__ import annotations

import numpy as np

from fedray.strategy.fedopt import FedOpt, adagrad_second_moment


class FedAdagrad(FedOpt):
    """Server Adagrad, v <- v + delta^2; params server_lr (1e-2), beta1 (0.0, as Flower),
    tau (1e-3).

    beta2 has no role in Adagrad and is not accepted.
    """

    def __init__(self, min_clients: int = 1, fraction: float = 1.0, *, server_lr: float = 1e-2,
                 beta1: float = 0.0, tau: float = 1e-3) -> None:
        super().__init__(min_clients=min_clients, fraction=fraction, server_lr=server_lr,
                         beta1=beta1, beta2=0.0, tau=tau)

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return adagrad_second_moment(v, delta, self.beta2)
