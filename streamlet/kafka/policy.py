"""Pure decisions about Kafka: where a partition starts, what a lost offset does, what a
failed transaction means.

Both are decided from offsets the caller has already looked up (the
partition's log start and end, the group's committed offset), so they are
tested without a broker; the source does the lookups and the logging.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, NamedTuple

__all__ = [
    "OutOfRange",
    "Start",
    "StartPolicy",
    "TransactionFailure",
    "out_of_range",
    "start_offset",
    "transaction_failure",
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
