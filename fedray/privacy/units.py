"""DP-SGD over privacy units that hold several records: a patient's images, or the flip_x4
copies of one image.

Record-level DP-SGD bounds what one record changes; when a patient contributes twenty images,
or an image is in the shard four times (identity, h-flip, v-flip, both), that bound covers a
twentieth or a quarter of what must be protected. Here whole units are Poisson-sampled, every
record of a sampled unit enters the batch, and the per-record gradients Opacus computes are
summed per unit before Opacus' own optimizer clips each unit to max_grad_norm, adds the noise
and divides by the expected number of units per batch. The ledger accounts with the unit-level
sample rate.

Ghost clipping cannot be used here: it computes per-record gradient norms without the
per-record gradients, and the norm of a unit's summed gradient needs them (or every pair's
cross terms). Grouped clipping runs Opacus' `hooks` mode.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

import torch
from opacus.optimizers import DPOptimizer
from torch import Tensor
from torch.utils.data import Sampler


class UnitBatchSampler(Sampler[list[int]]):
    """Batches of whole units: each unit enters a batch with probability `sample_rate`
    (Poisson sampling), with all of its records; records of one unit are adjacent. With one
    unit per record this is Opacus' UniformWithReplacementSampler.

    Without `poisson`, units are shuffled and cut into `steps` batches instead (not what the
    accountant assumes; for comparisons only, like Opacus' poisson_sampling=False).

    `before_batch` runs before each batch is drawn (before each epoch without `poisson`).
    With `track`, the unit ids of each batch's records wait in a queue until the optimizer
    steps on that batch (`next_units`), so a loader that fetches ahead stays in step.
    """

    def __init__(self, unit_ids: Tensor, sample_rate: float, steps: int,
                 generator: torch.Generator | None = None, poisson: bool = True,
                 before_batch: Callable[[], None] | None = None, track: bool = True) -> None:
        unit_ids = torch.as_tensor(unit_ids, dtype=torch.long)
        if unit_ids.ndim != 1 or len(unit_ids) == 0:
            raise ValueError("unit_ids must be a non-empty 1-D tensor, one id per record")
        _, self.unit_ids = torch.unique(unit_ids, return_inverse=True)  # 0..U-1
        self.num_units = int(self.unit_ids.max()) + 1
        self.sample_rate, self.steps = sample_rate, steps
        self.generator, self.poisson = generator, poisson
        self.before_batch, self.track = before_batch or (lambda: None), track
        self._order = torch.argsort(self.unit_ids, stable=True)  # records grouped by unit
        self._order_units = self.unit_ids[self._order]
        self._pending: deque[Tensor] = deque()

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        self._pending.clear()
        if self.poisson:
            for _ in range(self.steps):
                self.before_batch()
                chosen = torch.rand(self.num_units, generator=self.generator) < self.sample_rate
                yield self._records(chosen)
        else:
            self.before_batch()
            perm = torch.randperm(self.num_units, generator=self.generator)
            for part in torch.tensor_split(perm, self.steps):
                chosen = torch.zeros(self.num_units, dtype=torch.bool)
                chosen[part] = True
                yield self._records(chosen)

    def _records(self, chosen: Tensor) -> list[int]:
        records = self._order[chosen[self._order_units]]
        if self.track:
            self._pending.append(self.unit_ids[records])
        return records.tolist()

    def next_units(self) -> Tensor:
        """Unit ids of the oldest batch not yet stepped on, one per record, in batch order."""
        if not self._pending:
            raise RuntimeError("a DP step on a batch that the unit sampler did not draw")
        return self._pending.popleft()


def group_by_unit(grad_sample: Tensor, units: Tensor) -> Tensor:
    """Per-record gradients [B, ...] summed per unit: [units in the batch, ...]."""
    _, inverse = torch.unique(units, return_inverse=True)
    count = int(inverse.max()) + 1 if len(inverse) else 0
    out = grad_sample.new_zeros((count, *grad_sample.shape[1:]))
    return out.index_add_(0, inverse.to(grad_sample.device), grad_sample)


class UnitDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer, clipping each unit's summed gradient instead of each record's.

    `expected_batch_size` is the expected number of units per batch, the divisor of the noised
    sum.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, sampler: UnitBatchSampler,
                 **kwargs) -> None:
        super().__init__(optimizer, **kwargs)
        self.sampler = sampler

    def clip_and_accumulate(self) -> None:
        units = self.sampler.next_units()
        for p in self.params:
            grad_sample = self._get_flat_grad_sample(p)
            if grad_sample.shape[0] != len(units):
                raise RuntimeError(f"per-record gradients for {grad_sample.shape[0]} records, "
                                   f"the unit sampler drew {len(units)}")
            p.grad_sample = group_by_unit(grad_sample, units)
        super().clip_and_accumulate()
