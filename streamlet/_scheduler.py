"""The batch scheduler: ticks, allocation, handlers, and the commit protocol.

Every ``interval`` seconds the scheduler fixes the next batch's input and
logs it (``alloc``) before anything reads it, runs the batch's handlers
concurrently, then drives the commit protocol (docs/architecture.md, "The
commit protocol") in order:

1. sink commit: every handler's outputs, durable and idempotent by batch id;
   then the batch's dead letters (records that failed to decode, input of
   handlers that failed or whose outputs their sink refused), in one commit
   of the dead-letter sink, so that a re-run finds them committed or not as
   a whole;
2. source commit: direct sources are told the ranges are done;
3. ``done`` logged; a checkpoint now and then; logs cleaned behind it.

Batch sizes are bounded before a batch is logged (:func:`size_budget`): a
logged batch is re-read whole after every crash, so one too large for memory
could never complete. A batch cut short by that bound is followed at once by
the next one, without waiting for the tick, until the backlog is taken: the
bound limits a batch's size, never the throughput.

Batches run one at a time, in id order, on a fixed schedule: a batch that
takes longer than the interval delays the next one, which shows as
scheduling delay (the ticks are not skipped, as in Spark Streaming).

On start, :meth:`BatchScheduler.recover` re-runs every allocated-but-not-done
batch with exactly the input it was allocated. Sinks skip batches they
committed before the crash; the rest of the protocol is repeated, which is
harmless because each step is idempotent.

Invariant: no ``done`` is logged, and no source position is committed,
before every sink of the batch returned from ``commit``.
"""

from __future__ import annotations

import base64
import dataclasses
import gc
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, cast

import anyio

from streamlet._backpressure import RateController
from streamlet._checkpoint import Checkpointer
from streamlet._faults import crash_point
from streamlet._handlers import HandlerSpec, invoke
from streamlet._retry import GaveUp, RetryPolicy, retrying
from streamlet._tracker import (
    Allocation,
    Tracker,
    TrackerState,
    available_offsets,
    plan_allocation,
)
from streamlet.clock import SYSTEM_CLOCK, Clock
from streamlet.errors import (
    DecodeError,
    FencedError,
    HandlerError,
    OutputError,
    SinkError,
    StateError,
    StreamletError,
    TaskNotHeldError,
)
from streamlet.metrics import BatchInfo, HandlerInfo
from streamlet.records import Batch, BlockRef, OffsetRange, Record
from streamlet.sinks.base import Sink
from streamlet.sources.base import DirectSource
from streamlet.state._changelog import (
    ChangelogSink,
    ChangelogWrite,
    encode_changes,
    with_birth,
    with_positions,
)
from streamlet.state._keyed import KeyedState
from streamlet.state._store import Changes, StateStore
from streamlet.wal import Position

__all__ = [
    "BatchPolicy",
    "BatchScheduler",
    "BlockStore",
    "FailurePolicy",
    "RetryPolicy",
    "partition_limit",
    "size_budget",
]

log = logging.getLogger(__name__)

FailurePolicy = Literal["stop", "dead_letter", "dead_letter_batch"]
Listener = Callable[[BatchInfo], object]


@dataclass(slots=True)
class _Failure:
    error: BaseException
    attempts: int


_KEPT_ERRORS = 3
"""Failures of one handler on one batch kept for its HandlerInfo (the newest)."""


@dataclass(slots=True)
class _Trace:
    """What happened to one handler on one batch, for its :class:`HandlerInfo`."""

    attempts: int = 0
    errors: list[str] = field(default_factory=list)
    commit_time: float = 0.0
    commit_attempts: int = 0

    def failed(self, exc: BaseException) -> None:
        self.errors.append(f"{type(exc).__name__}: {exc}")
        del self.errors[:-_KEPT_ERRORS]


def _dead_letter(
    record: Record, batch_id: int, error: str, handler: str | None, attempts: int
) -> dict[str, object]:
    """A dead letter: the record's original bytes and position, and why (handler None: decode)."""
    return {
        "handler": handler,
        "batch_id": batch_id,
        "attempts": attempts,
        "error": error,
        "source": record.source,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": record.timestamp,
        "key": base64.b64encode(record.key).decode() if record.key is not None else None,
        "value": base64.b64encode(record.value).decode(),
    }


FIRST_BATCH_RECORDS = 1000
"""The most records the first batch of a direct source takes, before its record size is known."""
_SIZE_SAMPLE = 256
"""Records per batch measured to estimate a source's bytes per record."""


def size_budget(*, max_records: int, max_bytes: int, record_bytes: float | None) -> int:
    """The most offsets a batch takes from a direct source, all partitions together; pure.

    A batch's offset ranges are logged before they are read, and a batch
    re-run after a crash reads exactly them again: a batch too large for
    memory would fail again after every restart. So batches are bounded
    before they are logged, by records and, from the records' measured size,
    by bytes. Until a batch of the source was read its record size is
    unknown, and the first batch takes at most :data:`FIRST_BATCH_RECORDS`.
    The budget is shared among partitions by their backlog
    (:func:`~streamlet._tracker.share_budget`).

    Args:
        max_records: the most records a batch takes from the source.
        max_bytes: about the most bytes (keys and values) a batch takes from it.
        record_bytes: the measured average size of its records (None: unknown).
    """
    if record_bytes is None:
        return max(1, min(max_records, FIRST_BATCH_RECORDS))
    return max(1, min(max_records, int(max_bytes // max(record_bytes, 1.0))))


def partition_limit(rate: float, interval: float, partitions: int, ceiling: int | None) -> int:
    """The most offsets one batch takes per partition at ``rate``; pure.

    Backpressure estimates a rate for a whole source (records/s); a batch
    takes one interval of it, shared evenly among the source's partitions,
    never less than one record (a source must not stall) and never more than
    the ``ceiling`` its ``max_rate`` sets.
    """
    adapted = max(1, math.ceil(rate * interval / partitions))
    return adapted if ceiling is None else min(ceiling, adapted)


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """How batches are made and what a failure does: the app's batch settings.

    Attributes:
        interval: the batch interval in seconds.
        retry: retry policy for handlers, sinks and input reads.
        on_failure: what a handler failing after its retries does: "stop"
            the app with the batch uncommitted; "dead_letter": find the
            records it fails on (:meth:`BatchScheduler._isolate`), send those
            to the dead-letter sink and commit its outputs for the rest;
            "dead_letter_batch": send all the handler's input records of
            the batch to the dead-letter sink.
        max_batch_records: the most records a batch takes from one source.
        max_batch_bytes: about the most bytes a batch takes from one source
            (see :func:`size_budget`; receivers: whole blocks, at least one).
        pause_gc: pause Python's cyclic garbage collector while batches run
            (see :class:`_GcPause`).
    """

    interval: float
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    on_failure: FailurePolicy = "stop"
    max_batch_records: int = 100_000
    max_batch_bytes: int = 64 * 2**20
    pause_gc: bool = True


class _GcPause:
    """Python's cyclic garbage collector off while any batch runs, on between batches.

    A batch's records stay alive until it is done, and every young
    collection that runs meanwhile (one per 700 allocations) moves them on
    until the full collections walk all of them, again and again: a large
    batch's records cost about half as much again with the collector on.
    Reference counting still frees everything a batch drops; cycles made
    during a batch are collected at the next allocation after it, when the
    collector is back on. The collector is the process's: a pause only
    turns it back on if it was on.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._holds = 0
        self._resume = False

    def __enter__(self) -> None:
        if self.enabled:
            if self._holds == 0:
                self._resume = gc.isenabled()
                gc.disable()
            self._holds += 1

    def __exit__(self, *exc_info: object) -> None:
        if self.enabled:
            self._holds -= 1
            if self._holds == 0 and self._resume:
                gc.enable()


class BlockStore(Protocol):
    """What the scheduler needs of receivers' blocks (the block generator has it)."""

    async def cut(self) -> int:
        """Make every open block durable now (called before each allocation)."""
        ...

    async def read(self, refs: Sequence[BlockRef]) -> list[Record]:
        """The records of ``refs``, in order."""
        ...

    async def release(self, oldest_needed: Position | None) -> None:
        """Delete data that holds no block before ``oldest_needed`` (None: none needed)."""
        ...

    def set_rate(self, source: str, rate: float | None) -> None:
        """Throttle receiver ``source`` to ``rate`` records/s (backpressure)."""
        ...


class BatchScheduler:
    """Runs batches; see the module docstring for the protocol.

    Args:
        app: the app's name (sink keys carry it).
        tracker: the durable tracker, already replayed.
        sources: direct sources by name, started.
        handlers: the app's handlers, sinks opened.
        policy: batch interval, sizes, retries, failure routing.
        checkpointer: writes checkpoints and says how far the log may be cleaned.
        dead_letter: the sink for failed input (with ``on_failure`` set so).
        blocks: receivers' blocks (None: the app has no receivers).
        receivers: names of receivers whose blocks batches take.
        listeners: called with each batch's :class:`BatchInfo`.
        decoders: per source, a function from a record's value to its
            ``data``; a record it fails on goes to ``dead_letter`` (or, with
            none, stops the app with :class:`DecodeError`).
        clock: what ticks and batch timings read (:mod:`streamlet.clock`).
        rate_controller: backpressure: the input rates from batch timings
            (None: off; rates stay at the sources' ``max_rate``).
        stores: the keyed state of each stateful handler, by handler name
            (one worker; in group mode each task has its own, given to
            :meth:`acquire_task`).
        changelogs: group mode: each stateful handler's changelog topic,
            written in its sink's transaction (``commit_changelog``).
        source_topics: group mode: each Kafka source's topic (a task's
            input position goes in its changelog under it).
    """

    def __init__(
        self,
        *,
        app: str,
        tracker: Tracker,
        sources: Mapping[str, DirectSource],
        handlers: Sequence[HandlerSpec],
        policy: BatchPolicy,
        checkpointer: Checkpointer,
        dead_letter: Sink | None = None,
        blocks: BlockStore | None = None,
        receivers: frozenset[str] = frozenset(),
        listeners: Sequence[Listener] = (),
        decoders: Mapping[str, Callable[[bytes], object]] | None = None,
        clock: Clock = SYSTEM_CLOCK,
        rate_controller: RateController | None = None,
        stores: Mapping[str, StateStore] | None = None,
        changelogs: Mapping[str, str] | None = None,
        source_topics: Mapping[str, str] | None = None,
    ) -> None:
        self.app = app
        self.tracker = tracker
        self.sources = dict(sources)
        self.handlers = list(handlers)
        self.policy = policy
        self.interval = policy.interval
        self.retry = policy.retry
        self.checkpointer = checkpointer
        self.dead_letter = dead_letter
        self.blocks = blocks
        self.receivers = receivers
        self.listeners = list(listeners)
        self.clock = clock
        interval = policy.interval
        self._static_limits = {
            name: (max(1, math.ceil(src.max_rate * interval)) if src.max_rate else None)
            for name, src in self.sources.items()
        }
        self._limits = dict(self._static_limits)
        self._partitions = dict.fromkeys(self.sources, 1)
        self._receiver_limits: dict[str, int | None] = {}
        # Per direct source, the measured average bytes per record (key + value).
        self._record_bytes: dict[str, float] = {}
        self.decoders = dict(decoders or {})
        #: Whether the last allocation was cut short by the size bound.
        self.behind = False
        self._running: dict[tuple[str, int], None] = {}
        #: Per direct source, what ``latest()`` said at the last allocation:
        #: partition → the end of what may be read (lag = this - position).
        self.latest: dict[str, dict[int, int]] = {}
        #: The clock's time of the last sign of life: a tick, or a batch done.
        self.last_progress = clock.monotonic()
        #: Group mode: the tasks this worker owns and has taken over (None:
        #: one worker runs the app and batches span every partition).
        self.tasks: set[int] | None = None
        #: Group mode: no new batch starts while a rebalance is under way.
        self.paused = False
        #: Group mode: per task, how often it was released (see ``_run_task_batch``).
        self._task_epochs: dict[int, int] = {}
        #: The batches under way: id → allocation (several in group mode).
        self._in_flight: dict[int, Allocation] = {}
        self._batch_ended = anyio.Event()
        #: Group mode: told of a task whose commit was fenced (after it is released).
        self.fenced: Callable[[int], object] | None = None
        self.rate_controller = rate_controller
        self.stores = dict(stores or {})
        self._gc_pause = _GcPause(policy.pause_gc)
        self.changelogs = dict(changelogs or {})
        self.source_topics = dict(source_topics or {})
        #: Group mode: each owned task's stores (its part of the keyed state).
        self.task_stores: dict[int, dict[str, StateStore]] = {}
        #: Handlers that also run on batches with no input (their state asks to).
        self.idle_handlers = frozenset(
            spec.name for spec in self.handlers if spec.state is not None and spec.state.idle
        )

    @property
    def running(self) -> Mapping[str, int]:
        """The handlers under way on the event loop now: name → batch id.

        Read by the loop watchdog; ``thread=True`` handlers are not in it.
        In group mode a handler may run for several tasks' batches at once:
        the newest batch is named.
        """
        return dict(sorted(self._running))

    @property
    def limits(self) -> Mapping[str, int | None]:
        """Per direct source, the most offsets the next batch takes per partition."""
        return dict(self._limits)

    @property
    def rates(self) -> Mapping[str, float | None]:
        """Per source, the rate backpressure set (records/s; None: none yet or not on)."""
        return self.rate_controller.rates if self.rate_controller is not None else {}

    # -- recovery and the tick loop -------------------------------------------

    async def recover(self) -> int:
        """Re-run every allocated-but-not-done batch, in order; return how many.

        In group mode they are dropped instead: this worker owns no task
        until the group assigns it one, and a task's new owner (this worker
        again, perhaps) resumes from what the sinks committed.
        """
        pending = list(self.tracker.state.pending)
        if self.tasks is not None:
            for alloc in pending:
                await self.tracker.log_dropped(alloc.id)
            if pending:
                log.info(
                    "group mode: %d unfinished batch(es) dropped; each task resumes from"
                    " what its sinks committed when it is assigned",
                    len(pending),
                )
            return 0
        if pending:
            log.info(
                "recovering %d unfinished batch(es): %s",
                len(pending),
                ", ".join(str(a.id) for a in pending),
            )
        for alloc in pending:
            await self._run_batch(alloc, scheduled=None, recovered=True)
        for name, source in self.sources.items():
            source.resume_from(self.tracker.state.positions.get(name, {}))
        return len(pending)

    async def run(self, stop: anyio.Event, *, duration: float | None = None) -> None:
        """Tick every ``interval`` until ``stop`` is set or ``duration`` passed.

        Either way the batch under way finishes and commits first.
        """
        now = self.clock.monotonic()
        deadline = now + duration if duration is not None else math.inf
        next_tick = now + self.interval
        while not stop.is_set():
            if self.behind:
                # The last batch was cut short by the size bound: take the
                # rest now. The schedule starts again from here.
                if self.clock.monotonic() >= deadline:
                    break
                scheduled = self.clock.monotonic()
                next_tick = scheduled + self.interval
            else:
                await self.clock.wait(stop, min(next_tick, deadline))
                if stop.is_set() or self.clock.monotonic() >= deadline:
                    break
                if self.clock.monotonic() < next_tick:
                    continue
                scheduled = next_tick
                next_tick += self.interval
            batch_time = self.clock.time() - (self.clock.monotonic() - scheduled)
            if self.tasks is not None:
                await self._group_tick(batch_time, scheduled)
                continue
            alloc = await self.allocate(batch_time, idle=bool(self.idle_handlers))
            if alloc is not None:
                await self._run_batch(alloc, scheduled=scheduled, recovered=False)

    # -- group mode --------------------------------------------------------------

    async def _group_tick(self, batch_time: float, scheduled: float) -> None:
        """One batch per task this worker owns, run side by side (group mode).

        Each task's batch is planned and logged in task order, then all of
        them run at once: their reads, handlers and sink transactions
        overlap, as Kafka Streams' tasks do. Only marking them done keeps
        the order they were allocated in (the tracker's rule), so each batch
        waits for the one before it to be done or dropped first.
        """
        self.last_progress = self.clock.monotonic()
        if self.paused or not self.tasks:
            self.behind = False
            return
        latest = {name: await source.latest() for name, source in self.sources.items()}
        behind = False
        planned: list[tuple[int, int, Allocation, Mapping[str, StateStore]]] = []
        for task in sorted(self.tasks):
            if self.paused or task not in self.tasks:
                continue
            epoch = self._task_epochs.get(task, 0)
            # The task's state as it was acquired: a release while the batch
            # runs must not take it from under the batch.
            task_state: Mapping[str, StateStore] = self.task_stores.get(task, {})
            alloc = await self.allocate(
                batch_time, task=task, latest=latest, idle=bool(self.idle_handlers)
            )
            behind = behind or self.behind
            if alloc is not None:
                planned.append((task, epoch, alloc, task_state))
        self.behind = behind
        if not planned:
            return
        turns = [anyio.Event() for _ in planned]
        failures: list[Exception] = []

        async def run_task(
            index: int, task: int, epoch: int, alloc: Allocation, stores: Mapping[str, StateStore]
        ) -> None:
            previous = turns[index - 1] if index else None

            async def turn() -> None:
                if previous is not None:
                    await previous.wait()

            try:
                await self._run_task_batch(task, epoch, alloc, scheduled, turn, stores)
            except Exception as exc:
                # The app stops: the other tasks' batches are cancelled (none
                # is marked done after this one), and the error is raised as
                # itself, not in an exception group, so that `streamlet run`
                # prints it as one line.
                failures.append(exc)
                tg.cancel_scope.cancel()
            finally:
                turns[index].set()

        async with anyio.create_task_group() as tg:
            for index, (task, epoch, alloc, task_state) in enumerate(planned):
                tg.start_soon(run_task, index, task, epoch, alloc, task_state)
        if failures:
            raise failures[0]

    async def _run_task_batch(
        self,
        task: int,
        epoch: int,
        alloc: Allocation,
        scheduled: float,
        turn: Callable[[], Awaitable[None]],
        stores: Mapping[str, StateStore],
    ) -> None:
        """Run one task's batch; drop it instead when its task moved meanwhile.

        ``epoch`` is the task's release count when the batch was planned: a
        task released since (and perhaps acquired again, with new producers
        that fenced this batch's) has moved on without this batch.
        ``stores``: the task's keyed state when the batch was planned.
        """

        def moved() -> bool:
            owned = self.tasks is not None and task in self.tasks
            return not owned or self._task_epochs.get(task, 0) != epoch

        if moved():
            # Released (a rebalance) while the batch was being planned.
            await self._drop(alloc.id)
            return
        try:
            await self._run_batch(
                alloc, scheduled=scheduled, recovered=False, turn=turn, stores=stores, moved=moved
            )
        except (FencedError, TaskNotHeldError) as exc:
            # Not held: the sink lost the task without this scheduler
            # releasing it. Handled as a fence: dropping the batch and taking
            # the task over again (if still assigned) is always safe.
            if moved():
                log.info(
                    "batch %d of task %d was fenced after the task was released; dropped",
                    alloc.id,
                    task,
                )
                await self._drop(alloc.id)
                return
            log.warning(
                "task %d %s while batch %d ran (%s); the batch is dropped, and the task"
                " resumes from what was committed (here, if the group still assigns it here)",
                task,
                "was taken over by another worker"
                if isinstance(exc, FencedError)
                else "was no longer held by its sink",
                alloc.id,
                exc,
            )
            await self.release_task(task)
            if self.fenced is not None:
                self.fenced(task)
        except SinkError as exc:
            if not moved():
                raise
            # Released while the batch ran (a rebalance past revoke_budget):
            # its sink has let the task go; the new owner redoes the batch.
            log.warning(
                "task %d moved while batch %d ran; the batch is dropped (%s)",
                task,
                alloc.id,
                exc,
            )
            await self._drop(alloc.id)

    async def _drop(self, batch_id: int) -> None:
        """Log batch ``batch_id`` dropped, unless it no longer is pending."""
        if any(a.id == batch_id for a in self.tracker.state.pending):
            await self.tracker.log_dropped(batch_id)

    async def pause(self, budget: float) -> bool:
        """Start no new batch, and wait up to ``budget`` s for the one under way; True if none is.

        Called when the group takes tasks away (a rebalance starts). A batch
        still running after the budget goes on; if its task moved, its commit
        is fenced and it is dropped.
        """
        self.paused = True
        with anyio.move_on_after(budget):
            while self._in_flight:
                await self._batch_ended.wait()
        return not self._in_flight

    def resume(self) -> None:
        """New batches may start again (the rebalance is over)."""
        self.paused = False

    async def release_task(self, task: int) -> None:
        """Give task ``task`` up: no more batches of it, its pending ones dropped, sinks told."""
        if self.tasks is not None:
            self.tasks.discard(task)
        self._task_epochs[task] = self._task_epochs.get(task, 0) + 1
        self.task_stores.pop(task, None)
        for alloc in list(self.tracker.state.pending):
            if alloc.id not in self._in_flight and any(r.partition == task for r in alloc.ranges):
                await self.tracker.log_dropped(alloc.id)
        for name in self.latest:
            self.latest[name].pop(task, None)
        for spec in self.handlers:
            if spec.sink is not None:
                await spec.sink.release(task)
        if self.dead_letter is not None:
            await self.dead_letter.release(task)

    async def task_idle(self, task: int) -> None:
        """Wait until no batch of task ``task`` is under way.

        A task released while its batch still ran (a rebalance past
        ``revoke_budget``) may come straight back to this worker: its sinks
        must not take it over (new producers, new positions) until that
        batch has ended, or the batch could commit through them input the
        new positions then read again.
        """
        while any(r.partition == task for alloc in self._in_flight.values() for r in alloc.ranges):
            await self._batch_ended.wait()

    async def acquire_task(
        self,
        task: int,
        positions: Mapping[str, int],
        stores: Mapping[str, StateStore] | None = None,
    ) -> None:
        """Take task ``task`` over, resuming each source's partition ``task`` at ``positions``.

        ``stores``: the task's keyed state, restored up to what its sinks
        committed (the state as of ``positions``).
        """
        for name, offset in positions.items():
            self.tracker.reset_positions(name, {task: offset})
        self.task_stores[task] = dict(stores or {})
        if self.tasks is not None:
            self.tasks.add(task)

    async def drain(self) -> BatchInfo | None:
        """Run batches until receivers' stored blocks are all taken (a graceful stop).

        Receivers have stopped by now, so their blocks are a finite backlog;
        it may need several batches under the size bound. Returns the last
        batch's info (None: there was nothing to run).
        """
        info: BatchInfo | None = None
        while True:
            alloc = await self.allocate(self.clock.time())
            if alloc is None:
                return info
            info = await self._run_batch(alloc, scheduled=None, recovered=False)
            if not any(self.tracker.state.blocks.get(name) for name in self.receivers):
                return info

    async def allocate(
        self,
        batch_time: float,
        *,
        task: int | None = None,
        latest: Mapping[str, Mapping[int, int]] | None = None,
        idle: bool = False,
    ) -> Allocation | None:
        """Fix and durably log the next batch's input; None when there is none.

        Args:
            batch_time: the batch's time.
            task: group mode: only partition ``task`` of each source.
            latest: what each source's ``latest()`` said this tick (None: ask).
            idle: log a batch even without input (an *idle batch*, for the
                handlers in ``idle_handlers``: windows close and keys expire
                on the batch clock, as Spark's no-data batches do). In group
                mode its ranges are empty, at the task's positions: they name
                the task the batch is of.
        """
        self.last_progress = self.clock.monotonic()
        if self.blocks is not None:
            await self.blocks.cut()
        state = self.tracker.state
        chosen: dict[str, Mapping[int, int]] = {}
        for name, source in self.sources.items():
            available = latest[name] if latest is not None else await source.latest()
            self._partitions[name] = max(1, len(available))
            if task is not None:
                available = {task: available[task]} if task in available else {}
                self.latest.setdefault(name, {}).update(available)
            else:
                self.latest[name] = dict(available)
            known = state.positions.get(name, {})
            unseen = [p for p in available if p not in known]
            if unseen:
                self.tracker.seed_positions(name, await source.start_positions(unseen))
            chosen[name] = available
        latest = chosen
        budgets = {
            name: size_budget(
                max_records=self.policy.max_batch_records,
                max_bytes=self.policy.max_batch_bytes,
                record_bytes=self._record_bytes.get(name),
            )
            for name in latest
        }
        receiver_limits: dict[str, int | None] = {}
        for name in self.receivers:
            adapted = self._receiver_limits.get(name)
            receiver_limits[name] = (
                self.policy.max_batch_records
                if adapted is None
                else min(adapted, self.policy.max_batch_records)
            )
        alloc = plan_allocation(
            state,
            batch_time=batch_time,
            latest=latest,
            limits=self._limits,
            budgets=budgets,
            receivers=self.receivers,
            receiver_limits=receiver_limits,
            receiver_max_bytes=self.policy.max_batch_bytes,
        )
        self.behind = self._cut_short(state, alloc, latest)
        if alloc.empty and not idle:
            return None
        if alloc.empty and task is not None:
            at = [(name, state.positions.get(name, {}).get(task)) for name in self.sources]
            alloc = dataclasses.replace(
                alloc,
                ranges=tuple(OffsetRange(n, task, p, p) for n, p in at if p is not None),
            )
            if not alloc.ranges:
                return None
        await self.tracker.log_allocated(alloc)
        crash_point("after_allocate", alloc.id)
        return alloc

    def _cut_short(
        self, state: TrackerState, alloc: Allocation, latest: Mapping[str, Mapping[int, int]]
    ) -> bool:
        """Whether the size bound, not a rate limit, left input behind in ``alloc``."""
        for name, available in available_offsets(state, latest, self._limits).items():
            took = sum(r.until - r.start for r in alloc.ranges if r.source == name)
            if took < sum(available.values()):
                return True
        taken = {b.id for b in alloc.blocks}
        for name in self.receivers:
            if self._receiver_limits.get(name) is None and any(
                b.id not in taken for b in state.blocks.get(name, ())
            ):
                return True
        return False

    # -- one batch -------------------------------------------------------------

    def _decode(self, batch_id: int, records: list[Record]) -> tuple[list[Record], list[object]]:
        """Apply each source's ``decode``; the records that fail become dead letters."""
        if not self.decoders:
            return records, []
        good: list[Record] = []
        dead: list[object] = []
        new = tuple.__new__  # a third of ``_replace``'s cost; the fields' order is Record's
        for record in records:
            decode = self.decoders.get(record.source)
            if decode is None:
                good.append(record)
                continue
            value, key, stamp, source, partition, offset, _, headers = record
            try:
                data = decode(value)
            except Exception as exc:
                where = (
                    f"record at offset {record.offset} of partition {record.partition} of"
                    f" source {record.source!r} in batch {batch_id}"
                )
                if self.dead_letter is None:
                    raise DecodeError(
                        f"{where} cannot be decoded: {type(exc).__name__}: {exc}. Give the app"
                        " a dead_letter sink to set such records aside and go on, or fix the"
                        " decode function; the batch runs again on restart"
                    ) from exc
                log.warning(
                    "%s cannot be decoded (%r); it goes to the dead-letter sink", where, exc
                )
                dead.append(_dead_letter(record, batch_id, f"{type(exc).__name__}: {exc}", None, 1))
                continue
            good.append(new(Record, (value, key, stamp, source, partition, offset, data, headers)))
        return good, dead

    async def _read_with_retries(
        self, batch_id: int, name: str, source: DirectSource, ranges: Sequence[OffsetRange]
    ) -> list[Record]:
        """Read a batch's ranges, trying again with backoff (a broker restart passes)."""
        try:
            return await retrying(
                self.retry,
                f"reading batch {batch_id} from source {name!r}",
                lambda: source.read(ranges),
            )
        except GaveUp as gave_up:
            raise gave_up.error from None

    async def _read_input(self, alloc: Allocation) -> tuple[list[Record], dict[str, int]]:
        """The batch's records, and how many came from each source (counted as read)."""
        records: list[Record] = []
        counts: dict[str, int] = {}
        by_source: dict[str, list[OffsetRange]] = {}
        for r in alloc.ranges:
            by_source.setdefault(r.source, []).append(r)
        for name, ranges in by_source.items():
            source = self.sources.get(name)
            ranges = [r for r in ranges if r.until > r.start]  # an idle batch's are empty
            if not ranges:
                continue
            if source is None:
                raise StreamletError(
                    f"batch {alloc.id} was allocated from source {name!r}, which the app"
                    " no longer has; restore the source or use a new state_dir"
                )
            read = await self._read_with_retries(alloc.id, name, source, ranges)
            counts[name] = len(read)
            records.extend(read)
        if alloc.blocks:
            if self.blocks is None:
                raise StreamletError(f"batch {alloc.id} holds blocks but the app has no receivers")
            records.extend(await self.blocks.read(alloc.blocks))
            for block in alloc.blocks:
                counts[block.source] = counts.get(block.source, 0) + block.records
        return records, counts

    async def _call_handler(
        self,
        spec: HandlerSpec,
        batch: Batch,
        trace: _Trace,
        changes: dict[str, Changes] | None = None,
        retry: RetryPolicy | None = None,
        store: StateStore | None = None,
    ) -> list[object] | _Failure:
        """Call a handler with retries; a stateful one's encoded changes go to ``changes``.

        Each attempt of a stateful handler gets a fresh view of the state as
        of the previous batch, so a failed attempt leaves nothing behind.
        """

        if spec.state is not None and store is None:
            # Group mode: only a batch of a task whose state was restored runs.
            raise StateError(
                f"handler {spec.name!r} keeps state, but batch {batch.id} has no store for it"
                " (a task run before it was taken over)"
            )

        async def call() -> list[object]:
            if store is None:
                return await invoke(spec, batch)
            state = KeyedState(store, batch.id, batch.time)
            outputs = await invoke(spec, batch, state)
            # Encoded now: a value that cannot be stored fails the handler
            # before any sink commits the batch.
            assert changes is not None
            changes[spec.name] = state.changes()
            return outputs

        policy = retry or self.retry

        async def once() -> list[object]:
            trace.attempts += 1
            timeout = policy.timeout
            if timeout is None:
                return await call()
            if spec.thread:
                # A thread cannot be interrupted: the call counts as failed
                # once it returns late, and its outputs are dropped.
                started = time.monotonic()  # real time, as a timeout is
                outputs = await call()
                took = time.monotonic() - started
                if took > timeout:
                    raise TimeoutError(
                        f"handler {spec.name!r} took {took:.2f}s in its thread, over"
                        f" handler_timeout={timeout:g}s"
                    )
                return outputs
            with anyio.fail_after(timeout):
                return await call()

        try:
            return await retrying(
                policy,
                f"handler {spec.name!r} on batch {batch.id}",
                once,
                on_failure=trace.failed,
            )
        except GaveUp as gave_up:
            return _Failure(gave_up.error, gave_up.attempts)

    async def _isolate(
        self, spec: HandlerSpec, view: Batch, failure: _Failure, trace: _Trace
    ) -> tuple[list[object], list[object]]:
        """Find the records ``spec`` fails on; its outputs for the others, and dead letters.

        The handler failed on the whole of ``view`` after its retries. Bisect:
        a part it fails on is split in two and each half tried once more
        (one attempt, no retries: the whole batch already had them), down to
        single records. The outputs of the parts that pass, in record order,
        are what the handler commits; each record it still fails on alone is
        a dead letter naming the handler, the error and the attempts. This
        assumes a handler's outputs for a batch are those of its records, as
        for a per-record transform; a handler that aggregates over the batch
        should use ``on_failure="dead_letter_batch"``.

        Bounded: after ``2 * log2(n) + 16`` failing calls in a row, the
        failure looks like one of everything (a service down past the
        retries, from the start or from some point on) and the parts still
        undecided go to the dead-letter sink whole: a few calls, not one per
        record. Otherwise bisection finds k bad records of n in about
        ``2 k log2(n / k)`` calls;
        and a part that times out goes whole (each try would wait it out; a
        handler that timed out on the whole batch is not bisected at all).

        Deterministic for a deterministic handler, so a batch run again after
        a crash splits the same way and its sink skips what it holds.
        """
        once = RetryPolicy(max_retries=0, backoff=0, timeout=self.retry.timeout)
        patience = 2 * max(1, len(view.records)).bit_length() + 16
        failing = 0  # calls that failed since the last one that passed
        good: list[object] = []
        dead: list[object] = []

        def bury(records: Sequence[Record], why: _Failure) -> None:
            error = f"{type(why.error).__name__}: {why.error}"
            attempts = failure.attempts + (why.attempts if why is not failure else 0)
            dead.extend(_dead_letter(r, view.id, error, spec.name, attempts) for r in records)

        async def split(records: list[Record], known: _Failure | None) -> None:
            nonlocal failing
            if known is None:
                if failing >= patience:
                    bury(records, failure)
                    return
                part = Batch(view.id, view.time, records, view.ranges, view.blocks)
                result = await self._call_handler(spec, part, trace, retry=once)
                if not isinstance(result, _Failure):
                    failing = 0
                    good.extend(result)
                    return
                failing += 1
                if isinstance(result.error, (OutputError, TimeoutError)):
                    bury(records, result)
                    return
                known = result
            if len(records) == 1:
                bury(records, known)
                return
            middle = len(records) // 2
            await split(records[:middle], None)
            await split(records[middle:], None)

        await split(list(view.records), failure)
        return good, dead

    def _changed_in_group(self, name: str, changes: Mapping[str, Changes]) -> bool:
        """Group mode: whether handler ``name`` changed its state in this batch."""
        found = changes.get(name)
        return (
            self.tasks is not None
            and name in self.changelogs
            and found is not None
            and bool(found.writes or found.deletes)
        )

    def _changelog(
        self, name: str, alloc: Allocation, changes: Changes, store: StateStore | None
    ) -> tuple[Changes, ChangelogWrite]:
        """Group mode: ``changes`` with the input position they cover, and their changelog write.

        An empty partition's first write starts with its birth (``store.birth_due``).
        """
        covered = with_positions(changes, alloc.ranges, self.source_topics)
        covered = with_birth(covered, store.birth_due if store is not None else None)
        return covered, ChangelogWrite(
            self.changelogs[name], _task_of(alloc), encode_changes(covered)
        )

    async def _advance_past_dead_letters(
        self,
        alloc: Allocation,
        views: Mapping[str, Batch],
        traces: Mapping[str, _Trace],
        names: set[str],
        stores: Mapping[str, StateStore],
    ) -> set[str]:
        """Group mode: move the exactly-once sinks of handlers ``names`` past the batch.

        Their input went to the dead letters, but their sinks keep the task's
        input position: left behind, the task's next batch would start past
        it and be refused as a gap. Each commits no outputs (and, with
        state, no changes but the input position, and a birth if due).
        Returns the handlers whose commit carried a changelog write.
        """
        advanced: set[str] = set()
        for spec in self.handlers:
            sink = spec.sink
            if sink is None or spec.name not in names or sink.guarantee != "exactly-once":
                continue
            changelog = None
            if spec.name in self.changelogs:
                none = Changes(alloc.id, alloc.time, {}, frozenset())
                _, changelog = self._changelog(spec.name, alloc, none, stores.get(spec.name))
            error = await self._commit_sink(
                spec.name, sink, views[spec.name], [], traces[spec.name], changelog
            )
            if error is not None:
                raise error
            if changelog is not None:
                advanced.add(spec.name)
        return advanced

    async def _commit_sink(
        self,
        name: str,
        sink: Sink,
        batch: Batch,
        outputs: list[object],
        trace: _Trace | None = None,
        changelog: ChangelogWrite | None = None,
    ) -> SinkError | None:
        """Commit with retries; the error that stopped it, returned rather than raised.

        ``changelog``: group mode, the handler's state changes, committed in
        the sink's transaction.

        Returned, not raised: raising inside the task group would cancel the
        other sinks mid-commit and wrap the error in a group.
        """
        trace = trace if trace is not None else _Trace()

        async def once() -> bool:
            trace.commit_attempts += 1
            if changelog is not None:
                return await cast("ChangelogSink", sink).commit_changelog(batch, outputs, changelog)
            return await sink.commit(batch, outputs)

        started = self.clock.monotonic()
        try:
            await retrying(
                self.retry,
                f"sink {sink.describe()} of handler {name!r} on batch {batch.id}",
                once,
                on_failure=trace.failed,
            )
        except GaveUp as gave_up:
            exc = gave_up.error
            # Another worker took over (retrying would only fight it), or the
            # outputs themselves are at fault: passed on as they are.
            if isinstance(exc, (FencedError, TaskNotHeldError, OutputError)):
                return exc
            error = SinkError(
                f"sink {sink.describe()} of handler {name!r} failed to commit batch"
                f" {batch.id} after {gave_up.attempts} attempt(s): {exc}. The batch is not done"
                " and runs again when the app restarts"
            )
            error.__cause__ = exc
            return error
        finally:
            trace.commit_time = self.clock.monotonic() - started
        return None

    def _route_failures(
        self,
        batch: Batch,
        views: Mapping[str, Batch],
        failures: Mapping[str, _Failure],
        dead: list[object],
        recovered: bool = False,
    ) -> None:
        """Apply ``on_failure`` to handlers that failed on ``batch``.

        With ``"dead_letter"``, each failed handler's input records join
        ``dead``; otherwise the app stops with the batch uncommitted.
        """
        for name, failure in failures.items():
            view = views[name]
            # A stateful handler failing on a batch run again after a crash
            # may have had its outputs committed then: dead-lettering its input
            # now would leave the outputs without the state that made them.
            stateful_rerun = recovered and name in self.stores
            if self.policy.on_failure == "stop" or self.dead_letter is None or stateful_rerun:
                if isinstance(failure.error, OutputError):
                    raise failure.error
                raise HandlerError(
                    f"handler {name!r} failed on batch {batch.id} after"
                    f" {failure.attempts} attempt(s): {failure.error!r}. The app stops with"
                    " the batch uncommitted; it runs again on restart (fix the handler,"
                    " or set on_failure='dead_letter' with a dead_letter sink)"
                ) from failure.error
            what = (
                "its sink refused its outputs"
                if isinstance(failure.error, OutputError)
                else f"it failed after {failure.attempts} attempt(s)"
            )
            log.error(
                "handler %r on batch %d: %s (%r); its %d input record(s) go to the"
                " dead-letter sink",
                name,
                batch.id,
                what,
                failure.error,
                len(view),
            )
            error = f"{type(failure.error).__name__}: {failure.error}"
            dead.extend(
                _dead_letter(r, view.id, error, name, failure.attempts) for r in view.records
            )

    async def _run_batch(
        self,
        alloc: Allocation,
        *,
        scheduled: float | None,
        recovered: bool,
        turn: Callable[[], Awaitable[None]] | None = None,
        stores: Mapping[str, StateStore] | None = None,
        moved: Callable[[], bool] | None = None,
    ) -> BatchInfo:
        """Run a batch to done; ``turn`` is awaited after its sinks committed, before done.

        ``turn`` lets batches run side by side yet be marked done in order.
        Group mode: ``stores`` is the batch's task's keyed state, and
        ``moved()`` says whether the task was released since the batch was
        planned (its local state is then left as it was: see below).
        """
        self._in_flight[alloc.id] = alloc
        try:
            with self._gc_pause:
                return await self._run_batch_in_flight(
                    alloc,
                    scheduled,
                    recovered,
                    turn,
                    self.stores if stores is None else stores,
                    moved,
                )
        finally:
            del self._in_flight[alloc.id]
            self._batch_ended.set()
            self._batch_ended = anyio.Event()

    async def _run_batch_in_flight(
        self,
        alloc: Allocation,
        scheduled: float | None,
        recovered: bool,
        turn: Callable[[], Awaitable[None]] | None,
        stores: Mapping[str, StateStore],
        moved: Callable[[], bool] | None,
    ) -> BatchInfo:
        started = self.clock.monotonic()
        raw, inputs = await self._read_input(alloc)
        if raw:
            self._measure(raw)
        records, dead = self._decode(alloc.id, raw)
        batch = Batch(alloc.id, alloc.time, records, alloc.ranges, alloc.blocks)
        views = {spec.name: batch.for_sources(spec.sources) for spec in self.handlers}

        results: dict[str, list[object] | _Failure] = {}
        traces = {spec.name: _Trace() for spec in self.handlers}
        # A stateful handler whose state already holds this batch ran and
        # committed everything before a crash (state commits after the
        # sinks): it is not called again.
        settled = (
            {name for name, store in stores.items() if store.seq >= batch.id}
            if self.tasks is None
            else set()  # a task's batches are never run again: no re-run to settle
        )
        idle = alloc.empty
        if idle:
            # An idle batch runs only the handlers that asked for it.
            settled |= {spec.name for spec in self.handlers} - self.idle_handlers
        changes: dict[str, Changes] = {}
        isolated: dict[str, list[object]] = {}
        # Per-record dead letters: not for a stateful handler, whose parts
        # would each start from the same state.
        isolate = self.policy.on_failure == "dead_letter" and self.dead_letter is not None

        async def call(spec: HandlerSpec) -> None:
            result = await self._call_handler(
                spec, views[spec.name], traces[spec.name], changes, store=stores.get(spec.name)
            )
            if (
                isinstance(result, _Failure)
                and isolate
                and spec.state is None
                # A timeout is not bisected: every part tried would wait it out.
                and not isinstance(result.error, (OutputError, TimeoutError))
            ):
                # Its own trace: bisection calls are not the handler's retries.
                good, letters = await self._isolate(spec, views[spec.name], result, _Trace())
                if len(letters) < len(views[spec.name]):  # else it failed on every record
                    result, isolated[spec.name] = good, letters
            results[spec.name] = result

        async def run_one(spec: HandlerSpec) -> None:
            if spec.name in settled:
                results[spec.name] = []
                return
            if spec.thread:  # runs in a thread: it cannot block the loop
                await call(spec)
                return
            self._running[spec.name, batch.id] = None
            try:
                await call(spec)
            finally:
                del self._running[spec.name, batch.id]

        async with anyio.create_task_group() as tg:
            for spec in self.handlers:
                tg.start_soon(run_one, spec)
        processed = self.clock.monotonic()

        failed = {n: r for n, r in results.items() if isinstance(r, _Failure)}
        self._route_failures(batch, views, failed, dead, recovered)
        for name, letters in isolated.items():
            if not letters:
                log.warning(
                    "handler %r on batch %d failed on the whole batch, then passed on each"
                    " part of it; nothing is dead-lettered",
                    name,
                    batch.id,
                )
                continue
            log.error(
                "handler %r on batch %d failed on %d of its %d record(s); those go to the"
                " dead-letter sink, its outputs for the rest are committed",
                name,
                batch.id,
                len(letters),
                len(views[name]),
            )
            dead.extend(letters)
        crash_point("after_handler", batch.id)

        # Handlers' sinks first, then the dead letters: a sink refusing a
        # handler's outputs (OutputError) is that handler failing, and its
        # input joins this batch's dead letters, which commit once.
        to_commit = {
            spec.name: (spec.sink, result)
            for spec in self.handlers
            if spec.sink is not None
            and spec.name not in settled
            and not isinstance(result := results[spec.name], _Failure)
            # An idle batch with nothing to say leaves the sinks alone. In
            # group mode its state changes go only through the sink (the
            # changelog), so changes are something to say there.
            and not (idle and not result and not self._changed_in_group(spec.name, changes))
        }
        committed: dict[str, SinkError | None] = {}
        # A bisected handler commits part of its input as outputs and the rest
        # as dead letters. A re-run may bisect differently (a failure that
        # passed), and its sink then skips the batch: so the dead letters
        # commit first, and the worst a re-run can do is put a record in both
        # places, visibly, never in neither.
        letters_first = any(isolated.values()) and self.dead_letter is not None
        if letters_first:
            assert self.dead_letter is not None
            dead_failure = await self._commit_sink("dead-letter", self.dead_letter, batch, dead)
            if dead_failure is not None:
                raise dead_failure

        # Group mode: a stateful handler's changes go in its sink's
        # transaction, with the input position they cover.
        changelogs: dict[str, ChangelogWrite] = {}
        for name in to_commit:
            if name in self.changelogs and name in changes:
                changes[name], changelogs[name] = self._changelog(
                    name, alloc, changes[name], stores.get(name)
                )

        async def commit_one(name: str, sink: Sink, outputs: list[object]) -> None:
            committed[name] = await self._commit_sink(
                name, sink, views[name], outputs, traces[name], changelogs.get(name)
            )

        async with anyio.create_task_group() as tg:
            for name, (sink, result) in to_commit.items():
                tg.start_soon(commit_one, name, sink, result)
        errors = [e for e in committed.values() if e is not None]
        for error in errors:
            if not isinstance(error, OutputError):
                raise error
        refused = {
            name: _Failure(error, 1)
            for name, error in committed.items()
            if isinstance(error, OutputError)
        }
        if refused and letters_first:
            # The batch's dead letters are committed already: its refused
            # input cannot join them. Stop, with the batch not done.
            raise next(iter(refused.values())).error
        self._route_failures(batch, views, refused, dead)
        if dead and self.dead_letter is not None and not letters_first:
            dead_failure = await self._commit_sink("dead-letter", self.dead_letter, batch, dead)
            if dead_failure is not None:
                raise dead_failure
        advanced: set[str] = set()
        if self.tasks is not None and not idle:  # an idle batch has no input to move past
            advanced = await self._advance_past_dead_letters(
                alloc, views, traces, {*failed, *refused}, stores
            )
        dead_handlers = [
            s.name
            for s in self.handlers
            if s.name in failed or s.name in refused or isolated.get(s.name)
        ]
        outputs = sum(len(r) for n, (_, r) in to_commit.items() if n not in refused)
        crash_point("after_sink_commit", batch.id)
        if moved is not None and stores and moved():
            # Group mode: the task moved while the batch ran, and its sink may
            # have found the batch written by the next owner (after an unknown
            # outcome), whose changes need not be this run's. The local copy
            # stays behind; the changelog brings it up to date when the task
            # comes back (its position is a lower bound).
            stores = {}
        if idle and self.tasks is not None:
            # A task's local store is a cache of the changelog: an idle batch
            # that wrote nothing there has nothing for it either.
            stores = {name: store for name, store in stores.items() if name in changelogs}
        for name, store in stores.items():
            # A handler that failed (or whose outputs were refused) changes
            # nothing; its store still moves on to this batch.
            kept = changes.get(name) if name not in failed and name not in refused else None
            if kept is not None and name in changelogs:
                kept = dataclasses.replace(kept, position=changelogs[name].next_offset)
            commit = kept or Changes(batch.id, batch.time, {}, frozenset())
            # A changelog write of this batch committed (its outputs', or, for
            # a handler dead-lettered, the one moving its sink past the batch),
            # and it carried the partition's due birth: the copy takes it too.
            birth = store.birth_due
            wrote = (name in changelogs and name not in refused) or name in advanced
            if birth is not None and wrote:
                commit = with_birth(commit, birth)  # already in it if it is the batch's changes
            await store.commit(commit)
            if birth is not None and wrote:
                store.birth_due = None
        if stores:
            crash_point("after_state_commit", batch.id)
        if turn is not None:
            await turn()

        await self._commit_sources(batch)
        crash_point("before_done", batch.id)
        await self.tracker.log_done(batch.id)
        crash_point("after_done", batch.id)
        finished = self.last_progress = self.clock.monotonic()

        info = BatchInfo(
            batch_id=batch.id,
            batch_time=batch.time,
            records=len(records),
            outputs=outputs,
            scheduling_delay=max(0.0, started - scheduled) if scheduled is not None else 0.0,
            processing_time=processed - started,
            commit_time=finished - processed,
            total_delay=finished - (scheduled if scheduled is not None else started),
            recovered=recovered,
            dead_lettered=tuple(dead_handlers),
            inputs=inputs,
            ranges=tuple(batch.ranges),
            blocks=tuple(batch.blocks),
            handlers=tuple(
                HandlerInfo(
                    name=spec.name,
                    records=len(views[spec.name]),
                    outputs=0
                    if (spec.name in dead_handlers and spec.name not in isolated)
                    or spec.name not in to_commit
                    else len(to_commit[spec.name][1]),
                    attempts=traces[spec.name].attempts,
                    dead_lettered=spec.name in dead_handlers,
                    errors=tuple(traces[spec.name].errors),
                    sink=spec.sink.describe() if spec.sink is not None else None,
                    commit_time=traces[spec.name].commit_time,
                    commit_attempts=traces[spec.name].commit_attempts,
                )
                for spec in self.handlers
            ),
            decode_failures=len(raw) - len(records),
        )
        if not recovered:
            self._adapt_rates(info)
        for listener in self.listeners:
            try:
                listener(info)
            except Exception:
                log.exception("batch listener %r raised; ignored", listener)
        await self.maybe_checkpoint()
        return info

    def _measure(self, records: Sequence[Record]) -> None:
        """Update each direct source's average record size from a sample of a batch."""
        step = max(1, len(records) // _SIZE_SAMPLE)
        sizes: dict[str, list[int]] = {}
        for record in records[::step]:
            if record.source in self.sources:
                key = record.key
                sizes.setdefault(record.source, []).append(
                    len(record.value) + (len(key) if key is not None else 0)
                )
        for name, found in sizes.items():
            sample = sum(found) / len(found)
            known = self._record_bytes.get(name)
            # Leans to the larger: a burst of big records must shrink batches at once.
            self._record_bytes[name] = (
                sample if known is None else max(sample, (known + sample) / 2)
            )

    def _adapt_rates(self, info: BatchInfo) -> None:
        """Feed the batch to the rate controller and apply the rates it changed."""
        if self.rate_controller is None:
            return
        changed = self.rate_controller.update(
            self.clock.monotonic(),
            info.inputs,
            busy=info.processing_time + info.commit_time,
            scheduling_delay=info.scheduling_delay,
        )
        for name, rate in changed.items():
            if name in self.sources:
                self._limits[name] = partition_limit(
                    rate, self.interval, self._partitions[name], self._static_limits[name]
                )
            else:
                # Throttle the receiver's intake, and take at most one
                # interval's worth of its blocks per batch, so a backlog built
                # while the handlers were slow drains over several batches.
                self._receiver_limits[name] = partition_limit(rate, self.interval, 1, None)
                if self.blocks is not None:
                    self.blocks.set_rate(name, rate)
            log.debug("backpressure: %s rate now %.0f records/s", name, rate)

    async def _commit_sources(self, batch: Batch) -> None:
        by_source: dict[str, list[OffsetRange]] = {}
        for r in batch.ranges:
            if r.until > r.start:  # an idle batch's ranges are empty: nothing to record
                by_source.setdefault(r.source, []).append(r)
        for name, ranges in by_source.items():
            source = self.sources.get(name)
            if source is None:
                continue
            try:
                await source.commit(ranges)
            except Exception as exc:
                # streamlet's own log is the source of truth for positions; a
                # source's bookkeeping (a consumer group's offsets) only lags.
                log.warning(
                    "source %r could not record batch %d as done: %r; it catches up with"
                    " the next batch",
                    name,
                    batch.id,
                    exc,
                )

    # -- checkpoints -------------------------------------------------------------

    async def maybe_checkpoint(self, *, force: bool = False) -> None:
        """Write a checkpoint if one is due (or ``force``), then clean the logs."""
        state = self.tracker.state
        if not self.checkpointer.due(state.last_done, force=force):
            return
        clean_to = await self.checkpointer.write(
            state.last_done, self.tracker.last_event, state.to_json()
        )
        if clean_to is not None:
            await self.tracker.clean(clean_to)
        if self.blocks is not None:
            await self.blocks.release(self._oldest_needed_block())

    def _oldest_needed_block(self) -> Position | None:
        state = self.tracker.state
        refs = [b for a in state.pending for b in a.blocks]
        refs.extend(b for blocks in state.blocks.values() for b in blocks)
        if not refs:
            return None
        oldest = min(refs, key=lambda b: (b.segment, b.offset))
        return Position(oldest.segment, oldest.offset, oldest.length)


def _task_of(alloc: Allocation) -> int:
    """Group mode: the task of a batch (the one partition its ranges read)."""
    return alloc.ranges[0].partition
