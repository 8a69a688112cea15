"""The write-ahead log: durable, ordered, group-committed appends of byte records.

Receivers' blocks and the block tracker's events go through a
:class:`WriteAheadLog` before anything downstream is told about them. Its job
is to say "this record is on disk" only when it is (per the durability
policy), to hand every such record back byte for byte after a crash, and to
stop loudly, never silently, when the disk misbehaves. The byte format is
specified in :mod:`streamlet.wal.format`.

This module is the log's face: the API, the event loop's side of group
commit (where each append goes, its future), and reads. The writer thread's
side is :mod:`streamlet.wal._writer`, every frame is read back through
:mod:`streamlet.wal._reader`, and the files of a log directory are made and
locked by :mod:`streamlet.wal._segments`.

Invariants:

* Records are written in the order ``append`` / ``append_many`` were called,
  and a record's :class:`Position` is fixed when it is queued: the roll
  decision depends only on the sizes queued before it.
* Nothing is acknowledged before the write (and, with
  :attr:`Durability.ALWAYS`, the fsync) that holds it returned.
* Only the writer thread changes the segment files (started by the flusher
  task through ``anyio.to_thread``, one at a time); the event loop never
  blocks on the disk. What that thread owns is a class of its own
  (:class:`~streamlet.wal._writer.SegmentWriter`), and what it shares with
  the loop another (:class:`~streamlet.wal._writer.WriteQueue`).
* Every segment but the last is complete and synced: a segment is synced
  before the next one is created, and a torn tail is tolerated in the last
  segment only.
* After a failed write or fsync the log appends nothing more (an fsync error
  leaves the file's contents unknown); the process must restart and recover
  from disk.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import math
import operator
import os
import time
from array import array
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import NamedTuple, TypeVar, cast, overload

import anyio
import anyio.to_thread

from streamlet.errors import (
    ConfigError,
    RecordTooLargeError,
    WALClosedError,
    WALError,
    WALFailedError,
)
from streamlet.fs import File, FileSystem, OsFileSystem
from streamlet.metrics import LatencyHistogram
from streamlet.wal._reader import (
    EndKind,
    Inspection,
    Problem,
    SegmentReader,
    SegmentSummary,
    TornTail,
    corruption_error,
    inspect_log,
)
from streamlet.wal._segments import LOCK_NAME, is_locked, lock_directory
from streamlet.wal._writer import Chunk, Durability, SegmentWriter, WriteQueue
from streamlet.wal.format import (
    FRAME_HEADER_SIZE,
    MAX_RECORD_SIZE_LIMIT,
    SEGMENT_HEADER_SIZE,
    FrameFault,
    check_frame,
    encode_frames,
    encode_frames_joined,
    frame_header,
    segment_name,
)

__all__ = [
    "LOCK_NAME",
    "Durability",
    "Inspection",
    "Position",
    "Problem",
    "SegmentSummary",
    "TornTail",
    "WalStats",
    "WriteAheadLog",
    "corruption_error",
    "inspect_log",
    "is_locked",
    "lock_directory",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WalStats:
    """What a log did since it was opened (:meth:`WriteAheadLog.stats`).

    Attributes:
        segments: segment files on disk now.
        appended_bytes: bytes of frames written.
        fsync: the writer thread's fdatasync calls (one per group commit).
        append: appends as their callers saw them, from the call until durable.
    """

    segments: int
    appended_bytes: int
    fsync: LatencyHistogram
    append: LatencyHistogram


class Position(NamedTuple):
    """Where a record is in the log; positions order like the records do."""

    segment: int
    """The seq of the segment file holding the record."""
    offset: int
    """Byte offset of the record's frame in that file."""
    length: int
    """The record's payload length in bytes."""


_new_position = cast(
    Callable[[tuple[int, int, int]], Position], functools.partial(tuple.__new__, Position)
)
"""``Position`` from a tuple, skipping the Python-level ``__new__`` (hot path of ``append``)."""


class _Reader:
    """A cached read handle of one segment, with a count of reads using it."""

    __slots__ = ("file", "retired", "users")

    def __init__(self, file: File) -> None:
        self.file = file
        self.users = 0
        self.retired = False


_T = TypeVar("_T")


async def _in_thread(func: Callable[[], _T], *, abandoned: Callable[[_T | None], object]) -> _T:
    """``func()`` in a worker thread, finishing even if the caller is cancelled.

    A thread cannot be stopped, and anyio gives up waiting for it when the
    calling task is cancelled; whatever the thread then opens or locks would
    leak. Here the thread call runs in a task of its own, and if the caller
    is cancelled, ``abandoned`` is called once the thread is done, with the
    result (None if ``func`` raised), to release it. It runs on the event
    loop and must be quick.
    """
    task = asyncio.get_running_loop().create_task(anyio.to_thread.run_sync(func))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:

        def release(done: asyncio.Task[_T]) -> None:
            if not done.cancelled():
                abandoned(None if done.exception() is not None else done.result())

        task.add_done_callback(release)
        raise


def _close_if_opened(file: File | None) -> None:
    if file is not None:
        file.close()


def _frame_offsets(start: int, lengths: Iterable[int]) -> Iterator[int]:
    """Offsets of frames written back to back from ``start`` (one more: where the last ends)."""
    return itertools.accumulate(
        map(operator.add, lengths, itertools.repeat(FRAME_HEADER_SIZE)), initial=start
    )


class _Positions(Sequence[Position]):
    """The positions of records written back to back, each made when asked for.

    :meth:`WriteAheadLog.append_many` returns one: a block of 200,000 records
    would otherwise cost 200,000 tuples before the call could return, on the
    event loop. Indexing, slicing, iterating and ``len`` work as on a list,
    and it compares equal to any sequence holding the same positions.
    """

    __slots__ = ("_lengths", "_offsets", "_segment", "_start", "_stride")

    def __init__(self, segment: int, start: int, lengths: list[int], uniform: bool) -> None:
        self._segment = segment
        self._start = start
        self._lengths = lengths
        # Records of equal length sit at start + i * stride; other offsets are
        # summed up on the first random access.
        self._stride = FRAME_HEADER_SIZE + lengths[0] if uniform else 0
        self._offsets: array[int] | None = None

    def __len__(self) -> int:
        return len(self._lengths)

    @overload
    def __getitem__(self, index: int) -> Position: ...

    @overload
    def __getitem__(self, index: slice) -> list[Position]: ...

    def __getitem__(self, index: int | slice) -> Position | list[Position]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self._lengths)))]
        length = self._lengths[index]  # raises IndexError as a list would
        if index < 0:
            index += len(self._lengths)
        if self._stride:
            return Position(self._segment, self._start + index * self._stride, length)
        if self._offsets is None:
            self._offsets = array("q", _frame_offsets(self._start, self._lengths))
        return Position(self._segment, self._offsets[index], length)

    def __iter__(self) -> Iterator[Position]:
        offsets: Iterable[int]
        if self._stride:
            offsets = itertools.count(self._start, self._stride)
        else:
            offsets = self._offsets or _frame_offsets(self._start, self._lengths)
        # tuple.__new__ through map: no Python-level call per position.
        fields = zip(itertools.repeat(self._segment), offsets, self._lengths, strict=False)
        return cast(Iterator[Position], map(tuple.__new__, itertools.repeat(Position), fields))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str | bytes | bytearray):
            return NotImplemented
        return len(other) == len(self._lengths) and all(map(operator.eq, self, other))

    __hash__ = None  # type: ignore[assignment]  # equal to lists, so unhashable like them

    def __repr__(self) -> str:
        return repr(list(self))


class WriteAheadLog:
    """An append-only log of byte records in a directory of segment files.

    Open with :meth:`open` (or ``async with await WriteAheadLog.open(...)``).
    Appends from any number of tasks are gathered into groups (group commit):
    the writer thread writes a group with one write and one fsync (plus the
    sync of a segment it fills up), and meanwhile the next group gathers, so
    many appends share one fsync. See the module docstring for the invariants.

    The open chunk: the last queued :class:`~streamlet.wal._writer.Chunk`
    stays open while the writer thread has not taken it, and later appends
    add their frames to it instead of queueing chunks of their own. So the
    appends that gather while a group is synced (typically every task woken
    by the previous group's acknowledgement) make one queue entry, and the
    writer thread, which holds the GIL (and so blocks the event loop) for
    every step of Python it takes, handles one chunk per group instead of one
    per append. The open chunk always ends at the tail of the log: every
    reservation goes into it, or closes it first. ``_queue.lock`` guards the
    queue and the open chunk.
    """

    def __init__(
        self,
        directory: str,
        fs: FileSystem,
        durability: Durability,
        sync_interval: float,
        segment_size: int,
        max_record_size: int,
        max_group_bytes: int,
    ) -> None:
        """Use :meth:`open`, which validates settings and recovers the log."""
        self._directory = directory
        self._fs = fs
        self._durability = durability
        self._segment_size = segment_size
        self._max_record_size = max_record_size
        self._max_group_bytes = max_group_bytes
        self._lock_fd: int | None = None
        self._loop = asyncio.get_running_loop()
        # Shared with the writer thread.
        self._queue = WriteQueue()
        # Owned by worker threads: the recovery call, then the writer thread.
        self._writer = SegmentWriter(
            fs,
            directory,
            self._queue,
            self._loop,
            durability=durability,
            sync_interval=sync_interval,
            max_group_bytes=max_group_bytes,
            written=self._written,
            failed=self._fail,
        )
        # Event-loop state.
        self._tail_seq = 0  # where the next queued frame goes (changed with _queue.lock held)
        self._tail_size = 0
        self._written_seq = 0  # how far completed writes reach
        self._written_size = 0
        self._first = 0
        self._appends = LatencyHistogram()  # call → durable, per append call
        self._wakeup = asyncio.Event()  # wakes the flusher task
        self._flusher: asyncio.Task[None] | None = None
        self._writing = False  # a writer thread call is under way
        self._limiter = anyio.CapacityLimiter(1)  # the writer never waits for others' threads
        self._failed: BaseException | None = None
        self._closing = False
        self._close_task: asyncio.Task[BaseException | None] | None = None
        self._readers: dict[int, _Reader] = {}
        self._reader_lock = asyncio.Lock()
        self._clean_lock = asyncio.Lock()

    # ---- opening -------------------------------------------------------

    @classmethod
    async def open(
        cls,
        directory: str | os.PathLike[str],
        *,
        durability: Durability | str = "always",
        sync_interval: float = 0.05,
        segment_size: int = 64 * 2**20,
        max_record_size: int = 16 * 2**20,
        max_group_bytes: int = 8 * 2**20,
        fs: FileSystem | None = None,
    ) -> WriteAheadLog:
        """Open (creating if needed) the log in ``directory`` and recover it.

        Args:
            directory: the log's own directory; created with mode 0700.
            durability: when appends are acknowledged (see :class:`Durability`).
            sync_interval: seconds between fsyncs with ``"interval"`` durability.
            segment_size: bytes after which a new segment file is started; a
                single larger record gets a segment of its own.
            max_record_size: the largest record accepted, below 2**31.
            max_group_bytes: how many bytes one group commit gathers at most
                (at least one append; an append_many is not split unless it
                is larger than a segment).
            fs: the file layer; the real file system by default.

        Recovery deletes leftover ``*.tmp`` files, checks every segment header
        and the last segment's records, and cuts a torn tail off the last
        segment (with a warning saying how many bytes were dropped).

        Raises:
            ConfigError: a setting is invalid.
            WALError: another writer holds the directory's lock.
            WALCorruptionError: the log is damaged before its tail.
            OSError: the directory cannot be created or read.
        """
        mode = _check_settings(
            durability, sync_interval, segment_size, max_record_size, max_group_bytes
        )
        # abspath reads the working directory: a system call, so not on the loop.
        path = await anyio.to_thread.run_sync(os.path.abspath, os.fspath(directory))
        log = cls(
            path,
            fs if fs is not None else OsFileSystem(),
            mode,
            float(sync_interval),
            segment_size,
            max_record_size,
            max_group_bytes,
        )
        await _in_thread(log._recover, abandoned=lambda _: log._close_sync([], sync=False))
        log._flusher = log._loop.create_task(
            log._flush_loop(), name=f"streamlet-wal-flusher:{path}"
        )
        return log

    def _recover(self) -> None:
        """Lock the directory and bring the log to a state appends can continue from."""
        self._fs.makedirs(self._directory)
        if isinstance(self._fs, OsFileSystem):
            self._lock_fd = lock_directory(self._directory)
        try:
            self._first = self._writer.recover()
        except BaseException:
            self._release_lock()
            raise
        self._tail_seq = self._written_seq = self._writer.seq
        self._tail_size = self._written_size = self._writer.size

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the fd drops the flock
            self._lock_fd = None

    # ---- properties ----------------------------------------------------

    @property
    def directory(self) -> str:
        """The log's directory, as an absolute path."""
        return self._directory

    @property
    def durability(self) -> Durability:
        """The durability policy the log was opened with."""
        return self._durability

    @property
    def first_segment(self) -> int:
        """The seq of the oldest segment still on disk."""
        return self._first

    @property
    def last_segment(self) -> int:
        """The seq of the newest segment: where the latest appends were written."""
        return self._written_seq

    def stats(self) -> WalStats:
        """What the log did since it was opened, for the monitor (cheap; any time)."""
        return WalStats(
            segments=self._written_seq - self._first + 1,
            appended_bytes=self._writer.appended_bytes,
            fsync=self._writer.fsyncs,
            append=self._appends,
        )

    @property
    def failed(self) -> BaseException | None:
        """The error that broke the log (a failed write or fsync), or None."""
        return self._failed

    def __repr__(self) -> str:
        state = "failed" if self._failed else "closed" if self._closing else "open"
        return (
            f"<WriteAheadLog {self._directory} {state} durability={self._durability.value} "
            f"segments={self._first}..{self._written_seq}>"
        )

    # ---- appending -----------------------------------------------------

    async def append(self, data: bytes) -> Position:
        """Append one record; return its position once it is durable per the policy.

        Raises:
            RecordTooLargeError: ``data`` is over ``max_record_size``.
            WALFailedError: the log failed (now or earlier); the record may or
                may not be on disk and must be treated as not durable.
            WALClosedError: the log was closed.
        """
        self._check_writable()
        length = len(data)
        if length > self._max_record_size:
            raise self._too_large(length)
        if type(data) is not bytes:  # what is queued must not change: keep a copy
            data = bytes(data)
        header = frame_header(data)
        future = self._loop.create_future()
        with self._queue.lock:
            chunk, offset = self._place(FRAME_HEADER_SIZE + length)
            # Header and payload stay apart until the writer joins its group,
            # so the payload is copied once on its way to the disk, not twice.
            chunk.pieces += header, data
            chunk.futures.append(future)
        # If this task is cancelled, the future is cancelled with it and the
        # writer skips it; the frame is still written, in its place.
        started = time.monotonic()
        await future
        self._appends.observe(time.monotonic() - started)
        return _new_position((chunk.segment, offset, length))

    async def append_many(self, records: Sequence[bytes]) -> Sequence[Position]:
        """Append records as one group; return their positions once all are durable.

        The records are written contiguously and in order, and share the
        guarantees of :meth:`append`. A group that does not fit in one segment
        is spread over several, each record whole in one of them. The
        positions come as a sequence that makes each one when it is asked for
        (a large group does not wait for them to be built); use it as a list.
        """
        self._check_writable()
        if not records:
            return []
        lengths = list(map(len, records))
        count = len(lengths)
        uniform = lengths.count(lengths[0]) == count
        largest = lengths[0] if uniform else max(lengths)
        if largest > self._max_record_size:
            raise self._too_large(largest, index=lengths.index(largest))
        total = (largest * count if uniform else sum(lengths)) + FRAME_HEADER_SIZE * count
        future = self._loop.create_future()
        if not (count == 1 or total + SEGMENT_HEADER_SIZE <= self._segment_size):
            positions = self._queue_spread(encode_frames(records, lengths), lengths, future)
            await future
            return positions
        # Encoded before the space is reserved: a bad record fails the call
        # before it can leave a hole in the segment.
        data = encode_frames_joined(records, lengths)
        with self._queue.lock:
            chunk, offset = self._place(total)
            chunk.pieces.append(data)
            chunk.futures.append(future)
        started = time.monotonic()
        await future
        self._appends.observe(time.monotonic() - started)
        return _Positions(chunk.segment, offset, lengths, uniform)

    def _queue_spread(
        self, pieces: list[bytes], lengths: list[int], future: asyncio.Future[None]
    ) -> list[Position]:
        """Queue a group larger than a segment record by record across segments."""
        positions: list[Position] = []
        chunks: list[Chunk] = []
        start = 0
        queue = self._queue
        with queue.lock:
            queue.open = None  # later appends go after these frames
            for index, length in enumerate(lengths):
                segment, offset = self._reserve(length + FRAME_HEADER_SIZE)
                if not chunks or chunks[-1].segment != segment:
                    if chunks:
                        chunks[-1].pieces = pieces[2 * start : 2 * index]
                    chunks.append(Chunk(segment, offset))
                    start = index
                chunks[-1].nbytes += length + FRAME_HEADER_SIZE
                positions.append(Position(segment, offset, length))
            chunks[-1].pieces = pieces[2 * start :]
            chunks[-1].futures.append(future)
            queue.chunks.extend(chunks)
            self._notify()
        return positions

    async def roll(self) -> None:
        """Start a new segment; later appends go there.

        The current segment is synced and left complete. Useful to make the
        records so far eligible for :meth:`clean` as soon as they are released.
        """
        self._check_writable()
        future = self._loop.create_future()
        with self._queue.lock:
            self._tail_seq += 1
            self._tail_size = SEGMENT_HEADER_SIZE
            # An empty chunk at the start of the new segment: the writer rolls to it.
            self._open_chunk(self._tail_seq, SEGMENT_HEADER_SIZE).futures.append(future)
        await future

    def _reserve(self, nbytes: int) -> tuple[int, int]:
        """Fix where the next ``nbytes`` of frames go: (segment, offset).

        With ``_queue.lock`` held and no chunk open (the frames go elsewhere).
        """
        segment, size = self._tail_seq, self._tail_size
        # Roll when these frames would overflow the segment, unless it is
        # empty: a record larger than a segment goes alone into its own.
        if size + nbytes > self._segment_size and size > SEGMENT_HEADER_SIZE:
            segment += 1
            size = SEGMENT_HEADER_SIZE
        self._tail_seq = segment
        self._tail_size = size + nbytes
        return segment, size

    def _place(self, nbytes: int) -> tuple[Chunk, int]:
        """Fix where the next ``nbytes`` of frames go: (their chunk, offset).

        With ``_queue.lock`` held, which the caller keeps until it has added
        the frames and its future to the chunk. The frames go into the open
        chunk unless they start a new segment or would take a chunk past
        ``max_group_bytes``.
        """
        segment, offset = self._tail_seq, self._tail_size
        chunk = self._queue.open
        # Roll when these frames would overflow the segment, unless it is
        # empty: a record larger than a segment goes alone into its own.
        if offset + nbytes > self._segment_size and offset > SEGMENT_HEADER_SIZE:
            segment += 1
            offset = SEGMENT_HEADER_SIZE
            self._tail_seq = segment
            chunk = None
        if chunk is None or (chunk.nbytes and chunk.nbytes + nbytes > self._max_group_bytes):
            chunk = self._open_chunk(segment, offset)
        chunk.nbytes += nbytes
        self._tail_size = offset + nbytes
        return chunk, offset

    def _open_chunk(self, segment: int, offset: int) -> Chunk:
        """Queue an empty chunk at the tail and make it the open one (lock held)."""
        queue = self._queue
        chunk = queue.open = Chunk(segment, offset)
        queue.chunks.append(chunk)
        self._notify()
        return chunk

    def _notify(self) -> None:
        """Chunks were queued: wake the writer thread, or the flusher if none runs."""
        self._queue.wake_writer()
        if not self._writing:  # else the running writer takes them; no task switch needed
            self._wakeup.set()

    def _check_writable(self) -> None:
        if self._closing:
            raise WALClosedError(f"the write-ahead log in {self._directory} is closed")
        if self._failed is not None:
            raise self._failed_error()

    def _too_large(self, size: int, *, index: int | None = None) -> RecordTooLargeError:
        which = "a record" if index is None else f"record {index} of the group"
        return RecordTooLargeError(
            f"{which} is {size} bytes, over the write-ahead log's limit of "
            f"{self._max_record_size} bytes; split it, or raise max_record_size "
            f"(up to {MAX_RECORD_SIZE_LIMIT})"
        )

    def _failed_error(self) -> WALFailedError:
        cause = self._failed
        what = (
            f"[Errno {cause.errno}] {cause.strerror}"
            if isinstance(cause, OSError) and cause.errno is not None
            else repr(cause)
        )
        error = WALFailedError(
            f"the write-ahead log in {self._directory} failed: {what}. Nothing appended "
            f"after its last successful sync can be assumed durable, and it takes no more "
            f"appends; restart the process to recover the log from disk."
        )
        error.__cause__ = cause
        return error

    # ---- the flusher ----------------------------------------------------
    #
    # The flusher task hands the writing to one worker thread running
    # SegmentWriter.run (see streamlet.wal._writer), and starts it again when
    # it returned idle and appends come. The writer's completions come back
    # here, on the loop, through _written and _fail.

    async def _flush_loop(self) -> None:
        """Keep a writer thread running while there is anything to write."""
        try:
            while self._failed is None:
                if not self._queue.chunks:
                    if self._closing:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                self._writing = True
                try:
                    await anyio.to_thread.run_sync(self._writer.run, limiter=self._limiter)
                except Exception as exc:  # a bug, not an I/O error: those are handled inside
                    self._fail(exc, ())
                    return
                finally:
                    # Anything queued after the writer last looked is seen
                    # by the queue check at the top of the loop.
                    self._writing = False
        except asyncio.CancelledError:
            # Cancelled from outside (the loop is shutting down without
            # aclose): nobody will write the queue, so no caller may wait on it.
            self._queue.stop.set()
            self._closing = True
            for chunk in self._queue.drain():
                chunk.fail(
                    lambda: WALClosedError(
                        f"the write-ahead log in {self._directory} was shut down "
                        f"(its flusher task was cancelled) before this append was written"
                    )
                )
            raise

    def _written(self, group: list[Chunk], segment: int, size: int) -> None:
        """On the loop: a group is written (and synced per policy); acknowledge it."""
        self._written_seq = segment
        self._written_size = size
        for chunk in group:
            for future in chunk.futures:
                if not future.done():  # else cancelled (or failed by _fail)
                    future.set_result(None)

    def _fail(self, error: BaseException, group: Iterable[Chunk]) -> None:
        """On the loop: refuse all further appends, and fail every waiting one."""
        if self._failed is None:
            self._failed = error
            logger.error(
                "write-ahead log in %s failed and takes no more appends: %s; "
                "restart the process to recover it from disk",
                self._directory,
                error,
            )
        for chunk in itertools.chain(group, self._queue.drain()):
            chunk.fail(self._failed_error)

    # ---- reading -------------------------------------------------------

    async def read(self, position: Position) -> bytes:
        """The record at ``position``, checked against its crc.

        Raises:
            WALCorruptionError: the record fails its checks.
            WALError: the segment was cleaned, or ``position`` is not a record
                this log wrote.
            WALClosedError: the log was closed.
        """
        if self._closing:
            raise WALClosedError(f"the write-ahead log in {self._directory} is closed")
        segment, offset, length = position
        self._check_readable(segment)
        end = offset + FRAME_HEADER_SIZE + length
        if (
            offset < SEGMENT_HEADER_SIZE
            or segment > self._written_seq
            or (segment == self._written_seq and end > self._written_size)
        ):
            raise WALError(
                f"{position} is not a record of the write-ahead log in {self._directory}: "
                f"it lies outside what was written"
            )
        reader = await self._acquire_reader(segment)
        try:
            data = await _in_thread(
                functools.partial(self._read_sync, reader.file, position),
                abandoned=lambda _: self._release_reader(reader),
            )
        except asyncio.CancelledError:
            raise  # the reader is released when the abandoned read returns
        except BaseException:
            self._release_reader(reader)
            raise
        self._release_reader(reader)
        return data

    def _check_readable(self, segment: int) -> None:
        if segment < self._first:
            raise WALError(
                f"segment {segment} of the write-ahead log in {self._directory} was cleaned "
                f"(deleted after its records were released); it can no longer be read"
            )

    async def _acquire_reader(self, segment: int) -> _Reader:
        reader = self._readers.get(segment)
        if reader is None:
            async with self._reader_lock:
                reader = self._readers.get(segment)
                if reader is None:
                    path = self._segment_path(segment)
                    try:
                        file = await _in_thread(
                            functools.partial(self._fs.open, path),
                            abandoned=_close_if_opened,
                        )
                    except FileNotFoundError:
                        self._check_readable(segment)
                        raise WALError(f"segment file {path} is missing") from None
                    if segment < self._first:  # a clean raced the open
                        await anyio.to_thread.run_sync(file.close)
                        self._check_readable(segment)
                    reader = self._readers[segment] = _Reader(file)
        reader.users += 1
        return reader

    def _release_reader(self, reader: _Reader) -> None:
        reader.users -= 1
        if reader.retired and reader.users == 0:
            # Its segment was cleaned or the log closed while this read ran;
            # closing a read-only descriptor does not wait on the disk.
            reader.file.close()

    def _read_sync(self, file: File, position: Position) -> bytes:
        _, offset, length = position
        data = file.read(offset, FRAME_HEADER_SIZE + length)
        check = check_frame(data, 0, len(data))
        length_known = check.fault not in (FrameFault.SHORT_HEADER, FrameFault.BAD_LENGTH_CHECK)
        if length_known and check.length != length:
            raise WALError(
                f"{position} does not match the record in {file.path} at offset {offset}, "
                f"which is {check.length} bytes long; pass positions returned by this log"
            )
        if check.fault is not None:
            problem = Problem(file.path, offset, check.reason)
            raise corruption_error(problem, self._directory)
        return data[FRAME_HEADER_SIZE:]

    async def replay(self, start: Position | None = None) -> AsyncIterator[tuple[Position, bytes]]:
        """Every intact record in log order, from ``start`` (inclusive) or the beginning.

        Records appended while replaying are included if the replay gets to
        them. Raises WALCorruptionError at the first bad record (any bad
        frame is corruption here: a torn tail was cut off on open) and
        WALError if a segment is cleaned before the replay reaches it.
        """
        if self._closing:
            raise WALClosedError(f"the write-ahead log in {self._directory} is closed")
        if start is None:
            segment, offset = self._first, SEGMENT_HEADER_SIZE
        else:
            segment, offset = start.segment, max(start.offset, SEGMENT_HEADER_SIZE)
        expect = start
        fresh = True  # nothing read from this segment yet: check its header
        while True:
            if self._closing:
                raise WALClosedError(f"the write-ahead log in {self._directory} is closed")
            self._check_readable(segment)
            if segment > self._written_seq:
                return
            sealed = segment < self._written_seq
            limit = None if sealed else self._written_size
            if limit is not None and offset >= limit:
                return
            records, offset, at_end = await anyio.to_thread.run_sync(
                self._replay_chunk, segment, offset, limit, fresh
            )
            fresh = False
            if expect is not None and records and records[0][0] != expect:
                raise WALError(
                    f"cannot replay from {expect}: the record at that offset is "
                    f"{records[0][0].length} bytes, so the position is not from this log"
                )
            expect = None
            for record in records:
                yield record
            if at_end and sealed:
                segment += 1
                offset = SEGMENT_HEADER_SIZE
                fresh = True

    def _replay_chunk(
        self, segment: int, offset: int, limit: int | None, check_header: bool
    ) -> tuple[list[tuple[Position, bytes]], int, bool]:
        """Read the records from ``offset`` on (up to about a scan chunk).

        Returns ``(records, next_offset, at_end)``; ``limit`` is where the
        written data ends, None for a sealed segment (its file size).
        """
        path = self._segment_path(segment)
        try:
            file = self._fs.open(path)
        except FileNotFoundError:
            raise WALError(
                f"segment {segment} of the write-ahead log in {self._directory} was cleaned "
                f"while it was being replayed"
            ) from None
        try:
            # A torn tail was cut off on open: any bad frame here is corruption.
            reader = SegmentReader(
                file, segment, start=offset, end=limit, check_header=check_header
            )
            base, frames = reader.read_chunk()
        finally:
            file.close()
        records = [(Position(segment, base + o, len(p)), p) for o, p in frames]
        ending = reader.ending
        if ending is None:
            return records, reader.position, False
        if ending.kind is EndKind.CLEAN:
            return records, ending.offset, True
        if records:  # hand out the intact records first; the next call raises
            return records, ending.offset, False
        problem = Problem(path, ending.offset, ending.reason)
        raise corruption_error(problem, self._directory)

    # ---- cleaning and closing --------------------------------------------

    async def clean(self, up_to: Position) -> int:
        """Delete the whole segments before ``up_to.segment``; return how many.

        The segment appends go to is never deleted. Each deletion is made
        durable before the next, so after a crash the remaining segments are
        still a gap-free run.

        Raises:
            WALError: ``up_to`` lies beyond the end of the log.
            OSError: a segment could not be deleted.
        """
        if self._closing:
            raise WALClosedError(f"the write-ahead log in {self._directory} is closed")
        async with self._clean_lock:
            if up_to.segment > self._tail_seq:
                raise WALError(
                    f"cannot clean up to {up_to}: the write-ahead log in {self._directory} "
                    f"ends in segment {self._tail_seq}"
                )
            stop = min(up_to.segment, self._written_seq)
            doomed = list(range(self._first, stop))
            if not doomed:
                return 0
            self._first = stop  # from here on, reads of these segments fail cleanly
            idle = self._retire_readers(doomed)
            await anyio.to_thread.run_sync(self._remove_segments, doomed, idle)
            return len(doomed)

    def _retire_readers(self, segments: Iterable[int]) -> list[File]:
        """Drop cached read handles; return those no read is using (to close now)."""
        idle: list[File] = []
        for segment in segments:
            reader = self._readers.pop(segment, None)
            if reader is None:
                continue
            reader.retired = True
            if reader.users == 0:
                idle.append(reader.file)
        return idle

    def _remove_segments(self, segments: list[int], handles: list[File]) -> None:
        for file in handles:
            file.close()
        for segment in segments:
            self._fs.remove(self._segment_path(segment))
            self._fs.sync_dir(self._directory)

    async def aclose(self) -> None:
        """Write and sync everything queued, then close; idempotent.

        Syncs whatever the durability policy. Raises WALFailedError (once) if
        that final sync fails; a log that had already failed closes quietly,
        since its appends were already told.
        """
        first = self._close_task is None
        if self._close_task is None:
            self._closing = True
            self._queue.finish = True
            self._queue.wake_writer()
            self._wakeup.set()
            self._close_task = self._loop.create_task(self._close())
        # Shielded: a cancelled aclose still finishes closing in the background.
        error = await asyncio.shield(self._close_task)
        if first and error is not None:
            raise error

    async def _close(self) -> BaseException | None:
        flusher = self._flusher
        if flusher is not None:
            await asyncio.wait([flusher])
            if not flusher.cancelled() and flusher.exception() is not None:
                logger.error(
                    "write-ahead log flusher for %s crashed",
                    self._directory,
                    exc_info=flusher.exception(),
                )
        already_failed = self._failed is not None
        idle = self._retire_readers(list(self._readers))
        try:
            await anyio.to_thread.run_sync(self._close_sync, idle, not already_failed)
        except Exception as exc:
            self._fail(exc, [])
            return self._failed_error()
        return None

    def _close_sync(self, readers: list[File], sync: bool) -> None:
        self._queue.stop.set()
        try:
            self._writer.close(sync=sync)
        finally:
            try:
                for file in readers:
                    file.close()
            finally:
                self._release_lock()

    async def __aenter__(self) -> WriteAheadLog:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _segment_path(self, seq: int) -> str:
        return os.path.join(self._directory, segment_name(seq))


def _check_settings(
    durability: Durability | str,
    sync_interval: float,
    segment_size: int,
    max_record_size: int,
    max_group_bytes: int,
) -> Durability:
    """Validate :meth:`WriteAheadLog.open`'s settings; return the durability."""
    try:
        mode = Durability(durability)
    except ValueError:
        allowed = ", ".join(repr(d.value) for d in Durability)
        raise ConfigError(f"durability={durability!r} is not one of {allowed}") from None
    if (
        isinstance(sync_interval, bool)
        or not isinstance(sync_interval, int | float)
        or not math.isfinite(sync_interval)
        or sync_interval <= 0
    ):
        raise ConfigError(
            f"sync_interval={sync_interval!r} must be a positive, finite number of seconds"
        )
    min_segment = SEGMENT_HEADER_SIZE + FRAME_HEADER_SIZE
    for name, value, low, high in (
        ("segment_size", segment_size, min_segment, None),
        ("max_record_size", max_record_size, 1, MAX_RECORD_SIZE_LIMIT),
        ("max_group_bytes", max_group_bytes, 1, None),
    ):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}={value!r} must be an integer number of bytes")
        if value < low or (high is not None and value > high):
            allowed = f"at least {low}" if high is None else f"between {low} and {high}"
            raise ConfigError(f"{name}={value} is out of range: it must be {allowed} bytes")
    return mode
