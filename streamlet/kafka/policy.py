"""Pure decisions of the Kafka sources: where a partition starts, what a lost offset does.

Both are decided from offsets the caller has already looked up (the
partition's log start and end, the group's committed offset), so they are
tested without a broker; the source does the lookups and the logging.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, NamedTuple

__all__ = ["OutOfRange", "Start", "StartPolicy", "out_of_range", "start_offset"]

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
