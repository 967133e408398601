"""Dynamic batching that forms each batch when the model is free to run it (no Ray here).

Ray Serve's `@serve.batch` (Ray 2.60) forms the next batch as soon as its first request has
waited `batch_wait_timeout_s`, and only then waits for the model to finish the batch before
it. When the model is the bottleneck, as on a small CPU, batches of one or two form while a
batch runs and queue up behind it: measured with 16 concurrent clients on 2 cores (resnet18,
64 px), 2 of 3 forward passes had one image and requests waited about 130 ms for the model.

A Batcher forms its next batch when the model becomes free: what queued meanwhile, and what
arrives within wait_s after (from the first request, when the model was idle), up to
max_batch_size; a full queue goes at once. On that workload it ran batches of 16 (a batch the
moment the model was free, without the wait, ran the clients' requests as alternating batches
of 2-4 and 12-14, and 25% fewer images per second). A partial batch also goes once no request
has arrived for quiet_s: without that rule, a replica that fewer than max_batch_size clients
can reach (16 clients over 2 replicas, batches of up to 16) waited all of wait_s on every
batch, its 8 requests in within about 1 ms, and its model stood idle 4 ms of every 47. A
caller that stops waiting (deadline, disconnect) leaves the queue, and a batch that fails
fails each of its callers with its error.

With `streams` above one, up to that many batches run at once. A second batch starts while
one runs only when a full batch is waiting (a backlog). Sixteen clients of one image each then
still run as one batch of 16 on every thread; splitting them into two cohorts of 8 was no
faster. A deeper queue, or requests of many images (/v1/predict/batch), use the streams: on
2 cores (resnet18, 64 px), two single-threaded passes of 16 images did 1.3x the images per
second of one pass on both cores, and with two streams 64 clients of the service's batch
route reached 0.74x of the limit against 0.50x with one, and 64 one-image clients 0.58x
against 0.44x (benchmarks/results/serve_haproxy_64_clients*.json).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

BatchFn = Callable[[list[Any]], Awaitable[list[Any]]]


class Batcher:
    """`await batcher(item)`: the result for `item` of one `fn(items)` call on a batch."""

    def __init__(self, fn: BatchFn, max_batch_size: int, wait_s: float, streams: int = 1,
                 quiet_s: float | None = None) -> None:
        if streams < 1:
            raise ValueError(f"need streams >= 1, got {streams}")
        self._fn = fn
        self.configure(max_batch_size, wait_s, quiet_s)
        self.streams = int(streams)
        self._queue: deque[tuple[Any, asyncio.Future]] = deque()
        self._last_arrival = 0.0  # loop time of the latest call
        # made on the loop that serves calls
        self._arrived: asyncio.Event | None = None
        self._free: asyncio.Semaphore | None = None  # one permit per stream not running a batch
        self._worker: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()  # batches being computed

    def configure(self, max_batch_size: int, wait_s: float, quiet_s: float | None = None) -> None:
        """quiet_s None: no quiet rule (a partial batch waits all of wait_s)."""
        if max_batch_size < 1 or wait_s < 0 or (quiet_s is not None and quiet_s < 0):
            raise ValueError(f"need max_batch_size >= 1, wait_s >= 0 and quiet_s >= 0, got "
                             f"{max_batch_size}, {wait_s}, {quiet_s}")
        self.max_batch_size = int(max_batch_size)
        self.wait_s = float(wait_s)
        self.quiet_s = None if quiet_s is None else float(quiet_s)

    def closes_at(self, first: float, last: float) -> float:
        """When a partial batch goes, with the model idle: wait_s after the first request
        arrived, or quiet_s after the latest, whichever comes first."""
        if self.quiet_s is None:
            return first + self.wait_s
        return min(first + self.wait_s, last + self.quiet_s)

    async def __call__(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self._arrived is None:
            self._arrived = asyncio.Event()
            self._free = asyncio.Semaphore(self.streams)
        future = loop.create_future()
        self._last_arrival = loop.time()
        self._queue.append((item, future))
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._run())
        return await future  # cancelled here: the worker skips it

    def _waiting(self) -> int:
        """Callers still waiting in the queue (one that gave up is dropped here)."""
        while self._queue and self._queue[0][1].done():
            self._queue.popleft()
        return sum(not future.done() for _, future in self._queue)

    def _take(self) -> list[tuple[Any, asyncio.Future]]:
        batch = []
        while self._queue and len(batch) < self.max_batch_size:
            item, future = self._queue.popleft()
            if not future.done():  # a caller that gave up is not computed
                batch.append((item, future))
        return batch

    async def _gather(self) -> None:
        """A stream is free. With no batch running, wait up to wait_s for a full batch. With
        another batch running, a second one starts only on a backlog: a full batch waiting;
        if the running batch ends first, the wait is as with none running."""
        loop = asyncio.get_running_loop()
        first = None
        while self._waiting() < self.max_batch_size:
            if self._running:
                remaining = None
            else:
                if first is None:
                    first = loop.time()
                remaining = self.closes_at(first, max(first, self._last_arrival)) - loop.time()
                if remaining <= 0:
                    return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    async def _run(self) -> None:
        while True:
            await self._free.acquire()  # a stream is free: form its batch
            try:
                while not self._waiting():  # the fill wait starts at a first request
                    self._arrived.clear()
                    await self._arrived.wait()
                await self._gather()
                batch = self._take()
            except BaseException:
                self._free.release()
                raise
            if not batch:
                self._free.release()
                continue
            task = asyncio.get_running_loop().create_task(self._compute(batch))
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        self._free.release()
        self._arrived.set()  # a stream waiting for a backlog now waits as the only one

    async def _compute(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        try:
            results = await self._fn([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} gave {len(results)} results")
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - each caller gets the batch's error
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results):
            if not future.done():
                future.set_result(result)
