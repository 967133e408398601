"""fedray.serving.batching.Batcher: batches form when the model is free, callers get their own
results, a caller that gives up is not computed, a failed batch fails only its callers."""

import asyncio

import pytest

from fedray.serving.batching import Batcher


class Model:
    """A batch function that records each batch and can be held until released."""

    def __init__(self) -> None:
        self.batches: list[list] = []
        self.hold: asyncio.Event | None = None
        self.started = asyncio.Event()
        self.fail_on: set = set()

    async def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        self.started.set()
        if self.hold is not None:
            await self.hold.wait()
        if self.fail_on & set(items):
            raise RuntimeError("bad batch")
        return [item * 10 for item in items]


def test_concurrent_calls_share_one_batch_and_get_their_own_results():
    async def scenario():
        model = Model()
        # a full queue goes at once: with a 30 s wait, anything else would hang the test
        batcher = Batcher(model, max_batch_size=4, wait_s=30.0)
        results = await asyncio.wait_for(asyncio.gather(*(batcher(i) for i in range(8))), 10)
        return model.batches, results

    batches, results = asyncio.run(scenario())
    assert results == [10 * i for i in range(8)]
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_a_partial_batch_goes_when_its_wait_is_over():
    async def scenario():
        model = Model()
        batcher = Batcher(model, max_batch_size=4, wait_s=0.05)
        return await asyncio.wait_for(asyncio.gather(*(batcher(i) for i in range(3))), 10), \
            model.batches

    results, batches = asyncio.run(scenario())
    assert results == [0, 10, 20] and batches == [[0, 1, 2]]


async def _busy() -> tuple[Model, Batcher, asyncio.Future]:
    """A batcher (no wait) whose model is held running the batch [0]."""
    model = Model()
    model.hold = asyncio.Event()
    batcher = Batcher(model, max_batch_size=16, wait_s=0.0)
    first = asyncio.ensure_future(batcher(0))
    await model.started.wait()
    return model, batcher, first


def test_the_next_batch_takes_what_queued_while_the_model_was_busy():
    async def scenario():
        model, batcher, first = await _busy()
        later = []
        for i in range(1, 9):  # one at a time, the loop free in between: a batcher that
            later.append(asyncio.ensure_future(batcher(i)))  # formed batches ahead would
            for _ in range(3):  # make eight batches of one here
                await asyncio.sleep(0)
        model.hold.set()
        return model.batches, await first, await asyncio.gather(*later)

    batches, first, later = asyncio.run(scenario())
    assert batches == [[0], list(range(1, 9))]  # one batch of 8, not eight of one
    assert first == 0 and later == [10 * i for i in range(1, 9)]


def test_a_caller_that_gives_up_is_not_computed():
    async def scenario():
        model, batcher, first = await _busy()
        gone = asyncio.ensure_future(batcher(1))
        kept = asyncio.ensure_future(batcher(2))
        await asyncio.sleep(0)
        gone.cancel()
        model.hold.set()
        return model.batches, await first, await kept, gone.cancelled()

    batches, first, kept, cancelled = asyncio.run(scenario())
    assert batches == [[0], [2]] and kept == 20 and cancelled


def test_a_failed_batch_fails_its_callers_and_the_next_batch_still_runs():
    async def scenario():
        model = Model()
        model.fail_on = {1}
        batcher = Batcher(model, max_batch_size=2, wait_s=30.0)
        outcomes = await asyncio.gather(batcher(0), batcher(1), return_exceptions=True)
        return outcomes, await asyncio.wait_for(asyncio.gather(batcher(5), batcher(6)), 10)

    outcomes, after = asyncio.run(scenario())
    assert all(isinstance(o, RuntimeError) for o in outcomes) and after == [50, 60]


def test_configure_applies_to_later_batches_and_refuses_bad_values():
    async def scenario():
        model = Model()
        batcher = Batcher(model, max_batch_size=8, wait_s=30.0)
        batcher.configure(2, 30.0)
        await asyncio.wait_for(asyncio.gather(*(batcher(i) for i in range(4))), 10)
        return model.batches

    assert [len(b) for b in asyncio.run(scenario())] == [2, 2]
    with pytest.raises(ValueError, match="max_batch_size"):
        Batcher(Model(), max_batch_size=0, wait_s=0.0)


class HeldBatches(Model):
    """A batch function whose n-th batch runs until releases[n] is set."""

    def __init__(self) -> None:
        super().__init__()
        self.releases = [asyncio.Event() for _ in range(8)]

    async def __call__(self, items: list) -> list:
        n = len(self.batches)
        self.batches.append(list(items))
        await self.releases[n].wait()
        return [item * 10 for item in items]


async def _spin() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def _two_waves(model: HeldBatches, batcher: Batcher, first: int,
                     second: int) -> tuple[list, list]:
    """`first` calls, the batcher settled, `second` more, settled again: the batches running
    then, and every call's result once all batches are released."""
    calls = [asyncio.ensure_future(batcher(i)) for i in range(first)]
    await _spin()
    calls += [asyncio.ensure_future(batcher(i)) for i in range(first, first + second)]
    await _spin()
    running = [list(b) for b in model.batches]
    for release in model.releases:
        release.set()
    return running, await asyncio.wait_for(asyncio.gather(*calls), 10)


def test_with_two_streams_a_second_batch_runs_while_the_first_does():
    async def scenario():
        model = Model()
        model.hold = asyncio.Event()
        batcher = Batcher(model, max_batch_size=4, wait_s=30.0, streams=2)
        calls = [asyncio.ensure_future(batcher(i)) for i in range(12)]
        await _spin()  # both streams form their batches while neither is released
        running = [list(b) for b in model.batches]
        model.hold.set()
        return running, model.batches, await asyncio.wait_for(asyncio.gather(*calls), 10)

    running, batches, results = asyncio.run(scenario())
    assert running == [[0, 1, 2, 3], [4, 5, 6, 7]]  # two at once, never a third
    assert batches[2:] == [[8, 9, 10, 11]]
    assert results == [10 * i for i in range(12)]


def test_a_second_stream_waits_for_a_backlog_not_a_partial_batch():
    async def scenario():
        model = HeldBatches()
        # no wait for a full batch: a free stream would take any waiting request at once.
        # All 16 go in one batch, none split off for the idle stream; then 8 wait, under a
        # full batch, and the idle stream leaves them until the batch ends.
        batcher = Batcher(model, max_batch_size=16, wait_s=0.0, streams=2)
        return (*await _two_waves(model, batcher, 16, 8), model.batches)

    while_running, results, batches = asyncio.run(scenario())
    assert while_running == [list(range(16))]
    assert batches == [list(range(16)), list(range(16, 24))]
    assert results == [10 * i for i in range(24)]


def test_a_backlog_starts_a_second_batch_at_once_while_one_runs():
    async def scenario():
        model = HeldBatches()
        # a full batch waits while one runs: the second stream takes it, no wait
        batcher = Batcher(model, max_batch_size=8, wait_s=30.0, streams=2)
        return await _two_waves(model, batcher, 8, 8)

    running, results = asyncio.run(scenario())
    assert running == [list(range(8)), list(range(8, 16))]
    assert results == [10 * i for i in range(16)]


def test_one_stream_never_runs_two_batches_at_once():
    async def scenario():
        model = Model()
        model.hold = asyncio.Event()
        batcher = Batcher(model, max_batch_size=4, wait_s=30.0, streams=1)
        calls = [asyncio.ensure_future(batcher(i)) for i in range(8)]
        await _spin()
        running = [list(b) for b in model.batches]
        model.hold.set()
        await asyncio.wait_for(asyncio.gather(*calls), 10)
        return running, model.batches

    running, batches = asyncio.run(scenario())
    assert running == [[0, 1, 2, 3]] and batches == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_a_failed_batch_frees_its_stream():
    async def scenario():
        model = Model()
        model.fail_on = {0, 2}
        batcher = Batcher(model, max_batch_size=1, wait_s=0.0, streams=2)
        failed = await asyncio.gather(batcher(0), batcher(2), return_exceptions=True)
        after = await asyncio.wait_for(asyncio.gather(*(batcher(i) for i in (3, 4, 5))), 10)
        return failed, after

    failed, after = asyncio.run(scenario())
    assert all(isinstance(f, RuntimeError) for f in failed) and after == [30, 40, 50]


def test_streams_must_be_positive():
    with pytest.raises(ValueError, match="streams"):
        Batcher(Model(), max_batch_size=4, wait_s=0.0, streams=0)


def test_callers_that_gave_up_are_no_backlog():
    async def scenario():
        model = HeldBatches()
        batcher = Batcher(model, max_batch_size=2, wait_s=0.0, streams=2)
        calls = [asyncio.ensure_future(batcher(i)) for i in range(2)]
        await _spin()  # [0, 1] running
        gone = asyncio.ensure_future(batcher(2))
        kept = asyncio.ensure_future(batcher(3))
        await asyncio.sleep(0)
        gone.cancel()
        await _spin()  # one caller waits, one gave up: not a full batch, no second pass
        running = [list(b) for b in model.batches]
        for release in model.releases:
            release.set()
        return running, await asyncio.wait_for(asyncio.gather(*calls, kept), 10), model.batches

    running, results, batches = asyncio.run(scenario())
    assert running == [[0, 1]]
    assert batches == [[0, 1], [3]] and results == [0, 10, 30]


def test_a_partial_batch_goes_once_no_request_has_come_for_quiet_s():
    async def scenario():
        model = Model()
        # with a 30 s wait, only the quiet rule lets this partial batch go within the test
        batcher = Batcher(model, max_batch_size=16, wait_s=30.0, quiet_s=0.01)
        results = await asyncio.wait_for(asyncio.gather(*(batcher(i) for i in range(3))), 10)
        return results, model.batches

    results, batches = asyncio.run(scenario())
    assert results == [0, 10, 20] and batches == [[0, 1, 2]]


def test_a_partial_batch_closes_at_the_earlier_of_its_wait_and_its_quiet_time():
    batcher = Batcher(Model(), max_batch_size=16, wait_s=0.005, quiet_s=0.002)
    assert batcher.closes_at(first=10.0, last=10.001) == pytest.approx(10.003)
    assert batcher.closes_at(first=10.0, last=10.004) == pytest.approx(10.005)  # the wait caps
    batcher.configure(16, 0.005, None)  # no quiet rule: all of the wait
    assert batcher.closes_at(first=10.0, last=10.0) == pytest.approx(10.005)
    with pytest.raises(ValueError, match="quiet_s"):
        batcher.configure(16, 0.005, -0.001)
