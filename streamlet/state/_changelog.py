"""A stateful handler's changelog in group mode: what goes to Kafka, and what comes back.

In group mode a task's state must move with the task. Each batch's changed
keys are written to a compacted changelog topic, partition = the task, in
the same Kafka transaction as the batch's outputs and input position (the
handler's :class:`~streamlet.kafka.sink.KafkaSink` does that), so what the
changelog holds is always exactly the state of what the task committed. A
worker taking a task over first fences the earlier owner, then replays the
partition into its local store (``streamlet/kafka/changelog.py``); the local
store is a cache of the changelog that is never ahead of it, because it
commits a batch's changes only after the transaction committed.

This module is pure: the topic's name, and the record format.

Record format: the key is the stored key (:func:`~streamlet.state._store.
encode_key`'s form, streamlet's own entries included); the value is the
batch time of the write as an 8-byte big-endian double (what a ``ttl``
counts from), followed by the orjson encoding of the value. A delete is a
record without a value (a tombstone, which compaction eventually removes).
Replaying any suffix of the partition that starts at or before a store's
position gives the same state, since every record carries a whole value:
so a store's position need only be a lower bound.

Each partition's first record is its *birth*: streamlet's own entry
:data:`BIRTH_KEY` with a random id, written in the task's first transaction
into the empty partition and never again, so compaction never removes it.
A local store holds the birth it was built from; a store whose birth is not
the partition's was built from a topic since deleted and made anew, whose
offsets mean nothing to it (:func:`check_birth`). Partitions written before
births existed start with another record and are not checked.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import orjson

from streamlet.errors import ConfigError
from streamlet.records import Batch, OffsetRange
from streamlet.state._store import INTERNAL, Changes, StateStore

__all__ = [
    "BIRTH_KEY",
    "STALE_AFTER",
    "ChangelogSink",
    "ChangelogWrite",
    "changelog_topic",
    "check_birth",
    "decode_entry",
    "encode_changes",
    "replay_start",
    "replayed",
    "stored_birth",
    "stored_positions",
    "with_birth",
    "with_positions",
]

BIRTH_KEY = INTERNAL + b"changelog:birth"
"""The key of a changelog partition's first record: the id of the topic's incarnation."""

_TOUCHED = struct.Struct(">d")
STALE_AFTER = 6 * 3600.0
"""Seconds a task's local store may have been out of touch with its changelog
and still be replayed from its position rather than rebuilt. Compaction
drops a tombstone ``delete.retention.ms`` (24 h, set on the topics streamlet
makes) after it cleaned the tombstone's segment: a store older than that
could miss a delete. Kafka Streams' answer is alike (``state.cleanup.delay.ms``
removes stores of tasks a worker has not owned for ten minutes)."""
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]+")
_MAX_TOPIC = 249


def changelog_topic(app: str, handler: str) -> str:
    """The changelog topic of ``handler`` in ``app``: ``<app>.<handler>.changelog``.

    Raises:
        ConfigError: the name is not a valid Kafka topic name (Kafka allows
            letters, digits, ``.``, ``_`` and ``-``, at most 249 of them).
    """
    topic = f"{app}.{handler}.changelog"
    if not _TOPIC_NAME.fullmatch(topic) or len(topic) > _MAX_TOPIC:
        raise ConfigError(
            f"handler {handler!r} of app {app!r} keeps state in group mode, so its state goes"
            f" to the Kafka topic {topic!r}, which is not a valid topic name (letters, digits,"
            f" '.', '_' and '-', at most {_MAX_TOPIC}). Give the app and the handler"
            " (name=...) names made of those characters"
        )
    return topic


@dataclass(slots=True)
class ChangelogWrite:
    """One batch's state changes, to go into the sink's transaction.

    Attributes:
        topic: the changelog topic.
        partition: the task.
        records: (key, value) pairs in :func:`encode_changes`' format; a
            None value deletes the key.
        next_offset: set by the sink once its transaction committed: the
            changelog offset after the batch's last record (None: unknown,
            as when the batch had been written before; the store's position
            then stays where it was, which only means a longer replay).
    """

    topic: str
    partition: int
    records: Sequence[tuple[bytes, bytes | None]]
    next_offset: int | None = field(default=None)


class ChangelogSink(Protocol):
    """A sink that carries a handler's changelog in its transaction (KafkaSink in group mode)."""

    def changelog_settings(self) -> dict[str, Any]:
        """How a client reaches the changelog's cluster (servers, security settings)."""
        ...

    async def commit_changelog(
        self, batch: Batch, outputs: Sequence[object], changelog: ChangelogWrite
    ) -> bool:
        """Commit ``outputs`` and ``changelog`` in one transaction (see KafkaSink)."""
        ...


def encode_changes(changes: Changes) -> list[tuple[bytes, bytes | None]]:
    """The changelog records of one batch's changes: the birth if any, deletes, then writes."""
    touched = _TOUCHED.pack(changes.time)
    records: list[tuple[bytes, bytes | None]] = []
    birth = changes.writes.get(BIRTH_KEY)
    if birth is not None:  # the partition's first record
        records.append((BIRTH_KEY, touched + birth))
    records.extend((k, None) for k in sorted(changes.deletes))
    records.extend((k, touched + v) for k, v in changes.writes.items() if k != BIRTH_KEY)
    return records


def decode_entry(
    key: bytes | None, value: bytes | None
) -> tuple[bytes, tuple[bytes, float] | None]:
    """A changelog record as (stored key, (value, touched)), or (key, None) for a delete.

    An empty value is a delete too: streamlet's Kafka reads turn a missing
    value into ``b""``, and a written value is never shorter than 9 bytes.

    Raises:
        ValueError: the record is not in the changelog's format.
    """
    if not key:
        raise ValueError("a changelog record without a key")
    if not value:
        return key, None
    if len(value) <= _TOUCHED.size:
        raise ValueError(f"a changelog value of {len(value)} byte(s), too short")
    (touched,) = _TOUCHED.unpack_from(value)
    return key, (value[_TOUCHED.size :], touched)


def replayed(
    entries: Iterable[tuple[bytes, tuple[bytes, float] | None]],
) -> tuple[dict[bytes, tuple[bytes, float]], set[bytes]]:
    """The net effect of replaying ``entries`` in order: (writes, deletes), disjoint."""
    writes: dict[bytes, tuple[bytes, float]] = {}
    deletes: set[bytes] = set()
    for key, entry in entries:
        if entry is None:
            writes.pop(key, None)
            deletes.add(key)
        else:
            deletes.discard(key)
            writes[key] = entry
    return writes, deletes


def replay_start(
    position: int, current_at: float, begin: int, end: int, now: float, stale_after: float
) -> tuple[int, str]:
    """Where a store's replay of its changelog partition starts, and why it starts over.

    ``position``/``current_at``: the store's; ``begin``/``end``: the
    partition's first and next offsets. Returns (offset, reason): reason is
    "" when the store can be kept and replayed from its position; otherwise
    the store must be emptied and rebuilt from ``begin``, for the reason
    given. A store at position 0 (new, or whose every change went in with
    an unknown offset) replays from the start; the caller empties a store
    that is replayed from the start whole.
    """
    if position == 0:
        return begin, ""
    if position > end:
        return begin, (
            f"the store is at changelog offset {position}, past the topic's end {end} (was the"
            " topic deleted and made anew?)"
        )
    if position < begin:
        return begin, f"the changelog no longer holds offset {position}; it starts at {begin}"
    if now - current_at > stale_after:
        return begin, (
            f"the store was last current {now - current_at:.0f}s ago, over {stale_after:g}s:"
            " deletes since may have been compacted out of the changelog"
        )
    return position, ""


def with_birth(changes: Changes, birth: str | None) -> Changes:
    """``changes`` starting the partition with birth ``birth`` (None: ``changes`` as they are)."""
    if birth is None:
        return changes
    return replace(changes, writes={BIRTH_KEY: orjson.dumps(birth), **changes.writes})


def stored_birth(store: StateStore) -> str | None:
    """The birth of the changelog the store was built from (None: none seen)."""
    raw = store.read(BIRTH_KEY, 0.0)
    return None if raw is None else str(orjson.loads(raw))


def check_birth(
    stored: str | None, first: tuple[bytes, bytes] | None, position: int
) -> tuple[str, bool]:
    """Whether a task's store was built from this incarnation of its changelog; pure.

    Args:
        stored: the birth the store holds (:func:`stored_birth`).
        first: the partition's first committed record (key, value), or None
            when it has none.
        position: the store's changelog position.

    Returns:
        (reason, due): ``reason`` is "" when the store may be kept, else why
        it must be emptied and rebuilt from the partition's start; ``due``
        says whether the task's next changelog write must start with a new
        birth (the partition holds no record yet).
    """
    if first is None:
        if stored is not None:
            return (
                f"the store was built from changelog birth {stored}, and the partition is now"
                " empty: the topic was deleted and made anew"
            ), True
        return "", True
    key, value = first
    if key != BIRTH_KEY:
        return "", False  # written before births: nothing to compare with
    try:
        entry = decode_entry(key, value)[1]
        found = str(orjson.loads(entry[0])) if entry is not None else None
    except ValueError:  # orjson.JSONDecodeError is one
        found = None
    if found is None:
        return "", False  # not a birth streamlet wrote: nothing to compare with
    if stored == found or (stored is None and position == 0):
        return "", False
    if stored is None:
        return (
            f"the store holds changelog offset {position} but no birth, and the partition's"
            f" birth is {found}: what it was built from cannot be told (a topic made anew, or"
            " a crash before the store took its first batch)"
        ), False
    return (
        f"the store was built from changelog birth {stored}, and the partition's birth is now"
        f" {found}: the topic was deleted and made anew"
    ), False


def _position_key(topic: str) -> bytes:
    return INTERNAL + b"input:" + topic.encode()


def with_positions(
    changes: Changes, ranges: Sequence[OffsetRange], topics: Mapping[str, str]
) -> Changes:
    """``changes`` plus the task's input position after the batch, one entry per source topic.

    The position goes in the changelog (and the local copy) beside the
    state it matches, so the state also says what input it covers: a task
    whose sink lost its marker resumes from it, and a marker that disagrees
    with it is refused (see :func:`stored_positions`).
    """
    writes = dict(changes.writes)
    for r in ranges:
        topic = topics.get(r.source)
        if topic is not None:
            writes[_position_key(topic)] = orjson.dumps(r.until)
    return replace(changes, writes=writes)


def stored_positions(store: StateStore, topics: Mapping[str, str]) -> dict[str, int]:
    """Source name -> the next input offset the task's state covers, as the store holds it."""
    found: dict[str, int] = {}
    for name, topic in topics.items():
        raw = store.read(_position_key(topic), 0.0)
        if raw is not None:
            found[name] = int(orjson.loads(raw))
    return found
