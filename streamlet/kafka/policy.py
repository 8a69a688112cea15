"""Pure decisions about Kafka: where a partition starts, what a lost offset does, where a
fetch is cut, what a failed transaction means, the names of a sink's marker, and where a
group-mode batch stands against its task's marker.

Each is decided from values the caller has already looked up (the
partition's log start and end, the group's committed offset, the fetched
records, the app and handler), so they are tested without a broker; the
source and the sink do the lookups and the logging.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal, NamedTuple

from streamlet.records import OffsetRange, Record

if TYPE_CHECKING:
    from streamlet.sinks.base import SinkContext

__all__ = [
    "MARKER_METADATA",
    "MARKER_PREFIX",
    "TASK_MARKER_PREFIX",
    "TASK_MARKER_V2",
    "OutOfRange",
    "Start",
    "StartPolicy",
    "TaskStanding",
    "TransactionFailure",
    "batch_tag",
    "java_string_hash",
    "legacy_marker_group",
    "marker_group",
    "marker_metadata",
    "marker_owner",
    "out_of_range",
    "split",
    "start_offset",
    "task_marker_batch",
    "task_marker_group",
    "task_marker_metadata",
    "task_marker_start",
    "task_standing",
    "transaction_failure",
    "transactional_id",
]

StartPolicy = Literal["committed", "earliest", "latest"] | Mapping[int, int]
"""``KafkaSource(start=...)``: a named policy or explicit ``{partition: offset}``."""


class Start(NamedTuple):
    """Where a partition starts, and why (for the log)."""

    offset: int
    how: str


def start_offset(
    partition: int,
    start: StartPolicy,
    *,
    begin: int,
    end: int,
    added: bool,
    group_id: str | None,
    committed: int | None,
) -> Start:
    """Where a partition with no position in streamlet's state starts; pure.

    Args:
        partition: the partition.
        start: the source's ``start`` setting.
        begin: the partition's log start offset.
        end: its end (the last stable offset with ``read_committed``).
        added: the partition appeared after the source started: all its
            records are new, so it starts at ``begin`` whatever ``start`` says.
        group_id: the source's consumer group (None: none).
        committed: the group's committed offset for the partition (None: none,
            or not looked up because ``start`` does not need it).

    Returns:
        The offset, which may lie outside ``[begin, end]`` (an explicit or
        committed offset whose records were deleted): see :func:`out_of_range`.
    """
    if added:
        return Start(begin, "earliest (a partition added while running)")
    if isinstance(start, Mapping):
        if partition in start:
            return Start(start[partition], "explicit")
        return Start(begin, "earliest (not named in start)")
    if start == "earliest":
        return Start(begin, "earliest")
    if start == "latest":
        return Start(end, "latest")
    if group_id is None:
        return Start(begin, "earliest (start='committed' without a group_id)")
    if committed is None:
        return Start(begin, f"earliest (group {group_id!r} has no committed offset for it)")
    return Start(committed, f"committed by group {group_id!r}")


class OutOfRange(NamedTuple):
    """What to do about an offset that is not in its partition's log.

    ``target`` None means "fail" (nothing is skipped without being asked);
    otherwise reading continues at ``target``, and ``problem`` says what is
    lost, for the log.
    """

    target: int | None
    problem: str


def out_of_range(
    offset: int,
    *,
    begin: int,
    end: int,
    until: int | None,
    policy: Literal["fail", "earliest", "latest"],
    where: str,
) -> OutOfRange:
    """Apply ``on_out_of_range`` to an offset outside ``[begin, end]``; pure.

    Args:
        offset: the offset that was not found.
        begin: the partition's log start offset now.
        end: its end now.
        until: the end of the batch's range (direct mode: never read past
            it), or None for an open-ended read.
        policy: the source's ``on_out_of_range``.
        where: the topic-partition, for the message.
    """
    if offset < begin:
        problem = (
            f"offsets [{offset}, {begin}) of {where} were deleted (retention or"
            f" delete-records) before they were read"
        )
    else:
        problem = (
            f"offset {offset} of {where} is past the partition's end ({end}): the topic"
            " was recreated or truncated"
        )
    if policy == "fail":
        return OutOfRange(None, problem)
    if policy == "earliest":
        target = begin if offset < begin else (until if until is not None else begin)
    else:
        target = until if until is not None else end
    if until is not None:
        target = min(target, until)
    return OutOfRange(target, problem)


TransactionFailure = Literal["fenced", "output", "aborted", "unknown"]
"""What a failed KafkaSink transaction means (see :func:`transaction_failure`)."""


def transaction_failure(
    *,
    fenced: bool,
    partitioner_failed: bool,
    too_large: bool,
    committing: bool,
    timed_out: bool,
    producer_broken: bool,
) -> TransactionFailure:
    """Classify a KafkaSink transaction that raised; pure.

    Returns:
        ``"fenced"``: another producer took the transactional id; the sink
        stops. ``"output"``: an output cannot be written (the user's
        partitioner failed, or a record is too large): abort, and the handler
        counts as failed. ``"aborted"``: the transaction failed before the
        commit was asked for and can only abort; nothing is visible.
        ``"unknown"``: it timed out, failed while committing, or the
        producer broke, so it may have committed: a new producer settles it
        and the marker says which (never a guess).

    Args:
        fenced: the error (or the producer's) is ProducerFenced or an
            invalid epoch.
        partitioner_failed: the user's partitioner raised or answered a
            partition the topic lacks.
        too_large: the broker or the producer refused a record as too large.
        committing: ``commit_transaction`` had been called.
        timed_out: the transaction ran past its timeout.
        producer_broken: the producer's sender failed (its state is unknown).
    """
    if fenced:
        return "fenced"
    if partitioner_failed:
        return "output"
    if committing or timed_out or producer_broken:
        return "unknown"
    return "output" if too_large else "aborted"


# -- direct reads ----------------------------------------------------------------


def _record_offset(record: Record) -> int:
    return record.offset


def split(records: list[Record], start: int, until: int) -> tuple[list[Record], list[Record]]:
    """``records`` cut into those in ``[start, until)`` and those at or past ``until``.

    ``records`` are one partition's, in increasing offset order, as a fetch
    returns them; any before ``start`` are dropped. Bisection rather than a
    test per record: a batch may hold hundreds of thousands.
    """
    if not records:
        return [], []
    first, last = records[0].offset, records[-1].offset
    low = 0 if first >= start else bisect_left(records, start, key=_record_offset)
    high = len(records) if last < until else bisect_left(records, until, low, key=_record_offset)
    return records[low:high], records[high:]


# -- the sink's marker --------------------------------------------------------------

MARKER_METADATA = "streamlet-sink/1"
"""Metadata of a marker written before markers named their state directory."""
MARKER_PREFIX = "streamlet-sink/2 "
"""Start of a marker's metadata; the state directory's id follows it."""


def marker_metadata(state_id: str) -> str:
    """The metadata of a marker written under the state directory ``state_id``."""
    return MARKER_PREFIX + state_id


def marker_owner(metadata: str) -> str | None:
    """The state id a marker's metadata names ("" for an older marker); None: not a marker."""
    if metadata == MARKER_METADATA:
        return ""
    if metadata.startswith(MARKER_PREFIX):
        return metadata[len(MARKER_PREFIX) :]
    return None


_HASH_MODULUS = 1 << 32
_A = ord("A")


def java_string_hash(text: str) -> int:
    """Java's ``String.hashCode`` of ``text``, as an unsigned 32-bit number.

    Java hashes UTF-16 code units, so a character outside the BMP counts as
    its two surrogates.
    """
    units = text.encode("utf-16-be")
    h = 0
    for i in range(0, len(units), 2):
        h = (31 * h + (units[i] << 8 | units[i + 1])) & 0xFFFFFFFF
    return h


def _tail(start: int, target: int, length: int, letters: int) -> str | None:
    """``length`` characters from "A" on that take the hash from ``start`` to ``target``.

    Appending ``c_0 .. c_(n-1)`` to a string of hash ``h`` gives
    ``h·31^n + Σ c_i·31^(n-1-i)`` (mod 2^32). With ``c_i = "A" + d_i``, the
    ``d_i`` are the base-31 digits of what is left; the tail exists if that
    fits in ``length`` digits, each below ``letters``.
    """
    rest = target - start * 31**length - sum(_A * 31**j for j in range(length))
    rest %= _HASH_MODULUS
    digits: list[int] = []
    for _ in range(length):
        rest, digit = divmod(rest, 31)
        digits.append(digit)
    if rest or max(digits) >= letters:
        return None
    return "".join(chr(_A + d) for d in reversed(digits))


def _suffix_for(prefix: str, target: int) -> str:
    """Capital letters that give ``prefix + suffix`` the Java hash ``target``.

    Three letters are tried in order ("AAA", "AAB", ...) followed by the six
    that make the hash exact, if six letters can (about one try in 14).
    Should no three-letter start work, seven characters from "A" to "_"
    always can: 31^7 is more than 2^32.
    """
    start = java_string_hash(prefix)
    for head in itertools.product(range(26), repeat=3):
        h = start
        for digit in head:
            h = (31 * h + _A + digit) % _HASH_MODULUS
        tail = _tail(h, target, 6, 26)
        if tail is not None:
            return "".join(chr(_A + d) for d in head) + tail
    full = _tail(start, target, 7, 31)
    assert full is not None
    return full


def transactional_id(context: SinkContext, task: int | None = None) -> str:
    """The transactional id of the KafkaSink of ``context``'s app and handler.

    In group mode each task has its own (``task``): starting a task's producer
    fences the task's earlier owner and nobody else (see :mod:`streamlet.kafka.sink`).
    """
    base = f"streamlet.{context.app}.{context.handler}"
    return base if task is None else f"{base}.t{task}"


def marker_group(context: SinkContext, source_group: str | None = None) -> str:
    """The consumer group holding the marker of ``context``'s app and handler.

    Without a source group it is ``streamlet-sink.<app>.<handler>``. With
    one, a suffix of capital letters gives the name the Java hash of
    ``source_group``, so that Kafka keeps both groups in the same partition
    of ``__consumer_offsets`` and one transaction can commit both (see
    :mod:`streamlet.kafka.sink`). The name does not depend on the state
    directory: a new state directory must find the marker of the old one and
    be refused.
    """
    return _group_name(f"streamlet-sink.{context.app}.{context.handler}", source_group)


def legacy_marker_group(context: SinkContext, source_group: str | None = None) -> str:
    """The marker group's name before markers named their state directory.

    It held the start of the state directory's id; a sink still reads it, so
    that an app upgraded in place keeps its count of written batches.
    """
    base = f"streamlet-sink.{context.app}.{context.handler}"
    if context.state_id:
        base += f".{context.state_id[:12]}"
    return _group_name(base, source_group)


def _group_name(base: str, source_group: str | None) -> str:
    if source_group is None:
        return base
    prefix = base + "."
    return prefix + _suffix_for(prefix, java_string_hash(source_group))


# -- the sink's markers in group mode -------------------------------------------------

TASK_MARKER_PREFIX = "streamlet-task/1 "
"""Start of a first-version task marker's metadata: the start of the range it ends follows."""

TASK_MARKER_V2 = "streamlet-task/2 "
"""Start of a task marker's metadata now: the range's start, then the batch that wrote it."""

TaskStanding = Literal["write", "written", "overlap", "gap"]
"""Where a group-mode batch stands against its task's marker (see :func:`task_standing`)."""


def task_marker_group(context: SinkContext, source_group: str | None = None) -> str:
    """The consumer group holding the task markers of ``context``'s app and handler.

    ``streamlet-tasks.<app>.<handler>``, with the suffix of :func:`marker_group`
    when a source group's offsets share the transaction. A name apart from
    the single-worker marker's: that one counts batch ids, these count input
    offsets, and neither must be read as the other.
    """
    return _group_name(f"streamlet-tasks.{context.app}.{context.handler}", source_group)


def task_marker_metadata(start: int, batch: str) -> str:
    """The metadata of a task marker ending the range that started at ``start``.

    The offset says where the task's input resumes; the start says which
    range that was, for whoever reads the group with Kafka's tools. ``batch``
    (:func:`batch_tag`) names the batch that wrote it: an idle batch reads no
    input, so its marker has the offset of the one before, and only this
    tells whether that idle batch committed (see :func:`task_standing`).
    """
    return f"{TASK_MARKER_V2}{start} {batch}"


def batch_tag(state_id: str, batch_id: int, batch_time: float) -> str:
    """A batch's name in its task marker: the worker's state directory, batch id and time.

    The time (ms) tells two batches of one id apart when a state directory
    was restored from a backup and reuses ids.
    """
    return f"{state_id}:{batch_id}:{round(batch_time * 1000)}"


def _parse_task_marker(metadata: str) -> tuple[int, str | None] | None:
    """(range start, batch tag or None) of a task marker's metadata; None: not a marker."""
    if metadata.startswith(TASK_MARKER_PREFIX):
        number, tag = metadata[len(TASK_MARKER_PREFIX) :], None
    elif metadata.startswith(TASK_MARKER_V2):
        number, _, tag = metadata[len(TASK_MARKER_V2) :].partition(" ")
        if not tag or " " in tag:
            return None
    else:
        return None
    return (int(number), tag) if number.isdigit() else None


def task_marker_start(metadata: str) -> int | None:
    """The range start a task marker's metadata names; None: not a task marker."""
    parsed = _parse_task_marker(metadata)
    return None if parsed is None else parsed[0]


def task_marker_batch(metadata: str) -> str | None:
    """The batch tag a task marker's metadata names (None: a first-version marker, or none)."""
    parsed = _parse_task_marker(metadata)
    return None if parsed is None else parsed[1]


def task_standing(
    ranges: Sequence[OffsetRange],
    marker: Mapping[str, int],
    *,
    batch: str | None = None,
    marked: Mapping[str, str | None] | None = None,
) -> TaskStanding:
    """Where a group-mode batch stands against its task's marker; pure.

    Args:
        ranges: the batch's offset ranges, all of the task's partition.
        marker: source name -> the next offset the task's committed batches
            left to read (a source without an entry has none committed).
        batch: the batch's tag (:func:`batch_tag`), given where idle batches
            are written: an idle batch's ranges are empty, at the marker,
            and it was written only if the marker names it (``marked``:
            source name -> the tag its marker carries). Without ``batch``,
            empty ranges at the marker count as written.

    Returns:
        ``"written"``: every range ends at or below its marker, so the batch
        was committed before (a re-run): skip it. ``"write"``: every range
        starts at its marker, or its source has none: the next input. The
        rest cannot happen while one owner resumes from the marker, and mean
        two owners or a bug: ``"gap"``, a range starts past its marker
        (input would be skipped); ``"overlap"``, a range crosses its marker,
        or part of the batch is committed and part is not (input would be
        written twice).
    """
    written = True
    behind = False
    for r in ranges:
        at = marker.get(r.source)
        if at is None:
            written = False
            continue
        if r.start > at:
            return "gap"
        if r.start < at < r.until:
            return "overlap"
        written = written and r.until <= at
        behind = behind or r.start < at
    if written:
        idle = bool(ranges) and all(r.start == r.until == marker[r.source] for r in ranges)
        if batch is not None and idle:
            tags = marked or {}
            return "written" if all(tags.get(r.source) == batch for r in ranges) else "write"
        return "written"
    return "overlap" if behind else "write"
