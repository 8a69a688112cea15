"""The one reader of segment files, and the read-only pass over a log directory.

Recovery, replay, ``verify``, ``dump``, ``repair`` and ``read_records`` all
read frames through :class:`SegmentReader`, as leveldb's ``log::Reader`` and
etcd's WAL decoder serve all of theirs: the chunking, the re-reading of a
frame that runs past a chunk, and the torn-or-corrupt verdict at the end are
written once, so a fix to one is a fix to all. It reads a segment in chunks
(memory stays bounded whatever the segment size), hands out intact frames
with their offsets, and says exactly how the segment ended
(:class:`SegmentEnd`). What it decides is defined in
:mod:`streamlet.wal.format`; this module only applies those rules to a file.

:func:`inspect_log` is the read-only pass over a whole directory that
recovery and the tools share.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from streamlet.errors import WALCorruptionError
from streamlet.fs import File, FileSystem
from streamlet.wal._segments import list_segments
from streamlet.wal.format import (
    FRAME_HEADER_SIZE,
    SECTOR_SIZE,
    SEGMENT_HEADER_SIZE,
    SEGMENT_SUFFIX,
    TEMP_SUFFIX,
    FrameCheck,
    FrameFault,
    check_frame,
    check_segment_header,
    is_torn,
    scan,
    segment_name,
)

__all__ = [
    "CHUNK_SIZE",
    "EndKind",
    "Frames",
    "Inspection",
    "Problem",
    "SegmentEnd",
    "SegmentReader",
    "SegmentSummary",
    "TornTail",
    "corruption_error",
    "inspect_log",
]

CHUNK_SIZE = 4 * 2**20
"""Bytes read per call, unless a single frame is larger."""


class EndKind(enum.Enum):
    """How a segment ends.

    CLEAN: every byte up to the end was an intact frame. TORN: an incomplete
    last write, where the caller allows one (the last segment of a log): cut
    it off. CORRUPT: a bad frame, or a file shorter than the data written to
    it: refuse to read on. BAD_HEADER: the segment header is missing,
    damaged, or not one this build reads.
    """

    CLEAN = "clean end"
    TORN = "torn tail"
    CORRUPT = "corrupt"
    BAD_HEADER = "bad header"


class SegmentEnd(NamedTuple):
    """Where and how a :class:`SegmentReader` stopped."""

    kind: EndKind
    offset: int
    """Where the intact frames end: the bad frame's offset (0 for a bad header)."""
    reason: str
    """What is wrong there, as a sentence fragment; empty for a clean end."""
    fault: FrameFault | None = None
    """The bad frame's fault, for TORN and CORRUPT (None when the file is short)."""
    length: int = 0
    """The bad frame's payload length, trustworthy for a BAD_CRC fault."""


class Frames(NamedTuple):
    """The intact frames of one chunk read by :meth:`SegmentReader.read_chunk`.

    Offsets are left relative to the chunk, as :func:`~streamlet.wal.format.scan`
    gives them: turning each into a file offset here would cost every record
    a tuple more (a sixth of replay's time), while replay builds a tuple per
    record anyway and adds ``base`` in the same step.
    """

    base: int
    """The file offset of the chunk: a frame's file offset is ``base + offset``."""
    frames: list[tuple[int, bytes]]
    """``(offset in the chunk, payload)`` of each intact frame, in order."""


_NO_FRAMES = Frames(0, [])


class SegmentReader:
    """Intact frames of one open segment file, read a chunk at a time, and how it ends.

    Iterate over it for ``(offset, payload)`` pairs, or call
    :meth:`read_chunk` for a chunk's worth at a time (replay hands each
    chunk to the event loop, and inspection only counts them). Once it
    stops, :attr:`ending` says why.

    Args:
        file: the segment, open for reading; the caller closes it.
        seq: its seq, which the header must carry.
        start: the offset of the first frame to read.
        end: where the data written to the file ends (a live log's last
            segment); None for the file's size. A file shorter than ``end``
            is corrupt; one that shrinks while read without ``end`` is judged
            by what is there.
        check_header: check the segment header before the first frame.
        torn_tail: the segment may end in a torn write (the last segment of a
            log); without it every bad frame is corruption.
        chunk_size: bytes per read (tests make it tiny).
    """

    __slots__ = (
        "_base",
        "_buf",
        "_chunk_size",
        "_end",
        "_file",
        "_header_pending",
        "_pos",
        "_seq",
        "_short",
        "_torn_tail",
        "_want",
        "_written",
        "ending",
    )

    def __init__(
        self,
        file: File,
        seq: int,
        *,
        start: int = SEGMENT_HEADER_SIZE,
        end: int | None = None,
        check_header: bool = True,
        torn_tail: bool = False,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be positive")
        self._file = file
        self._seq = seq
        self._pos = start
        self._written = end
        self._end = end if end is not None else file.size()
        self._short = False  # the file ended before self._written
        self._header_pending = check_header
        self._torn_tail = torn_tail
        self._chunk_size = self._want = chunk_size
        self._buf = b""  # the last chunk read, starting at file offset _base
        self._base = 0
        self.ending: SegmentEnd | None = None
        """None while frames may follow; then where and how the segment ended."""

    @property
    def position(self) -> int:
        """The offset of the next frame to read (where the intact frames end, once ended)."""
        return self._pos

    @property
    def size(self) -> int:
        """Where the data ends: ``end`` or the file's size (less if the file was short)."""
        return self._end

    def read_header(self) -> SegmentEnd | None:
        """Check the segment header now (once); the ending if it is bad, else None."""
        if self._header_pending:
            self._header_pending = False
            reason = check_segment_header(self._file.read(0, SEGMENT_HEADER_SIZE), self._seq)
            if reason is not None:
                self.ending = SegmentEnd(EndKind.BAD_HEADER, 0, f"the segment header {reason}")
        return self.ending

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        while self.ending is None:
            base, frames = self.read_chunk()
            for offset, payload in frames:
                yield base + offset, payload

    def read_chunk(self) -> Frames:
        """The intact frames of the next chunk; none once ended.

        Frames may come with :attr:`ending` set: the frames before a bad one
        are handed out first.
        """
        if self.read_header() is not None:
            return _NO_FRAMES
        file = self._file
        while self.ending is None:
            pos, end = self._pos, self._end
            if pos >= end:
                self.ending = self._end_of_data(pos)
                return _NO_FRAMES
            requested = min(end - pos, self._want)
            buf = file.read(pos, requested)
            if len(buf) < requested:  # the file ends before the data it should hold
                self._end = end = pos + len(buf)
                self._short = self._written is not None
            self._buf, self._base = buf, pos
            found, stop = scan(buf, 0, len(buf))
            self._pos = pos + stop
            if stop == len(buf):
                self._want = self._chunk_size
                if self._pos >= end:
                    self.ending = self._end_of_data(self._pos)
                if found:
                    return Frames(pos, found)
                continue
            check = check_frame(buf, stop, len(buf))
            needed = FRAME_HEADER_SIZE + (check.length if check.fault is FrameFault.PAST_END else 0)
            if (
                check.fault in (FrameFault.SHORT_HEADER, FrameFault.PAST_END)
                and pos + len(buf) < end
            ):
                # The frame goes on past this chunk: read it whole next time,
                # or up to the end of the data, which then judges it.
                self._want = max(self._chunk_size, needed)
                if found:
                    return Frames(pos, found)
                continue
            self.ending = self._bad_frame(self._pos, check)
            return Frames(pos, found)
        return _NO_FRAMES

    def step_over(self) -> bytes:
        """Go on past a frame that failed only its checksum; return its payload.

        Its length passed its own check, so the next frame is where the length
        says: ``dump`` lists such a record and walks on. Only after an ending
        whose fault is BAD_CRC.
        """
        ending = self.ending
        if ending is None or ending.fault is not FrameFault.BAD_CRC:
            raise ValueError(f"only a frame that failed its checksum can be stepped over: {ending}")
        start = ending.offset - self._base + FRAME_HEADER_SIZE
        payload = self._buf[start : start + ending.length]
        self._pos = ending.offset + FRAME_HEADER_SIZE + ending.length
        self.ending = None
        return payload

    def _end_of_data(self, offset: int) -> SegmentEnd:
        if self._short:
            return SegmentEnd(
                EndKind.CORRUPT,
                offset,
                f"the file ends here, before the {self._written} bytes written to it",
            )
        return SegmentEnd(EndKind.CLEAN, offset, "")

    def _bad_frame(self, offset: int, check: FrameCheck) -> SegmentEnd:
        """The verdict on the bad frame at ``offset`` (see :mod:`streamlet.wal.format`)."""
        if not self._torn_tail:
            return SegmentEnd(EndKind.CORRUPT, offset, check.reason, check.fault, check.length)
        if check.fault not in (FrameFault.SHORT_HEADER, FrameFault.PAST_END):
            # Read again the whole sectors the frame overlaps: is_torn looks at
            # them, and a frame that now checks out was changed while read.
            # Sectors past the frame never change the verdict (a zero run from
            # the frame to the end of the file implies a zero frame header).
            base = offset - offset % SECTOR_SIZE
            span = offset + FRAME_HEADER_SIZE
            if check.fault is FrameFault.BAD_CRC:
                span += check.length
            stop = min(self._end, span + (-span) % SECTOR_SIZE)
            tail = self._file.read(base, stop - base)
            check = check_frame(tail, offset - base, len(tail))
            if check.fault is None:
                check = FrameCheck(FrameFault.PAST_END, 0, "the file changed while it was read")
            elif not is_torn(tail, base, offset, check):
                return SegmentEnd(EndKind.CORRUPT, offset, check.reason, check.fault, check.length)
        return SegmentEnd(EndKind.TORN, offset, check.reason, check.fault, check.length)


# --------------------------------------------------------------------------
# The read-only pass over a log directory, shared by recovery and the tools.


class Problem(NamedTuple):
    """The first place a log cannot be read past."""

    path: str
    """The segment file (or the missing file's would-be path)."""
    offset: int
    """Byte offset of the bad record or header in that file."""
    reason: str
    """What is wrong there, as a sentence fragment."""


class TornTail(NamedTuple):
    """An incomplete write at the end of the last segment, to be cut off on open."""

    path: str
    """The last segment file."""
    offset: int
    """Where the intact records end; the file is cut here."""
    dropped: int
    """How many bytes are cut off."""
    reason: str
    """What the torn frame looks like."""


@dataclass
class SegmentSummary:
    """One segment as :func:`inspect_log` found it."""

    seq: int
    path: str
    size: int
    scanned: bool = False
    """Whether its records were checked (always for the last segment)."""
    records: int = 0
    """Intact records found, when scanned."""
    payload_bytes: int = 0
    """Sum of their payload lengths, when scanned."""


@dataclass
class Inspection:
    """What a read-only pass over a log directory found; nothing is changed."""

    directory: str
    segments: list[SegmentSummary] = field(default_factory=list)
    """Segments in order, up to and including the one holding :attr:`problem`."""
    temp_files: list[str] = field(default_factory=list)
    """Leftover ``*.wal.tmp`` paths from an interrupted segment creation."""
    problem: Problem | None = None
    """The first corruption, or None."""
    torn_tail: TornTail | None = None
    """A torn tail of the last segment (only when there is no problem)."""


def corruption_error(problem: Problem, directory: str) -> WALCorruptionError:
    """The error for ``problem``, saying where, what, and how to repair."""
    return WALCorruptionError(
        f"{problem.path}: corrupt at offset {problem.offset}: {problem.reason}. "
        f"The log cannot be read past this point. To cut it off there (losing what "
        f"follows), run `streamlet wal repair {directory}`, which keeps a .broken "
        f"copy of every file it changes.",
        path=problem.path,
        offset=problem.offset,
    )


def inspect_log(fs: FileSystem, directory: str, *, scan_all: bool) -> Inspection:
    """Check a log directory without changing it, up to the first problem.

    Segment numbering and every segment header are always checked; records
    are checked in the last segment, and in all of them when ``scan_all``.
    A bad frame in the last segment is classed torn or corrupt by the rules
    in :mod:`streamlet.wal.format`; anywhere else it is corruption.
    """
    names = fs.listdir(directory)
    found = Inspection(directory)
    found.temp_files = [
        os.path.join(directory, n) for n in names if n.endswith(SEGMENT_SUFFIX + TEMP_SUFFIX)
    ]
    seqs = list_segments(fs, directory)
    previous: int | None = None
    for index, seq in enumerate(seqs):
        if previous is not None and seq != previous + 1:
            found.problem = Problem(
                os.path.join(directory, segment_name(previous + 1)),
                0,
                f"segment {previous + 1} is missing: the directory holds segment "
                f"{previous}, then {seq}",
            )
            return found
        previous = seq
        path = os.path.join(directory, segment_name(seq))
        last = index == len(seqs) - 1
        file = fs.open(path)
        try:
            reader = SegmentReader(file, seq, torn_tail=last)
            size = reader.size
            bad_header = reader.read_header()
            if bad_header is not None:
                found.problem = Problem(path, bad_header.offset, bad_header.reason)
                return found
            summary = SegmentSummary(seq, path, size)
            found.segments.append(summary)
            if not (scan_all or last):
                continue
            summary.scanned = True
            while reader.ending is None:
                frames = reader.read_chunk().frames
                summary.records += len(frames)
                summary.payload_bytes += sum(len(payload) for _, payload in frames)
        finally:
            file.close()
        ending = reader.ending
        assert ending is not None
        if ending.kind is EndKind.TORN:
            found.torn_tail = TornTail(path, ending.offset, size - ending.offset, ending.reason)
            return found
        if ending.kind is not EndKind.CLEAN:
            found.problem = Problem(path, ending.offset, ending.reason)
            return found
    return found
