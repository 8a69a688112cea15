"""Inspection of a write-ahead log directory: verify, dump, repair and read_records.

These are what ``streamlet wal verify | dump | repair`` (and ``streamlet
checkpoint show``, through :func:`read_records`) run, as plain functions
returning result objects so they can be used from Python too. None of them
opens the log as its writer does; they are kept apart from it so that what
only reads cannot share state with the write path.
``verify`` and ``dump`` only read. ``repair`` is the one explicit way to cut
a corrupt log short; it never runs by itself (opening a log refuses a corrupt
one), and it keeps a ``.broken`` copy of every file it changes or removes.

A log has one writer, which holds the ``flock`` of its ``LOCK`` file (see
:func:`streamlet.wal._segments.lock_directory`). ``repair`` takes that lock
before it reads anything and keeps it until it is done, so it refuses a log that a
running app has open and no app can open the log while it is repaired.
``verify`` never takes it: it may look at a live log, and then says so
(:attr:`VerifyReport.live`), since what it reads is changing under it.

What counts as a torn tail and what as corruption is defined in
:mod:`streamlet.wal.format`. Every segment is read with the frame reader that
recovery and replay use (:class:`streamlet.wal._reader.SegmentReader`), and
``verify`` and ``repair`` run recovery's own pass
(:func:`streamlet.wal._reader.inspect_log`) over every segment.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from streamlet.errors import WALError
from streamlet.fs import FileSystem, OsFileSystem
from streamlet.wal._reader import (
    CHUNK_SIZE,
    EndKind,
    Inspection,
    Problem,
    SegmentReader,
    TornTail,
    inspect_log,
)
from streamlet.wal._segments import (
    LOCK_NAME,
    create_segment,
    is_locked,
    list_segments,
    lock_directory,
)
from streamlet.wal.format import (
    FRAME_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    FrameFault,
    parse_segment_name,
    segment_name,
)
from streamlet.wal.log import Position

__all__ = [
    "BROKEN_SUFFIX",
    "RepairResult",
    "VerifyReport",
    "dump",
    "read_records",
    "repair",
    "verify",
]

BROKEN_SUFFIX = ".broken"
"""Suffix of the copies ``repair`` keeps of the files it changes."""

_HEAD = 32  # payload bytes shown per record by dump
_LIVE_ATTEMPTS = 5  # looks at a live log before a vanished segment or a problem is reported


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify` found."""

    directory: str
    segments: int
    """Segment files checked (up to the problem, if any)."""
    records: int
    """Intact records found (up to the problem, if any)."""
    bytes: int
    """Sum of their payload sizes."""
    problem: Problem | None
    """The first corruption, or None."""
    torn_tail: TornTail | None
    """A torn tail of the last segment: not corruption; cut off on the next open."""
    temp_files: tuple[str, ...]
    """Leftovers of an interrupted segment creation, deleted on the next open."""
    live: bool = False
    """A writer held the log's lock while it was checked: the report is a snapshot
    of a log that was changing. Its torn tail, if any, is an append in progress,
    and records appended since are not checked."""
    ends: dict[int, int] = field(default_factory=dict, repr=False, compare=False)
    """Segment seq -> where its intact records end, for every segment checked."""

    @property
    def ok(self) -> bool:
        """True when the log opens and replays without error."""
        return self.problem is None

    def holds(self, position: Position) -> bool:
        """Whether the intact part of the log reaches past the record at ``position``."""
        end = self.ends.get(position.segment)
        return end is not None and position.offset + FRAME_HEADER_SIZE + position.length <= end


@dataclass(frozen=True)
class RepairResult:
    """What :func:`repair` did, or with ``dry_run`` would do."""

    directory: str
    problem: Problem | None
    """The first corruption; None means there was nothing to repair."""
    torn_tail: TornTail | None
    """A torn tail, left alone: opening the log cuts it off."""
    truncated: tuple[str, int] | None
    """The segment cut short and the size it is cut to."""
    recreated: str | None
    """A segment whose header was bad, replaced by an empty one with the same seq."""
    removed: tuple[str, ...]
    """Later segments taken out of the log whole (renamed to ``*.broken``)."""
    lost_records: int
    """Records after the cut that could still be framed; there may be more that could not."""
    lost_bytes: int
    """File bytes after the cut, in all affected segments."""
    backups: tuple[str, ...]
    """The ``.broken`` copies made; empty for a dry run."""
    applied: bool
    """False for a dry run, a declined repair, or when there was nothing to do."""


def verify(directory: str | os.PathLike[str], *, fs: FileSystem | None = None) -> VerifyReport:
    """Check every segment header and record of the log in ``directory``; change nothing.

    The log's lock is not taken, so a running app is not disturbed; whether a
    writer held it is probed (before and after) and reported as
    :attr:`VerifyReport.live`. A live log changes while it is read: its last
    segment may end in an append in progress, which is a torn tail (never
    corruption: a reader sees a prefix of what is being written), and the
    writer deletes old segments when it cleans. So on a live log a segment
    that vanishes between listing and reading, or a problem that a second
    look does not find again at the same place, makes the check start over
    (up to 5 looks in all) instead of being reported.

    Raises:
        OSError: the directory or a segment cannot be read.
    """
    fs = fs or OsFileSystem()
    path = os.path.abspath(os.fspath(directory))
    locks = isinstance(fs, OsFileSystem)  # other file layers have no writer lock to probe
    live = locks and is_locked(path)
    seen: Problem | None = None
    for attempt in itertools.count(1):
        try:
            found = inspect_log(fs, path, scan_all=True)
        except FileNotFoundError:
            # A segment listed but gone when opened: a live writer cleaned it.
            live = live or (locks and is_locked(path))
            if not live or attempt >= _LIVE_ATTEMPTS:
                raise
            continue
        if found.problem is not None and locks and attempt < _LIVE_ATTEMPTS:
            live = live or is_locked(path)
            if live and found.problem != seen:
                seen = found.problem  # look again: is it still there?
                continue
        break
    live = live or (locks and is_locked(path))
    return VerifyReport(
        directory=path,
        segments=len(found.segments),
        records=sum(s.records for s in found.segments),
        bytes=sum(s.payload_bytes for s in found.segments),
        problem=found.problem,
        torn_tail=found.torn_tail,
        temp_files=tuple(found.temp_files),
        live=live,
        ends=_ends(found),
    )


def _ends(found: Inspection) -> dict[int, int]:
    """Segment seq -> where its intact records end, for the segments ``found`` checked."""
    ends = {s.seq: s.size for s in found.segments if s.scanned}
    for stop in (found.problem, found.torn_tail):
        if stop is not None:
            seq = parse_segment_name(os.path.basename(stop.path))
            if seq in ends:
                ends[seq] = stop.offset
    return ends


def dump(
    directory: str | os.PathLike[str],
    *,
    fs: FileSystem | None = None,
    on_problem: Callable[[Problem], None] | None = None,
) -> Iterator[dict[str, object]]:
    """One dict per record in log order: segment, offset, length, crc_ok, head.

    ``head`` is the hex of the first 32 payload bytes. A record that fails
    only its checksum is listed with ``crc_ok`` false and the walk goes on
    (its length is known to be right); where the framing itself is damaged
    the rest of that segment cannot be followed: ``on_problem`` is told, and
    the dump continues with the next segment. A bad segment header is
    reported the same way.
    """
    report = on_problem or (lambda problem: None)
    for seq, segment_path, reader in _segments(directory, fs):
        while True:
            for offset, payload in reader:
                yield _listed(seq, offset, payload, crc_ok=True)
            ending = reader.ending
            assert ending is not None
            if ending.fault is not FrameFault.BAD_CRC:
                break
            yield _listed(seq, ending.offset, reader.step_over(), crc_ok=False)
        if ending.kind is not EndKind.CLEAN:
            report(Problem(segment_path, ending.offset, ending.reason))


def _listed(seq: int, offset: int, payload: bytes, *, crc_ok: bool) -> dict[str, object]:
    """One line of :func:`dump`."""
    return {
        "segment": seq,
        "offset": offset,
        "length": len(payload),
        "crc_ok": crc_ok,
        "head": payload[:_HEAD].hex(),
    }


def read_records(
    directory: str | os.PathLike[str],
    *,
    fs: FileSystem | None = None,
    on_problem: Callable[[Problem], None] | None = None,
) -> Iterator[tuple[Position, bytes]]:
    """Every intact record in log order, without opening (or changing) the log.

    For tools that look at a log another process may own, such as
    ``streamlet checkpoint show``. The walk stops at the first record that
    is not intact, torn tail or corruption alike, and tells ``on_problem``.
    Segments are read a chunk at a time, so memory stays bounded.
    """
    report = on_problem or (lambda problem: None)
    for seq, segment_path, reader in _segments(directory, fs):
        for offset, payload in reader:
            yield Position(seq, offset, len(payload)), payload
        ending = reader.ending
        assert ending is not None
        if ending.kind is not EndKind.CLEAN:
            report(Problem(segment_path, ending.offset, ending.reason))
            return


def _segments(
    directory: str | os.PathLike[str], fs: FileSystem | None
) -> Iterator[tuple[int, str, SegmentReader]]:
    """Each segment of the log in ``directory`` in order: seq, path and a reader from its start.

    The segment's file stays open until the caller asks for the next one
    (or drops the iterator).
    """
    fs = fs or OsFileSystem()
    path = os.path.abspath(os.fspath(directory))
    for seq in list_segments(fs, path):
        segment_path = os.path.join(path, segment_name(seq))
        file = fs.open(segment_path)
        try:
            yield seq, segment_path, SegmentReader(file, seq)
        finally:
            file.close()


def repair(
    directory: str | os.PathLike[str],
    *,
    dry_run: bool = False,
    fs: FileSystem | None = None,
    confirm: Callable[[RepairResult], bool] | None = None,
) -> RepairResult:
    """Cut the log in ``directory`` at its first bad record, keeping ``.broken`` copies.

    Everything from the first problem on is taken out of the log: the damaged
    segment is truncated at the bad record (or, for a bad header, replaced by
    an empty segment with the same seq) and every later segment is renamed to
    ``NAME.broken``. A torn tail alone needs no repair: opening the log cuts
    it off. With ``dry_run`` nothing is changed and the result says what
    would be. ``confirm``, if given, is shown that plan (when there is
    something to repair) and the repair goes ahead only if it returns True.

    The log's writer lock is taken first (without waiting; the lock file is
    created if missing, as a writer would) and held until the end, the
    ``confirm`` call included: the plan is made from, and applied to, a log
    no app can change or open meanwhile.

    Later segments go first, each rename made durable before the damaged
    segment is cut, so a crash during repair never leaves a log that opens
    with records missing from its middle; running repair again finishes it.

    Raises:
        WALError: the log is in use: a running app (or another process) holds
            its lock. Nothing was read or changed.
        OSError: a file cannot be read, copied or changed.
    """
    fs = fs or OsFileSystem()
    path = os.path.abspath(os.fspath(directory))
    lock = _lock_for_repair(path) if isinstance(fs, OsFileSystem) else None
    try:
        plan = _plan(fs, path)
        if plan.problem is None or dry_run or (confirm is not None and not confirm(plan)):
            return plan
        return _apply(fs, plan)
    finally:
        if lock is not None:
            os.close(lock)  # closing the fd drops the flock


def _lock_for_repair(path: str) -> int:
    """Take the log's writer lock without waiting; refuse a log in use, saying what to do."""
    try:
        return lock_directory(path)
    except WALError:
        raise WALError(
            f"cannot repair the write-ahead log in {path}: it is in use. A running app (or "
            f"another process) holds its lock {os.path.join(path, LOCK_NAME)}, and a log "
            f"must not be changed under its writer. Stop the app first, then run "
            f"`streamlet wal repair {path}` again."
        ) from None


def _plan(fs: FileSystem, path: str) -> RepairResult:
    """What a repair of the log in ``path`` would do (lock held); changes nothing."""
    found = inspect_log(fs, path, scan_all=True)
    problem = found.problem
    if problem is None:
        return RepairResult(path, None, found.torn_tail, None, None, (), 0, 0, (), False)

    bad_seq = parse_segment_name(os.path.basename(problem.path))
    assert bad_seq is not None
    removed = tuple(
        os.path.join(path, segment_name(s)) for s in list_segments(fs, path) if s > bad_seq
    )
    truncated: tuple[str, int] | None = None
    recreated: str | None = None
    lost_records = lost_bytes = 0
    if fs.exists(problem.path):
        if problem.offset == 0:
            recreated = problem.path
            records, size = _count(fs, problem.path, SEGMENT_HEADER_SIZE)
            lost_bytes += size
        else:
            truncated = (problem.path, problem.offset)
            records, size = _count(fs, problem.path, problem.offset)
            lost_bytes += size - problem.offset
        lost_records += records
    for later in removed:
        records, size = _count(fs, later, SEGMENT_HEADER_SIZE)
        lost_records += records
        lost_bytes += size
    return RepairResult(
        directory=path,
        problem=problem,
        torn_tail=None,
        truncated=truncated,
        recreated=recreated,
        removed=removed,
        lost_records=lost_records,
        lost_bytes=lost_bytes,
        backups=(),
        applied=False,
    )


def _apply(fs: FileSystem, plan: RepairResult) -> RepairResult:
    """Carry out ``plan`` (lock held); return it with the backups made."""
    path = plan.directory
    backups: list[str] = []
    # Newest first: an interrupted repair leaves a gap-free prefix.
    for later in reversed(plan.removed):
        backup = _free_name(fs, later + BROKEN_SUFFIX)
        fs.rename(later, backup)
        fs.sync_dir(path)
        backups.append(backup)
    if plan.truncated is not None:
        backups.append(_copy(fs, plan.truncated[0]))
        file = fs.open(plan.truncated[0], writable=True)
        try:
            file.truncate(plan.truncated[1])
            file.sync()
        finally:
            file.close()
    if plan.recreated is not None:
        seq = parse_segment_name(os.path.basename(plan.recreated))
        assert seq is not None
        backups.append(_copy(fs, plan.recreated))
        create_segment(fs, path, seq, sync_dir=False)
    fs.sync_dir(path)
    return dataclasses.replace(plan, backups=tuple(backups), applied=True)


def _count(fs: FileSystem, path: str, start: int) -> tuple[int, int]:
    """Records that can be framed in ``path`` from ``start`` on, and the file's size.

    A record that fails only its checksum counts: its length is sound, so the
    walk goes on after it; it stops where the framing itself is damaged.
    """
    file = fs.open(path)
    try:
        seq = parse_segment_name(os.path.basename(path))
        assert seq is not None
        reader = SegmentReader(file, seq, start=start, check_header=False)
        size = reader.size
        records = 0
        while True:
            records += sum(1 for _ in reader)
            if reader.ending is None or reader.ending.fault is not FrameFault.BAD_CRC:
                break
            reader.step_over()
            records += 1
    finally:
        file.close()
    return records, size


def _free_name(fs: FileSystem, wanted: str) -> str:
    """``wanted``, or ``wanted.N`` for the first N not taken (repairs can repeat)."""
    name, n = wanted, 1
    while fs.exists(name):
        name = f"{wanted}.{n}"
        n += 1
    return name


def _copy(fs: FileSystem, path: str) -> str:
    """Copy ``path`` to a free ``.broken`` name, synced; return the copy's path."""
    backup = _free_name(fs, path + BROKEN_SUFFIX)
    source = fs.open(path)
    try:
        target = fs.create(backup)
        try:
            offset, size = 0, source.size()
            while offset < size:
                chunk = source.read(offset, min(CHUNK_SIZE, size - offset))
                if not chunk:
                    break
                target.append(chunk)
                offset += len(chunk)
            target.sync()
        finally:
            target.close()
    finally:
        source.close()
    return backup
