"""The injected clock: FakeClock itself, and the scheduler's ticks on it, exactly."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from streamlet._checkpoint import Checkpointer
from streamlet._handlers import HandlerSpec
from streamlet._scheduler import BatchPolicy, BatchScheduler
from streamlet._tracker import Tracker
from streamlet.fs import OsFileSystem
from streamlet.metrics import BatchInfo
from streamlet.records import Batch
from streamlet.sources.sequence import SequenceSource
from streamlet.testing.clock import FakeClock


async def test_a_sleeper_wakes_when_time_is_advanced_to_its_deadline() -> None:
    clock = FakeClock()
    woke: list[float] = []

    async def sleeper(seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(clock.monotonic())

    async with anyio.create_task_group() as tg:
        tg.start_soon(sleeper, 2.0)
        tg.start_soon(sleeper, 1.0)
        await anyio.wait_all_tasks_blocked()
        assert clock.next_deadline == 1.0
        clock.advance(0.5)
        await anyio.wait_all_tasks_blocked()
        assert woke == []
        clock.advance(0.5)
        await anyio.wait_all_tasks_blocked()
        assert woke == [1.0]
        clock.advance(5.0)
    assert woke == [1.0, 6.0]  # woken by the advance, at the time it reached


async def test_a_cancelled_sleeper_leaves_no_deadline_behind() -> None:
    clock = FakeClock()
    with anyio.move_on_after(0.01):
        await clock.sleep(10.0)
    assert clock.next_deadline == float("inf")


async def test_wait_returns_at_the_deadline_when_the_event_does_not_come() -> None:
    clock = FakeClock()
    async with anyio.create_task_group() as tg:
        tg.start_soon(clock.autojump)
        await clock.wait(anyio.Event(), 3.0)
        tg.cancel_scope.cancel()
    assert clock.monotonic() == 3.0


async def test_wait_returns_on_the_event_before_the_deadline_and_forgets_it() -> None:
    clock = FakeClock()
    event = anyio.Event()
    done: list[float] = []

    async def waiter() -> None:
        await clock.wait(event, 100.0)
        done.append(clock.monotonic())

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        assert clock.next_deadline == 100.0
        clock.advance(1.0)
        event.set()
    assert done == [1.0]
    assert clock.next_deadline == float("inf")


async def test_time_does_not_go_back_and_the_wall_clock_follows_it() -> None:
    clock = FakeClock(wall=1000.0)
    clock.advance(2.5)
    assert (clock.monotonic(), clock.time()) == (2.5, 1002.5)
    with pytest.raises(ValueError, match="does not go back"):
        clock.advance(-1)


@pytest.fixture
async def tracker(tmp_path: Path) -> AsyncIterator[Tracker]:
    opened = await Tracker.open(str(tmp_path / "tracker"), base=None, after=None)
    try:
        yield opened
    finally:
        await opened.aclose()


async def _run_ticks(
    tmp_path: Path, tracker: Tracker, *, slow_batch: int | None, handler_seconds: float
) -> list[BatchInfo]:
    """One second of 1/16 s ticks over a 160 records/s source; batch ``slow_batch`` is slow.

    Binary fractions keep the clock's arithmetic exact, so the figures are too.
    """
    clock = FakeClock(wall=1024.0)
    source = SequenceSource(rate=160.0, clock=clock)
    source.name = "seq"

    async def handler(batch: Batch) -> list[int]:
        if batch.id == slow_batch:
            await clock.sleep(handler_seconds)
        return []

    infos: list[BatchInfo] = []
    scheduler = BatchScheduler(
        app="t",
        tracker=tracker,
        sources={"seq": source},
        handlers=[HandlerSpec("h", handler, ("seq",), None)],
        policy=BatchPolicy(interval=1 / 16),
        checkpointer=Checkpointer(
            OsFileSystem(), str(tmp_path / "cp"), "t", interval=60, loaded=None, last_done=0
        ),
        listeners=[infos.append],
        clock=clock,
    )
    await source.start()
    async with anyio.create_task_group() as tg:
        tg.start_soon(clock.autojump)
        with anyio.fail_after(30):  # real seconds: a hang, not a timing
            await scheduler.run(anyio.Event(), duration=1.0)
        tg.cancel_scope.cancel()
    return infos


async def test_ticks_come_every_interval_on_the_clock_and_take_what_arrived(
    tmp_path: Path, tracker: Tracker
) -> None:
    infos = await _run_ticks(tmp_path, tracker, slow_batch=None, handler_seconds=0)
    # Ticks at 1/16, 2/16, ... 15/16 (the one at 1.0 is the deadline itself).
    assert [i.batch_id for i in infos] == list(range(1, 16))
    assert [i.batch_time for i in infos] == [1024 + k / 16 for k in range(1, 16)]
    assert [i.records for i in infos] == [10] * 15  # 160/s for 1/16 s, exactly
    assert all(i.scheduling_delay == 0 and i.total_delay == 0 for i in infos)


async def test_a_slow_batch_delays_the_next_tick_and_no_tick_is_lost(
    tmp_path: Path, tracker: Tracker
) -> None:
    infos = await _run_ticks(tmp_path, tracker, slow_batch=3, handler_seconds=1 / 8)
    # Batch 3 ticks at 3/16 and ends at 5/16. The tick due at 4/16 runs then,
    # 1/16 late, and takes all that arrived by 5/16; the tick due at 5/16
    # finds nothing new, so no batch; from 6/16 on, ticks are on time.
    assert [(i.batch_id, i.batch_time - 1024) for i in infos] == [
        (b, t / 16) for b, t in zip(range(1, 15), [1, 2, 3, 4, *range(6, 16)], strict=True)
    ]
    slow, late, after = infos[2], infos[3], infos[4]
    assert (slow.processing_time, slow.total_delay) == (1 / 8, 1 / 8)
    assert (late.scheduling_delay, late.total_delay, late.records) == (1 / 16, 1 / 16, 20)
    assert (after.scheduling_delay, after.records) == (0, 10)
