"""Test an app in-process: feed its sources, run its batches, read what its sinks committed.

:class:`AppHarness` takes the user's :class:`~streamlet.app.App` and runs it
with the real engine (``App.serve``: the scheduler, decode, retries, dead
letters, keyed state, recovery) on in-memory inputs and outputs:

* **Sources.** Each of the app's sources, whatever it is (Kafka, TCP, a
  directory), is replaced by a :class:`MemorySource` of the same name: a
  direct source shaped like a Kafka topic, with partitions and offsets,
  holding what :meth:`AppHarness.feed` gave it. The source's ``decode`` (as
  given to ``app.source``) still applies. A receiver becomes a direct source
  too: handlers see the same records, but its data write-ahead log and
  acknowledgements are not exercised.
* **Sinks.** Each handler's sink, and the dead-letter sink, is replaced by a
  :class:`RecordingSink` that keeps every commit in memory, by batch id. It
  keeps the guarantee of the sink it replaces: an exactly-once one writes a
  batch once and reports a re-run as already committed, an at-least-once one
  (``CallbackSink``, ``PrintSink``) takes the re-run again, so duplicates
  show. A handler without a sink gets one too, to show its outputs. With
  ``keep_sinks=True`` the recorder wraps the real sink instead (a FileSink
  or SQLiteSink pointed at a temporary directory) and writes through it.
* **Files.** The state directory (tracker log, checkpoints) lives in a
  :class:`~streamlet.testing.faultfs.FaultFS`, in memory. Keyed state cannot:
  its store is an SQLite file at a path, so an app with ``state=`` gets a
  temporary directory, which :meth:`AppHarness.close` removes.
* **Time.** The app runs on a :class:`~streamlet.testing.clock.FakeClock`
  that jumps to the next tick whenever everything waits, so a test never
  sleeps; a run needs asyncio (the clock reads its tasks). Retry backoff is
  on real time in the engine, so the harness sets it to 0 (``retry_backoff``
  to change that); the number of retries stays the app's.

Each :meth:`~AppHarness.until_idle`, :meth:`~AppHarness.run_batches` or
:meth:`~AppHarness.run_for` is one start and one graceful stop of the app,
as ``streamlet run`` would do it: recovery, batches, a last checkpoint. The
state directory, the keyed state and the recorded sinks outlive it, as a
real restart would find them, and the user's ``App`` object is never changed
(each start serves a copy with the harness's sources and sinks).

Crashes: :meth:`AppHarness.crash_at` runs the app until a batch reaches a
step of the commit protocol (:data:`CRASH_POINTS`), where
:func:`streamlet._faults.crash_in_process` raises
:class:`~streamlet._faults.SimulatedCrash` instead of the SIGKILL of
``STREAMLET_CRASH_AT``. The exception unwinds the app: no later step of the
protocol runs, only the closing of files and connections that a killed
process's kernel would do, and the harness checks that the state directory
changed no more (a close may still sync, which changes nothing a kill
leaves). The next start recovers on what is there, as after ``kill -9``:
written data survives in the page cache; a power cut is a different test
(see :mod:`streamlet.testing.faultfs`). Unlike a kill, it does not end the
test's process: what the user's code keeps in module globals or closures
survives it. :func:`assert_same_after_crash`
runs inputs twice, with and without a crash, and compares every handler's
committed outputs.

Choices:

* A copy of the app, not a seam in :class:`App`: the harness swaps the
  registrations (read from the app's private ``_sources``, ``_handlers``
  and ``_decoders``; it ships and is tested with this package) and sets the
  public settings ``fs``, ``clock`` and ``state_dir``, so the engine runs as
  in production, with no testing branch in it.
* A start per call, not one app kept running between calls: between two
  calls a test may await anything, and a clock that jumps whenever all
  tasks wait would meanwhile run the app through idle ticks. A start per
  call keeps batches where the test asks for them (and runs recovery and
  the last checkpoint each time, as a restart would).
* The name ``AppHarness``, not ``TestRun``: pytest tries to collect a class
  named ``Test...`` that a test module imports.
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import logging
import shutil
import tempfile
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import ClassVar, NamedTuple

import anyio
from anyio.abc import TaskStatus

from streamlet._faults import POINTS, SimulatedCrash, crash_in_process
from streamlet.app import App
from streamlet.errors import ConfigError
from streamlet.metrics import BatchInfo
from streamlet.records import Batch, OffsetRange, Record
from streamlet.sinks.base import Guarantee, Sink, SinkContext, encode_output
from streamlet.sources.base import DirectSource
from streamlet.testing.clock import FakeClock
from streamlet.testing.faultfs import FaultFS

__all__ = [
    "CRASH_POINTS",
    "AppHarness",
    "Commit",
    "MemorySource",
    "Message",
    "RecordingSink",
    "SimulatedCrash",
    "assert_same_after_crash",
]

log = logging.getLogger(__name__)

_SYNCS = ("sync", "sync_dir")

CRASH_POINTS: tuple[str, ...] = POINTS
"""The steps of the commit protocol a crash can be put at, in protocol order."""

DEFAULT_LIMIT = 600.0
"""Seconds of the app's (fake) clock a run may take before the harness gives up."""


class Message(NamedTuple):
    """A record to feed, shaped like a Kafka record; every field but ``value`` optional."""

    value: object
    """The payload: bytes as they are, str as UTF-8, anything else as JSON (orjson)."""
    key: bytes | str | None = None
    """The key (str as UTF-8); None for none."""
    partition: int = 0
    """The partition it is in."""
    offset: int | None = None
    """Its offset; None: one past the partition's last (offsets start at 0)."""
    timestamp: float | None = None
    """Event time, seconds since the epoch; None: the harness clock's time when fed."""
    headers: tuple[tuple[str, bytes | None], ...] = ()
    """Kafka headers, ``(name, value)`` in order."""


class Commit(NamedTuple):
    """One commit a :class:`RecordingSink` received."""

    batch: int
    """The batch id."""
    outputs: list[object]
    """The outputs, as the handler returned them."""
    written: bool
    """False when the sink had the batch already (a re-run after a crash) and skipped it."""


class MemorySource(DirectSource):
    """An in-memory direct source with Kafka's shape: partitions of records by offset.

    Records are added with :meth:`add` (the harness's :meth:`AppHarness.feed`)
    and stay, so a batch re-run after a crash reads the same ones. The
    source has partitions 0 to the highest fed; a partition starts at its
    first record's offset (0 if none was fed when it is first read); offsets
    may have gaps (as a compacted or transactional topic's do) and only
    increase.

    Args:
        name: the source's name in the app.
        replaces: the description of the source it stands for (for the manifest).
    """

    def __init__(self, name: str, *, replaces: str = "") -> None:
        super().__init__(name=name)
        self.replaces = replaces
        self._records: dict[int, list[Record]] = {}
        self._offsets: dict[int, list[int]] = {}
        self._ends: dict[int, int] = {}
        self.done: dict[int, int] = {}
        """Per partition, the next offset after those in batches done."""

    def add(self, record: Record) -> Record:
        """Append ``record`` to its partition; an offset of -1 means "the next one".

        Returns:
            The record as stored (with its offset and this source's name).

        Raises:
            ValueError: a negative partition, or an offset not past the partition's last.
        """
        partition = record.partition
        if partition < 0:
            raise ValueError(f"source {self.name!r}: partition {partition} is negative")
        end = self._ends.get(partition, 0)
        offset = end if record.offset == -1 else record.offset
        if offset < end or offset < 0:
            raise ValueError(
                f"source {self.name!r}: offset {offset} of partition {partition} is not past"
                f" the partition's last one ({end - 1}); offsets only increase"
            )
        stored = record._replace(source=self.name, offset=offset, data=None)
        self._records.setdefault(partition, []).append(stored)
        self._offsets.setdefault(partition, []).append(offset)
        self._ends[partition] = offset + 1
        return stored

    @property
    def ends(self) -> Mapping[int, int]:
        """Per partition, one past the last offset fed."""
        return dict(self._ends)

    def all_done(self) -> bool:
        """Whether every record fed is in a batch that is done."""
        return all(self.done.get(p, 0) >= end for p, end in self._ends.items())

    async def latest(self) -> Mapping[int, int]:
        # Partitions 0..N-1, as a topic has them, even those not fed (yet).
        return {p: self._ends.get(p, 0) for p in range(max(self._ends, default=0) + 1)}

    async def start_positions(self, partitions: Iterable[int]) -> Mapping[int, int]:
        return {p: self._offsets[p][0] if self._offsets.get(p) else 0 for p in partitions}

    async def read(self, ranges: Sequence[OffsetRange]) -> list[Record]:
        out: list[Record] = []
        for r in ranges:
            offsets = self._offsets.get(r.partition, [])
            lo = bisect.bisect_left(offsets, r.start)
            hi = bisect.bisect_left(offsets, r.until)
            out.extend(self._records[r.partition][lo:hi] if hi > lo else ())
        return out

    def resume_from(self, positions: Mapping[int, int]) -> None:
        # Streamlet's log, not what this source was told, says what is done.
        self.done = dict(positions)

    def describe(self) -> str:
        return f"MemorySource({self.replaces})" if self.replaces else "MemorySource"


class RecordingSink(Sink):
    """A sink that keeps every commit in memory, idempotent by batch id.

    Args:
        inner: a real sink to write through (``keep_sinks=True``), or None to
            write nowhere else.
        replaces: the description of the sink it stands for.
    """

    guarantee: ClassVar[Guarantee] = "exactly-once"

    def __init__(self, inner: Sink | None = None, *, replaces: str = "") -> None:
        self.inner = inner
        self.replaces = replaces
        self.commits: list[Commit] = []
        """Every commit, in the order it came, re-runs included."""
        self._written: set[int] = set()

    @staticmethod
    def standing_in_for(sink: Sink | None, *, keep: bool) -> RecordingSink:
        """A recorder for ``sink``, with its guarantee; writing through it if ``keep``."""
        at_least_once = sink is not None and sink.guarantee != "exactly-once"
        kind = _AtLeastOnceRecordingSink if at_least_once else RecordingSink
        if sink is None:
            return kind()
        return kind(sink if keep else None, replaces=sink.describe())

    def written(self) -> list[Commit]:
        """The commits that wrote, in order."""
        return [c for c in self.commits if c.written]

    async def open(self, context: SinkContext) -> None:
        if self.inner is not None:
            await self.inner.open(context)

    async def commit(self, batch: Batch, outputs: Sequence[object]) -> bool:
        if self.inner is not None:
            written = await self.inner.commit(batch, outputs)
        else:
            written = self.guarantee != "exactly-once" or batch.id not in self._written
        if written:
            self._written.add(batch.id)
        self.commits.append(Commit(batch.id, list(outputs), written))
        return written

    async def last_committed(self) -> int | None:
        if self.inner is not None:
            return await self.inner.last_committed()
        if self.guarantee != "exactly-once":
            return None
        return max(self._written, default=0)

    async def aclose(self) -> None:
        if self.inner is not None:
            await self.inner.aclose()

    def describe(self) -> str:
        if self.inner is not None:
            return self.inner.describe()
        return f"RecordingSink({self.replaces})" if self.replaces else "RecordingSink"


class _AtLeastOnceRecordingSink(RecordingSink):
    """A recorder for an at-least-once sink: a re-run's commit is taken again."""

    guarantee: ClassVar[Guarantee] = "at-least-once"


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _as_record(item: object, now: float) -> Record:
    """What :meth:`AppHarness.feed` stores for one item (offset -1: the next one)."""
    if isinstance(item, Record):
        if not isinstance(item.value, bytes):
            raise TypeError(f"a Record's value must be bytes, not {type(item.value).__name__}")
        return item
    if isinstance(item, Message):
        key = item.key.encode() if isinstance(item.key, str) else item.key
        return Record(
            encode_output(item.value),
            key,
            now if item.timestamp is None else float(item.timestamp),
            "",
            item.partition,
            -1 if item.offset is None else item.offset,
            None,
            tuple(item.headers),
        )
    return Record(encode_output(item), None, now)


class AppHarness:
    """Run ``app`` in-process on records fed to it; see the module docstring.

    Use it as ``async with AppHarness(app) as harness:`` or call :meth:`close`
    (the pytest fixture ``streamlet_harness`` does).

    Args:
        app: the app under test; it is not changed.
        keep_sinks: write through the app's real sinks (recording too).
        retry_backoff: seconds before a failed handler's first retry (real
            time; 0 by default so that tests do not wait).
        clock: the fake clock to run on (a new one by default).
        limit: seconds of the fake clock a run may take before it fails.
    """

    def __init__(
        self,
        app: App,
        *,
        keep_sinks: bool = False,
        retry_backoff: float = 0.0,
        clock: FakeClock | None = None,
        limit: float = DEFAULT_LIMIT,
    ) -> None:
        if not isinstance(app, App):
            raise ConfigError(f"AppHarness takes a streamlet App, not {type(app).__name__}")
        self.app = app
        self.clock = clock if clock is not None else FakeClock()
        self.fs = FaultFS()
        """The in-memory file system holding the state directory."""
        self.retry = dataclasses.replace(app.retry, backoff=retry_backoff)
        self.limit = limit
        self.sources: dict[str, MemorySource] = {
            name: MemorySource(name, replaces=source.describe())
            for name, source in app._sources.items()
        }
        self.sinks: dict[str, RecordingSink] = {
            h.name: RecordingSink.standing_in_for(h.sink, keep=keep_sinks) for h in app._handlers
        }
        self.dead_letter_sink: RecordingSink | None = (
            RecordingSink.standing_in_for(app.dead_letter, keep=keep_sinks)
            if app.dead_letter is not None
            else None
        )
        self.infos: list[BatchInfo] = []
        """Every batch's :class:`~streamlet.metrics.BatchInfo`, re-runs included."""
        self.crashes: list[SimulatedCrash] = []
        """The simulated crashes so far."""
        self._armed: tuple[str, int | None] | None = None
        self._ops_at_crash: int | None = None
        self._tmp: str | None = None
        self._cleanup: weakref.finalize[[str, bool], AppHarness] | None = None
        if any(h.state is not None for h in app._handlers):
            # Keyed state is an SQLite file at a real path: the one thing on disk.
            self._tmp = tempfile.mkdtemp(prefix=f"streamlet-{app.name}-")
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._tmp, True)
        self.state_dir = self._tmp if self._tmp is not None else f"/streamlet/{app.name}"
        """The state directory: virtual (in :attr:`fs`), or a temporary one with keyed state."""

    async def __aenter__(self) -> AppHarness:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the temporary directory of keyed state, if there is one."""
        if self._cleanup is not None:
            self._cleanup()

    # -- input -------------------------------------------------------------------

    def feed(self, source: str, records: Iterable[object]) -> list[Record]:
        """Add records to source ``source``, to be taken by the next batches.

        Each item is a :class:`Message` (Kafka-shaped: key, partition, offset,
        timestamp, headers), a :class:`~streamlet.records.Record` (its value
        bytes; offset -1 for the next one), or a bare value for partition 0:
        bytes as they are, str as UTF-8, anything else as JSON. The source's
        ``decode`` applies when a batch reads them, as in production.

        Returns:
            The records as stored, with their offsets.

        Raises:
            ConfigError: the app has no source of that name.
            ValueError: an offset is not past its partition's last one.
        """
        target = self.sources.get(source)
        if target is None:
            raise ConfigError(
                f"app {self.app.name!r} has no source named {source!r};"
                f" its sources: {', '.join(sorted(self.sources)) or 'none'}"
            )
        now = self.clock.time()
        return [target.add(_as_record(item, now)) for item in records]

    # -- running -----------------------------------------------------------------

    def idle(self) -> bool:
        """Whether every record fed is in a batch that is done."""
        return all(source.all_done() for source in self.sources.values())

    def _idle_now(self, ran: list[BatchInfo]) -> bool:
        return self.idle()

    async def until_idle(self, *, limit: float | None = None) -> list[BatchInfo]:
        """Start the app, run batches until every record fed is in a done batch, stop it.

        A batch left unfinished by a crash is run first (recovery).

        Returns:
            The batches that ran, in order.

        Raises:
            AssertionError: the app was not idle after ``limit`` seconds of its clock.
            HandlerError, SinkError, DecodeError, ...: the app stopped on an
                error, as ``App.serve`` raises it.
        """
        ran = await self._serve(self._idle_now, limit)
        if not self.idle():
            raise AssertionError(self._not_idle(limit))
        return ran

    async def run_batches(self, count: int, *, limit: float | None = None) -> list[BatchInfo]:
        """Start the app, run ``count`` batches (recovered and idle ones count), stop it.

        Raises:
            AssertionError: fewer batches ran within ``limit`` seconds of the clock.
        """
        ran = await self._serve(lambda ran: len(ran) >= count, limit)
        if len(ran) < count:
            raise AssertionError(
                f"{len(ran)} batch(es) ran in {limit or self.limit:g} s of the app's clock,"
                f" not {count}: feed more records, or give a stateful handler idle batches"
            )
        return ran

    async def run_for(self, seconds: float) -> list[BatchInfo]:
        """Start the app, let ``seconds`` of its clock pass (idle batches too), stop it.

        For processing-time windows, which close as time passes.
        """
        return await self._serve(None, seconds)

    async def crash_at(self, point: str, batch: int | None = None) -> SimulatedCrash:
        """Start the app and run it until ``batch`` (default: any) reaches ``point``; crash there.

        The app stops at that step as a killed process would: nothing after
        it runs. The next start (:meth:`restart`, :meth:`until_idle`...)
        recovers, on the same state directory and sinks.

        Args:
            point: one of :data:`CRASH_POINTS`.
            batch: the batch id to crash in; None: the first that gets there.

        Raises:
            ValueError: not a crash point.
            AssertionError: the app went idle without reaching the point.
        """
        crash = await self._crashing(point, batch, lambda: self._serve(self._idle_now, None))
        if crash is None:
            where = f"{point} of batch {batch}" if batch is not None else point
            raise AssertionError(
                f"the app went idle without reaching {where}; batches ran:"
                f" {', '.join(str(i.batch_id) for i in self.infos) or 'none'}"
            )
        return crash

    async def restart(self) -> list[int]:
        """Start the app, let it recover, and stop it; return the ids of the batches re-run."""
        ran = await self._serve(lambda ran: True, None, stop_at_once=True)
        return [info.batch_id for info in ran if info.recovered]

    async def _crashing(
        self, point: str, batch: int | None, run: Callable[[], Awaitable[object]]
    ) -> SimulatedCrash | None:
        """Await ``run()`` with a crash armed at ``point``; the crash, if one happened."""
        if point not in CRASH_POINTS:
            raise ValueError(f"{point!r} is not a crash point; they are {', '.join(CRASH_POINTS)}")
        self._armed = (point, batch)
        before = len(self.crashes)
        try:
            await run()
        except AssertionError:
            # Not idle because of the crash: the crash is the outcome.
            if len(self.crashes) == before:
                raise
        finally:
            self._armed = None
        return self.crashes[-1] if len(self.crashes) > before else None

    def _crash_here(self, point: str, batch_id: int) -> bool:
        armed = self._armed
        if armed is None or armed[0] != point or armed[1] not in (None, batch_id):
            return False
        self._armed = None  # once: the recovery re-runs the batch through the point
        self._ops_at_crash = len(self.fs.ops)
        return True

    def _copy_of_app(self) -> App:
        """The app as one start serves it: the user's, with the harness's parts."""
        original = self.app
        app = copy.copy(original)
        app._sources, app._handlers, app._decoders = {}, [], {}
        app._listeners = list(original._listeners)
        app._stop, app._stop_requested, app._probe = None, False, None
        app.http = app.http_url = app.group = None
        app.fs, app.clock, app.state_dir = self.fs, self.clock, self.state_dir
        app.retry = self.retry
        app.dead_letter = self.dead_letter_sink
        for name, source in self.sources.items():
            app.source(source, name=name, decode=original._decoders.get(name))
        for spec in original._handlers:
            app.handler(
                list(spec.sources),
                sink=self.sinks[spec.name],
                name=spec.name,
                thread=spec.thread,
                state=spec.state,
            )(spec.fn)
        return app

    async def _serve(
        self,
        enough: Callable[[list[BatchInfo]], bool] | None,
        duration: float | None,
        *,
        stop_at_once: bool = False,
    ) -> list[BatchInfo]:
        """One start of the app, until ``enough(batches so far)`` or ``duration`` passed."""
        app = self._copy_of_app()
        ran: list[BatchInfo] = []

        def on_batch(info: BatchInfo) -> None:
            ran.append(info)
            self.infos.append(info)
            for r in info.ranges:
                done = self.sources[r.source].done
                done[r.partition] = max(done.get(r.partition, 0), r.until)
            if enough is not None and enough(ran):
                app.stop()

        app.add_listener(on_batch)
        if stop_at_once:
            app.stop()
        limit = duration if duration is not None else self.limit
        self._ops_at_crash = None
        failure: Exception | None = None
        try:
            with crash_in_process(self._crash_here):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self.clock.autojump)

                    async def serve(*, task_status: TaskStatus[None]) -> None:
                        await app.serve(duration=limit, task_status=task_status)
                        tg.cancel_scope.cancel()

                    await tg.start(serve)
                    if enough is not None and enough(ran):
                        app.stop()  # recovered (or nothing to do): no tick needed
        except BaseException as exc:
            leaves = _leaves(exc)
            crash = next((e for e in leaves if isinstance(e, SimulatedCrash)), None)
            if crash is None:
                errors = [e for e in leaves if isinstance(e, Exception)]
                if len(errors) != 1 or errors[0] is exc:
                    raise
                # The app's error as App.serve raised it, not in our task group's
                # ExceptionGroup; raised below, so its context stays its own.
                failure = errors[0]
            else:
                self.crashes.append(crash)
                self._check_nothing_written_after(crash)
        if failure is not None:
            raise failure
        return ran

    def _check_nothing_written_after(self, crash: SimulatedCrash) -> None:
        """A killed process writes nothing more: neither may the unwinding app."""
        if self._ops_at_crash is None:
            return
        after = [op for op in self.fs.ops[self._ops_at_crash :] if op.name not in _SYNCS]
        if after:
            raise AssertionError(
                f"the app wrote to its state directory after {crash}, which a killed"
                f" process could not: {', '.join(f'{op.name} {op.path}' for op in after)}"
            )

    def _not_idle(self, limit: float | None) -> str:
        left = {
            name: {
                p: (s.done.get(p, 0), end) for p, end in s.ends.items() if s.done.get(p, 0) < end
            }
            for name, s in self.sources.items()
            if not s.all_done()
        }
        return (
            f"the app was not idle after {limit or self.limit:g} s of its clock; records not"
            f" in a done batch, as source: {{partition: (done up to, fed up to)}}: {left}"
        )

    # -- results -----------------------------------------------------------------

    def _sink(self, handler: str) -> RecordingSink:
        sink = self.sinks.get(handler)
        if sink is None:
            raise KeyError(
                f"app {self.app.name!r} has no handler named {handler!r};"
                f" its handlers: {', '.join(sorted(self.sinks)) or 'none'}"
            )
        return sink

    def commits(self, handler: str) -> list[Commit]:
        """Every commit of ``handler``'s sink, in order, re-runs (``written=False``) included."""
        return list(self._sink(handler).commits)

    def outputs(self, handler: str) -> list[object]:
        """All outputs ``handler``'s sink committed, in commit (batch) order."""
        return [o for c in self._sink(handler).written() for o in c.outputs]

    def batches(self, handler: str) -> dict[int, list[object]]:
        """``handler``'s committed outputs by batch id."""
        return {c.batch: list(c.outputs) for c in self._sink(handler).written()}

    def dead_letters(self) -> list[object]:
        """The dead letters committed: dicts with the record (base64), where it was, and why.

        Raises:
            ConfigError: the app has no dead-letter sink.
        """
        if self.dead_letter_sink is None:
            raise ConfigError(f"app {self.app.name!r} has no dead_letter sink")
        return [o for c in self.dead_letter_sink.written() for o in c.outputs]


Round = Mapping[str, Iterable[object]] | float
"""One step of :func:`assert_same_after_crash`: records per source, or seconds to let pass."""


async def assert_same_after_crash(
    app: App | Callable[[], App],
    inputs: Mapping[str, Iterable[object]] | Sequence[Round],
    *,
    point: str,
    batch: int | None = None,
    keep_sinks: bool = False,
) -> AppHarness:
    """Run ``inputs`` through the app twice, once with a crash, and check the outputs match.

    The first run feeds each round and runs until idle (a number as a round:
    :meth:`AppHarness.run_for` that many seconds). The second does the same,
    but crashes the first time ``batch`` (default: any) reaches ``point``,
    restarts, and goes on. Then every handler's committed outputs, batch by
    batch, and the dead letters must be equal.

    Args:
        app: the app, or a function making a fresh one for each run (for
            handlers that keep anything between calls).
        inputs: records per source name, or a sequence of such rounds.
        point: one of :data:`CRASH_POINTS`.
        batch: the batch id to crash in; None: the first that reaches ``point``.
        keep_sinks: write through the real sinks (they must then not share
            their location between the two runs).

    Returns:
        The harness of the run with the crash (closed; its results stay readable).

    Raises:
        AssertionError: the outputs differ, or no batch reached the point.
    """
    if point not in CRASH_POINTS:
        raise ValueError(f"{point!r} is not a crash point; they are {', '.join(CRASH_POINTS)}")
    rounds: list[Round] = [inputs] if isinstance(inputs, Mapping) else list(inputs)
    steady = await _play(app, rounds, None, keep_sinks=keep_sinks)
    crashed = await _play(app, rounds, (point, batch), keep_sinks=keep_sinks)
    if not crashed.crashes:
        where = f"{point} of batch {batch}" if batch is not None else point
        raise AssertionError(f"no batch reached {where}: the crash was not tested")
    crash = crashed.crashes[0]
    for handler in steady.sinks:
        same = steady.batches(handler) == crashed.batches(handler)
        if not same or steady.outputs(handler) != crashed.outputs(handler):
            raise AssertionError(
                f"handler {handler!r} committed other outputs after {crash} and a restart"
                f" than without it:\n{_difference(steady, crashed, handler)}"
            )
    if steady.dead_letter_sink is not None:
        want_dead, got_dead = steady.dead_letters(), crashed.dead_letters()
        if want_dead != got_dead:
            raise AssertionError(
                f"other dead letters after {crash} and a restart than without it:"
                f"\nwithout: {want_dead}\nwith:    {got_dead}"
            )
    return crashed


async def _play(
    app: App | Callable[[], App],
    rounds: Sequence[Round],
    crash: tuple[str, int | None] | None,
    *,
    keep_sinks: bool,
) -> AppHarness:
    """One run of :func:`assert_same_after_crash`; with ``crash``, crash once and restart."""
    made = app if isinstance(app, App) else app()
    async with AppHarness(made, keep_sinks=keep_sinks) as harness:
        for step in rounds:
            if isinstance(step, Mapping):
                for source, records in step.items():
                    harness.feed(source, records)
            end = harness.clock.monotonic() + (0.0 if isinstance(step, Mapping) else float(step))

            async def run(step: Round = step, end: float = end) -> None:
                if isinstance(step, Mapping):
                    await harness.until_idle()
                else:
                    await harness.run_for(max(0.0, end - harness.clock.monotonic()))

            if crash is not None and not harness.crashes:
                if await harness._crashing(crash[0], crash[1], run) is not None:
                    await harness.restart()
                    await run()
            else:
                await run()
    return harness


def _difference(steady: AppHarness, crashed: AppHarness, handler: str) -> str:
    """The commits that wrote in the two runs side by side, marking where they part."""
    want = steady.sinks[handler].written()
    got = crashed.sinks[handler].written()
    lines = []
    for index in range(max(len(want), len(got))):
        a = want[index] if index < len(want) else None
        b = got[index] if index < len(got) else None
        mark = "  " if a == b else "≠ "
        lines.append(f"{mark}without: {_show(a)}\n  with:    {_show(b)}")
    return "\n".join(lines)


def _show(commit: Commit | None) -> str:
    return "-" if commit is None else f"batch {commit.batch}: {commit.outputs!r}"
