"""Fault hooks for crash and chaos tests, switched on by environment variables.

In production none of the variables is set (nor the in-process crash hook
below) and each hook costs a lookup or two. They let a test make a real
worker process (``streamlet run``) misbehave without changing its code:

``STREAMLET_CRASH_AT=<point>[:<batch id>]``
    SIGKILL this process when it reaches that point of the commit protocol
    (for that batch, or for the first batch that gets there). Points, in
    protocol order: ``after_allocate``, ``after_handler``,
    ``after_sink_commit``, ``after_state_commit`` (apps with keyed state),
    ``before_done``, ``after_done``.

``STREAMLET_CRASH_AT=<point>[:<n>]``, receivers' points
    The same on the way from a receiver's store to its acknowledgement
    (:data:`RECEIVER_POINTS`); ``n`` counts the times this process reached
    the point (default: the first):

    * ``block_before_tracker_event``: the block generator's ``n``-th cut
      has appended its blocks to the data WAL (durable), and the tracker's
      ``block`` events are not written. Other tasks run for
      :data:`CRASH_PAUSE` seconds first, as they do while the tracker's
      fsync is in flight: whatever a receiver was told by then, it has
      acted on (acknowledged to its sender, committed to its Kafka group).
    * ``block_after_tracker_event``: the ``n``-th cut's blocks are durable
      in the data WAL and in the tracker, and no store is completed yet
      (no receiver was told).
    * ``receiver_after_group_commit``: a Kafka receiver's ``n``-th commit
      of its consumer group's offsets has returned.

In process, :func:`crash_in_process` (behind the test kit's
:meth:`streamlet.testing.AppHarness.crash_at`) makes a crash point of either
list raise :class:`SimulatedCrash` where the variable would kill (without
the pause of ``block_before_tracker_event``): the app unwinds with no later
step of the protocol running, and the test starts it again in the same
process. The variable works as above whether or not a hook is set.

``STREAMLET_FAULT_FS=<fault>[;<fault>...]``
    The file layer that :class:`~streamlet.app.App` and
    :class:`~streamlet.sinks.file.FileSink` use by default
    (:func:`file_system`) injects I/O faults into the files whose absolute
    path matches a glob (``fnmatch``; ``*`` also matches ``/``):

    * ``fsync_eio:<glob>:<n>``: the first ``n`` fsyncs of matching files and
      directories succeed; every later one fails with EIO (a disk that broke).
    * ``enospc:<glob>:<bytes>``: writes to matching files fail with ENOSPC
      once ``bytes`` bytes were written to them (the write that crosses the
      limit writes what fits first, as a full disk does), and so does
      creating a matching file after that.
    * ``slow_fsync:<ms>[:<glob>]``: every fsync of a matching file or
      directory (all of them without a glob) takes ``ms`` milliseconds longer.

    Counts are per process: a restarted worker starts them afresh.

``STREAMLET_FAULT_CLOCK=<seconds>@<after>[;<seconds>@<after>...]``
    The wall clock (``time.time``) jumps by ``seconds`` (negative: back)
    ``after`` seconds after the worker starts (``streamlet run`` installs it
    with :func:`install_clock`; nothing does at import); jumps add up. The
    monotonic clock is left alone, as the kernel leaves it when the system
    time is set. Used to check that nothing durable depends on wall time.
"""

from __future__ import annotations

import errno
import fnmatch
import functools
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from streamlet.errors import ConfigError
from streamlet.fs import File, FileSystem, OsFileSystem

__all__ = [
    "CLOCK_ENV",
    "CRASH_PAUSE",
    "ENV",
    "FS_ENV",
    "POINTS",
    "RECEIVER_POINTS",
    "CrashHook",
    "FaultyFileSystem",
    "FsFault",
    "SimulatedCrash",
    "check_environment",
    "crash_due",
    "crash_in_process",
    "crash_point",
    "file_system",
    "install_clock",
    "parse_fs_faults",
]

ENV = "STREAMLET_CRASH_AT"
FS_ENV = "STREAMLET_FAULT_FS"
CLOCK_ENV = "STREAMLET_FAULT_CLOCK"
POINTS = (
    "after_allocate",
    "after_handler",
    "after_sink_commit",
    "after_state_commit",
    "before_done",
    "after_done",
)
RECEIVER_POINTS = (
    "block_before_tracker_event",
    "block_after_tracker_event",
    "receiver_after_group_commit",
)
#: Seconds other tasks run at ``block_before_tracker_event`` before the kill.
CRASH_PAUSE = 1.0
FS_FAULTS = ("fsync_eio", "enospc", "slow_fsync")


def _parse(value: str | None) -> tuple[str, int | None] | None:
    if not value:
        return None
    point, _, batch = value.partition(":")
    if point not in POINTS + RECEIVER_POINTS or (batch and not batch.isdigit()):
        known = ", ".join(POINTS + RECEIVER_POINTS)
        raise ConfigError(f"{ENV}={value!r} is not <point>[:<batch id>]; known points: {known}")
    if point in RECEIVER_POINTS and not batch:
        batch = "1"
    return point, int(batch) if batch else None


@functools.cache
def _target() -> tuple[str, int | None] | None:
    # Read once, on first use: importing this module has no effect.
    return _parse(os.environ.get(ENV))


def check_environment() -> None:
    """Fail early on a malformed fault variable (the app calls it as it starts).

    Raises:
        ConfigError: ``STREAMLET_CRASH_AT`` or ``STREAMLET_FAULT_FS`` is not understood.
    """
    _target()
    spec = os.environ.get(FS_ENV)
    if spec:
        parse_fs_faults(spec)


def crash_due(point: str, batch_id: int) -> bool:
    """Whether the environment asked for a crash at ``point`` for this batch id (or count)."""
    target = _target()
    if target is None:
        return False
    name, batch = target
    return name == point and (batch is None or batch == batch_id)


class SimulatedCrash(BaseException):
    """The app "died" at a crash point: raised by an in-process crash hook instead of SIGKILL.

    A ``BaseException``, as :class:`~streamlet.testing.faultfs.PowerCut` is,
    so that no ``except Exception`` of the engine takes it for a failure to
    retry, log or dead-letter: it unwinds the app the way a kill ends it.

    Attributes:
        point: the crash point (one of :data:`POINTS`).
        batch_id: the batch that reached it.
    """

    def __init__(self, point: str, batch_id: int) -> None:
        super().__init__(f"simulated crash at {point} of batch {batch_id}")
        self.point = point
        self.batch_id = batch_id


CrashHook = Callable[[str, int], bool]
"""``hook(point, batch_id)``: True to crash there (see :func:`crash_in_process`)."""

# A context variable, not a module global: tasks started inside the block
# inherit it, and two tests on one event loop do not see each other's hook.
_crash_hook: ContextVar[CrashHook | None] = ContextVar("streamlet_crash_hook", default=None)


@contextmanager
def crash_in_process(hook: CrashHook) -> Iterator[None]:
    """Within the block, a crash point for which ``hook`` says True raises :class:`SimulatedCrash`.

    Tasks started inside the block (an app served there) inherit the hook.
    The hook is asked before the environment variable; it runs on the event
    loop at each crash point, so it must be quick and must not raise.
    """
    token = _crash_hook.set(hook)
    try:
        yield
    finally:
        _crash_hook.reset(token)


def crash_point(point: str, batch_id: int) -> None:
    """Crash here if asked: raise SimulatedCrash for an in-process hook, or SIGKILL this process.

    Raises:
        SimulatedCrash: a hook set by :func:`crash_in_process` asked for it.
    """
    hook = _crash_hook.get()
    if hook is not None and hook(point, batch_id):
        raise SimulatedCrash(point, batch_id)
    if crash_due(point, batch_id):
        os.kill(os.getpid(), signal.SIGKILL)


# -- file system faults ----------------------------------------------------------


@dataclass(slots=True)
class FsFault:
    """One injected I/O fault; see the module docstring for the kinds.

    Attributes:
        kind: ``"fsync_eio"``, ``"enospc"`` or ``"slow_fsync"``.
        pattern: glob over absolute paths the fault applies to.
        amount: syncs that succeed (fsync_eio), bytes that fit (enospc) or
            the added delay in milliseconds (slow_fsync).
        used: syncs or bytes counted so far in this process.
    """

    kind: str
    pattern: str
    amount: int
    used: int = field(default=0)

    def matches(self, path: str) -> bool:
        return fnmatch.fnmatchcase(path, self.pattern)


def _parse_fs_fault(part: str) -> FsFault:
    kind, _, rest = part.partition(":")
    if kind == "slow_fsync":
        ms, _, pattern = rest.partition(":")
        return FsFault(kind, pattern or "*", int(ms))
    if kind not in FS_FAULTS:
        raise ValueError(f"unknown fault {kind!r}")
    pattern, _, amount = rest.rpartition(":")
    if not pattern:
        raise ValueError("no glob")
    return FsFault(kind, pattern, int(amount))


def parse_fs_faults(spec: str) -> list[FsFault]:
    """Parse a ``STREAMLET_FAULT_FS`` value.

    Raises:
        ConfigError: naming the part that is not a fault.
    """
    faults: list[FsFault] = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        try:
            faults.append(_parse_fs_fault(part))
        except ValueError as exc:
            raise ConfigError(
                f"{FS_ENV}: {part!r} is not a fault ({exc}); use fsync_eio:<glob>:<n>,"
                " enospc:<glob>:<bytes> or slow_fsync:<ms>[:<glob>]"
            ) from None
    return faults


class _FaultyFile:
    """A :class:`File` whose appends and syncs go through the fault rules."""

    __slots__ = ("_fs", "_inner")

    def __init__(self, inner: File, fs: FaultyFileSystem) -> None:
        self._inner = inner
        self._fs = fs

    @property
    def path(self) -> str:
        return self._inner.path

    def append(self, data: bytes) -> None:
        fits = self._fs.room(self._inner.path, len(data))
        if fits < len(data):
            if fits > 0:
                self._inner.append(data[:fits])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._inner.path)
        self._inner.append(data)

    def read(self, offset: int, size: int) -> bytes:
        return self._inner.read(offset, size)

    def size(self) -> int:
        return self._inner.size()

    def sync(self) -> None:
        self._fs.before_sync(self._inner.path)
        self._inner.sync()

    def truncate(self, size: int) -> None:
        self._inner.truncate(size)

    def close(self) -> None:
        self._inner.close()


class FaultyFileSystem(OsFileSystem):
    """The real file system with :class:`FsFault` rules applied; thread-safe.

    A subclass of :class:`OsFileSystem`, so everything that treats the real
    file system specially (directory locks, permission checks) still does.
    """

    def __init__(self, faults: list[FsFault], *, sleep: Callable[[float], None] = time.sleep):
        self.faults = faults
        self._sleep = sleep
        self._lock = threading.Lock()

    def room(self, path: str, size: int) -> int:
        """How many of ``size`` bytes may be written to ``path`` (counting them)."""
        path = os.path.abspath(path)
        fits = size
        with self._lock:
            for fault in self.faults:
                if fault.kind == "enospc" and fault.matches(path):
                    fits = min(fits, max(0, fault.amount - fault.used))
            for fault in self.faults:
                if fault.kind == "enospc" and fault.matches(path):
                    fault.used += fits
        return fits

    def before_sync(self, path: str) -> None:
        """Delay or fail an fsync of ``path`` as the rules say."""
        path = os.path.abspath(path)
        delay = 0.0
        failed = False
        with self._lock:
            for fault in self.faults:
                if not fault.matches(path):
                    continue
                if fault.kind == "slow_fsync":
                    delay += fault.amount / 1000
                elif fault.kind == "fsync_eio":
                    fault.used += 1
                    failed = failed or fault.used > fault.amount
        if delay:
            self._sleep(delay)
        if failed:
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)

    def create(self, path: str) -> File:
        full = os.path.abspath(path)
        with self._lock:
            full_disk = any(
                f.kind == "enospc" and f.used >= f.amount and f.matches(full) for f in self.faults
            )
        if full_disk:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return _FaultyFile(super().create(path), self)

    def open(self, path: str, *, writable: bool = False) -> File:
        file = super().open(path, writable=writable)
        return _FaultyFile(file, self) if writable else file

    def sync_dir(self, path: str) -> None:
        self.before_sync(path)
        super().sync_dir(path)


def file_system() -> FileSystem:
    """The default file layer: the real one, or a :class:`FaultyFileSystem` if asked.

    Raises:
        ConfigError: ``STREAMLET_FAULT_FS`` is set but not understood.
    """
    spec = os.environ.get(FS_ENV)
    if not spec:
        return OsFileSystem()
    return FaultyFileSystem(parse_fs_faults(spec))


# -- wall clock jumps ---------------------------------------------------------------


def _parse_clock(value: str) -> list[tuple[float, float]]:
    jumps: list[tuple[float, float]] = []
    for part in filter(None, (p.strip() for p in value.split(";"))):
        offset, at, after = part.partition("@")
        try:
            jumps.append((float(after) if at else 0.0, float(offset)))
        except ValueError:
            raise ConfigError(
                f"{CLOCK_ENV}: {part!r} is not a jump; use <seconds>@<after seconds>"
            ) from None
    return sorted(jumps)


def install_clock() -> bool:
    """Make ``time.time`` jump as ``STREAMLET_FAULT_CLOCK`` says; False when it is not set.

    Called by ``streamlet run`` only: jumps are counted from this call, and
    nothing replaces ``time.time`` unless a worker is started with the
    variable set.

    Raises:
        ConfigError: the variable is not understood.
    """
    value = os.environ.get(CLOCK_ENV)
    if not value:
        return False
    jumps = _parse_clock(value)
    real_time = time.time
    origin = time.monotonic()

    def skewed() -> float:
        elapsed = time.monotonic() - origin
        return real_time() + sum(offset for after, offset in jumps if elapsed >= after)

    time.time = skewed
    return True
