"""The writer side of the log: what the writer thread owns, and what it shares with the loop.

A :class:`~streamlet.wal.log.WriteAheadLog` has three kinds of state, and
each is a class here or there, so which thread may touch what is a class
boundary rather than a comment:

* :class:`SegmentWriter`: the open segment file and the calls that write,
  sync, roll and create segment files. Only a worker thread touches it: the
  recovery call while the log opens, then the writer thread (one at a time,
  under :attr:`SegmentWriter.lock`), then the closing call.
* :class:`WriteQueue`: what the event loop hands the writer thread (the
  queued :class:`Chunk` s and the signals between the two), guarded by its
  lock or thread-safe by construction.
* everything else, in ``WriteAheadLog``: the event loop's.

The writer thread writes group after group for as long as appends keep
coming and lingers a moment when they stop. A busy log thus pays no thread
hand-off per group: while one group is synced, the next one gathers in the
queue, and the writer takes it as soon as the sync returns. Completions go
back to the loop through ``call_soon_threadsafe``, in order.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable

from streamlet.fs import File, FileSystem
from streamlet.metrics import LatencyHistogram
from streamlet.wal._reader import corruption_error, inspect_log
from streamlet.wal._segments import create_segment
from streamlet.wal.format import SEGMENT_HEADER_SIZE, SEGMENT_SUFFIX, TEMP_SUFFIX

__all__ = ["Chunk", "Durability", "SegmentWriter", "WriteQueue"]

logger = logging.getLogger(__name__)

_SLOW_SYNC = 1.0  # seconds; an fsync slower than this is logged (the disk is struggling)
_WRITER_LINGER = 1.0  # seconds the writer thread waits for more appends before it returns


class Durability(enum.StrEnum):
    """When an append counts as done."""

    ALWAYS = "always"
    """Acknowledge after the fsync: nothing acknowledged is lost, even by a power cut."""
    INTERVAL = "interval"
    """Acknowledge after the write; fsync at most every ``sync_interval`` seconds.

    A process crash loses nothing (the page cache survives it); a machine
    crash or power cut loses up to ``sync_interval`` seconds of appends."""
    NONE = "none"
    """Acknowledge after the write and never fsync records: for benchmarks and tests only.

    Segment creation and ``aclose`` still sync, so the log's structure stays
    sound; a machine crash can lose any amount of recent appends."""


class Chunk:
    """Frames queued for one segment, at a place fixed when they were queued, and their waiters.

    The appends queued while the writer thread is busy share one chunk (see
    "the open chunk" in :class:`~streamlet.wal.log.WriteAheadLog`).
    """

    __slots__ = ("futures", "nbytes", "offset", "pieces", "segment")

    def __init__(self, segment: int, offset: int) -> None:
        self.segment = segment
        self.offset = offset
        self.nbytes = 0  # grows while the chunk is open
        self.pieces: list[bytes] = []  # whose join is the frames; immutable bytes only
        # Set once the frames are durable (or the log failed): one per call,
        # so that cancelling one caller cancels its own future only.
        self.futures: list[asyncio.Future[None]] = []

    def fail(self, error: Callable[[], BaseException]) -> None:
        """Tell this chunk's callers that still wait that it failed."""
        for future in self.futures:
            if not future.done():
                future.set_exception(error())


class WriteQueue:
    """What the event loop and the writer thread share.

    ``chunks`` and ``open`` are guarded by ``lock``: the loop appends chunks
    and adds frames to the open one, the writer pops chunks (the open one
    included: it is then closed), and the loop empties the queue once the
    writer has stopped (:meth:`drain`). ``lock`` is held for a few steps of
    Python only, never across I/O; uncontended, it costs a fraction of a
    microsecond. The rest are thread-safe primitives or flags set once.
    """

    __slots__ = ("_work", "chunks", "finish", "lock", "open", "stop")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.chunks: collections.deque[Chunk] = collections.deque()
        self.open: Chunk | None = None
        """The last queued chunk while the writer has not taken it: later appends join it."""
        self.stop = threading.Event()
        """Set when the writer must stop at once: the log is closing or its flusher is gone."""
        self.finish = False
        """Set by the loop when no more appends will come: the writer returns once idle."""
        # Wakes the writer thread. A bare lock used as a binary semaphore:
        # held = no news; the loop releases it when it queues work, the writer
        # blocks acquiring it. Cheaper both ways than threading.Event, whose
        # Python-level condition variable costs microseconds per append.
        self._work = threading.Lock()
        self._work.acquire()

    def wake_writer(self) -> None:
        """Release the writer thread's wait (a no-op if it was released already)."""
        work = self._work
        if work.locked():
            with contextlib.suppress(RuntimeError):  # released meanwhile: as good
                work.release()

    def wait_for_work(self, timeout: float) -> None:
        """Writer thread: wait up to ``timeout`` seconds, or less if work was queued."""
        self._work.acquire(timeout=timeout)

    def take_group(self, max_bytes: int) -> list[Chunk]:
        """Writer thread: the chunks to write next, at least one unless the queue was emptied."""
        queue = self.chunks
        with self.lock:
            if not queue:  # by a cancelled flusher, since the writer looked
                return []
            group = [queue.popleft()]
            size = group[0].nbytes
            while queue and size + queue[0].nbytes <= max_bytes:
                chunk = queue.popleft()
                group.append(chunk)
                size += chunk.nbytes
            if group[-1] is self.open:  # the open chunk is the last queued
                self.open = None  # taken: closed to later appends
        return group

    def drain(self) -> list[Chunk]:
        """Empty the queue, returning what it held: the writer will not write it."""
        with self.lock:
            waiting = list(self.chunks)
            self.chunks.clear()
            self.open = None
        return waiting


Written = Callable[[list[Chunk], int, int], None]
"""Called on the loop when a group is written: ``(group, segment, size)``."""
Failed = Callable[[BaseException, Iterable[Chunk]], None]
"""Called on the loop when writing failed: ``(error, the group that was being written)``."""


class SegmentWriter:
    """The writer thread's state: the segment appends go to, and every change to segment files.

    Worker threads only, one at a time (:attr:`lock`); the event loop never
    touches it, and learns what was written through the ``written`` and
    ``failed`` callbacks posted to it.
    """

    def __init__(
        self,
        fs: FileSystem,
        directory: str,
        queue: WriteQueue,
        loop: asyncio.AbstractEventLoop,
        *,
        durability: Durability,
        sync_interval: float,
        max_group_bytes: int,
        written: Written,
        failed: Failed,
    ) -> None:
        self._fs = fs
        self._directory = directory
        self._queue = queue
        self._loop = loop
        self._durability = durability
        self._sync_interval = sync_interval
        self._max_group_bytes = max_group_bytes
        self._written = written
        self._failed = failed
        self.lock = threading.Lock()
        """Held while a thread runs the writer (a thread abandoned by a cancelled flusher too)."""
        self.file: File | None = None
        self.seq = 0
        """The segment appends go to."""
        self.size = 0
        """Its size: where the next frame goes."""
        self._dirty = False  # written but not synced (interval durability)
        self._last_sync = time.monotonic()
        self.fsyncs = LatencyHistogram()
        """How long each fdatasync took (read by the monitor from any thread)."""
        self.appended_bytes = 0
        """Bytes of frames written since the log was opened."""

    # ---- recovery --------------------------------------------------------

    def recover(self) -> int:
        """Bring the segment files to a state appends can continue from; return the first seq.

        Deletes leftover temp files, refuses corruption, cuts a torn tail off
        the last segment durably, and opens the last segment (creating segment
        1 in an empty directory).
        """
        fs, directory = self._fs, self._directory
        temps = [n for n in fs.listdir(directory) if n.endswith(SEGMENT_SUFFIX + TEMP_SUFFIX)]
        for name in temps:
            # A crash between creating and renaming a segment; it holds no records.
            fs.remove(os.path.join(directory, name))
        if temps:
            fs.sync_dir(directory)
        found = inspect_log(fs, directory, scan_all=False)
        if found.problem is not None:
            raise corruption_error(found.problem, directory)
        if found.torn_tail is not None:
            torn = found.torn_tail
            file = fs.open(torn.path, writable=True)
            try:
                file.truncate(torn.offset)
                file.sync()
            finally:
                file.close()
            logger.warning(
                "%s: dropped a torn tail of %d bytes at offset %d (%s); this is the "
                "unfinished last write of a crash, and nothing before it was lost",
                torn.path,
                torn.dropped,
                torn.offset,
                torn.reason,
            )
        if found.segments:
            last = found.segments[-1]
            self.seq = last.seq
            self.file = fs.open(last.path, writable=True)
            self.size = self.file.size()
            return found.segments[0].seq
        self.seq = 1
        self.file = self._create_segment(1)
        self.size = SEGMENT_HEADER_SIZE
        return 1

    def _create_segment(self, seq: int) -> File:
        """Create segment ``seq`` durably (temp, header, sync, rename, sync dir); open it."""
        path = create_segment(self._fs, self._directory, seq)
        return self._fs.open(path, writable=True)

    # ---- the write loop ----------------------------------------------------

    def run(self) -> None:
        """Write queued groups until idle for a while, closed or failed."""
        with self.lock:
            queue = self._queue
            chunks = queue.chunks
            idle_since = time.monotonic()
            while not queue.stop.is_set():
                # The last group stays referenced until the next one is taken:
                # dropping it (a large append_many's buffer) as soon as it was
                # written made back-to-back large append_many calls a fifth
                # slower (benchmarks.wal, blocks), an effect of when the
                # memory goes back to the allocator.
                if chunks and (group := queue.take_group(self._max_group_bytes)):
                    try:
                        self._write_group(group)
                    except Exception as exc:
                        self._post(self._failed, exc, group)
                        return
                    self._post(self._written, group, self.seq, self.size)
                    idle_since = time.monotonic()
                    continue
                if queue.finish:
                    return
                now = time.monotonic()
                if self._dirty:  # interval durability: sync when the interval is up
                    timeout = self._last_sync + self._sync_interval - now
                    if timeout <= 0:
                        try:
                            self.sync()
                        except Exception as exc:
                            self._post(self._failed, exc, ())
                            return
                        continue
                else:
                    timeout = idle_since + _WRITER_LINGER - now
                    if timeout <= 0:
                        return
                # Returns at once if work was queued since the last wait.
                queue.wait_for_work(timeout)

    def _post(self, callback: Callable[..., None], *args: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            self._loop.call_soon_threadsafe(callback, *args)

    def _write_group(self, group: list[Chunk]) -> None:
        if len(group) == 1 and group[0].segment == self.seq:
            self._write_chunk(group[0])  # e.g. one large append_many: no copy of its pieces
            return
        pieces: list[bytes] = []
        size = self.size
        for chunk in group:
            if chunk.segment != self.seq:
                self._write_pieces(pieces)
                pieces = []
                self._roll_to(chunk.segment)
                size = self.size
            if chunk.offset != size:
                raise AssertionError(
                    f"internal error: frames queued for offset {chunk.offset} of segment "
                    f"{chunk.segment} would land at {size}"
                )
            pieces += chunk.pieces
            size += chunk.nbytes
        self._write_pieces(pieces)
        self._sync_per_policy()

    def _write_chunk(self, chunk: Chunk) -> None:
        if chunk.offset != self.size:
            raise AssertionError(
                f"internal error: frames queued for offset {chunk.offset} of segment "
                f"{chunk.segment} would land at {self.size}"
            )
        self._write_pieces(chunk.pieces)
        self._sync_per_policy()

    def _sync_per_policy(self) -> None:
        durability = self._durability
        if durability is Durability.ALWAYS or (
            durability is Durability.INTERVAL
            and time.monotonic() - self._last_sync >= self._sync_interval
        ):
            self.sync()
        elif durability is Durability.INTERVAL:
            self._dirty = True

    def _write_pieces(self, pieces: list[bytes]) -> None:
        if not pieces:
            return
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if not data:
            return
        assert self.file is not None
        self.file.append(data)
        self.size += len(data)
        self.appended_bytes += len(data)

    def sync(self) -> None:
        """fdatasync the open segment, warning when the disk is slow."""
        assert self.file is not None
        started = time.monotonic()
        self.file.sync()
        self._dirty = False
        self._last_sync = finished = time.monotonic()
        took = finished - started
        self.fsyncs.observe(took)
        if took > _SLOW_SYNC:
            logger.warning(
                "fsync of %s took %.2fs; the disk is slow or overloaded, and every "
                "append waits for it",
                self.file.path,
                took,
            )

    def _roll_to(self, seq: int) -> None:
        """Seal the current segment (sync, close) and make ``seq`` the current one."""
        if seq != self.seq + 1:
            raise AssertionError(f"internal error: roll from segment {self.seq} to {seq}")
        assert self.file is not None
        # Sealed segments are complete on disk before a later one exists:
        # recovery tolerates a torn tail in the last segment only.
        self.sync()
        self.file.close()
        self.file = None
        self.file = self._create_segment(seq)
        self.seq = seq
        self.size = SEGMENT_HEADER_SIZE

    # ---- closing ---------------------------------------------------------

    def close(self, *, sync: bool) -> None:
        """Sync (if asked) and close the open segment.

        Waits for a writer thread abandoned by a cancelled flusher to stop
        touching the file first (the caller has set ``queue.stop``).
        """
        with self.lock:
            try:
                if sync and self.file is not None:
                    self.sync()
            finally:
                if self.file is not None:
                    self.file.close()
                    self.file = None
