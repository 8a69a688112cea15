"""The composition root: an :class:`App` wires sources, handlers and sinks.

``App`` holds settings and registrations and, in :meth:`App.serve`, builds the
pipeline from left to right: state directory (lock, manifest) → checkpoint →
tracker (replayed) → sources → sinks → scheduler (recovery first, then new
batches). It does no batch work itself.

The state directory (its lock, layout and manifest) is
:mod:`streamlet._statedir`'s.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload

import anyio
from anyio.abc import TaskStatus

from streamlet._backpressure import RateController
from streamlet._blocks import BlockGenerator
from streamlet._checkpoint import Checkpointer, load_latest
from streamlet._faults import check_environment as check_fault_environment
from streamlet._faults import file_system
from streamlet._handlers import HandlerFn, HandlerSpec, check_handler, code_of
from streamlet._scheduler import BatchPolicy, BatchScheduler, FailurePolicy, RetryPolicy
from streamlet._statedir import MANIFEST_FORMAT, MANIFEST_VERSION, StateDir
from streamlet._tracker import SEGMENT_SIZE as TRACKER_SEGMENT_SIZE
from streamlet._tracker import Tracker, TrackerState, restore
from streamlet._watchdog import watched
from streamlet.clock import SYSTEM_CLOCK, Clock
from streamlet.errors import ConfigError, StreamletError
from streamlet.fs import FileSystem, sqlite_vfs_of
from streamlet.metrics import BatchInfo
from streamlet.observe.address import parse_address
from streamlet.records import Batch, Decoded
from streamlet.sinks.base import Sink, SinkContext, sink_ahead
from streamlet.sources.base import DirectSource
from streamlet.sources.receiver import Receiver
from streamlet.state import KeyedState, State
from streamlet.state._changelog import ChangelogSink, changelog_topic
from streamlet.state._store import StateStore
from streamlet.wal import Position, WriteAheadLog

__all__ = ["App"]

if TYPE_CHECKING:
    from streamlet.observe.probe import EngineProbe
    from streamlet.observe.web import HttpServer

log = logging.getLogger(__name__)

DEFAULT_BLOCK_INTERVAL = 0.2

AnySource = DirectSource | Receiver
_S = TypeVar("_S", DirectSource, Receiver)
#: A handler function, returned by the decorator as it came (types kept).
_F = TypeVar("_F", bound=HandlerFn)
#: What a source's decode returns: its records' data (Decoded[_D]).
_D = TypeVar("_D")
_R = TypeVar("_R")
SourceArg = AnySource | str
#: Sources without a type the checker knows: plain ones, names, and lists
#: that mix them with decoded ones.
SourcesArg = SourceArg | Sequence[SourceArg | Decoded[Any]]


def _positive(name: str, value: object, unit: str = "seconds") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{name} must be a positive number of {unit}, not {value!r}")
    return float(value)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, not {value!r}")
    return value


async def _within_after(
    stop: anyio.Event, grace: float | None, body: Callable[[], Awaitable[None]]
) -> None:
    """Run ``body``; once ``stop`` is set, cancel it if it has not returned ``grace`` s later.

    A graceful stop lets the batch under way finish, but a batch that waits
    on a broker that is down (reads retried for minutes) must not hold the
    stop for as long: cancelled, it stays uncommitted and runs again on
    restart, which is what a second signal does too. Exceptions from
    ``body`` are raised as themselves.
    """
    if grace is None:
        await body()
        return
    failure: BaseException | None = None
    async with anyio.create_task_group() as tg:

        async def deadline() -> None:
            await stop.wait()
            await anyio.sleep(grace)
            log.warning(
                "the app did not stop within stop_timeout=%gs: the batch under way is"
                " cancelled; it is not committed and runs again on restart",
                grace,
            )
            tg.cancel_scope.cancel()

        tg.start_soon(deadline)
        try:
            await body()
        except Exception as exc:
            failure = exc
        tg.cancel_scope.cancel()
    if failure is not None:
        raise failure


class App:
    """A streaming application.

    Args:
        name: the app's name; part of every sink's idempotency key.
        state_dir: where the tracker log and checkpoints live (default
            ``.streamlet/<name>``); one running app per directory.
        batch_interval: seconds between batches.
        block_interval: seconds between cuts of receivers' blocks (default
            0.2, or the batch interval if shorter); a receiver's records are
            acknowledged at most this long (plus an fsync) after they arrive.
        max_block_bytes: a receiver's block is cut early at this size.
        max_buffered_bytes: receivers wait while this much received data is
            not yet durable (bounds memory when input outruns the disk).
        receiver_stop_timeout: seconds a graceful stop waits for receivers
            to finish before cancelling them.
        backpressure: adapt each source's intake rate to how fast batches
            are processed (a PID estimator as in Spark Streaming), so a slow
            handler shrinks batches instead of growing delay; ``max_rate``
            stays the ceiling.
        min_rate: the lowest rate backpressure may set, records/s per source.
        checkpoint_interval: seconds between checkpoints (0: after every
            batch). Recovery replays the tracker log since the last one.
        max_retries: retries of a failing handler call (or sink commit)
            before ``on_failure`` applies.
        retry_backoff: seconds before the first retry; doubles per retry.
        handler_timeout: the most one handler call may take, in seconds.
        on_failure: ``"stop"`` (default) stops the app with the batch
            uncommitted, to run again after a fix; ``"dead_letter"`` finds
            the records a failing handler fails on (by bisecting the batch),
            sends only those to ``dead_letter`` and commits the handler's
            outputs for the rest; ``"dead_letter_batch"`` sends all of a
            failing handler's input records of the batch (for handlers that
            aggregate over a batch, or keep keyed state, where outputs are
            not per record; stateful handlers always fail whole batches).
        dead_letter: the sink for dead letters.
        durability: the tracker log's fsync policy (``"always"``; see the WAL).
        tracker_segment_bytes: size of the tracker log's segment files; the
            log is cleaned behind checkpoints a whole segment at a time.
        max_batch_records: the most records one batch takes from one source
            (default 100,000), so that a backlog drains over several batches
            instead of one that may not fit in memory.
        max_batch_bytes: about the most bytes (keys and values) one batch
            takes from one source (default 64 MiB). A direct source's first
            batch takes at most 1,000 records, until its record size is known.
        pause_gc: pause Python's cyclic garbage collector while a batch runs
            and resume it between batches (default True): the collector
            would otherwise walk a large batch's live records again and
            again. It is the process's collector; reference counting frees
            memory meanwhile as always.
        stop_timeout: seconds a graceful stop waits for the batch under way
            (and, with receivers, for the last batches over what they
            stored) before it cancels it; a cancelled batch is not committed
            and runs again on restart (None: wait as long as it takes).
        blocked_loop_warning: seconds a handler may block the event loop
            before a warning names it (None: no watch); see ``thread=True``
            in :meth:`handler` for blocking code.
        fs: the file layer (tests inject a fault-injecting one).
        clock: the clock of ticks, batch timings, block cuts and checkpoint
            intervals (tests inject :class:`streamlet.testing.clock.FakeClock`).
        http: serve the live status page, Prometheus metrics (``/metrics``),
            JSON status and a health check on this address (``HOST:PORT``,
            ``:PORT`` for loopback, port 0 for any free one); None: nothing
            is served. Read-only; see SECURITY.md before binding anything
            but loopback.
        retained_batches: batches the status page and ``/api/batches`` keep.
        group: run as one of many workers sharing the app's Kafka partitions
            through this consumer group (None: this worker runs the whole
            app). Every source must be a Kafka source in direct mode, and
            the one exactly-once sink a KafkaSink or a PostgresSink; see docs/architecture.md,
            "Group mode".
        worker: this worker's name in the group (default: host and process id).
        revoke_budget: seconds a rebalance waits for the batch under way
            before the partitions move (default: 20 batch intervals, at most 10).
        session_timeout: seconds without a heartbeat before the group gives
            this worker's tasks to the others.
    """

    def __init__(
        self,
        name: str,
        *,
        state_dir: str | os.PathLike[str] | None = None,
        batch_interval: float = 1.0,
        block_interval: float | None = None,
        max_block_bytes: int = 4 * 2**20,
        max_buffered_bytes: int = 64 * 2**20,
        receiver_stop_timeout: float = 10.0,
        backpressure: bool = False,
        min_rate: float = 100.0,
        checkpoint_interval: float = 5.0,
        max_retries: int = 3,
        retry_backoff: float = 0.2,
        handler_timeout: float | None = None,
        on_failure: FailurePolicy = "stop",
        dead_letter: Sink | None = None,
        durability: str = "always",
        tracker_segment_bytes: int = TRACKER_SEGMENT_SIZE,
        max_batch_records: int = 100_000,
        max_batch_bytes: int = 64 * 2**20,
        pause_gc: bool = True,
        stop_timeout: float | None = 30.0,
        blocked_loop_warning: float | None = 1.0,
        fs: FileSystem | None = None,
        clock: Clock = SYSTEM_CLOCK,
        http: str | None = None,
        retained_batches: int = 1000,
        group: str | None = None,
        worker: str | None = None,
        revoke_budget: float | None = None,
        session_timeout: float = 10.0,
    ) -> None:
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise ConfigError(
                f"app name {name!r} must be non-empty and use only letters, digits, '-', '_', '.'"
            )
        self.name = name
        self.state_dir = os.fspath(state_dir) if state_dir is not None else f".streamlet/{name}"
        self.batch_interval = _positive("batch_interval", batch_interval)
        self._block_interval_given = block_interval is not None
        if block_interval is None:
            block_interval = min(DEFAULT_BLOCK_INTERVAL, self.batch_interval)
        self.block_interval = _positive("block_interval", block_interval)
        if self.block_interval > self.batch_interval:
            raise ConfigError(
                f"block_interval ({block_interval}) must not exceed batch_interval"
                f" ({batch_interval}): a batch takes whole blocks"
            )
        self.max_block_bytes = _positive_int("max_block_bytes", max_block_bytes)
        self.max_buffered_bytes = _positive_int("max_buffered_bytes", max_buffered_bytes)
        if self.max_buffered_bytes < self.max_block_bytes:
            raise ConfigError(
                f"max_buffered_bytes ({max_buffered_bytes}) must be at least"
                f" max_block_bytes ({max_block_bytes})"
            )
        self.receiver_stop_timeout = _positive("receiver_stop_timeout", receiver_stop_timeout)
        self.backpressure = bool(backpressure)
        self.min_rate = _positive("min_rate", min_rate, "records/s")
        if isinstance(checkpoint_interval, bool) or not checkpoint_interval >= 0:
            raise ConfigError(
                f"checkpoint_interval must be >= 0 seconds, not {checkpoint_interval!r}"
            )
        self.checkpoint_interval = float(checkpoint_interval)
        self.retry = RetryPolicy(
            max_retries=max_retries, backoff=retry_backoff, timeout=handler_timeout
        )
        if on_failure not in ("stop", "dead_letter", "dead_letter_batch"):
            raise ConfigError(
                "on_failure must be 'stop', 'dead_letter' or 'dead_letter_batch', not"
                f" {on_failure!r}"
            )
        if on_failure != "stop" and dead_letter is None:
            raise ConfigError(f"on_failure={on_failure!r} needs a dead_letter sink")
        self.on_failure: FailurePolicy = on_failure
        self.dead_letter = dead_letter
        if durability not in ("always", "interval", "none"):
            raise ConfigError(
                f"durability must be 'always', 'interval' or 'none', not {durability!r}"
            )
        self.durability = durability
        self.tracker_segment_bytes = _positive_int("tracker_segment_bytes", tracker_segment_bytes)
        self.max_batch_records = _positive_int("max_batch_records", max_batch_records)
        self.max_batch_bytes = _positive_int("max_batch_bytes", max_batch_bytes)
        if not isinstance(pause_gc, bool):
            raise ConfigError(f"pause_gc must be True or False, not {pause_gc!r}")
        self.pause_gc = pause_gc
        self.stop_timeout = (
            None if stop_timeout is None else _positive("stop_timeout", stop_timeout)
        )
        self.blocked_loop_warning = (
            None
            if blocked_loop_warning is None
            else _positive("blocked_loop_warning", blocked_loop_warning)
        )
        # The real file system, unless STREAMLET_FAULT_FS asks for injected faults.
        self.fs: FileSystem = fs if fs is not None else file_system()
        self.clock = clock
        self.http = parse_address(http) if http else None
        self.retained_batches = _positive_int("retained_batches", retained_batches)
        #: Where the status page is served while the app runs (None: not served).
        self.http_url: str | None = None
        self._probe: EngineProbe | None = None
        self.group = group or None
        self.worker = worker or f"{socket.gethostname()}-{os.getpid()}"
        self.revoke_budget = (
            _positive("revoke_budget", revoke_budget)
            if revoke_budget is not None
            else min(10.0, 20 * self.batch_interval)
        )
        self.session_timeout = _positive("session_timeout", session_timeout)
        self._sources: dict[str, AnySource] = {}
        self._handlers: list[HandlerSpec] = []
        self._decoders: dict[str, Callable[[bytes], object]] = {}
        self._listeners: list[Callable[[BatchInfo], object]] = []
        self._stop: anyio.Event | None = None
        self._stop_requested = False

    # -- registration ------------------------------------------------------------

    def configure(self, **settings: Any) -> None:
        """Override settings before the app starts (used by ``streamlet run``)."""
        for key, value in settings.items():
            if value is None:
                continue
            if key == "state_dir":
                self.state_dir = os.fspath(value)
            elif key == "http":
                self.http = parse_address(value)
            elif key == "group":
                self.group = str(value)
            elif key == "worker":
                self.worker = str(value)
            elif key == "batch_interval":
                interval = _positive("batch_interval", value)
                if not self._block_interval_given:
                    self.block_interval = min(DEFAULT_BLOCK_INTERVAL, interval)
                if interval < self.block_interval:
                    raise ConfigError(
                        f"batch_interval ({value}) must not be below block_interval"
                        f" ({self.block_interval}): a batch takes whole blocks"
                    )
                self.batch_interval = interval
            else:
                raise ConfigError(f"unknown setting {key!r}")

    @overload
    def source(self, source: _S, *, name: str | None = None, decode: None = None) -> _S: ...

    @overload
    def source(
        self, source: AnySource, *, name: str | None = None, decode: Callable[[bytes], _D]
    ) -> Decoded[_D]: ...

    def source(
        self,
        source: AnySource,
        *,
        name: str | None = None,
        decode: Callable[[bytes], object] | None = None,
    ) -> Any:
        """Register a direct source or a receiver and return it, to pass to :meth:`handler`.

        ``decode`` turns each record's value into its ``data`` (for example
        ``orjson.loads``) before handlers see it; a record it raises on goes
        to the ``dead_letter`` sink with its bytes, position and the error,
        and the batch goes on without it (without a dead-letter sink the app
        stops with :class:`~streamlet.errors.DecodeError`).

        With ``decode`` the source comes back typed
        :class:`~streamlet.records.Decoded` ``[T]`` (``T``: what ``decode``
        returns), and :meth:`handler` checks that its handler takes a
        ``Batch[T]``. It is the same object; for anything but
        :meth:`handler`, use the object passed in.
        """
        if decode is not None and not callable(decode):
            raise ConfigError(f"decode must be a function of bytes, not {type(decode).__name__}")
        if not isinstance(source, (DirectSource, Receiver)):
            raise ConfigError(
                f"app.source() takes a DirectSource or Receiver object, not {type(source).__name__}"
            )
        name = name or source.name or f"{type(source).__name__.lower()}-{len(self._sources) + 1}"
        if name in self._sources and self._sources[name] is not source:
            raise ConfigError(f"the app already has a source named {name!r}")
        source.name = name
        self._sources[name] = source
        if decode is not None:
            self._decoders[name] = decode
        return source

    # The overloads overlap (a list of decoded sources is also a list the
    # last one takes); the first that fits wins, which is the intent.
    @overload
    def handler(  # type: ignore[overload-overlap]
        self,
        sources: Decoded[_D] | Sequence[Decoded[_D]],
        *,
        sink: Sink | None = None,
        name: str | None = None,
        thread: bool = False,
        state: None = None,
    ) -> Callable[[Callable[[Batch[_D]], _R]], Callable[[Batch[_D]], _R]]: ...

    @overload
    def handler(  # type: ignore[overload-overlap]
        self,
        sources: Decoded[_D] | Sequence[Decoded[_D]],
        *,
        sink: Sink | None = None,
        name: str | None = None,
        thread: bool = False,
        state: State,
    ) -> Callable[
        [Callable[[Batch[_D], KeyedState], _R]], Callable[[Batch[_D], KeyedState], _R]
    ]: ...

    @overload
    def handler(
        self,
        sources: SourcesArg,
        *,
        sink: Sink | None = None,
        name: str | None = None,
        thread: bool = False,
        state: State | None = None,
    ) -> Callable[[_F], _F]: ...

    def handler(
        self,
        sources: SourcesArg | Decoded[Any],
        *,
        sink: Sink | None = None,
        name: str | None = None,
        thread: bool = False,
        state: State | None = None,
    ) -> Callable[[_F], _F]:
        """Decorate an ``async def handler(batch)`` to run on every batch of ``sources``.

        Handlers share the event loop with receivers' acknowledgements and the
        batch ticks, so they must not block it. For blocking code (a
        synchronous client, heavy CPU work) decorate a plain ``def`` with
        ``thread=True``: it runs in a worker thread. A plain ``def`` without
        it is refused here, before it could run. ``handler_timeout`` cannot
        interrupt a thread: a call that returns late counts as failed and its
        outputs are dropped.

        With ``state=State(...)`` the handler is called as ``handler(batch,
        state)``: ``state`` is a dict-like :class:`~streamlet.state.KeyedState`
        holding what earlier batches stored, and what this batch changes in
        it becomes durable exactly once, with the batch.

        Sources registered with ``decode`` are typed (see :meth:`source`):
        the type checker then refuses a handler whose ``Batch[T]`` does not
        fit what ``decode`` returns, and the decorator hands the function
        back as a callable of that type. A handler of several decoded
        sources of different types takes their common type (annotate
        ``sl.Batch`` and narrow by ``record.source``).
        """
        # A Decoded[T] is a source object at run time: the type is the checker's only.
        items: list[Any] = (
            [sources]
            if isinstance(sources, (DirectSource, Receiver, str))
            else list(cast(Sequence[Any], sources))
        )
        names: list[str] = []
        for item in items:
            if isinstance(item, str):
                names.append(item)
            elif item.name in self._sources and self._sources[item.name] is item:
                names.append(item.name)
            else:
                raise ConfigError(
                    f"handler source {item!r} is not registered; pass it through app.source() first"
                )
        if not names:
            raise ConfigError("a handler needs at least one source")
        if sink is not None and not isinstance(sink, Sink):
            raise ConfigError(f"sink must be a streamlet Sink, not {type(sink).__name__}")
        if state is not None and not isinstance(state, State):
            raise ConfigError(f"state must be a streamlet State, not {type(state).__name__}")

        def register(fn: _F) -> _F:
            handler_name = name or getattr(fn, "__name__", "") or f"handler-{len(self._handlers)}"
            check_handler(handler_name, fn, thread=thread, state=state is not None)
            if any(h.name == handler_name for h in self._handlers):
                raise ConfigError(f"the app already has a handler named {handler_name!r}")
            if sink is not None and any(h.sink is sink for h in self._handlers):
                raise ConfigError(
                    f"handler {handler_name!r} reuses another handler's sink object;"
                    " give each handler its own sink"
                )
            self._handlers.append(HandlerSpec(handler_name, fn, tuple(names), sink, thread, state))
            return fn

        return register

    def add_listener(self, listener: Callable[[BatchInfo], object]) -> None:
        """Call ``listener`` with every batch's :class:`BatchInfo`."""
        self._listeners.append(listener)

    def stop(self) -> None:
        """Ask a running app to stop after the batch under way (graceful)."""
        self._stop_requested = True
        if self._stop is not None:
            self._stop.set()

    # -- running -------------------------------------------------------------------

    def manifest(self) -> dict[str, Any]:
        """What identifies this app's batches: its sources, handlers and sinks."""
        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "app": self.name,
            "sources": {name: src.describe() for name, src in sorted(self._sources.items())},
            "handlers": {
                h.name: {
                    "sources": sorted(h.sources),
                    "sink": h.sink.describe() if h.sink is not None else None,
                    # Only when there is state: older manifests stay valid as they are.
                    **({"state": h.state.describe()} if h.state is not None else {}),
                }
                for h in sorted(self._handlers, key=lambda h: h.name)
            },
        }

    def settings(self) -> dict[str, Any]:
        """The app's settings as the status page shows them (no secrets: none are settings)."""
        return {
            "state_dir": self.state_dir,
            "batch_interval": self.batch_interval,
            "block_interval": self.block_interval,
            "max_batch_records": self.max_batch_records,
            "max_batch_bytes": self.max_batch_bytes,
            "pause_gc": self.pause_gc,
            "backpressure": self.backpressure,
            "min_rate": self.min_rate,
            "checkpoint_interval": self.checkpoint_interval,
            "max_retries": self.retry.max_retries,
            "retry_backoff": self.retry.backoff,
            "handler_timeout": self.retry.timeout,
            "on_failure": self.on_failure,
            "dead_letter": self.dead_letter.describe() if self.dead_letter is not None else None,
            "durability": self.durability,
            "stop_timeout": self.stop_timeout,
        }

    def _validate(self) -> None:
        if not self._handlers:
            raise ConfigError(f"app {self.name!r} has no handlers; decorate one with @app.handler")
        for h in self._handlers:
            for source in h.sources:
                if source not in self._sources:
                    raise ConfigError(f"handler {h.name!r} reads unknown source {source!r}")
        if self.group is not None:
            from streamlet._group import check_group_mode

            sinks = [(h.name, h.sink) for h in self._handlers if h.sink is not None]
            if self.dead_letter is not None:
                sinks.append(("dead-letter", self.dead_letter))
            stateful = [(h.name, h.sink) for h in self._handlers if h.state is not None]
            problems = check_group_mode(self._sources, sinks, stateful)
            for name, _ in stateful:
                try:
                    changelog_topic(self.name, name)
                except ConfigError as exc:
                    problems.append(str(exc))
            if problems:
                raise ConfigError(
                    f"app {self.name!r} cannot run in group mode ({self.group!r}): "
                    + "; ".join(problems)
                )

    async def serve(
        self,
        *,
        duration: float | None = None,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run until :meth:`stop` (or ``duration`` seconds); usable in any anyio loop.

        Recovery (re-running unfinished batches) completes before
        ``task_status.started()`` is called.

        Raises:
            ConfigError: settings or the state directory are unusable.
            HandlerError: a handler failed with ``on_failure="stop"``.
            SinkError: a sink could not commit after retries.
        """
        self._validate()
        check_fault_environment()
        self._stop = anyio.Event()
        if self._stop_requested:
            self._stop.set()
        for h in self._handlers:
            if h.sink is not None and h.sink.guarantee != "exactly-once":
                log.warning(
                    "handler %r writes to %s, which is %s: a batch re-run after a crash"
                    " may repeat its outputs",
                    h.name,
                    h.sink.describe(),
                    h.sink.guarantee,
                )
        statedir = await anyio.to_thread.run_sync(
            StateDir.open, self.state_dir, self.fs, self.manifest()
        )
        try:
            await self._serve_locked(statedir, duration=duration, task_status=task_status)
        finally:
            statedir.close()

    async def _serve_locked(
        self, statedir: StateDir, *, duration: float | None, task_status: TaskStatus[None]
    ) -> None:
        checkpoint = await anyio.to_thread.run_sync(load_latest, self.fs, statedir.checkpoints)
        base: TrackerState | None = None
        after: Position | None = None
        if checkpoint is not None:
            body = checkpoint.body
            if body.get("app") != self.name:
                raise ConfigError(
                    f"checkpoint {checkpoint.path} is of app {body.get('app')!r}, not {self.name!r}"
                )
            base, after = restore(body, checkpoint.path)
            log.info("loaded checkpoint %s (batch %d)", checkpoint.path, checkpoint.batch_id)
        tracker = await Tracker.open(
            statedir.tracker,
            base=base,
            after=after,
            fs=self.fs,
            durability=self.durability,
            segment_size=self.tracker_segment_bytes,
        )
        direct = {n: src for n, src in self._sources.items() if isinstance(src, DirectSource)}
        receivers = {n: src for n, src in self._sources.items() if isinstance(src, Receiver)}
        started_sources: list[DirectSource] = []
        opened_sinks: list[Sink] = []
        stores: dict[str, StateStore] = {}
        data_wal: WriteAheadLog | None = None
        server: HttpServer | None = None
        try:
            generator: BlockGenerator | None = None
            if receivers:
                data_wal = await WriteAheadLog.open(
                    statedir.data, durability=self.durability, fs=self.fs
                )
                generator = BlockGenerator(
                    wal=data_wal,
                    tracker=tracker,
                    interval=self.block_interval,
                    max_block_bytes=self.max_block_bytes,
                    max_buffered_bytes=self.max_buffered_bytes,
                    clock=self.clock,
                )
            for source in direct.values():
                await source.start()
                started_sources.append(source)
            sinks = [(h.name, h.sink) for h in self._handlers if h.sink is not None]
            if self.dead_letter is not None:
                sinks.append(("dead-letter", self.dead_letter))
            allocated = tracker.state.next_batch_id - 1
            # Group mode: each stateful handler's changelog topic.
            changelogs = {
                h.name: changelog_topic(self.name, h.name)
                for h in self._handlers
                if h.state is not None and self.group is not None
            }
            for handler, sink in sinks:
                context = SinkContext(
                    self.name,
                    handler,
                    self.state_dir,
                    statedir.state_id,
                    allocated,
                    group=self.group,
                    source_topics=_source_topics(direct),
                    changelog=changelogs.get(handler),
                )
                await sink.open(context)
                opened_sinks.append(sink)
            await self._check_sinks_not_ahead(sinks, tracker.state)
            for spec in self._handlers:
                if spec.state is None or self.group is not None:
                    continue  # group mode: each task's, when it is taken over
                vfs = sqlite_vfs_of(self.fs)
                if vfs is not None:  # SQLite reaches this file system through its VFS
                    await anyio.to_thread.run_sync(self.fs.makedirs, statedir.state)
                stores[spec.name] = store = await StateStore.open(
                    statedir.state_store(spec.name),
                    vfs=vfs,
                    app=self.name,
                    handler=spec.name,
                    state_id=statedir.state_id,
                    ttl=spec.state.ttl,
                    cache_keys=spec.state.cache_keys,
                )
                if spec.name in statedir.new_state:
                    # State added in an upgrade: it starts empty at the last done batch.
                    await store.start_at(tracker.state.last_done)
                store.check_against(
                    tracker.state.last_done,
                    [a.id for a in tracker.state.pending],
                    tracker.state.next_batch_id - 1,
                )
            await anyio.to_thread.run_sync(statedir.state_started)
            scheduler = BatchScheduler(
                app=self.name,
                tracker=tracker,
                sources=direct,
                handlers=self._handlers,
                policy=BatchPolicy(
                    interval=self.batch_interval,
                    retry=self.retry,
                    on_failure=self.on_failure,
                    max_batch_records=self.max_batch_records,
                    max_batch_bytes=self.max_batch_bytes,
                    pause_gc=self.pause_gc,
                ),
                rate_controller=(
                    RateController(
                        [*direct, *sorted(receivers)],
                        batch_interval=self.batch_interval,
                        min_rate=self.min_rate,
                    )
                    if self.backpressure
                    else None
                ),
                checkpointer=Checkpointer(
                    self.fs,
                    statedir.checkpoints,
                    self.name,
                    interval=self.checkpoint_interval,
                    loaded=(checkpoint.batch_id, after) if checkpoint is not None else None,
                    last_done=tracker.state.last_done,
                    clock=self.clock,
                ),
                dead_letter=self.dead_letter,
                blocks=generator,
                receivers=frozenset(receivers),
                listeners=self._listeners,
                decoders=self._decoders,
                clock=self.clock,
                stores=stores,
                changelogs=changelogs,
                source_topics=_source_topics(direct) if changelogs else None,
            )
            stop = self._stop
            assert stop is not None
            probe: EngineProbe | None = None
            if self.http is not None:
                server, probe = await self._serve_http(
                    self.http,
                    tracker,
                    scheduler,
                    direct,
                    receivers,
                    sinks,
                    generator,
                    data_wal,
                    stop,
                )
            observed = probe

            if self.group is not None:
                scheduler.tasks = set()

            async def work() -> None:
                if observed is not None:
                    observed.state = "recovering"
                await scheduler.recover()
                if observed is not None:
                    observed.state = "running"
                if self.group is not None:
                    await self._serve_group(
                        scheduler, direct, sinks, stop, duration, task_status, statedir
                    )
                elif generator is None:
                    task_status.started()
                    await scheduler.run(stop, duration=duration)
                else:
                    await self._serve_receivers(
                        scheduler, generator, receivers, duration=duration, task_status=task_status
                    )

            async def bounded() -> None:
                await _within_after(stop, self.stop_timeout, work)

            code = {h.name: c for h in self._handlers if (c := code_of(h.fn)) is not None}
            await watched(self.blocked_loop_warning, lambda: dict(scheduler.running), bounded, code)
            await scheduler.maybe_checkpoint(force=True)
            log.info("app %r stopped after batch %d", self.name, tracker.state.last_done)
        finally:
            with anyio.CancelScope(shield=True):
                if server is not None:
                    try:
                        await server.aclose()
                    except Exception:
                        log.exception("stopping the status page failed")
                    self.http_url = None
                for sink in reversed(opened_sinks):
                    try:
                        await sink.aclose()
                    except Exception:
                        log.exception("closing sink %s failed", sink.describe())
                for store in stores.values():
                    try:
                        await store.aclose()
                    except Exception:
                        log.exception("closing state store %s failed", store.path)
                for source in reversed(started_sources):
                    try:
                        await source.aclose()
                    except Exception:
                        log.exception("closing source %s failed", source.name)
                # Each close runs even when an earlier one raised: the tracker's
                # lock and the data WAL's must both be released.
                try:
                    if data_wal is not None:
                        await data_wal.aclose()
                finally:
                    await tracker.aclose()

    async def _serve_group(
        self,
        scheduler: BatchScheduler,
        direct: Mapping[str, DirectSource],
        sinks: Sequence[tuple[str, Sink]],
        stop: anyio.Event,
        duration: float | None,
        task_status: TaskStatus[None],
        statedir: StateDir,
    ) -> None:
        """Group mode: batches of the tasks the group gives this worker, until stopped."""
        from streamlet._group import GroupWorker
        from streamlet.kafka._group import GroupMember
        from streamlet.kafka.changelog import TaskStates
        from streamlet.kafka.direct import KafkaDirectSource

        kafka = [s for s in direct.values() if isinstance(s, KafkaDirectSource)]
        # Checked by _validate: a group, and every source a Kafka one.
        assert self.group is not None
        assert kafka
        config = kafka[0].config
        topics = _source_topics(direct)
        states = (
            TaskStates(
                directory=statedir.state,
                app=self.name,
                state_id=statedir.state_id,
                handlers={
                    h.name: (h.state, cast("ChangelogSink", h.sink), scheduler.changelogs[h.name])
                    for h in self._handlers
                    if h.state is not None
                },
            )
            if scheduler.changelogs
            else None
        )
        worker = GroupWorker(
            scheduler=scheduler,
            sources=direct,
            sinks=[sink for _, sink in sinks],
            topics=topics,
            revoke_budget=self.revoke_budget,
            retry=self.retry,
            group=self.group,
            worker=self.worker,
            states=states,
        )
        if self._probe is not None:
            self._probe.group = worker.status
        member = GroupMember(
            group=self.group,
            worker=self.worker,
            topics=topics.values(),
            bootstrap_servers=config.bootstrap_servers,
            consumer_config=config.consumer_config,
            revoked=worker.revoked,
            assigned=worker.assigned,
            failed=worker.failed,
            session_timeout=self.session_timeout,
            rebalance_timeout=self.revoke_budget + 5.0,
            warm=states.warm if states is not None else None,
        )
        scheduler.listeners.append(worker.on_batch)
        scheduler.fenced = worker.fenced
        log.info("joining group %r as worker %r", self.group, self.worker)
        try:
            async with anyio.create_task_group() as tg:

                async def follow_the_group() -> None:
                    await worker.run(member)
                    worker.stopped.set()

                async def until_stopped() -> None:
                    await worker.stopped.wait()
                    stop.set()

                tg.start_soon(follow_the_group)
                tg.start_soon(until_stopped)
                task_status.started()
                await scheduler.run(stop, duration=duration)
                tg.cancel_scope.cancel()
        finally:
            if states is not None:
                with anyio.CancelScope(shield=True):
                    await states.aclose()
        if worker.error is not None:
            raise worker.error

    async def _serve_http(
        self,
        address: tuple[str, int],
        tracker: Tracker,
        scheduler: BatchScheduler,
        direct: Mapping[str, DirectSource],
        receivers: Mapping[str, Receiver],
        sinks: Sequence[tuple[str, Sink]],
        generator: BlockGenerator | None,
        data_wal: WriteAheadLog | None,
        stop: anyio.Event,
    ) -> tuple[HttpServer, EngineProbe]:
        """Start the status page and metrics on ``address``; the monitor listens to batches."""
        # Imported here: prometheus_client and aiohttp load only when asked for.
        from streamlet.observe.monitor import Monitor
        from streamlet.observe.probe import EngineProbe
        from streamlet.observe.status import SinkStatus
        from streamlet.observe.web import HttpServer

        probe = EngineProbe(
            app=self.name,
            clock=self.clock,
            batch_interval=self.batch_interval,
            tracker=tracker,
            scheduler=scheduler,
            direct=direct,
            receivers=receivers,
            sinks=[SinkStatus(h, s.describe(), s.guarantee) for h, s in sinks],
            settings=self.settings(),
            blocks=generator,
            wals={"tracker": tracker.wal} | ({"data": data_wal} if data_wal is not None else {}),
            stop=stop,
            started=self.clock.monotonic(),
        )
        monitor = Monitor(self.name, self.clock, retained=self.retained_batches)
        monitor.probe = probe
        server = HttpServer(monitor, *address)
        await server.start()
        self.http_url = server.url
        scheduler.listeners.append(monitor.on_batch)
        self._probe = probe
        return server, probe

    async def _check_sinks_not_ahead(
        self, sinks: Sequence[tuple[str, Sink]], state: TrackerState
    ) -> None:
        """Refuse to start when a sink committed batches this state never allocated.

        That happens when the state directory was restored from a backup
        older than the sink's outputs (or its tracker log lost its tail):
        the next batches would get ids the sink already holds, and it would
        skip them as "already committed", dropping new input without a word.
        """
        allocated = state.next_batch_id - 1
        for handler, sink in sinks:
            committed = await sink.last_committed()
            problem = sink_ahead(handler, sink.describe(), committed, allocated, self.state_dir)
            if problem is not None:
                raise ConfigError(problem)

    async def _serve_receivers(
        self,
        scheduler: BatchScheduler,
        generator: BlockGenerator,
        receivers: dict[str, Receiver],
        *,
        duration: float | None,
        task_status: TaskStatus[None],
    ) -> None:
        """Run receivers and the block generator beside the scheduler.

        A graceful stop (like Spark's ``stopGracefully``) finishes what was
        received: receivers are told to stop and given
        ``receiver_stop_timeout`` to return, the open blocks are cut, and a
        last batch takes them, so nothing stored is left for a restart.
        """
        assert self._stop is not None
        stop = self._stop
        failure: list[BaseException] = []
        scheduler_error: Exception | None = None
        running = len(receivers)
        receivers_done = anyio.Event()

        async def run_receiver(name: str, receiver: Receiver) -> None:
            nonlocal running
            try:
                await receiver.run(generator.context(name))
            except Exception as exc:
                log.exception("receiver %r failed; the app stops", name)
                failure.append(exc)
                stop.set()
            finally:
                running -= 1
                if running == 0:
                    receivers_done.set()

        async def run_generator() -> None:
            try:
                await generator.run()
            except Exception as exc:
                log.exception("the block generator failed; the app stops")
                failure.append(exc)
                stop.set()

        async with anyio.create_task_group() as generator_group:
            generator_group.start_soon(run_generator)
            async with anyio.create_task_group() as receiver_group:
                for name, receiver in receivers.items():
                    receiver_group.start_soon(run_receiver, name, receiver)
                task_status.started()
                try:
                    await scheduler.run(stop, duration=duration)
                except Exception as exc:
                    # Raised below, outside the task groups, as itself.
                    scheduler_error = exc
                    failure.insert(0, exc)
                generator.stopping.set()
                with anyio.move_on_after(0 if failure else self.receiver_stop_timeout) as waited:
                    await receivers_done.wait()
                if waited.cancelled_caught and not failure:
                    log.warning(
                        "receivers did not stop within %.1f s; cancelling them",
                        self.receiver_stop_timeout,
                    )
                receiver_group.cancel_scope.cancel()
            if not failure:
                await generator.close()
            generator_group.cancel_scope.cancel()
        if scheduler_error is not None:
            raise scheduler_error
        if failure:
            error = failure[0]
            if isinstance(error, StreamletError):
                raise error
            raise StreamletError(f"a receiver failed: {error!r}") from error
        await scheduler.drain()

    def run(self, *, duration: float | None = None, signals: bool = True) -> None:
        """Run in a new event loop until stopped; for scripts and ``streamlet run``.

        With ``signals``, SIGINT/SIGTERM stop gracefully (the batch under way
        finishes and commits); a second signal stops at once, which is safe:
        the next start recovers whatever was in flight.
        """

        async def main() -> None:
            error: Exception | None = None
            async with anyio.create_task_group() as tg:
                if signals:
                    tg.start_soon(self._watch_signals, tg.cancel_scope)
                try:
                    await self.serve(duration=duration)
                except Exception as exc:
                    # Raised after the task group, so callers see the error
                    # itself rather than an ExceptionGroup around it.
                    error = exc
                tg.cancel_scope.cancel()
            if error is not None:
                raise error

        anyio.run(main)

    async def _watch_signals(self, scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
            count = 0
            async for signum in received:
                count += 1
                if count == 1:
                    log.warning(
                        "%s: stopping after the batch under way (send again to stop at once)",
                        signal.Signals(signum).name,
                    )
                    self.stop()
                else:
                    log.warning("%s again: stopping now", signal.Signals(signum).name)
                    scope.cancel()
                    return


def _source_topics(direct: Mapping[str, DirectSource]) -> dict[str, str]:
    """Source name → topic, for the app's Kafka sources."""
    from streamlet.kafka.direct import KafkaDirectSource

    return {n: s.config.topic for n, s in direct.items() if isinstance(s, KafkaDirectSource)}
