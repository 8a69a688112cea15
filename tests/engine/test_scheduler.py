"""The batch scheduler on its own: a real tracker, a sequence source, sinks in memory."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import anyio
import orjson
import pytest

import streamlet as sl
from streamlet._checkpoint import Checkpointer, list_checkpoints
from streamlet._handlers import HandlerSpec
from streamlet._retry import RetryPolicy
from streamlet._scheduler import BatchPolicy, BatchScheduler, _GcPause, partition_limit
from streamlet._tracker import Tracker
from streamlet.errors import OutputError, SinkError, TaskNotHeldError
from streamlet.fs import OsFileSystem
from streamlet.records import Batch, BlockRef, OffsetRange, Record
from streamlet.sinks.base import Sink
from streamlet.sources.sequence import SequenceSource
from streamlet.state import KeyedState
from streamlet.state._changelog import BIRTH_KEY, ChangelogWrite, stored_birth
from streamlet.state._store import StateStore
from streamlet.wal import Position
from tests.engine.test_app import ListSink


class Refusing(Sink):
    """Refuses a batch whose outputs contain ``bad`` (an output it cannot write)."""

    def __init__(self, bad: int) -> None:
        self.bad = bad
        self.batches: dict[int, list[object]] = {}

    async def commit(self, batch: Batch, outputs: Sequence[object]) -> bool:
        if self.bad in outputs:
            raise OutputError(f"output {self.bad} cannot be written")
        self.batches[batch.id] = list(outputs)
        return True


class Blocks:
    """A BlockStore in memory: what the scheduler asked of it, in order."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.released: list[Position | None] = []

    async def cut(self) -> int:
        self.calls.append("cut")
        return 0

    async def read(self, refs: Sequence[BlockRef]) -> list[Record]:
        self.calls.append("read")
        return []

    async def release(self, oldest_needed: Position | None) -> None:
        self.calls.append("release")
        self.released.append(oldest_needed)

    def set_rate(self, source: str, rate: float | None) -> None:
        self.calls.append("set_rate")


async def _echo(batch: Batch) -> list[int]:
    return [int(r.value) for r in batch]


@pytest.fixture
async def tracker(tmp_path: Path) -> AsyncIterator[Tracker]:
    opened = await Tracker.open(str(tmp_path / "tracker"), base=None, after=None)
    try:
        yield opened
    finally:
        await opened.aclose()


def _scheduler(
    tmp_path: Path, tracker: Tracker, handlers: list[HandlerSpec], **policy: object
) -> tuple[BatchScheduler, SequenceSource]:
    source = SequenceSource(rate=None, limit=10)
    source.name = "seq"
    scheduler = BatchScheduler(
        app="s",
        tracker=tracker,
        sources={"seq": source},
        handlers=handlers,
        policy=BatchPolicy(interval=0.01, **policy),  # type: ignore[arg-type]
        checkpointer=Checkpointer(
            OsFileSystem(),
            str(tmp_path / "checkpoints"),
            "s",
            interval=0,
            loaded=None,
            last_done=0,
        ),
        dead_letter=ListSink(),
        blocks=Blocks(),
    )
    return scheduler, source


async def test_a_pending_batch_is_rerun_with_exactly_its_logged_ranges(
    tmp_path: Path, tracker: Tracker
) -> None:
    sink = ListSink()
    scheduler, _ = _scheduler(tmp_path, tracker, [HandlerSpec("echo", _echo, ("seq",), sink)])
    alloc = await scheduler.allocate(0.0)
    assert alloc is not None
    # A crash here: the batch is logged, nothing ran. A new scheduler recovers it.
    again, _ = _scheduler(tmp_path, tracker, [HandlerSpec("echo", _echo, ("seq",), sink)])
    assert await again.recover() == 1
    assert sink.batches == {alloc.id: list(range(10))}
    assert tracker.state.last_done == alloc.id
    assert tracker.state.pending == []


async def test_an_output_the_sink_refuses_dead_letters_that_handlers_input_once(
    tmp_path: Path, tracker: Tracker
) -> None:
    good, refusing = ListSink(), Refusing(bad=3)
    scheduler, _ = _scheduler(
        tmp_path,
        tracker,
        [HandlerSpec("good", _echo, ("seq",), good), HandlerSpec("odd", _echo, ("seq",), refusing)],
        on_failure="dead_letter",
    )
    alloc = await scheduler.allocate(0.0)
    assert alloc is not None
    info = await scheduler._run_batch(alloc, scheduled=None, recovered=False)
    assert info.dead_lettered == ("odd",)
    assert info.outputs == 10  # the good handler's only
    assert good.batches == {alloc.id: list(range(10))}
    assert refusing.batches == {}
    dead = scheduler.dead_letter
    assert isinstance(dead, ListSink)
    letters = [orjson.loads(orjson.dumps(d)) for d in dead.values()]
    assert [d["offset"] for d in letters] == list(range(10))
    assert {d["handler"] for d in letters} == {"odd"}
    assert dead.calls == 1  # one commit of the batch's dead letters


async def test_a_checkpoint_after_a_batch_releases_blocks_and_cleans_behind_the_older(
    tmp_path: Path, tracker: Tracker
) -> None:
    scheduler, _ = _scheduler(tmp_path, tracker, [HandlerSpec("echo", _echo, ("seq",), None)])
    alloc = await scheduler.allocate(0.0)
    assert alloc is not None
    await scheduler._run_batch(alloc, scheduled=None, recovered=False)
    blocks = scheduler.blocks
    assert isinstance(blocks, Blocks)
    assert blocks.calls == ["cut", "release"]
    assert blocks.released == [None]  # no block is needed by any batch
    assert [b for b, _ in list_checkpoints(OsFileSystem(), str(tmp_path / "checkpoints"))] == [1]


async def test_a_batch_bounded_by_size_leaves_the_scheduler_behind(
    tmp_path: Path, tracker: Tracker
) -> None:
    scheduler, _ = _scheduler(
        tmp_path, tracker, [HandlerSpec("echo", _echo, ("seq",), None)], max_batch_records=4
    )
    first = await scheduler.allocate(0.0)
    assert first is not None
    assert [(r.start, r.until) for r in first.ranges] == [(0, 4)]
    assert scheduler.behind
    await scheduler._run_batch(first, scheduled=None, recovered=False)
    second = await scheduler.allocate(0.0)
    assert second is not None
    assert [(r.start, r.until) for r in second.ranges] == [(4, 8)]
    await scheduler._run_batch(second, scheduled=None, recovered=False)
    third = await scheduler.allocate(0.0)
    assert third is not None
    assert [(r.start, r.until) for r in third.ranges] == [(8, 10)]
    assert not scheduler.behind


def test_a_rate_is_shared_among_partitions_within_the_ceiling_and_never_zero() -> None:
    assert partition_limit(1000.0, 0.5, 4, None) == 125  # 500 records a batch, 4 ways
    assert partition_limit(1001.0, 0.5, 4, None) == 126  # rounded up, never below the rate
    assert partition_limit(1000.0, 0.5, 4, 100) == 100  # max_rate stays the ceiling
    assert partition_limit(0.01, 0.5, 4, None) == 1  # a slow rate still moves


async def test_the_batch_info_says_what_each_handler_did(tmp_path: Path, tracker: Tracker) -> None:
    calls = {"n": 0}

    async def flaky(batch: Batch) -> list[int]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("first try fails")
        return [int(r.value) for r in batch]

    good, refusing = ListSink(), Refusing(bad=3)
    scheduler, _ = _scheduler(
        tmp_path,
        tracker,
        [
            HandlerSpec("flaky", flaky, ("seq",), good),
            HandlerSpec("odd", _echo, ("seq",), refusing),
        ],
        on_failure="dead_letter",
        retry=RetryPolicy(max_retries=2, backoff=0),
    )
    alloc = await scheduler.allocate(0.0)
    assert alloc is not None
    info = await scheduler._run_batch(alloc, scheduled=None, recovered=False)
    assert dict(info.inputs) == {"seq": 10}
    assert [(r.source, r.partition, r.start, r.until) for r in info.ranges] == [("seq", 0, 0, 10)]
    flaky_info, odd_info = info.handlers
    assert (flaky_info.name, flaky_info.outputs, flaky_info.attempts) == ("flaky", 10, 2)
    assert flaky_info.errors == ("ConnectionError: first try fails",)
    assert (flaky_info.dead_lettered, flaky_info.commit_attempts) == (False, 1)
    assert flaky_info.sink == good.describe()
    assert (odd_info.outputs, odd_info.attempts, odd_info.dead_lettered) == (0, 1, True)
    assert odd_info.errors == ("OutputError: output 3 cannot be written",)
    assert odd_info.commit_attempts == 1  # an OutputError is never retried
    assert info.decode_failures == 0


# -- group mode ---------------------------------------------------------------------


class TaskSink(Sink):
    """Per task, the next input offset it holds (a KafkaSink's marker, in memory).

    Like KafkaSink it commits only for tasks it holds, and only a batch that
    starts exactly at its task's marker: anything else is a second owner or
    a replay, refused.
    """

    def __init__(self) -> None:
        self.held: set[int] = set()
        self.marker: dict[int, int] = {}
        self.values: list[int] = []

    async def acquire(self, task: int) -> dict[str, int]:
        self.held.add(task)
        return {"seq": self.marker.get(task, 0)}

    async def release(self, task: int) -> None:
        self.held.discard(task)

    async def commit(self, batch: Batch, outputs: Sequence[object]) -> bool:
        (r,) = batch.ranges
        if r.partition not in self.held:
            raise TaskNotHeldError(f"task {r.partition} is not held")
        if r.start != self.marker.get(r.partition, 0):
            raise SinkError(f"batch {batch.id} starts at {r.start}, not at the marker")
        self.marker[r.partition] = r.until
        self.values.extend(int(o) for o in outputs)  # type: ignore[call-overload]
        return True


def _grouped(
    tmp_path: Path, tracker: Tracker, handler: Callable[[Batch], Awaitable[list[int]]]
) -> tuple[BatchScheduler, TaskSink]:
    source = SequenceSource(rate=None, limit=6, partitions=2)
    source.name = "seq"
    sink = TaskSink()
    scheduler = BatchScheduler(
        app="g",
        tracker=tracker,
        sources={"seq": source},
        handlers=[HandlerSpec("h", handler, ("seq",), sink)],
        policy=BatchPolicy(interval=0.01, max_batch_records=3),
        checkpointer=Checkpointer(
            OsFileSystem(), str(tmp_path / "checkpoints"), "g", interval=0, loaded=None, last_done=0
        ),
    )
    scheduler.tasks = set()
    return scheduler, sink


async def _take(scheduler: BatchScheduler, sink: TaskSink, task: int) -> None:
    """What GroupWorker does on an assignment: wait for the task's batch, fence, resume."""
    await scheduler.task_idle(task)
    await scheduler.acquire_task(task, await sink.acquire(task))


async def test_tasks_batches_run_side_by_side_and_are_done_in_order(
    tmp_path: Path, tracker: Tracker
) -> None:
    started: set[int] = set()
    both = anyio.Event()

    async def handler(batch: Batch) -> list[int]:
        started.add(batch.ranges[0].partition)
        if started == {0, 1}:
            both.set()
        await both.wait()  # one after another, the first would wait forever
        return [int(r.value) for r in batch]

    scheduler, sink = _grouped(tmp_path, tracker, handler)
    for task in (0, 1):
        await _take(scheduler, sink, task)
    with anyio.fail_after(10):
        await scheduler._group_tick(0.0, 0.0)
    assert started == {0, 1}
    assert sink.marker == {0: 3, 1: 3}
    assert tracker.state.pending == []
    assert tracker.state.last_done == 2


async def test_a_task_given_up_and_taken_back_mid_batch_drops_that_batch_and_goes_on(
    tmp_path: Path, tracker: Tracker
) -> None:
    # A rebalance past revoke_budget: task 0 is released while its batch
    # runs, and the group hands it straight back. The batch must not commit
    # through the new acquisition, whose positions start where it started.
    entered, go = anyio.Event(), anyio.Event()

    async def handler(batch: Batch) -> list[int]:
        if not go.is_set():
            entered.set()
            await go.wait()
        return [int(r.value) for r in batch]

    scheduler, sink = _grouped(tmp_path, tracker, handler)
    await _take(scheduler, sink, 0)
    taken_back = anyio.Event()

    async def rebalance() -> None:
        await entered.wait()
        await scheduler.release_task(0)
        await _take(scheduler, sink, 0)
        taken_back.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(rebalance)
            tg.start_soon(scheduler._group_tick, 0.0, 0.0)
            await entered.wait()
            await anyio.sleep(0.05)
            assert not taken_back.is_set()  # not while the old batch runs
            go.set()
        assert taken_back.is_set()
        assert tracker.state.pending == []  # the old batch was dropped
        assert sink.values == []
        for _ in range(3):
            await scheduler._group_tick(0.0, 0.0)
    expected = await scheduler.sources["seq"].read([OffsetRange("seq", 0, 0, 6)])
    assert sink.values == [int(r.value) for r in expected]  # each once, in order
    assert sink.marker == {0: 6}


async def test_a_task_released_while_its_batch_reads_drops_the_batch_and_goes_on(
    tmp_path: Path, tracker: Tracker
) -> None:
    """A rebalance during the read (not the handler): the worker goes on, nothing is lost."""

    async def handler(batch: Batch) -> list[int]:
        return [int(r.value) for r in batch]

    scheduler, sink = _grouped(tmp_path, tracker, handler)
    await _take(scheduler, sink, 0)
    source = scheduler.sources["seq"]
    reading, go = anyio.Event(), anyio.Event()
    read = source.read

    async def slow_read(ranges: Sequence[OffsetRange]) -> list[Record]:
        if not go.is_set():
            reading.set()
            await go.wait()
        return await read(ranges)

    source.read = slow_read  # type: ignore[method-assign]

    async def release() -> None:
        await reading.wait()
        await scheduler.release_task(0)
        go.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(release)
            await scheduler._group_tick(0.0, 0.0)
        assert sink.values == []
        assert tracker.state.pending == []  # dropped, not left for a re-run
        await _take(scheduler, sink, 0)  # back, from what was committed
        for _ in range(3):
            await scheduler._group_tick(0.0, 0.0)
    expected = await read([OffsetRange("seq", 0, 0, 6)])
    assert sink.values == [int(r.value) for r in expected]  # each once, in order
    assert sink.marker == {0: 6}


async def test_a_task_batch_that_fails_stops_the_tick_with_its_own_error(
    tmp_path: Path, tracker: Tracker
) -> None:
    async def handler(batch: Batch) -> list[int]:
        if batch.ranges[0].partition == 1:
            raise OutputError("task 1 cannot be written")
        return [int(r.value) for r in batch]

    scheduler, sink = _grouped(tmp_path, tracker, handler)
    scheduler.retry = RetryPolicy(max_retries=0)
    for task in (0, 1):
        await _take(scheduler, sink, task)
    with pytest.raises(OutputError, match="task 1 cannot be written"):  # not an ExceptionGroup
        await scheduler._group_tick(0.0, 0.0)


class ChangelogSink(Sink):
    """A sink whose commit succeeds whoever holds the task, as a KafkaSink can
    after an unknown outcome when the next owner had written the batch."""

    def __init__(self) -> None:
        self.changelogs: list[ChangelogWrite] = []
        self.batches: list[tuple[tuple[OffsetRange, ...], list[object]]] = []

    async def acquire(self, task: int) -> dict[str, int]:
        return {}

    async def commit(self, batch: Batch, outputs: Sequence[object]) -> bool:
        return True

    async def commit_changelog(
        self, batch: Batch, outputs: Sequence[object], changelog: ChangelogWrite
    ) -> bool:
        self.changelogs.append(changelog)
        self.batches.append((tuple(batch.ranges), list(outputs)))
        changelog.next_offset = sum(len(c.records) for c in self.changelogs)
        return True


async def _stateful_task(
    tmp_path: Path,
    tracker: Tracker,
    handler: HandlerSpec,
    *,
    limit: int,
    policy: BatchPolicy,
    dead_letter: Sink | None = None,
) -> tuple[BatchScheduler, StateStore]:
    """A group-mode scheduler of one stateful handler and its task 0's store (not acquired)."""
    source = SequenceSource(rate=None, limit=limit, partitions=1)
    source.name = "seq"
    scheduler = BatchScheduler(
        app="g",
        tracker=tracker,
        sources={"seq": source},
        handlers=[handler],
        policy=policy,
        checkpointer=Checkpointer(
            OsFileSystem(), str(tmp_path / "checkpoints"), "g", interval=0, loaded=None, last_done=0
        ),
        changelogs={handler.name: f"g.{handler.name}.changelog"},
        dead_letter=dead_letter,
    )
    scheduler.tasks = set()
    store = await StateStore.open(
        str(tmp_path / "t0.sqlite"), app="g", handler=handler.name, state_id="", task=0
    )
    return scheduler, store


async def test_a_task_released_mid_batch_leaves_its_local_state_behind(
    tmp_path: Path, tracker: Tracker
) -> None:
    """The batch's sink commit passed, but the task moved: its local copy is not changed."""
    entered, go = anyio.Event(), anyio.Event()

    async def count(batch: Batch, state: KeyedState) -> list[int]:
        entered.set()
        await go.wait()
        state["n"] = state.get("n", 0) + len(batch)
        return [state["n"]]

    sink = ChangelogSink()
    scheduler, store = await _stateful_task(
        tmp_path,
        tracker,
        HandlerSpec("count", count, ("seq",), sink, state=sl.State(idle=False)),
        limit=6,
        policy=BatchPolicy(interval=0.01, max_batch_records=3),
    )
    try:
        await scheduler.acquire_task(0, {}, {"count": store})

        async def release() -> None:
            await entered.wait()
            await scheduler.release_task(0)
            go.set()

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(release)
                await scheduler._group_tick(0.0, 0.0)
        assert len(sink.changelogs) == 1  # the sink took the batch and its changes
        assert (store.seq, store.position, store.empty()) == (0, 0, True)  # the copy did not
    finally:
        await store.aclose()


async def test_a_tasks_windows_close_on_the_batch_clock_without_input(
    tmp_path: Path, tracker: Tracker
) -> None:
    """Group mode makes idle batches too, one per task, named by empty ranges at its position.

    Only one that closes a window (or changes state) reaches the sink: its
    state changes go to the changelog with it, and the local copy follows.
    """
    window = sl.windows.tumbling(1.0)

    async def per_second(batch: Batch, state: KeyedState) -> list[object]:
        done = sl.windows.windowed(state, batch, window, sl.windows.count(), key=lambda r: b"k")
        return [(r.start, r.value) for r in done.results]

    sink = ChangelogSink()
    scheduler, store = await _stateful_task(
        tmp_path,
        tracker,
        HandlerSpec("w", per_second, ("seq",), sink, state=sl.State()),
        limit=4,
        policy=BatchPolicy(interval=0.01),
    )
    try:
        store.birth_due = "b1"  # as restore_task leaves it when the partition is empty
        await scheduler.acquire_task(0, {"seq": 0}, {"w": store})
        with anyio.fail_after(10):
            await scheduler._group_tick(100.2, 0.0)  # the input: window [100, 101)
            assert [r for r, _ in sink.batches] == [(OffsetRange("seq", 0, 0, 4),)]
            written = store.position
            await scheduler._group_tick(100.6, 0.0)  # idle; nothing closes
            assert len(sink.batches) == 1
            assert store.position == written  # nor did the local copy change
            await scheduler._group_tick(101.1, 0.0)  # idle; the window closes
            await scheduler._group_tick(101.5, 0.0)  # idle; nothing more
        assert sink.batches[1:] == [((OffsetRange("seq", 0, 4, 4),), [(100.0, 4)])]
        assert store.position == sum(len(c.records) for c in sink.changelogs) > written
        # The partition's first record is its birth, written once; the copy holds it.
        assert [c.records[0][0] == BIRTH_KEY for c in sink.changelogs] == [True, False]
        assert sum(k == BIRTH_KEY for c in sink.changelogs for k, _ in c.records) == 1
        assert (store.birth_due, stored_birth(store)) == (None, "b1")
        assert tracker.state.pending == []
        assert tracker.state.last_done == 4  # every tick logged its batch (ids from 1)
    finally:
        await store.aclose()


async def test_an_idle_batch_whose_handler_fails_writes_nothing_and_the_birth_goes_once(
    tmp_path: Path, tracker: Tracker
) -> None:
    """Dead-lettered on an idle batch, a handler has no input to move its sink past: no
    transaction, and the partition's birth waits for the first real write, once."""
    calls = []

    async def flaky(batch: Batch, state: KeyedState) -> list[object]:
        calls.append(len(batch))
        if len(calls) == 2:  # the first idle batch
            raise ValueError("fails once")
        if not len(batch):
            return []
        state["n"] = state.get("n", 0) + len(batch)
        return [state["n"]]

    sink = ChangelogSink()
    scheduler, store = await _stateful_task(
        tmp_path,
        tracker,
        HandlerSpec("f", flaky, ("seq",), sink, state=sl.State()),
        limit=3,
        policy=BatchPolicy(interval=0.01, on_failure="dead_letter"),
        dead_letter=ListSink(),
    )
    scheduler.retry = RetryPolicy(max_retries=0)
    try:
        store.birth_due = "b1"
        await scheduler.acquire_task(0, {"seq": 0}, {"f": store})
        with anyio.fail_after(10):
            for t in (1.0, 2.0, 3.0):  # input, a failing idle batch, an idle batch
                await scheduler._group_tick(t, 0.0)
        assert calls == [3, 0, 0]
        assert len(sink.changelogs) == 1  # only the batch with input wrote
        assert sum(k == BIRTH_KEY for c in sink.changelogs for k, _ in c.records) == 1
        assert (store.birth_due, stored_birth(store)) == (None, "b1")
    finally:
        await store.aclose()


async def test_a_task_batch_sent_to_the_dead_letters_still_moves_its_sink_on(
    tmp_path: Path, tracker: Tracker
) -> None:
    """Else the task's next batch starts past the sink's marker and is refused as a gap."""

    async def handler(batch: Batch) -> list[int]:
        if batch.ranges[0].start == 0:
            raise ValueError("the first batch fails on every record")
        return [int(r.value) for r in batch]

    scheduler, sink = _grouped(tmp_path, tracker, handler)
    scheduler.retry = RetryPolicy(max_retries=0)
    scheduler.dead_letter = letters = ListSink()
    scheduler.policy = BatchPolicy(interval=0.01, max_batch_records=3, on_failure="dead_letter")
    await _take(scheduler, sink, 0)
    with anyio.fail_after(10):
        await scheduler._group_tick(0.0, 0.0)
        await scheduler._group_tick(0.0, 0.0)
    assert len(letters.values()) == 3  # the first batch, record by record
    assert sink.marker == {0: 6}
    expected = await scheduler.sources["seq"].read([OffsetRange("seq", 0, 3, 6)])
    assert sink.values == [int(r.value) for r in expected]


@pytest.mark.parametrize("pause", [True, False])
async def test_the_garbage_collector_is_paused_while_batches_run(
    tmp_path: Path, pause: bool
) -> None:
    app = sl.App("gc", state_dir=str(tmp_path / "state"), batch_interval=0.02, pause_gc=pause)
    numbers = app.source(SequenceSource(rate=None, limit=5))
    seen: list[bool] = []

    @app.handler(numbers)
    async def look(batch: Batch) -> list[int]:
        seen.append(gc.isenabled())
        return []

    assert gc.isenabled()
    with anyio.fail_after(10):
        await app.serve(duration=0.3)
    assert seen
    assert set(seen) == {not pause}
    assert gc.isenabled()


def test_a_gc_pause_nests_and_leaves_a_collector_it_found_off_as_it_was() -> None:
    pause = _GcPause(enabled=True)
    with pause:
        with pause:  # tasks' batches side by side
            assert not gc.isenabled()
        assert not gc.isenabled()  # one batch still runs
    assert gc.isenabled()
    gc.disable()
    try:
        with pause:
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


async def test_a_sink_that_no_longer_holds_the_task_drops_the_batch_and_the_task(
    tmp_path: Path, tracker: Tracker
) -> None:
    """However the sink lost it, the batch is dropped and the task handed back, not a crash."""

    async def handler(batch: Batch) -> list[int]:
        return [int(r.value) for r in batch]

    scheduler, sink = _grouped(tmp_path, tracker, handler)
    handed_back: list[int] = []
    scheduler.fenced = handed_back.append
    await _take(scheduler, sink, 0)
    sink.held.discard(0)  # the sink let go of the task behind the scheduler's back
    with anyio.fail_after(10):
        await scheduler._group_tick(0.0, 0.0)
    assert handed_back == [0]
    assert scheduler.tasks == set()
    assert tracker.state.pending == []
    assert sink.values == []
