"""Values that flow through streamlet: records, offset ranges, blocks, batches.

Nothing here does I/O. A :class:`Record` is one event from a source. A
:class:`Batch` is what a handler receives: every record that batch ``id``
covers, plus the offset ranges (direct sources) and blocks (receivers) it was
built from, so that a re-run after a crash can be checked to read exactly the
same input.

Blocks are stored in the data WAL in the binary layout written down in
:func:`encode_records`; it carries a format version so that old logs stay
readable or are refused by name.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, Protocol

from typing_extensions import TypeVar

__all__ = [
    "Batch",
    "BlockRef",
    "Decoded",
    "OffsetRange",
    "Record",
    "decode_records",
    "encode_records",
]


D = TypeVar("D", covariant=True, default=object)
"""The type of a record's ``data``: what its source's ``decode`` returns.

Write ``sl.Batch[Order]`` in a handler's signature and ``record.data`` is an
``Order``; a bare ``sl.Batch`` has ``data: object``."""


class Decoded(Protocol[D]):
    """A source registered with ``decode``, as the type checker sees it: ``Decoded[T]``.

    ``app.source(src, decode=fn)`` returns ``src`` itself, typed
    ``Decoded[T]`` when ``fn`` returns ``T``, so that ``@app.handler`` checks
    the handler takes a ``Batch[T]`` (or a ``Batch`` of a wider type, such
    as a bare ``sl.Batch``). Pass it to ``app.handler``; where the source
    object itself is wanted (``KafkaSink(consume_from=...)``), use the
    object given to ``app.source``. Nothing has this type at run time.
    """

    @property
    def name(self) -> str:
        """The source's name in the app."""
        ...

    def __streamlet_decoded__(self) -> D:
        """Never called: it only carries ``T`` for the type checker."""
        ...


class Record(NamedTuple, Generic[D]):
    """One event, as a source delivered it; ``Record[T]``: its ``data`` is a ``T``."""

    value: bytes
    """The payload, as bytes; handlers decode it."""
    key: bytes | None = None
    """The key, where the source has one (Kafka); None otherwise."""
    timestamp: float = 0.0
    """Event time in seconds since the epoch, as the source gave it (0.0: none)."""
    source: str = ""
    """Name of the source the record came from."""
    partition: int = 0
    """Partition within the source (0 for unpartitioned sources)."""
    offset: int = -1
    """Offset within the partition for replayable sources; -1 where there is none."""
    data: D = None  # type: ignore[assignment]  # None until decoded, when a source has decode
    """``value`` decoded by the source's ``decode`` function (``app.source(...,
    decode=...)``); None when the source has none. Never stored: a re-run
    decodes again, so ``decode`` must be deterministic."""
    headers: tuple[tuple[str, bytes | None], ...] = ()
    """Kafka record headers, ``(name, value)`` in order, when the source is
    asked for them (``KafkaSource(headers=True)``); () otherwise."""


class OffsetRange(NamedTuple):
    """The half-open range ``[start, until)`` of one partition a batch reads."""

    source: str
    """Name of the direct source."""
    partition: int
    """Partition number."""
    start: int
    """First offset included."""
    until: int
    """First offset not included; a re-run never reads at or past it."""

    @property
    def size(self) -> int:
        """How many offsets the range spans (records, for gap-free sources)."""
        return self.until - self.start


class BlockRef(NamedTuple):
    """Where a received block lives in the data WAL."""

    id: int
    """Block id, unique and increasing within the app's state directory."""
    source: str
    """Name of the receiver that stored it."""
    segment: int
    """WAL segment holding the block."""
    offset: int
    """Byte offset of the block's frame in that segment."""
    length: int
    """Payload length of the frame."""
    records: int
    """Number of records in the block."""

    @classmethod
    def from_json(cls, data: Sequence[Any]) -> BlockRef:
        """A ref from its JSON form, ``[id, source, segment, offset, length, records]``.

        Raises:
            ValueError, TypeError, IndexError: ``data`` is not that form.
        """
        if len(data) != 6:
            raise ValueError(f"a block ref has 6 fields, not {len(data)}: {data!r}")
        return cls(int(data[0]), str(data[1]), *(int(v) for v in data[2:]))


@dataclass(frozen=True, slots=True)
class Batch(Generic[D]):
    """One micro-batch: the input a handler runs on.

    ``Batch[T]``: its records' ``data`` are ``T`` (their sources' ``decode``
    returns ``T``); a handler declares it as ``batch: sl.Batch[T]``.

    Attributes:
        id: the batch number, increasing by one per batch for the life of
            the state directory; sinks use it to apply a batch at most once.
        time: the wall-clock time (seconds since the epoch) the batch was
            scheduled for.
        records: the records, in source order (per partition, by offset).
        ranges: offset ranges read from direct sources.
        blocks: blocks read from receivers.
    """

    id: int
    time: float
    records: Sequence[Record[D]]
    ranges: tuple[OffsetRange, ...] = ()
    blocks: tuple[BlockRef, ...] = ()

    def __iter__(self) -> Iterator[Record[D]]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def for_sources(self, names: Sequence[str]) -> Batch[D]:
        """The same batch restricted to records, ranges and blocks of ``names``."""
        wanted = set(names)
        present = {r.source for r in self.ranges} | {b.source for b in self.blocks}
        if present <= wanted and all(r.source in wanted for r in self.records):
            return self  # nothing to leave out: no copy per handler
        return Batch(
            id=self.id,
            time=self.time,
            records=[r for r in self.records if r.source in wanted],
            ranges=tuple(r for r in self.ranges if r.source in wanted),
            blocks=tuple(b for b in self.blocks if b.source in wanted),
        )


# Block payload layout (little-endian):
#   header:  version u8 | count u32
#   record:  flags u8 (bit 0: key present, bit 1: headers present)
#            | timestamp f64 | partition i32 | offset i64 | key_len u32
#            | value_len u32 | key | value [| headers]
#   headers: count u16, then per header: name_len u16 | value_len u32
#            (0xFFFFFFFF: null) | name (UTF-8) | value
# The source name is not repeated per record: a block belongs to one source.
# Version 1 has no headers (bit 1 never set): blocks without headers are
# still written as version 1, byte for byte as before headers existed.
# Version 2 is a block with headers on at least one record, so a streamlet
# that predates them refuses it by its version rather than misreading it.
_BLOCK_VERSION = 1
_HEADERS_VERSION = 2
_HEADER = struct.Struct("<BI")
_RECORD = struct.Struct("<BdiqII")
_HEADER_COUNT = struct.Struct("<H")
_HEADER_SIZES = struct.Struct("<HI")
_NULL = 0xFFFFFFFF
_KEY, _HEADERS = 1, 2


def _encode_headers(headers: tuple[tuple[str, bytes | None], ...]) -> bytes:
    parts = [_HEADER_COUNT.pack(len(headers))]
    for name, value in headers:
        raw = name.encode()
        parts.append(_HEADER_SIZES.pack(len(raw), _NULL if value is None else len(value)))
        parts.append(raw)
        if value:
            parts.append(value)
    return b"".join(parts)


def encode_records(records: Sequence[Record]) -> bytes:
    """Encode one source's records as a block payload for the data WAL.

    Raises:
        ValueError: a record has more than 65,535 headers or a header name over
            65,535 bytes (Kafka allows neither in practice).
    """
    parts: list[bytes] = [b""]  # the header, once the version is known
    pack = _RECORD.pack
    version = _BLOCK_VERSION
    for record in records:
        key = record.key
        headers = record.headers
        try:
            parts.append(
                pack(
                    (_KEY if key is not None else 0) | (_HEADERS if headers else 0),
                    record.timestamp,
                    record.partition,
                    record.offset,
                    len(key) if key is not None else 0,
                    len(record.value),
                )
            )
            if key:
                parts.append(key)
            parts.append(record.value)
            if headers:
                parts.append(_encode_headers(headers))
                version = _HEADERS_VERSION
        except struct.error as exc:
            raise ValueError(f"record at offset {record.offset} cannot be stored: {exc}") from exc
    parts[0] = _HEADER.pack(version, len(records))
    return b"".join(parts)


def _decode_headers(
    payload: bytes, pos: int, end_of_payload: int
) -> tuple[tuple[tuple[str, bytes | None], ...], int]:
    if pos + _HEADER_COUNT.size > end_of_payload:
        raise ValueError(f"block payload cut short at byte {pos}")
    (count,) = _HEADER_COUNT.unpack_from(payload, pos)
    if count == 0:
        raise ValueError(f"block payload has an empty header list at byte {pos}")
    pos += _HEADER_COUNT.size
    headers: list[tuple[str, bytes | None]] = []
    for _ in range(count):
        if pos + _HEADER_SIZES.size > end_of_payload:
            raise ValueError(f"block payload cut short at byte {pos}")
        name_len, value_len = _HEADER_SIZES.unpack_from(payload, pos)
        pos += _HEADER_SIZES.size
        end = pos + name_len + (0 if value_len == _NULL else value_len)
        if end > end_of_payload:
            raise ValueError(f"block payload cut short at byte {pos}")
        try:
            name = payload[pos : pos + name_len].decode()
        except UnicodeDecodeError as exc:
            raise ValueError(f"block payload has a header name that is not UTF-8 at {pos}") from exc
        value = None if value_len == _NULL else payload[pos + name_len : end]
        headers.append((name, value))
        pos = end
    return tuple(headers), pos


def decode_records(payload: bytes, source: str) -> list[Record]:
    """Decode a block payload written by :func:`encode_records`.

    Raises:
        ValueError: the payload is not a block of a known version or is cut
            short; the WAL's checksum makes this a sign of a bug or of a block
            written by a newer streamlet, never of a torn write.
    """
    if len(payload) < _HEADER.size:
        raise ValueError(f"block payload of {len(payload)} bytes is shorter than its header")
    version, count = _HEADER.unpack_from(payload, 0)
    if version not in (_BLOCK_VERSION, _HEADERS_VERSION):
        raise ValueError(
            f"block format version {version} is not readable by this streamlet"
            f" (reads versions {_BLOCK_VERSION} and {_HEADERS_VERSION})"
        )
    allowed = _KEY | (_HEADERS if version == _HEADERS_VERSION else 0)
    with_headers = 0
    pos = _HEADER.size
    unpack = _RECORD.unpack_from
    size = _RECORD.size
    end_of_payload = len(payload)
    make = tuple.__new__  # Record's own constructor costs a Python call per record
    out: list[Record] = []
    append = out.append
    for _ in range(count):
        if pos + size > end_of_payload:
            raise ValueError(f"block payload cut short at byte {pos}")
        flags, ts, partition, offset, key_len, value_len = unpack(payload, pos)
        if flags & ~allowed or (key_len and not flags & _KEY):
            raise ValueError(f"block payload has a malformed record at byte {pos}")
        pos += size
        end = pos + key_len + value_len
        if end > end_of_payload:
            raise ValueError(f"block payload cut short at byte {pos}")
        key = payload[pos : pos + key_len] if flags & _KEY else None
        value = payload[pos + key_len : end]
        pos = end
        headers: tuple[tuple[str, bytes | None], ...] = ()
        if flags & _HEADERS:
            headers, pos = _decode_headers(payload, pos, end_of_payload)
            with_headers += 1
        append(make(Record, (value, key, ts, source, partition, offset, None, headers)))
    if version == _HEADERS_VERSION and not with_headers:
        raise ValueError(f"block of version {version} has no record with headers")
    if pos != len(payload):
        raise ValueError(f"block payload has {len(payload) - pos} unexpected trailing bytes")
    return out
