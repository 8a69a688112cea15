"""The rate estimator alone, and backpressure in a running app on a fake clock."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest

from streamlet._backpressure import RateController, RateEstimator
from streamlet.app import App
from streamlet.errors import ConfigError
from streamlet.metrics import BatchInfo
from streamlet.records import Batch
from streamlet.sinks.base import Sink
from streamlet.sources.sequence import SequenceSource
from streamlet.testing.clock import FakeClock


def test_the_first_batch_sets_the_rate_to_what_was_processed() -> None:
    est = RateEstimator(batch_interval=1.0)
    assert est.update(time=1.0, records=5000, processing_time=0.5, scheduling_delay=0) == 10_000


def test_a_slower_handler_lowers_the_rate_and_a_faster_one_raises_it() -> None:
    est = RateEstimator(batch_interval=1.0, min_rate=10)
    est.update(time=1.0, records=1000, processing_time=0.1, scheduling_delay=0)  # 10k/s
    slow = est.update(time=2.0, records=1000, processing_time=1.0, scheduling_delay=0)
    assert slow == pytest.approx(1000)  # follows the processing rate
    slower = est.update(time=3.0, records=1000, processing_time=1.0, scheduling_delay=2.0)
    # A backlog of two intervals takes another 0.2 * 2 * 1000 off.
    assert slower == pytest.approx(600)
    fast = est.update(time=4.0, records=600, processing_time=0.06, scheduling_delay=0)
    assert fast is not None
    assert fast > 5000


def test_the_rate_never_falls_below_the_floor_and_ignores_empty_batches() -> None:
    est = RateEstimator(batch_interval=1.0, min_rate=250)
    est.update(time=1.0, records=100, processing_time=10.0, scheduling_delay=0)
    assert est.rate == 250
    assert est.update(time=2.0, records=0, processing_time=0.1, scheduling_delay=0) is None
    assert est.update(time=0.5, records=10, processing_time=0.1, scheduling_delay=0) is None


def test_the_controller_sets_a_rate_per_source_and_reports_only_changes() -> None:
    rates = RateController(["a", "b"], batch_interval=1.0, min_rate=10)
    assert rates.rates == {"a": None, "b": None}
    changed = rates.update(1.0, {"a": 500}, busy=0.5, scheduling_delay=0)
    # "b" had no records: its estimator keeps no rate yet, and says nothing.
    assert changed == {"a": 1000}
    assert rates.rates == {"a": 1000, "b": None}
    assert rates.update(2.0, {}, busy=0.1, scheduling_delay=0) == {}


def test_bad_gains_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="integral"):
        RateEstimator(batch_interval=1.0, integral=-1)
    with pytest.raises(ConfigError, match="min_rate"):
        RateEstimator(batch_interval=1.0, min_rate=0)


class NullSink(Sink):
    async def commit(self, batch: Batch, outputs: Sequence[object]) -> bool:
        return True


async def _sizes_fast_slow_fast(
    app: App, clock: FakeClock | None, slow: dict[str, bool], *, within: float
) -> tuple[list[int], list[int], list[int]]:
    """Batch sizes of the last five batches: handler fast, then slow, then fast again.

    The handlers take time on ``clock`` (if given), which jumps whenever
    every task waits, so the timings are the same on a loaded machine as on
    an idle one.
    """
    infos: list[BatchInfo] = []
    wanted: list[tuple[int, anyio.Event]] = []

    def on_batch(info: BatchInfo) -> None:
        infos.append(info)
        if wanted and len(infos) >= wanted[-1][0]:
            wanted[-1][1].set()

    async def batches(more: int) -> list[int]:
        wanted.append((len(infos) + more, anyio.Event()))
        await wanted[-1][1].wait()
        return [i.records for i in infos[-5:]]

    app.add_listener(on_batch)
    async with anyio.create_task_group() as timing:
        if clock is not None:
            timing.start_soon(clock.autojump)
        async with anyio.create_task_group() as tg:
            await tg.start(app.serve)
            with anyio.fail_after(within):  # real seconds: a hang, not a timing
                fast_sizes = await batches(15)
                slow["on"] = True
                slow_sizes = await batches(25)
                slow["on"] = False
                recovered_sizes = await batches(25)
            app.stop()
        timing.cancel_scope.cancel()
    return fast_sizes, slow_sizes, recovered_sizes


async def test_backpressure_shrinks_batches_when_the_handler_slows_and_grows_them_after(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    app = App(
        "bp",
        state_dir=tmp_path / "state",
        batch_interval=0.05,
        backpressure=True,
        min_rate=50,
        clock=clock,
    )
    # Everything is available at once: without backpressure batches would be huge.
    source = app.source(SequenceSource(rate=None, limit=10**9, max_rate=200_000), name="seq")
    slow = {"on": False}

    @app.handler(source, sink=NullSink())
    async def work(batch: Batch) -> list[int]:
        # 0.1 ms per record when slow: at most ~500 records fit in one interval.
        await clock.sleep(len(batch) * (1e-4 if slow["on"] else 1e-6))
        return []

    fast_sizes, slow_sizes, recovered_sizes = await _sizes_fast_slow_fast(
        app, clock, slow, within=30
    )
    assert max(slow_sizes) < min(fast_sizes) / 4, (fast_sizes, slow_sizes)
    assert max(slow_sizes) <= 1500, slow_sizes
    assert min(recovered_sizes) > max(slow_sizes) * 2, (slow_sizes, recovered_sizes)
    assert max(fast_sizes + recovered_sizes) <= 200_000 * 0.05  # max_rate stays the ceiling


async def test_backpressure_throttles_a_receiver_when_the_handler_slows(tmp_path: Path) -> None:
    # On real time: a fake clock would jump while the data WAL's thread
    # writes (every task then waits), which the receiver's pacing and the
    # batch timings would both see as time passing. The throttle's
    # arithmetic is tested exactly on its own (test_blocks.py).
    from streamlet.records import Record
    from streamlet.sources.receiver import Receiver, ReceiverContext

    class Steady(Receiver):
        """Offers 20,000 records/s; stores wait only when backpressure holds them."""

        def __init__(self) -> None:
            super().__init__()
            self.stored = 0

        async def run(self, context: ReceiverContext) -> None:
            start = time.monotonic()
            while not context.stopping.is_set():
                due = start + (self.stored + 50) / 20_000
                await anyio.sleep(max(0.0, due - time.monotonic()))
                await context.store([Record(b"x")] * 50)
                self.stored += 50

    app = App(
        "bpr",
        state_dir=tmp_path / "state",
        batch_interval=0.05,
        block_interval=0.01,
        backpressure=True,
        min_rate=50,
        durability="none",
    )
    receiver = app.source(Steady(), name="steady")
    slow = {"on": False}

    @app.handler(receiver, sink=NullSink())
    async def work(batch: Batch) -> list[int]:
        await anyio.sleep(len(batch) * (2e-4 if slow["on"] else 1e-6))
        return []

    fast_sizes, slow_sizes, recovered_sizes = await _sizes_fast_slow_fast(
        app, None, slow, within=60
    )
    # Fast: each 50 ms batch holds what arrived, about 1,000 records. Slow
    # (0.2 ms a record, 5,000 records/s at most): the intake is throttled and
    # batches shrink toward 250; then they grow back.
    assert min(fast_sizes) >= 500, fast_sizes
    assert max(slow_sizes) <= 700, (fast_sizes, slow_sizes)
    assert min(recovered_sizes) >= max(slow_sizes) * 1.3, (slow_sizes, recovered_sizes)
