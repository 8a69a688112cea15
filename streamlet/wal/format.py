"""The write-ahead log's on-disk format, and pure functions to encode and check it.

This module is the one place the format is written down; everything that reads
or writes segment bytes goes through the constants and functions below. None of
them does I/O: they take and return bytes, so the rules can be tested without
a disk.

Segments
--------
A log is a directory of segment files named ``{seq:016d}.wal``. ``seq`` starts
at 1 and grows by one per segment; a number is never reused. Records are only
ever appended to the segment with the highest ``seq``; older segments are
complete and immutable until they are deleted whole. A segment is created as
``NAME.tmp`` (header written and synced), renamed to ``NAME``, and the
directory synced, so a segment that is visible under its name always has a
complete header; a leftover ``*.tmp`` is debris from a crash and is deleted.

Every segment starts with a 32-byte header, all integers little-endian::

    offset  size  field
         0     8  magic            b"STRMLWAL"
         8     4  format version   u32, FORMAT_VERSION (1)
        12     4  flags            u32, 0 (no flags are defined)
        16     8  segment seq      u64, equal to the seq in the file name
        24     4  reserved         u32, 0
        28     4  header crc       u32, CRC-32C of bytes 0..27

Records
-------
After the header come record frames, back to back::

    offset  size  field
         0     4  length           u32, payload length n
         4     4  length check     u32, CRC-32C of the 4 length bytes
         8     4  crc              u32, CRC-32C of the 4 length bytes + payload
        12     n  payload

The length check lets a reader tell a damaged length field from a torn write
before it trusts the length: without it, a flipped high bit in the length
looks exactly like a frame that runs past the end of the file. A record's
position is its segment seq, the offset of its frame in that file, and its
payload length.

Torn tail or corruption
-----------------------
Only the last segment may end in a torn write (the part of the last appends a
crash did not persist). Scanning it frame by frame, the first frame at offset
``o`` that does not check out is a torn tail, cut off on open, when:

* fewer than 12 bytes are left after ``o``; or
* its header checks out but the frame runs past the end of the file; or
* every byte from ``o`` to the end of the file is zero; or
* its 12 header bytes are all zero. That is what a power cut leaves when the
  sector holding the header kept its old content (zeros past the old end of
  file) while later sectors were written; a valid header is never all zero
  nor one bit away from it (its length and length check together always have
  several bits set: checked for every length); or
* its header runs across a sector boundary, fails its length check, and its
  bytes before the boundary are all zero: the sector holding its start kept
  its old content (the records synced before it, then zeros) while the next
  one was written. With five or more header bytes before the boundary, a
  valid header never has them zero nor one bit away from it (they hold the
  length and the low byte of the length check, which is non-zero for every
  length with at most one bit set: checked); with four or fewer they are low
  length bytes, zero when the length is a multiple of 256 (see below); or
* some 512-byte-aligned sector overlapping the frame is all zeros (a last,
  partial sector counts when all its bytes up to the end of file are: on disk
  the rest of it is zero padding). The frame's extent is ``[o, o + 12 + n)``
  when its header checks out, else the header alone, ``[o, o + 12)`` (its
  length cannot be trusted). A power cut persists appended data in whole
  sectors and leaves unwritten ones as zero-filled holes; a flipped bit cannot
  zero a whole sector.

Anything else, and any bad frame in an older segment, is corruption: the
reader stops with :class:`~streamlet.errors.WALCorruptionError` naming the file
and offset, and ``streamlet wal repair`` can cut the log there.

Residual risk (the same rule and risk as etcd's WAL): a bit flip inside a
record of the last segment whose payload itself holds a whole zero sector (or,
for the last record, ends the file with zeros back to a sector boundary) is
classed as torn, so that record and the ones after it are cut off instead of
reported; so is a flip in the length or length check of a record of the last
segment whose header starts at most 4 bytes before a sector boundary, if the
header bytes before the boundary (low bytes of its length) are zero or have
one bit set. Records in older segments, and records without such zero runs, are
never at this risk: none of the rules above can be met by flipping one bit.

The other way round, a file system that exposes stale, non-zero blocks after
a crash makes a torn tail look like corruption. That fails safe: the log
refuses to open until repaired, rather than losing records silently.
"""

from __future__ import annotations

import enum
import itertools
import re
import struct
import sys
from array import array
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import google_crc32c

__all__ = [
    "FORMAT_VERSION",
    "FRAME_HEADER_SIZE",
    "MAGIC",
    "MAX_RECORD_SIZE_LIMIT",
    "READABLE_VERSIONS",
    "SECTOR_SIZE",
    "SEGMENT_HEADER_SIZE",
    "SEGMENT_SUFFIX",
    "TEMP_SUFFIX",
    "FrameCheck",
    "FrameFault",
    "check_frame",
    "check_segment_header",
    "crc32c",
    "encode_frame",
    "encode_frames",
    "encode_frames_joined",
    "encode_segment_header",
    "frame_header",
    "is_torn",
    "parse_segment_name",
    "scan",
    "segment_name",
]

MAGIC = b"STRMLWAL"
"""The first 8 bytes of every segment."""

FORMAT_VERSION = 1
"""The format version this build writes."""

READABLE_VERSIONS = (1,)
"""The format versions this build reads."""

SEGMENT_HEADER_SIZE = 32
"""Bytes in a segment header; the first frame starts here."""

FRAME_HEADER_SIZE = 12
"""Bytes a frame adds in front of its payload: length, length check, crc."""

SECTOR_SIZE = 512
"""The unit a power cut is assumed to persist or lose whole (see above)."""

MAX_RECORD_SIZE_LIMIT = 2**31 - 1
"""Hard upper bound for a record's payload; lengths stay clear of the sign bit."""

SEGMENT_SUFFIX = ".wal"
TEMP_SUFFIX = ".tmp"

_SEGMENT_NAME = re.compile(r"^([0-9]{16})\.wal$")
_HEADER_BODY = struct.Struct("<8sIIQI")  # magic, version, flags, seq, reserved
_U32 = struct.Struct("<I")
_FRAME = struct.Struct("<III")  # length, length check, crc
_CRC_OFFSET = 8  # of the crc field in a frame header
_MAX_SEQ = 10**16 - 1  # the largest seq that fits the 16-digit file name

# Hot paths use the C functions directly (they take ``bytes`` only, not
# memoryview); the typed wrapper below is for everything else.
_crc_value = google_crc32c.value
_crc_extend = google_crc32c.extend


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``, in hardware where the CPU has it."""
    return int(_crc_value(data))


class _LengthChecks(dict[int, int]):
    """Memoised length checks: the CRC of a length's 4 bytes.

    The length check is also the running CRC a frame's crc continues from,
    so a lookup here replaces one of the two CRC calls per record. Only small
    lengths are kept, which bounds the table while covering the hot path of
    many small records; a large record's own CRC dwarfs the extra call.
    """

    _KEEP_BELOW = 8192

    def __missing__(self, length: int) -> int:
        check = crc32c(_U32.pack(length))
        if length < self._KEEP_BELOW:
            self[length] = check
        return check


_LENGTH_CHECKS = _LengthChecks()


def segment_name(seq: int) -> str:
    """The file name of segment ``seq``."""
    if not 1 <= seq <= _MAX_SEQ:
        raise ValueError(f"segment seq {seq} is outside 1..{_MAX_SEQ}")
    return f"{seq:016d}{SEGMENT_SUFFIX}"


def parse_segment_name(name: str) -> int | None:
    """The seq of a segment file name, or None for any other name."""
    match = _SEGMENT_NAME.match(name)
    if match is None:
        return None
    seq = int(match.group(1))
    return seq if seq >= 1 else None


def encode_segment_header(seq: int) -> bytes:
    """The 32-byte header of segment ``seq``."""
    body = _HEADER_BODY.pack(MAGIC, FORMAT_VERSION, 0, seq, 0)
    return body + _U32.pack(crc32c(body))


def check_segment_header(data: bytes, seq: int) -> str | None:
    """Why ``data`` is not a valid header for segment ``seq``, or None if it is.

    ``data`` is the start of the file; only its first 32 bytes are examined.
    The returned text completes "the segment header ...".
    """
    if len(data) < SEGMENT_HEADER_SIZE:
        return f"is incomplete: the file holds {len(data)} of its {SEGMENT_HEADER_SIZE} bytes"
    magic, version, flags, stored_seq, reserved = _HEADER_BODY.unpack_from(data)
    if magic != MAGIC:
        return f"has magic {magic!r}, not {MAGIC!r}: this is not a streamlet WAL segment"
    (stored_crc,) = _U32.unpack_from(data, _HEADER_BODY.size)
    actual_crc = crc32c(data[: _HEADER_BODY.size])
    if stored_crc != actual_crc:
        return f"fails its checksum (stored {stored_crc:#010x}, computed {actual_crc:#010x})"
    if version not in READABLE_VERSIONS:
        readable = ", ".join(str(v) for v in READABLE_VERSIONS)
        return (
            f"has format version {version}; this build of streamlet reads version(s) "
            f"{readable} (a newer streamlet wrote it?)"
        )
    if flags != 0 or reserved != 0:
        return f"has unknown flags {flags:#x} / reserved {reserved:#x} set"
    if stored_seq != seq:
        return f"says segment {stored_seq}, but the file name says {seq}"
    return None


def encode_frame(payload: bytes) -> bytes:
    """One record's frame: header and payload."""
    length = len(payload)
    check = _LENGTH_CHECKS[length]
    return _FRAME.pack(length, check, _crc_extend(check, payload)) + payload


def frame_header(payload: bytes) -> bytes:
    """The 12-byte header of ``payload``'s frame; the frame is the header, then the payload."""
    length = len(payload)
    check = _LENGTH_CHECKS[length]
    return _FRAME.pack(length, check, _crc_extend(check, payload))


def encode_frames_joined(payloads: Sequence[bytes], lengths: Sequence[int]) -> bytes:
    """The frames of many records back to back, as one ``bytes``.

    Equal to ``b"".join(encode_frames(payloads, lengths))``; this is the hot
    path of a large ``append_many``. When all records have the same length
    (the usual block of fixed-size records), it takes no Python-level step per
    record: length and length check are then the same in every header, so the
    payloads are joined once with a separator holding them, which leaves a
    4-byte hole in front of every payload exactly where its crc goes, and the
    crc column is filled with one strided copy from an array of the CRCs.
    """
    count = len(payloads)
    first = lengths[0] if count else 0
    if count < 2 or lengths.count(first) != count:
        return b"".join(encode_frames(payloads, lengths))
    check = _LENGTH_CHECKS[first]
    crcs = array("I", map(_crc_extend, itertools.repeat(check, count), payloads))
    if sys.byteorder != "little":
        crcs.byteswap()
    separator = bytearray(_FRAME.pack(first, check, 0))
    buf = separator.join(itertools.chain((b"",), payloads))  # a separator before each
    stride = FRAME_HEADER_SIZE + first
    if stride % 4 == 0:  # the crc field is word-aligned in every frame
        with memoryview(buf) as view, view.cast("I") as words:
            words[_CRC_OFFSET // 4 :: stride // 4] = crcs
    else:
        crc_bytes = crcs.tobytes()
        for byte in range(4):
            buf[_CRC_OFFSET + byte :: stride] = crc_bytes[byte::4]
    # Immutable from here on: nothing can change what is queued for the disk.
    return bytes(buf)


def encode_frames(payloads: Sequence[bytes], lengths: Sequence[int]) -> list[bytes]:
    """The frames of many records as pieces whose ``b"".join`` is the frames back to back.

    ``lengths`` must be ``[len(p) for p in payloads]`` (the caller has it
    already). Headers and payloads alternate in the result, so no payload is
    copied until the single join. Every step is a C-level ``map``: this is the
    hot path of a large ``append_many``.
    """
    checks: Iterable[int]
    if lengths and lengths.count(lengths[0]) == len(lengths):  # the common case of equal sizes
        checks = itertools.repeat(_LENGTH_CHECKS[lengths[0]])
    else:
        checks = list(map(_LENGTH_CHECKS.__getitem__, lengths))
    headers = list(map(_FRAME.pack, lengths, checks, map(_crc_extend, checks, payloads)))
    pieces: list[bytes] = [b""] * (2 * len(headers))
    pieces[::2] = headers
    pieces[1::2] = payloads
    return pieces


class FrameFault(enum.Enum):
    """Why a frame does not check out."""

    SHORT_HEADER = "short header"
    """Fewer than 12 bytes are left for the frame header."""
    BAD_LENGTH_CHECK = "bad length check"
    """The length field does not match its check: the length cannot be trusted."""
    PAST_END = "past end"
    """The header checks out, but the frame runs past the end of the data."""
    BAD_CRC = "bad crc"
    """The frame is complete, but its crc does not match the payload."""


class FrameCheck(NamedTuple):
    """What :func:`check_frame` found at one offset."""

    fault: FrameFault | None
    """None when the frame is intact."""
    length: int
    """The payload length; trustworthy unless the fault is SHORT_HEADER or BAD_LENGTH_CHECK."""
    reason: str
    """A sentence fragment saying what is wrong, empty when the frame is intact."""


def check_frame(buf: bytes, offset: int, end: int) -> FrameCheck:
    """Check the frame starting at ``buf[offset]``, with ``buf[end]`` the end of the data.

    This is the slow, explaining twin of :func:`scan`, used where a reason is
    needed (reports, errors) or where a damaged frame is stepped over (dump).
    """
    left = end - offset
    if left < FRAME_HEADER_SIZE:
        return FrameCheck(
            FrameFault.SHORT_HEADER,
            0,
            f"only {left} bytes are left, fewer than a {FRAME_HEADER_SIZE}-byte frame header",
        )
    length, check, stored = _FRAME.unpack_from(buf, offset)
    expected = _LENGTH_CHECKS[length]
    if check != expected:
        return FrameCheck(
            FrameFault.BAD_LENGTH_CHECK,
            length,
            f"the length field ({length}) fails its check "
            f"(stored {check:#010x}, computed {expected:#010x})",
        )
    stop = offset + FRAME_HEADER_SIZE + length
    if stop > end:
        return FrameCheck(
            FrameFault.PAST_END,
            length,
            f"the frame of a {length}-byte record runs past the end of the data "
            f"({left - FRAME_HEADER_SIZE} payload bytes are there)",
        )
    actual = _crc_extend(check, buf[offset + FRAME_HEADER_SIZE : stop])
    if actual != stored:
        return FrameCheck(
            FrameFault.BAD_CRC,
            length,
            f"the {length}-byte record fails its checksum "
            f"(stored {stored:#010x}, computed {actual:#010x})",
        )
    return FrameCheck(None, length, "")


def scan(buf: bytes, start: int, end: int) -> tuple[list[tuple[int, bytes]], int]:
    """Decode the intact frames in ``buf[start:end]``, stopping at the first that is not.

    Returns ``(records, stop)``: ``records`` holds ``(offset, payload)`` for
    each intact frame in order (offsets index ``buf``), and ``stop`` is where
    decoding stopped; ``stop == end`` means every byte was consumed. When
    ``stop < end``, :func:`check_frame` at ``stop`` says why, and
    :func:`is_torn` whether that is a torn tail.
    """
    records: list[tuple[int, bytes]] = []
    append = records.append
    unpack = _FRAME.unpack_from
    checks = _LENGTH_CHECKS
    extend = _crc_extend
    offset = start
    limit = end - FRAME_HEADER_SIZE
    while offset <= limit:
        length, check, stored = unpack(buf, offset)
        if check != checks[length]:
            break
        stop = offset + FRAME_HEADER_SIZE + length
        if stop > end:
            break
        payload = buf[offset + FRAME_HEADER_SIZE : stop]
        if extend(check, payload) != stored:
            break
        append((offset, payload))
        offset = stop
    return records, offset


def is_torn(tail: bytes, tail_offset: int, offset: int, check: FrameCheck) -> bool:
    """Whether the bad frame at file offset ``offset`` is a torn tail (see the module doc).

    ``tail`` holds the file's bytes from ``tail_offset`` to the end of the
    file; ``tail_offset`` must be a multiple of :data:`SECTOR_SIZE` and at
    most ``offset``, so whole sectors around the frame can be examined.
    ``check`` is :func:`check_frame` of the frame. Only meaningful for the last
    segment: anywhere else a bad frame is corruption.
    """
    if tail_offset % SECTOR_SIZE or tail_offset > offset:
        raise ValueError("tail must start on a sector boundary at or before the frame")
    if check.fault in (FrameFault.SHORT_HEADER, FrameFault.PAST_END):
        return True
    eof = tail_offset + len(tail)
    rel = offset - tail_offset
    if tail.count(0, rel) == len(tail) - rel:
        return True
    if tail.count(0, rel, rel + FRAME_HEADER_SIZE) == FRAME_HEADER_SIZE:
        return True
    boundary = offset - offset % SECTOR_SIZE + SECTOR_SIZE
    if (
        check.fault is FrameFault.BAD_LENGTH_CHECK
        and boundary < offset + FRAME_HEADER_SIZE
        and tail.count(0, rel, boundary - tail_offset) == boundary - offset
    ):
        return True  # the header's first sector kept its old content (see the module doc)
    if check.fault is FrameFault.BAD_CRC:
        span_end = offset + FRAME_HEADER_SIZE + check.length
    else:
        span_end = min(eof, offset + FRAME_HEADER_SIZE)
    sector = offset - offset % SECTOR_SIZE
    while sector < span_end:
        lo = sector - tail_offset
        hi = min(sector + SECTOR_SIZE, eof) - tail_offset
        if tail.count(0, lo, hi) == hi - lo:
            return True
        sector += SECTOR_SIZE
    return False
