"""DP-SGD's Gaussian noise on the CPU, drawn by as many threads as torch computes with.

Opacus draws the noise parameter by parameter from one generator (`_generate_noise`), and a
CPU generator fills its tensor on one thread: for resnet18's 11.2 M parameters that is about a
sixth of a non-private step on two cores. `ThreadedNoiseOptimizer` draws the same
distribution, N(0, (noise_multiplier * max_grad_norm)^2) independently per coordinate, into
one flat buffer cut into one chunk per thread, each chunk from a generator of its own. Those
generators are reseeded at every step from the hospital's noise generator (secret, or seeded
per step under `privacy.reproducible_noise`), so the noise stays exactly as unknowable, or as
reproducible, as that generator. It also keeps the clipped sum Opacus' ghost-mode optimizer
copies (`accumulate` deep-copies .grad), since book-keeping clipping writes a fresh .grad
every batch.

Opacus' own path is kept where this one does not apply: secure mode (torchcsprng's generator,
its 2n-sample draw against floating-point attacks), a generator on a GPU (which fills in
parallel itself), parameters of mixed dtypes, zero noise.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.optimizers.optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping


class ThreadedNoiseOptimizer(DPOptimizerFastGradientClipping):
    """Opacus' ghost-mode DP optimizer with its noise drawn by several CPU threads."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0
        self._generators: list[torch.Generator] = []
        self._buffer: torch.Tensor | None = None

    def accumulate(self) -> None:
        for p in self.params:
            if p.summed_grad is not None:
                p.summed_grad.add_(p.grad.data)
            else:  # .grad is this batch's own tensor (book-keeping clipping): kept, not copied
                p.summed_grad = p.grad.data

    def _threaded(self) -> bool:
        generator = self.generator
        return (not self.secure_mode and isinstance(generator, torch.Generator)
                and generator.device.type == "cpu"
                and len({p.summed_grad.dtype for p in self.params}) == 1
                and all(p.summed_grad.device.type == "cpu" for p in self.params))

    def add_noise(self) -> None:
        multiplier = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
        std = multiplier * self.max_grad_norm
        if std == 0 or not self._threaded():
            super().add_noise()
            return
        for p in self.params:
            _check_processed_flag(p.summed_grad)
        noise = self.draw(sum(p.summed_grad.numel() for p in self.params),
                          self.params[0].summed_grad.dtype, std)
        offset = 0
        for p in self.params:
            n = p.summed_grad.numel()
            p.grad = (p.summed_grad + noise[offset:offset + n].view_as(p.summed_grad)).view_as(p)
            _mark_as_processed(p.summed_grad)
            offset += n

    def draw(self, numel: int, dtype: torch.dtype, std: float) -> torch.Tensor:
        """`numel` independent N(0, std^2) draws, one chunk per thread."""
        k = max(1, min(torch.get_num_threads(), numel // 65536))
        if self._buffer is None or self._buffer.numel() != numel or self._buffer.dtype != dtype:
            self._buffer = torch.empty(numel, dtype=dtype)
        while len(self._generators) < k:
            self._generators.append(torch.Generator())
        # the chunks' seeds come from the hospital's generator: secret when it is
        seeds = torch.randint(0, 2**62, (k,), generator=self.generator).tolist()
        chunks = self._buffer.tensor_split(k)

        def fill(i: int) -> None:
            self._generators[i].manual_seed(seeds[i])
            chunks[i].normal_(0.0, std, generator=self._generators[i])

        if k == 1:
            fill(0)
        else:
            if self._pool_size < k:
                if self._pool is not None:
                    self._pool.shutdown(wait=False)
                self._pool = ThreadPoolExecutor(max_workers=k, thread_name_prefix="dp-noise")
                self._pool_size = k
            list(self._pool.map(fill, range(k)))
        return self._buffer
