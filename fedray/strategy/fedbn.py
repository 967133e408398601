"""FedBN (Li et al. 2021): FedAvg over everything but the normalisation layers, which stay local.

Hospitals keep their own normalisation parameters and statistics (`configure` says so); the
coordinator's copy of those entries is left as it was. Which state_dict keys belong to
normalisation layers cannot be told from names alone (`bn1.weight` but also `features.1.1.weight`),
so the strategy takes them as `norm_keys`, computed from the model by `norm_parameter_names`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from fedray.federation.messages import Failure, FitRes, RoundConfig
from fedray.strategy.aggregate import weighted_average
from fedray.strategy.base import Strategy

if TYPE_CHECKING:
    import torch


def norm_parameter_names(model: torch.nn.Module) -> set[str]:
    """The state_dict keys of every BatchNorm/InstanceNorm (_NormBase), GroupNorm, LayerNorm
    (and RMSNorm, where torch has it) in `model`: weight, bias, running_mean, running_var,
    num_batches_tracked, whichever the layer has. Shared modules count under every name."""
    from torch import nn

    kinds: tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    if hasattr(nn, "RMSNorm"):
        kinds += (nn.RMSNorm,)
    names: set[str] = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, kinds):
            own = module.state_dict(keep_vars=True)  # its own tensors: norm layers have no children
            names.update(f"{prefix}.{key}" if prefix else key for key in own)
    return names


class FedBN(Strategy):
    """FedAvg for all tensors outside `norm_keys`; the entries in `norm_keys` keep current's values.

    `norm_keys` may be set after construction (`strategy.norm_keys = ...`), but must be set
    before the first aggregation.
    """

    def __init__(self, min_clients: int = 1, fraction: float = 1.0, *,
                 norm_keys: Iterable[str] | None = None, norm_in_global: str = "average") -> None:
        """`norm_in_global`: what the coordinator's copy of the norm entries holds. Hospitals
        never load them; "average" (their sample-weighted mean) makes the global model
        evaluable, "keep" leaves them as they were."""
        super().__init__(min_clients=min_clients, fraction=fraction)
        if norm_in_global not in ("average", "keep"):
            raise ValueError(f"norm_in_global must be 'average' or 'keep', got {norm_in_global!r}")
        self.norm_in_global = norm_in_global
        self.norm_keys: frozenset[str] | None = None if norm_keys is None else frozenset(norm_keys)

    def bind(self, hospitals: list[str], model: Any, noise_seed: int | None) -> None:
        del hospitals, noise_seed
        if self.norm_keys is None:
            self.norm_keys = frozenset(norm_parameter_names(model))

    def configure(self, round_number: int) -> RoundConfig:
        del round_number
        return RoundConfig(local_layers="norm")

    def aggregate(
        self, round_number: int, current: OrderedDict, results: list[FitRes], failures: list[Failure]
    ) -> OrderedDict | None:
        del round_number, failures
        if not self.enough(results):
            return None
        if self.norm_keys is None:
            raise ValueError("FedBN needs norm_keys: pass norm_parameter_names(model) "
                             "to the constructor or set strategy.norm_keys")
        norm_keys = frozenset(self.norm_keys)
        missing = sorted(norm_keys - set(current))
        if missing:
            raise ValueError(f"norm_keys not in the current model (another model?): {missing[:5]}")
        shared = [name for name in current if name not in norm_keys]
        updates = []
        for r in self.ordered(results):
            absent = [name for name in shared if name not in r.weights]
            if absent:
                raise ValueError(f"{r.hospital} sent no {absent[:5]}")
            updates.append((OrderedDict((name, r.weights[name]) for name in shared), r.num_samples))
        average = weighted_average(updates)
        if self.norm_in_global == "average":
            norms = weighted_average([(OrderedDict((k, r.weights[k]) for k in current if k in norm_keys),
                                       r.num_samples) for r in self.ordered(results)])
            average.update(norms)
        return OrderedDict(
            (name, np.array(current[name], copy=True)
             if name in norm_keys and self.norm_in_global == "keep" else average[name])
            for name in current
        )
