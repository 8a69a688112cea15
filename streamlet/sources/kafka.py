"""Kafka as a streamlet source: direct (by offset range) or receiver (through the WAL).

One :func:`KafkaSource` reads **one topic**: all of its partitions, or the
ones named in ``partitions``. An app that reads several topics registers one
source per topic; a handler may take several sources::

    clicks = app.source(KafkaSource("clicks", bootstrap_servers="kafka:9092"))
    views = app.source(KafkaSource("views", bootstrap_servers="kafka:9092"))

    @app.handler([clicks, views], sink=...)
    async def join(batch): ...

**Direct mode** (the default, :class:`KafkaDirectSource`) is Spark's direct
API: there is no receiver and no copy of the data in the WAL. At batch time
the scheduler asks :meth:`~KafkaDirectSource.latest` how far each partition
is readable, fixes ``[start, until)`` per partition (clamped by ``max_rate``),
logs it, and :meth:`~KafkaDirectSource.read` fetches exactly those records.
A re-run after a crash fetches the same range, so the same records.
streamlet's own log is the source of truth for where the next batch starts;
the consumer group's offsets (with ``group_id``) are committed after each
batch only so that standard tooling shows the lag.

**Receiver mode** (``mode="receiver"``, :class:`KafkaReceiver`) runs one
consumer task that stores each fetched chunk in the data WAL with the
partitions' next offsets as acks (``{"<partition>": next_offset}``). On
restart it resumes from those acks, so records already durable in the WAL
are never fetched again; the group's offsets are committed only once a chunk
is durable. Use it when a topic's retention may be shorter than the time a
batch can wait, at the cost of writing every record to the local disk.

**Offsets and isolation.** With ``isolation="read_committed"`` (the default)
a partition is readable up to its *last stable offset* (LSO): the first
offset of the oldest open transaction. :meth:`~KafkaDirectSource.latest`
asks the broker for end offsets with the consumer's isolation level
(ListOffsets v2 and later), which answers the LSO, so a range never reaches
into an open transaction. Transaction markers and aborted records occupy
offsets but are never returned, so a range may hold fewer records than
``until - start``; a read ends when the consumer's position reaches
``until``, never returns a record at or past it, and fails with a clear
error if it cannot make progress for ``fetch_timeout`` seconds.

**Records** are ``Record(value, key, timestamp, source, partition,
offset)``: bytes as stored, the Kafka timestamp in seconds, ``source`` the
source's name (the topic unless named). A tombstone's null value arrives as
``b""``. With ``headers=True`` the record headers come in
``Record.headers``. ``max_rate`` caps records per second per partition: the
scheduler clamps direct ranges by it, and a receiver paces each partition's
fetches.

**Lost data.** When offsets a batch needs were deleted (retention,
``kafka-delete-records``) the fetch is out of range, and ``on_out_of_range``
decides: ``"fail"`` (default) stops with an error naming the partition and
the offsets; ``"earliest"`` goes on at the oldest offset still stored;
``"latest"`` skips to the end of the range (receiver mode: to the end of
the partition). Both log the lost range at ERROR level: nothing is skipped
silently. The same policy applies to a starting offset (committed or
explicit) outside what the partition holds.

**Brokers down.** At each tick a direct source waits about a second (twice
``fetch_max_wait_ms``, at least one) for the partitions' end offsets; while
the brokers do not answer, batches take no new offsets of the topic, so the
app keeps ticking and a stop request is seen at once. If they stay silent
for ``fetch_timeout`` the app stops with an error. A batch already reading
waits for its records as usual. A receiver that is stopping gives its last
group commit the same second: the data WAL's acks, not the group, say where
it resumes. Closing a consumer takes at most 5 seconds, brokers up or down.

**Partitions.** Without ``partitions`` the source reads every partition of
the topic, and one added while the app runs is picked up (direct mode: by
the next :meth:`~KafkaDirectSource.latest`) once the client's metadata refreshes
(``metadata_max_age_ms``, 30 s here unless ``consumer_config`` says
otherwise); a new partition starts at its earliest offset. Partitions are
assigned to this source, not balanced by the consumer group: to spread one
topic over several workers, give each worker its own ``partitions``.

**Connection settings.** ``consumer_config`` passes keyword arguments
through to ``aiokafka.AIOKafkaConsumer``: ``security_protocol``,
``ssl_context``, ``sasl_mechanism``, ``sasl_plain_username``,
``sasl_plain_password``, ``client_id``, fetch sizes and timeouts. The
settings that the guarantees rest on are streamlet's to set and are
refused there: ``bootstrap_servers``, ``group_id``, ``isolation_level``
(use the arguments), ``enable_auto_commit`` (always off: offsets are
committed only after a batch is durable), ``auto_offset_reset`` (always
"none": see ``on_out_of_range``) and the deserializers (records carry bytes).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import re
import time
from abc import ABCMeta
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, TypeVar, overload

import aiokafka
import aiokafka.consumer.fetcher as _fetcher
import anyio
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError, KafkaTimeoutError, OffsetOutOfRangeError
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from streamlet.errors import ConfigError, SourceError, StreamletError
from streamlet.kafka.policy import out_of_range, start_offset
from streamlet.records import OffsetRange, Record
from streamlet.sources.base import DirectSource
from streamlet.sources.receiver import Receiver, ReceiverContext, Stored

__all__ = [
    "KafkaDirectSource",
    "KafkaReceiver",
    "KafkaSource",
    "KafkaSourceConfig",
    "OutOfRangePolicy",
    "StartPosition",
]

log = logging.getLogger(__name__)

StartPosition = Literal["committed", "earliest", "latest"] | Mapping[int, int]
OutOfRangePolicy = Literal["fail", "earliest", "latest"]
Isolation = Literal["read_committed", "read_uncommitted"]

_T = TypeVar("_T")

#: Longest single wait for fetched records; between waits a read checks its
#: progress and a receiver checks whether the app is stopping.
_POLL = 0.2
#: Stored-but-not-yet-durable chunks a receiver may have queued for commit.
_MAX_PENDING = 1024
#: The longest a consumer's close may take. Closing needs no broker (nothing
#: is committed on the way out), so a close that takes longer is waiting on
#: brokers that are down, and is abandoned rather than holding up a stop.
_CLOSE_TIMEOUT = 5.0
#: How long a direct source's latest() waits at least for the brokers before
#: it answers with the end offsets they last told (see there); at least twice
#: the consumer's fetch_max_wait_ms too, as an offset lookup can queue behind
#: a fetch the broker holds that long.
_LATEST_PATIENCE = 1.0
#: Consumer settings streamlet owns, and what to use instead.
_MANAGED = {
    "topics": "the topic argument",
    "loop": "nothing: the running loop is used",
    "bootstrap_servers": "the bootstrap_servers argument",
    "group_id": "the group_id argument",
    "isolation_level": "the isolation argument",
    "enable_auto_commit": "nothing: offsets are committed only after a batch is durable",
    "auto_offset_reset": "the on_out_of_range argument",
    "key_deserializer": "nothing: records carry bytes; decode them in the handler",
    "value_deserializer": "nothing: records carry bytes; decode them in the handler",
}
_CONSUMER_ARGS = frozenset(inspect.signature(AIOKafkaConsumer.__init__).parameters) - {"self"}
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
#: Record's fields, in the order _Consumer.getmany builds them (see there).
_RECORD_FIELDS = (
    "value",
    "key",
    "timestamp",
    "source",
    "partition",
    "offset",
    "data",
    "headers",
)
if Record._fields != _RECORD_FIELDS:
    raise RuntimeError(
        f"streamlet.records.Record has fields {Record._fields}; update"
        f" streamlet.sources.kafka, which builds records as {_RECORD_FIELDS}"
    )


# -- settings ------------------------------------------------------------------


def _seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"KafkaSource {name} must be a positive number of seconds, not {value!r}")
    return float(value)


def _offset(what: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"KafkaSource {what} must be an integer >= 0, not {value!r}")
    return value


@dataclass(frozen=True)
class KafkaSourceConfig:
    """Validated settings of a Kafka source; see :func:`KafkaSource` for each field.

    Raises:
        ConfigError: a setting is invalid; the message names it and what to do.
    """

    topic: str
    bootstrap_servers: str | Sequence[str]
    group_id: str | None = None
    partitions: Sequence[int] | None = None
    start: StartPosition = "committed"
    isolation: Isolation = "read_committed"
    max_rate: float | None = None
    on_out_of_range: OutOfRangePolicy = "fail"
    connect_timeout: float = 30.0
    fetch_timeout: float = 30.0
    consumer_config: Mapping[str, object] = field(default_factory=dict)
    name: str | None = None
    headers: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.topic, str) or not _TOPIC_NAME.fullmatch(self.topic):
            raise ConfigError(
                f"KafkaSource topic {self.topic!r} is not a Kafka topic name (1 to 249 of"
                " letters, digits, '.', '_', '-'); one KafkaSource reads one topic, so"
                " register a source per topic"
            )
        servers = self.bootstrap_servers
        listed = [servers] if isinstance(servers, str) else list(servers)
        if not listed or not all(isinstance(s, str) and s.strip() for s in listed):
            raise ConfigError(
                f"KafkaSource({self.topic!r}) bootstrap_servers must be 'host:port' or a list"
                f" of them, not {servers!r}"
            )
        object.__setattr__(
            self, "bootstrap_servers", servers if isinstance(servers, str) else tuple(listed)
        )
        if self.group_id is not None and (not isinstance(self.group_id, str) or not self.group_id):
            raise ConfigError(
                f"KafkaSource({self.topic!r}) group_id must be a non-empty string or None"
            )
        if self.partitions is not None:
            parts = tuple(_offset("partition number", p) for p in self.partitions)
            if not parts or len(set(parts)) != len(parts):
                raise ConfigError(
                    f"KafkaSource({self.topic!r}) partitions must list distinct partition"
                    f" numbers, or be None for all, not {self.partitions!r}"
                )
            object.__setattr__(self, "partitions", tuple(sorted(parts)))
        start = self.start
        if isinstance(start, Mapping):
            checked = {
                _offset("start partition", p): _offset(f"start offset of partition {p}", o)
                for p, o in start.items()
            }
            if self.partitions is not None:
                extra = sorted(set(checked) - set(self.partitions))
                if extra:
                    raise ConfigError(
                        f"KafkaSource({self.topic!r}) start names partitions {extra} that are"
                        f" not in partitions={list(self.partitions)}; add them or drop them"
                    )
            object.__setattr__(self, "start", dict(sorted(checked.items())))
        elif start not in ("committed", "earliest", "latest"):
            raise ConfigError(
                f"KafkaSource({self.topic!r}) start must be 'committed', 'earliest', 'latest'"
                f" or a {{partition: offset}} dict, not {start!r}"
            )
        if self.isolation not in ("read_committed", "read_uncommitted"):
            raise ConfigError(
                f"KafkaSource({self.topic!r}) isolation must be 'read_committed' or"
                f" 'read_uncommitted', not {self.isolation!r}"
            )
        if self.max_rate is not None and (
            isinstance(self.max_rate, bool)
            or not isinstance(self.max_rate, (int, float))
            or not self.max_rate > 0
        ):
            raise ConfigError(
                f"KafkaSource({self.topic!r}) max_rate must be a positive number of records/s"
                f" per partition, or None, not {self.max_rate!r}"
            )
        if self.on_out_of_range not in ("fail", "earliest", "latest"):
            raise ConfigError(
                f"KafkaSource({self.topic!r}) on_out_of_range must be 'fail', 'earliest' or"
                f" 'latest', not {self.on_out_of_range!r}"
            )
        object.__setattr__(
            self, "connect_timeout", _seconds("connect_timeout", self.connect_timeout)
        )
        object.__setattr__(self, "fetch_timeout", _seconds("fetch_timeout", self.fetch_timeout))
        if not isinstance(self.consumer_config, Mapping):
            raise ConfigError(
                f"KafkaSource({self.topic!r}) consumer_config must be a mapping of"
                f" aiokafka consumer settings, not {type(self.consumer_config).__name__}"
            )
        for key in self.consumer_config:
            if key in _MANAGED:
                raise ConfigError(
                    f"KafkaSource({self.topic!r}) consumer_config must not set {key!r};"
                    f" use {_MANAGED[key]}"
                )
            if key not in _CONSUMER_ARGS:
                raise ConfigError(
                    f"KafkaSource({self.topic!r}) consumer_config has {key!r}, which"
                    " aiokafka.AIOKafkaConsumer does not take; check the spelling against"
                    " its documentation"
                )
        object.__setattr__(self, "consumer_config", dict(self.consumer_config))
        if self.name is not None and (not isinstance(self.name, str) or not self.name):
            raise ConfigError(f"KafkaSource({self.topic!r}) name must be a non-empty string")
        if not isinstance(self.headers, bool):
            raise ConfigError(
                f"KafkaSource({self.topic!r}) headers must be True or False, not {self.headers!r}"
            )

    @property
    def patience(self) -> float:
        """Seconds a live broker may take to answer an offset lookup (see ``_LATEST_PATIENCE``)."""
        wait = self.consumer_config.get("fetch_max_wait_ms", 500)
        fetch_wait = wait / 1000 if isinstance(wait, (int, float)) else 0.5
        return min(self.fetch_timeout, max(_LATEST_PATIENCE, 2 * fetch_wait))

    @property
    def servers(self) -> str:
        """The bootstrap servers as one comma-separated string, for messages."""
        servers = self.bootstrap_servers
        return servers if isinstance(servers, str) else ",".join(servers)

    def consumer_kwargs(self, *, group: bool = False) -> dict[str, object]:
        """Keyword arguments for an ``AIOKafkaConsumer``: the group's, or a group-less one."""
        servers = self.bootstrap_servers
        return {
            "client_id": "streamlet",
            "metadata_max_age_ms": 30_000,
            **self.consumer_config,
            "bootstrap_servers": servers if isinstance(servers, str) else list(servers),
            "group_id": self.group_id if group else None,
            "isolation_level": self.isolation,
            "enable_auto_commit": False,
            # Never reset silently: an out-of-range fetch raises and
            # on_out_of_range decides, with the lost range logged.
            "auto_offset_reset": "none",
        }

    def describe(self, mode: str) -> str:
        """Identity for the app's manifest (what a state directory's ranges mean)."""
        parts = "all" if self.partitions is None else ",".join(map(str, self.partitions))
        return f"KafkaSource(topic={self.topic!r}, partitions={parts}, mode={mode})"


# -- records straight from the fetch buffers -------------------------------------
#
# aiokafka turns every fetched record into a ConsumerRecord (a dataclass of
# eleven fields, headers copied into a tuple) and the source would then turn
# that into a Record: two objects and two Python-level constructions per
# record, the larger share of a direct read's CPU time. Here a consumer of
# ours tags itself through its value_deserializer, and the fetch buffers of a
# tagged consumer build Records themselves. Everything else (batches, CRCs,
# control batches, aborted transactions, positions) stays aiokafka's own.
#
# This leans on one private seam of aiokafka: the fetcher module's
# PartitionRecords class, constructed once per fetched partition response,
# and its _consumer_record(tp, record) method. aiokafka is pinned below its
# next minor version for that reason, and tests/kafka/test_kafka_fast_path.py
# fails when the seam moves. If it has moved, nothing breaks: the tag is an
# identity deserializer, _Consumer.getmany converts ConsumerRecords as before,
# and a warning says that reads are slower than they should be.


class _RecordTag:
    """A tagged consumer's value_deserializer: where its Records say they came from."""

    __slots__ = ("headers", "source")

    def __init__(self, headers: bool) -> None:
        self.source = ""
        self.headers = headers  # carry record headers (KafkaSource(headers=True))

    def __call__(self, value: bytes | None) -> bytes | None:
        return value  # only reached when the fast path is not installed


_PartitionRecords: Any = _fetcher.PartitionRecords
_new_tuple = tuple.__new__


class _RecordBuffers(_PartitionRecords):  # type: ignore[misc]
    """A tagged consumer's fetch buffer: yields Records rather than ConsumerRecords."""

    def _consumer_record(self, tp: Any, record: Any) -> Record:
        # tuple.__new__ rather than Record(...): the named tuple's __new__ is
        # a Python-level call. The tuple's order is _RECORD_FIELDS.
        value = record.value
        stamp = record.timestamp
        tag = self._value_deserializer
        return _new_tuple(
            Record,
            (
                b"" if value is None else value,
                record.key,
                stamp / 1000.0 if stamp is not None and stamp > 0 else 0.0,
                tag.source,
                tp.partition,
                record.offset,
                None,
                tuple(record.headers) if tag.headers else (),
            ),
        )


def _partition_records(
    tp: Any,
    records: Any,
    aborted_transactions: Any,
    fetch_offset: int,
    key_deserializer: Any,
    value_deserializer: Any,
    *args: Any,
) -> Any:
    """Stands in for aiokafka's PartitionRecords: untagged consumers get the original."""
    cls = _RecordBuffers if type(value_deserializer) is _RecordTag else _PartitionRecords
    return cls(
        tp, records, aborted_transactions, fetch_offset, key_deserializer, value_deserializer, *args
    )


def _seam_intact() -> bool:
    init = inspect.signature(_PartitionRecords.__init__)
    convert = getattr(_PartitionRecords, "_consumer_record", None)
    return (
        list(init.parameters)[1:7]
        == [
            "tp",
            "records",
            "aborted_transactions",
            "fetch_offset",
            "key_deserializer",
            "value_deserializer",
        ]
        and callable(convert)
        and list(inspect.signature(convert).parameters) == ["self", "tp", "record"]
    )


def _install_record_buffers() -> bool:
    """Route fetch buffers through _partition_records; False if aiokafka's seam moved."""
    current = _fetcher.PartitionRecords
    if current is _partition_records:
        return True
    if current is not _PartitionRecords or not _seam_intact():
        return False
    _fetcher.PartitionRecords = _partition_records
    return True


_FAST_READS = False
"""Whether fetch buffers build Records (set by :func:`_use_record_buffers`)."""
_SEAM_CHECKED = False


def _use_record_buffers() -> None:
    """Install the fast path when the first streamlet consumer is made, once.

    Not at import: ``import streamlet`` must change nothing in aiokafka for
    a program that never reads Kafka through streamlet.
    """
    global _FAST_READS, _SEAM_CHECKED
    if _SEAM_CHECKED:
        return
    _SEAM_CHECKED = True
    _FAST_READS = _install_record_buffers()
    if not _FAST_READS:
        log.warning(
            "aiokafka %s does not have the fetch-buffer seam streamlet builds records in"
            " (aiokafka.consumer.fetcher.PartitionRecords._consumer_record); Kafka reads"
            " work but take about twice the CPU. Install the aiokafka version streamlet"
            " pins.",
            aiokafka.__version__,
        )


# -- the typed adapter over aiokafka's consumer ---------------------------------


def _cancel_requests() -> int:
    """How many cancellations of the running task are pending (its cancel scopes' doing).

    A ``CancelledError`` raised while this count stayed the same is not the
    task's own: it escaped from some other task that aiokafka awaited.
    """
    task = asyncio.current_task()
    return task.cancelling() if task is not None else 0


class _OutOfRange(Exception):
    """A fetch asked for offsets the partition no longer (or not yet) holds."""

    def __init__(self, offsets: Mapping[int, int]) -> None:
        super().__init__(dict(offsets))
        self.offsets = dict(offsets)


class _Consumer:
    """``AIOKafkaConsumer`` on one topic, with partitions as ints and typed results.

    aiokafka ships no type information; everything untyped stays in here.
    """

    def __init__(
        self,
        topic: str,
        kwargs: Mapping[str, object],
        *,
        paused: Iterable[int] = (),
        headers: bool = False,
    ) -> None:
        self.topic = topic
        self._tag = _RecordTag(headers)
        _use_record_buffers()
        self._consumer: Any = AIOKafkaConsumer(**kwargs, value_deserializer=self._tag)
        self._assigned: frozenset[int] = frozenset()
        if paused:
            # Assigned before start, never fetched from: see _Group.
            self.assign(paused)
            self._consumer.pause(*(self._tp(p) for p in sorted(self._assigned)))

    def _tp(self, partition: int) -> Any:
        return TopicPartition(self.topic, partition)

    async def start(self) -> None:
        await self._consumer.start()

    async def stop(self) -> None:
        """Close the consumer within ``_CLOSE_TIMEOUT`` seconds, brokers up or down.

        Never raises but for the caller's own cancellation: a stop must not
        turn into an error of its own (the app is already on its way out,
        and nothing of streamlet's state depends on the close).
        """
        before = _cancel_requests()
        with anyio.move_on_after(_CLOSE_TIMEOUT) as waited:
            try:
                await self._consumer.stop()
            except asyncio.CancelledError:
                if _cancel_requests() > before:
                    raise
                # Not this task's cancellation: aiokafka 0.14's fetcher
                # close cancels its fetch tasks and awaits them, and one
                # that was sleeping out a retry backoff (the broker is down)
                # re-raises its own CancelledError there, which leaves the
                # rest of the close undone. Finish it.
                await self._finish_stop()
            except Exception as exc:
                log.warning("closing the consumer of topic %r failed: %r", self.topic, exc)
        if waited.cancelled_caught:
            log.warning(
                "closing the consumer of topic %r took over %.0f s (brokers down?); left"
                " behind, its connections close with the process",
                self.topic,
                _CLOSE_TIMEOUT,
            )

    async def _finish_stop(self) -> None:
        """The part of ``AIOKafkaConsumer.stop`` after a fetch task's cancellation escaped it."""
        fetcher: Any = getattr(self._consumer, "_fetcher", None)
        tasks = [t for t in getattr(fetcher, "_pending_tasks", ()) if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        client: Any = getattr(self._consumer, "_client", None)
        if client is not None:
            await client.close()

    async def topic_exists(self) -> bool:
        """Ask the cluster (without creating the topic, as a metadata lookup of it may)."""
        return self.topic in set(await self._consumer.topics())

    def known_partitions(self) -> frozenset[int]:
        """The topic's partitions per the client's cached metadata (empty if unknown)."""
        found = self._consumer.partitions_for_topic(self.topic)
        return frozenset(int(p) for p in found) if found else frozenset()

    async def load_partitions(self) -> frozenset[int]:
        """Track the topic in the client's metadata and wait until its partitions are known."""
        # An offset lookup of partition 0, which every topic has, waits for
        # the topic's metadata (its leaders) to arrive.
        await self._consumer.end_offsets([self._tp(0)])
        return self.known_partitions()

    @property
    def assigned(self) -> frozenset[int]:
        return self._assigned

    def assign(self, partitions: Iterable[int]) -> None:
        """Replace the assignment; every partition's position is forgotten."""
        self._assigned = frozenset(partitions)
        self._consumer.assign([self._tp(p) for p in sorted(self._assigned)])

    def seek(self, partition: int, offset: int) -> None:
        self._consumer.seek(self._tp(partition), offset)

    async def position(self, partition: int) -> int:
        return int(await self._consumer.position(self._tp(partition)))

    async def end_offsets(self, partitions: Iterable[int]) -> dict[int, int]:
        """One past the newest readable offset (the LSO under read_committed)."""
        found = await self._consumer.end_offsets([self._tp(p) for p in partitions])
        return {int(tp.partition): int(offset) for tp, offset in found.items()}

    async def beginning_offsets(self, partitions: Iterable[int]) -> dict[int, int]:
        found = await self._consumer.beginning_offsets([self._tp(p) for p in partitions])
        return {int(tp.partition): int(offset) for tp, offset in found.items()}

    async def committed(self, partition: int) -> int | None:
        offset = await self._consumer.committed(self._tp(partition))
        return None if offset is None else int(offset)

    async def commit(self, offsets: Mapping[int, int]) -> None:
        await self._consumer.commit({self._tp(p): o for p, o in offsets.items()})

    async def getmany(
        self, partitions: Iterable[int], *, wait: float, source: str
    ) -> dict[int, list[Record]]:
        """Records fetched for ``partitions`` (waiting up to ``wait`` seconds for some).

        Raises:
            _OutOfRange: a partition's fetch position is outside its log.
        """
        tps = [self._tp(p) for p in partitions]
        assert tps, "getmany() without partitions would read every partition"
        self._tag.source = source  # what the fetch buffers put in Record.source
        try:
            fetched = await self._consumer.getmany(*tps, timeout_ms=int(wait * 1000))
        except OffsetOutOfRangeError as exc:
            raw = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
            raise _OutOfRange({int(tp.partition): int(o) for tp, o in raw.items()}) from exc
        if _FAST_READS:  # the fetch buffers built Records (see _RecordBuffers)
            return {tp.partition: messages for tp, messages in fetched.items()}
        out: dict[int, list[Record]] = {}
        new = _new_tuple
        headers = self._tag.headers
        for tp, messages in fetched.items():
            partition = int(tp.partition)
            out[partition] = [
                new(
                    Record,
                    (
                        b"" if (value := m.value) is None else value,
                        m.key,
                        stamp / 1000.0 if (stamp := m.timestamp) is not None and stamp > 0 else 0.0,
                        source,
                        partition,
                        m.offset,
                        None,
                        m.headers if headers else (),
                    ),
                )
                for m in messages
            ]
        return out


# -- what both modes share: connection, partitions, positions, policies ---------


def _kafka_error(message: str, exc: BaseException) -> StreamletError:
    error = SourceError(f"{message}: {exc}")
    error.retriable = bool(getattr(exc, "retriable", False)) or isinstance(exc, KafkaTimeoutError)
    return error


class _Group:
    """The consumer group's offsets, through a consumer of its own.

    Fetching happens on a group-less consumer, whose assignment changes
    freely. This one never fetches (its partitions are paused) and its
    assignment is fixed before it starts: aiokafka's group coordinator can
    fail on an assignment that changes while it looks the coordinator up.
    Partitions added later get a new consumer.
    """

    def __init__(self, config: KafkaSourceConfig) -> None:
        self.config = config
        self._consumer: _Consumer | None = None

    async def _for(self, partitions: Iterable[int]) -> _Consumer:
        wanted = frozenset(partitions)
        consumer = self._consumer
        if consumer is not None and wanted <= consumer.assigned:
            return consumer
        if consumer is not None:
            wanted |= consumer.assigned
            await self.close()
        consumer = _Consumer(
            self.config.topic, self.config.consumer_kwargs(group=True), paused=wanted
        )
        try:
            await consumer.start()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await consumer.stop()
            raise
        self._consumer = consumer
        return consumer

    async def committed(self, partition: int, *, assign: Iterable[int]) -> int | None:
        """The committed offset; ``assign``: every partition the source reads."""
        return await (await self._for({partition, *assign})).committed(partition)

    async def commit(self, offsets: Mapping[int, int], *, assign: Iterable[int]) -> None:
        """Commit ``offsets``; ``assign``: every partition the source reads."""
        await (await self._for({*offsets, *assign})).commit(offsets)

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()


class _Link:
    """The source's consumers on the topic, and the decisions both modes make alike."""

    def __init__(self, config: KafkaSourceConfig) -> None:
        self.config = config
        self._consumer: _Consumer | None = None
        self._group = _Group(config) if config.group_id is not None else None
        #: Partitions present when the source started; the start policy
        #: applies to them, while partitions added later start at earliest.
        self.initial: frozenset[int] = frozenset()

    @property
    def consumer(self) -> _Consumer:
        if self._consumer is None:
            raise SourceError(
                f"KafkaSource({self.config.topic!r}) is not started; start() comes first"
            )
        return self._consumer

    @property
    def partitions(self) -> frozenset[int]:
        return self.consumer.assigned

    def where(self, partition: int) -> str:
        return f"{self.config.topic}-{partition}"

    async def connect(self) -> None:
        """Connect, find the topic and assign its partitions, within ``connect_timeout``.

        Raises:
            StreamletError: the brokers could not be reached in time
                (``retriable``), or refused the connection for good.
            ConfigError: the topic or a requested partition does not exist.
        """
        config = self.config
        deadline = time.monotonic() + config.connect_timeout
        consumer = await self._start_consumer(deadline)
        try:
            await self._assign_partitions(consumer, deadline)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await consumer.stop()
            raise
        self._consumer = consumer
        self.initial = consumer.assigned
        log.info(
            "connected to %s: topic %r, partitions %s, isolation %s",
            config.servers,
            config.topic,
            sorted(consumer.assigned),
            config.isolation,
        )

    async def _assign_partitions(self, consumer: _Consumer, deadline: float) -> None:
        config = self.config
        while not await consumer.topic_exists():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConfigError(
                    f"topic {config.topic!r} does not exist at {config.servers} (waited"
                    f" {config.connect_timeout:g} s); create it, or fix the topic name"
                )
            log.warning(
                "topic %r does not exist at %s yet; checking again (%.0f s left)",
                config.topic,
                config.servers,
                remaining,
            )
            await anyio.sleep(min(1.0, remaining))
        existing: frozenset[int] = frozenset()
        with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
            existing = await consumer.load_partitions()
        if not existing:
            raise SourceError(
                f"the partitions of topic {config.topic!r} at {config.servers} were not"
                f" known within connect_timeout={config.connect_timeout:g} s; check the"
                " brokers' health, or raise connect_timeout"
            )
        if config.partitions is None:
            consumer.assign(existing)
            return
        missing = sorted(set(config.partitions) - existing)
        if missing:
            raise ConfigError(
                f"topic {config.topic!r} has no partition(s) {missing} (it has"
                f" {len(existing)}: 0..{max(existing)}); fix partitions="
            )
        consumer.assign(config.partitions)

    async def _start_consumer(self, deadline: float) -> _Consumer:
        config = self.config
        attempt = 0
        delay = 0.25
        while True:
            attempt += 1
            consumer = _Consumer(config.topic, config.consumer_kwargs(), headers=config.headers)
            error: BaseException | None = None
            with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
                try:
                    await consumer.start()
                except (KafkaError, OSError) as exc:
                    error = exc
                else:
                    return consumer
            with anyio.CancelScope(shield=True):
                await consumer.stop()
            if isinstance(error, KafkaError) and not error.retriable:
                raise SourceError(
                    f"Kafka at {config.servers} refused the connection: {error}. Check"
                    " bootstrap_servers and the security settings in consumer_config"
                    " (security_protocol, ssl_context, sasl_*)"
                ) from error
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                failure = SourceError(
                    f"could not connect to Kafka at {config.servers} within"
                    f" connect_timeout={config.connect_timeout:g} s ({attempt} attempt(s);"
                    f" last error: {error or 'timed out'}). Check that the brokers are"
                    " running and reachable from this host, that bootstrap_servers is"
                    " right, and that consumer_config holds the listener's security"
                    " settings (security_protocol, ssl_context, sasl_*)"
                )
                failure.retriable = True
                raise failure from error
            log.warning(
                "cannot reach Kafka at %s (attempt %d): %s; retrying in %.2f s",
                config.servers,
                attempt,
                error or "timed out",
                min(delay, remaining),
            )
            await anyio.sleep(min(delay, remaining))
            delay = min(delay * 2, 2.0)

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        try:
            if consumer is not None:
                await consumer.stop()
        finally:
            if self._group is not None:
                await self._group.close()

    def refresh_partitions(self) -> frozenset[int]:
        """Assign partitions the topic gained since the last look; return the new ones.

        Reassigning forgets every partition's position: callers seek again.
        """
        if self.config.partitions is not None:
            return frozenset()
        consumer = self.consumer
        new = consumer.known_partitions() - consumer.assigned
        if new:
            log.info(
                "topic %r gained partition(s) %s; reading them from their earliest offset",
                self.config.topic,
                sorted(new),
            )
            consumer.assign(consumer.assigned | new)
        return new

    async def call(
        self, action: str, fn: Callable[[], Awaitable[_T]], *, since: float | None = None
    ) -> _T:
        """Run a broker request, retrying transient errors for up to ``fetch_timeout``.

        ``since``: the monotonic time the wait began, when earlier calls
        already waited for the same answer (default: now).
        """
        config = self.config
        deadline = (time.monotonic() if since is None else since) + config.fetch_timeout
        delay = 0.1
        while True:
            error: BaseException | None = None
            with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
                try:
                    return await fn()
                except KafkaError as exc:
                    if not (exc.retriable or isinstance(exc, KafkaTimeoutError)):
                        raise _kafka_error(
                            f"{action} of topic {config.topic!r} at {config.servers} failed",
                            exc,
                        ) from exc
                    error = exc
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                failure = SourceError(
                    f"{action} of topic {config.topic!r} at {config.servers} did not succeed"
                    f" within fetch_timeout={config.fetch_timeout:g} s (last error:"
                    f" {error or 'timed out'}); check the brokers' health"
                )
                failure.retriable = True
                raise failure from error
            log.warning(
                "%s of topic %r failed: %s; retrying in %.1f s",
                action,
                config.topic,
                error,
                min(delay, remaining),
            )
            await anyio.sleep(min(delay, remaining))
            delay = min(delay * 2, 2.0)

    async def end_offsets(
        self, partitions: Iterable[int], *, since: float | None = None
    ) -> dict[int, int]:
        wanted = sorted(partitions)
        return await self.call(
            "looking up end offsets", lambda: self.consumer.end_offsets(wanted), since=since
        )

    async def beginning_offsets(self, partitions: Iterable[int]) -> dict[int, int]:
        wanted = sorted(partitions)
        return await self.call(
            "looking up beginning offsets", lambda: self.consumer.beginning_offsets(wanted)
        )

    async def committed(self, partition: int) -> int | None:
        """The group's committed offset of ``partition`` (None: none, or no group)."""
        group = self._group
        if group is None:
            return None
        return await self.call(
            "looking up committed offsets",
            lambda: group.committed(partition, assign=self.partitions),
        )

    async def commit(self, offsets: Mapping[int, int]) -> None:
        """Commit ``offsets`` for the group (nothing without a group_id)."""
        group = self._group
        if group is None or not offsets:
            return
        await self.call(
            "committing group offsets", lambda: group.commit(offsets, assign=self.partitions)
        )

    async def start_positions(self, partitions: Iterable[int]) -> dict[int, int]:
        """Where partitions with no recorded position start, per ``start``.

        Partitions that appeared after the source started begin at their
        earliest offset: all their records are new.
        """
        config = self.config
        wanted = sorted(partitions)
        if not wanted:
            return {}
        begin = await self.beginning_offsets(wanted)
        end = await self.end_offsets(wanted)
        out: dict[int, int] = {}
        for p in wanted:
            needs_group = (
                p in self.initial and config.start == "committed" and config.group_id is not None
            )
            offset, how = start_offset(
                p,
                config.start,
                begin=begin[p],
                end=end[p],
                added=p not in self.initial,
                group_id=config.group_id,
                committed=await self.committed(p) if needs_group else None,
            )
            if not begin[p] <= offset <= end[p]:
                what = f"start offset {offset} ({how})"
                offset = await self.out_of_range(p, offset, until=None, what=what)
                how += f", then on_out_of_range={config.on_out_of_range!r}"
            log.info("%s starts at offset %d: %s", self.where(p), offset, how)
            out[p] = offset
        return out

    async def out_of_range(
        self, partition: int, offset: int, *, until: int | None, what: str
    ) -> int:
        """Apply ``on_out_of_range`` to ``offset``; return where reading goes on.

        Args:
            partition: the partition.
            offset: the offset that is not in the partition's log.
            until: the end of the batch's range (direct mode), or None for an
                open-ended read (receiver mode, start positions).
            what: what the offset is, for the messages.

        Returns:
            The offset to continue at; at or past ``until`` means the rest
            of the range is gone or skipped.

        Raises:
            StreamletError: the policy is "fail".
        """
        config = self.config
        where = self.where(partition)
        begin = (await self.beginning_offsets([partition]))[partition]
        end = (await self.end_offsets([partition]))[partition]
        policy = config.on_out_of_range
        if begin <= offset <= end:
            # In range by the time we looked (a leader change, say): go on.
            log.warning(
                "%s: offset %d of %s was reported out of range; retrying", what, offset, where
            )
            return offset
        target, problem = out_of_range(
            offset, begin=begin, end=end, until=until, policy=policy, where=where
        )
        if target is None:
            raise SourceError(
                f"{what}: {problem}. Nothing was skipped. To go on without those records,"
                " set on_out_of_range='earliest' (continue at the oldest offset still"
                " stored) or 'latest' (skip to the newest); each logs what it skips"
            )
        log.error(
            "%s: %s; on_out_of_range=%r: continuing at offset %d, records of [%d, %d) are not read",
            what,
            problem,
            policy,
            target,
            offset,
            max(offset, target),
        )
        return target


# -- direct mode ---------------------------------------------------------------


def _record_offset(record: Record) -> int:
    return record.offset


def _split(records: list[Record], start: int, until: int) -> tuple[list[Record], list[Record]]:
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


@dataclass(slots=True)
class _Cursor:
    """Where the consumer stands on a partition after a read.

    ``records`` are those fetched past the last range's ``until``, offsets
    ``[start, position)``; a read that starts at ``start`` uses them instead
    of fetching them again.
    """

    start: int
    position: int
    records: list[Record]


@dataclass(slots=True)
class _Progress:
    range: OffsetRange
    position: int
    taken: list[Record]
    spill: list[Record]
    reusable: bool = True


class _KafkaSourceMeta(ABCMeta):
    """Makes ``KafkaSource(topic, ...)`` build the kind of source ``mode`` asks for.

    A metaclass rather than ``__new__`` alone: the object built is of a
    subclass, and Python would call its ``__init__`` again with the
    factory's arguments.
    """

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is KafkaSource:
            return _build(*args, **kwargs)
        return super().__call__(*args, **kwargs)


class KafkaSource(metaclass=_KafkaSourceMeta):
    """A source reading one Kafka topic; pass it to ``app.source()``.

    ``KafkaSource(topic, ...)`` builds a :class:`KafkaDirectSource` or,
    with ``mode="receiver"``, a :class:`KafkaReceiver`; both are
    ``KafkaSource`` instances, so ``isinstance(source, KafkaSource)`` holds.

    Args:
        topic: the topic. One source reads one topic; register one per topic.
        bootstrap_servers: ``"host:port"`` or a list of them.
        group_id: the consumer group whose offsets are committed after each
            batch (direct) or durable chunk (receiver), so lag tools see
            progress; also where ``start="committed"`` looks. None: no group.
        partitions: the partitions to read; None for all (and any added later).
        start: where partitions streamlet has no position for begin:
            ``"committed"`` (the group's offset; earliest where it has none,
            logged), ``"earliest"``, ``"latest"`` (the LSO), or an explicit
            ``{partition: offset}`` (partitions not named: earliest).
        isolation: ``"read_committed"`` (skip aborted transactions, never
            read past the LSO) or ``"read_uncommitted"``.
        mode: ``"direct"`` (offset ranges, no WAL copy) or ``"receiver"``
            (a consumer task feeding the data WAL).
        max_rate: the most records per second per partition (None: no limit).
        on_out_of_range: what lost offsets (retention) do: ``"fail"``,
            ``"earliest"`` or ``"latest"``; the latter two log what is skipped.
        connect_timeout: seconds to keep trying to reach the brokers (and
            find the topic) at start before failing.
        fetch_timeout: seconds a read, offset lookup or commit may go
            without progress before it fails.
        consumer_config: further ``aiokafka.AIOKafkaConsumer`` settings,
            passed through (SASL/SSL, client_id, fetch sizes...).
        name: the source's name in the app (records' ``source``); default
            the topic.
        headers: carry each record's Kafka headers in ``Record.headers``
            (receiver mode: stored in the data WAL with the record). Off by
            default: it costs a tuple per record.

    Raises:
        ConfigError: a setting is invalid.
    """

    config: KafkaSourceConfig

    @overload
    def __new__(
        cls,
        topic: str,
        *,
        bootstrap_servers: str | Sequence[str],
        group_id: str | None = None,
        partitions: Sequence[int] | None = None,
        start: StartPosition = "committed",
        isolation: Isolation = "read_committed",
        mode: Literal["direct"] = "direct",
        max_rate: float | None = None,
        on_out_of_range: OutOfRangePolicy = "fail",
        connect_timeout: float = 30.0,
        fetch_timeout: float = 30.0,
        consumer_config: Mapping[str, object] | None = None,
        name: str | None = None,
        headers: bool = False,
    ) -> KafkaDirectSource: ...

    @overload
    def __new__(
        cls,
        topic: str,
        *,
        bootstrap_servers: str | Sequence[str],
        group_id: str | None = None,
        partitions: Sequence[int] | None = None,
        start: StartPosition = "committed",
        isolation: Isolation = "read_committed",
        mode: Literal["receiver"],
        max_rate: float | None = None,
        on_out_of_range: OutOfRangePolicy = "fail",
        connect_timeout: float = 30.0,
        fetch_timeout: float = 30.0,
        consumer_config: Mapping[str, object] | None = None,
        name: str | None = None,
        headers: bool = False,
    ) -> KafkaReceiver: ...

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        # The overloads above type ``KafkaSource(...)``; the metaclass builds it.
        return super().__new__(cls)

    @property
    def topic(self) -> str:
        """The topic read (what a KafkaSink's ``consume_from`` commits offsets for)."""
        return self.config.topic

    @property
    def group_id(self) -> str | None:
        """The consumer group offsets are committed to, if any."""
        return self.config.group_id


class KafkaDirectSource(KafkaSource, DirectSource):
    """A Kafka topic read by offset ranges (Spark's direct API); see the module docs.

    Build it with :func:`KafkaSource` (``mode="direct"``, the default).

    Args:
        config: the validated settings.
    """

    def __init__(self, config: KafkaSourceConfig) -> None:
        super().__init__(name=config.name or config.topic, max_rate=config.max_rate)
        self.config = config
        self._link = _Link(config)
        self._cursors: dict[int, _Cursor] = {}
        #: The last end offsets the brokers told, and since when they have
        #: not answered (None: the last lookup succeeded).
        self._ends: dict[int, int] = {}
        self._unanswered_since: float | None = None
        #: Per partition, where the batches planned so far end (the
        #: scheduler's next start): from start_positions, resume_from, read.
        self._planned: dict[int, int] = {}

    async def start(self) -> None:
        """Connect and assign the topic's partitions.

        Raises:
            StreamletError: the brokers cannot be reached within
                ``connect_timeout`` (the message names them and what to check).
            ConfigError: the topic or a requested partition does not exist.
        """
        await self._link.connect()

    async def latest(self) -> Mapping[int, int]:
        """Per partition, one past the newest readable offset (the LSO under read_committed).

        Called at every tick, between batches. When the brokers do not
        answer within ``config.patience`` seconds, each partition's end is
        given as where the batches planned so far end (never past what the
        brokers last told): the next batch takes no new offsets, so no batch
        starts that would wait on brokers that are down, and the scheduler
        goes on ticking (and sees a stop request) instead of hanging in this
        lookup. Only when no answer came for ``fetch_timeout`` seconds in a
        row does it fail, as any other lookup does.

        Raises:
            StreamletError: no answer for ``fetch_timeout`` seconds, or a
                lookup failed for good.
        """
        link = self._link
        if link.refresh_partitions():
            self._cursors.clear()
        partitions = sorted(link.partitions)
        known = self._ends
        if any(p not in known for p in partitions):
            ends = await link.end_offsets(partitions)  # nothing to fall back on
        else:
            began = time.monotonic()
            since = self._unanswered_since
            answer: dict[int, int] | None = None
            with anyio.move_on_after(self.config.patience):
                answer = await link.end_offsets(partitions, since=since)
            if answer is None:
                if since is None:
                    self._unanswered_since = began
                    log.warning(
                        "Kafka at %s did not tell the end offsets of topic %r within %g s;"
                        " batches take no new offsets of it until it does (the app stops if"
                        " it does not answer within fetch_timeout=%g s)",
                        self.config.servers,
                        self.config.topic,
                        self.config.patience,
                        self.config.fetch_timeout,
                    )
                planned = self._planned
                return {p: min(known[p], planned.get(p, known[p])) for p in partitions}
            ends = answer
        if self._unanswered_since is not None:
            log.info("Kafka at %s answers again", self.config.servers)
        self._unanswered_since = None
        known.update(ends)
        return ends

    async def start_positions(self, partitions: Iterable[int]) -> Mapping[int, int]:
        """Apply ``start`` (and ``on_out_of_range``) to partitions streamlet has not seen."""
        positions = await self._link.start_positions(partitions)
        self._planned.update(positions)
        return positions

    def resume_from(self, positions: Mapping[int, int]) -> None:
        """Point the consumer at the next batch's starts, so it prefetches them."""
        consumer = self._link.consumer
        self._planned.update(positions)
        for partition, offset in positions.items():
            if partition in consumer.assigned:
                consumer.seek(partition, offset)
                self._cursors[partition] = _Cursor(offset, offset, [])

    async def read(self, ranges: Sequence[OffsetRange]) -> list[Record]:
        """Exactly the readable records of ``ranges``, in range and offset order.

        Raises:
            StreamletError: a partition made no progress for ``fetch_timeout``
                seconds, offsets were lost and ``on_out_of_range="fail"``, or
                the broker failed the fetch.
        """
        link = self._link
        consumer = link.consumer
        progress: dict[int, _Progress] = {}
        for r in ranges:
            if r.partition not in consumer.assigned:
                raise SourceError(
                    f"cannot read offsets [{r.start}, {r.until}) of {link.where(r.partition)}:"
                    f" this source reads partitions {sorted(consumer.assigned)} only"
                )
            if r.partition in progress:
                raise SourceError(f"two ranges for {link.where(r.partition)} in one read")
            self._planned[r.partition] = max(self._planned.get(r.partition, 0), r.until)
            cursor = self._cursors.pop(r.partition, None)
            if cursor is not None and cursor.start == r.start:
                taken, spill = _split(cursor.records, r.start, r.until)
                progress[r.partition] = _Progress(r, cursor.position, taken, spill)
            else:
                consumer.seek(r.partition, r.start)
                progress[r.partition] = _Progress(r, r.start, [], [])
        active = {p for p, s in progress.items() if s.position < s.range.until}
        last_progress = time.monotonic()
        while active:
            try:
                fetched = await consumer.getmany(active, wait=_POLL, source=self.name)
            except _OutOfRange as exc:
                for partition, offset in exc.offsets.items():
                    state = progress.get(partition)
                    if state is None or partition not in active:
                        continue
                    r = state.range
                    target = await link.out_of_range(
                        partition,
                        offset,
                        until=r.until,
                        what=f"reading offsets [{r.start}, {r.until}) of {link.where(partition)}",
                    )
                    state.reusable = False
                    if target >= r.until:
                        active.discard(partition)
                    else:
                        consumer.seek(partition, target)
                        state.position = target
                last_progress = time.monotonic()
                continue
            except KafkaError as exc:
                raise _kafka_error(
                    f"fetching from topic {self.config.topic!r} at {self.config.servers}", exc
                ) from exc
            moved = False
            for partition, records in fetched.items():
                if not records:
                    continue
                state = progress[partition]
                taken, spill = _split(records, state.range.start, state.range.until)
                state.taken.extend(taken)
                state.spill.extend(spill)
                moved = True
            for partition in sorted(active):
                state = progress[partition]
                position = await consumer.position(partition)
                if position != state.position:
                    state.position = position
                    moved = True
                # Markers and aborted records are skipped without being
                # returned, so the position, not the records, says "done".
                if position >= state.range.until:
                    active.discard(partition)
            now = time.monotonic()
            if moved:
                last_progress = now
            elif active and now - last_progress > self.config.fetch_timeout:
                await self._stalled(progress, active)
        for partition, state in progress.items():
            if state.reusable:
                self._cursors[partition] = _Cursor(state.range.until, state.position, state.spill)
        out: list[Record] = []
        for r in ranges:
            out.extend(progress[r.partition].taken)
        return out

    async def _stalled(self, progress: Mapping[int, _Progress], active: Iterable[int]) -> None:
        link = self._link
        stuck = sorted(active)
        ends: dict[int, int] = {}
        # Only for the message: a broker that is down must not double the wait.
        with anyio.move_on_after(self.config.patience):
            ends = await link.end_offsets(stuck)
        details = "; ".join(
            f"{link.where(p)} at offset {progress[p].position} of range"
            f" [{progress[p].range.start}, {progress[p].range.until}), "
            + (f"readable up to {ends[p]}" if p in ends else "the brokers did not answer")
            for p in stuck
        )
        error = SourceError(
            f"reading topic {self.config.topic!r} made no progress for"
            f" fetch_timeout={self.config.fetch_timeout:g} s: {details}. If the range"
            " reaches past what is readable, the topic was recreated or truncated since the"
            " batch was planned; otherwise check the brokers' health"
        )
        error.retriable = True
        raise error

    async def commit(self, ranges: Sequence[OffsetRange]) -> None:
        """Commit each range's ``until`` to the group (with ``group_id``), for lag tools."""
        await self._link.commit({r.partition: r.until for r in ranges})

    async def aclose(self) -> None:
        """Disconnect."""
        self._cursors.clear()
        await self._link.close()

    def describe(self) -> str:
        return self.config.describe("direct")


# -- receiver mode -------------------------------------------------------------


class _Pending(NamedTuple):
    stored: Stored
    offsets: dict[int, int]


class KafkaReceiver(KafkaSource, Receiver):
    """A Kafka topic consumed into the data WAL (a reliable receiver); see the module docs.

    Build it with :func:`KafkaSource` and ``mode="receiver"``. Each chunk is
    stored with acks ``{"<partition>": next_offset}``; a restart resumes
    from them, and the consumer group's offsets are committed only after the
    chunk they cover is durable.

    Args:
        config: the validated settings.
    """

    def __init__(self, config: KafkaSourceConfig) -> None:
        super().__init__(name=config.name or config.topic)
        self.config = config
        self._group_commits = 0  # for the crash point after each

    async def run(self, context: ReceiverContext) -> None:
        """Consume until ``context.stopping`` is set, then wait for what was stored.

        Raises:
            StreamletError: the brokers cannot be reached within
                ``connect_timeout``, offsets were lost with
                ``on_out_of_range="fail"``, or the broker failed a fetch.
            ConfigError: the topic or a requested partition does not exist.
        """
        link = _Link(self.config)
        await link.connect()
        try:
            await self._consume(link, context)
        finally:
            with anyio.CancelScope(shield=True):
                await link.close()

    async def _consume(self, link: _Link, context: ReceiverContext) -> None:
        consumer = link.consumer
        acks = context.acks
        resumed = {p: int(acks[str(p)]) for p in consumer.assigned if str(p) in acks}
        for p, offset in sorted(resumed.items()):
            log.info("%s resumes at offset %d (durable in the WAL)", link.where(p), offset)
        positions = {**resumed, **await link.start_positions(consumer.assigned - set(resumed))}
        for p, offset in positions.items():
            consumer.seek(p, offset)
        if self.config.group_id is None:
            await self._fetch(link, context, positions, None)
            return
        send, receive = anyio.create_memory_object_stream[_Pending](_MAX_PENDING)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._commit_durable, link, receive, context.stopping)
            async with send:
                await self._fetch(link, context, positions, send)

    async def _fetch(
        self,
        link: _Link,
        context: ReceiverContext,
        positions: dict[int, int],
        stored_chunks: MemoryObjectSendStream[_Pending] | None,
    ) -> None:
        """Fetch and store chunks until the app stops; hand each to the committer."""
        consumer = link.consumer
        rate = self.config.max_rate
        ready_at: dict[int, float] = {}
        while not context.stopping.is_set():
            new = link.refresh_partitions()
            if new:
                # Reassigning forgets positions: put every partition back.
                positions.update(await link.start_positions(new))
                for p, offset in positions.items():
                    consumer.seek(p, offset)
            now = time.monotonic()
            ready = [p for p in sorted(consumer.assigned) if ready_at.get(p, 0.0) <= now]
            if not ready:  # every partition is ahead of max_rate
                with anyio.move_on_after(min(ready_at.values()) - now):
                    await context.stopping.wait()
                continue
            try:
                fetched = await consumer.getmany(ready, wait=_POLL, source=self.name)
            except _OutOfRange as exc:
                for p, offset in exc.offsets.items():
                    target = await link.out_of_range(
                        p, offset, until=None, what=f"consuming {link.where(p)}"
                    )
                    consumer.seek(p, target)
                    positions[p] = target
                continue
            except KafkaError as exc:
                raise _kafka_error(
                    f"fetching from topic {self.config.topic!r} at {self.config.servers}", exc
                ) from exc
            records: list[Record] = []
            chunk: dict[int, int] = {}
            for p in sorted(fetched):
                if not fetched[p]:
                    continue
                records.extend(fetched[p])
                # The position, not the last record + 1: it is past any
                # markers, so the group shows no phantom lag.
                chunk[p] = positions[p] = await consumer.position(p)
                if rate is not None:
                    ready_at[p] = max(ready_at.get(p, now), now) + len(fetched[p]) / rate
            if not records:
                continue
            stored = await context.store(records, acks={str(p): o for p, o in chunk.items()})
            if stored_chunks is not None:
                await stored_chunks.send(_Pending(stored, chunk))

    async def _commit_durable(
        self, link: _Link, receive: MemoryObjectReceiveStream[_Pending], stopping: anyio.Event
    ) -> None:
        """Commit the group's offsets of stored chunks, in order, once each is durable.

        Invariant: the group never holds an offset whose records are not
        durable in the WAL.
        """

        async def commit(offsets: Mapping[int, int]) -> None:
            await self._commit(link, offsets, stopping)

        offsets: dict[int, int] = {}
        async with receive:
            try:
                item = await receive.receive()
            except anyio.EndOfStream:
                return
            while True:
                if not item.stored.done() and offsets:
                    await commit(offsets)
                    offsets = {}
                await item.stored.wait()
                offsets.update(item.offsets)
                try:
                    item = receive.receive_nowait()
                    continue
                except anyio.WouldBlock:
                    pass
                except anyio.EndOfStream:
                    await commit(offsets)
                    return
                await commit(offsets)
                offsets = {}
                try:
                    item = await receive.receive()
                except anyio.EndOfStream:
                    return

    async def _commit(self, link: _Link, offsets: Mapping[int, int], stopping: anyio.Event) -> None:
        # Imported here: streamlet.faults starts STREAMLET_FAULT_CLOCK's clock
        # when first imported, which should be once the package is loaded.
        from streamlet.faults import crash_point

        if self.config.group_id is None or not offsets:
            return
        # The WAL's acks are the source of truth; the group's offsets only
        # lag until the next commit. So once the app is stopping, a commit
        # does not wait out fetch_timeout on brokers that do not answer.
        patience = self.config.patience if stopping.is_set() else math.inf
        try:
            with anyio.move_on_after(patience) as waited:
                await link.commit(offsets)
                self._group_commits += 1
                crash_point("receiver_after_group_commit", self._group_commits)
        except StreamletError as exc:
            log.warning("%s; the group's offsets catch up with the next chunk", exc)
            return
        if waited.cancelled_caught:
            log.warning(
                "committing the group offsets of topic %r got no answer within %g s while"
                " stopping; left behind (the data WAL's acks say where the next start"
                " resumes; the group catches up with the next chunk it commits)",
                self.config.topic,
                patience,
            )

    def describe(self) -> str:
        return self.config.describe("receiver")


# -- the factory ---------------------------------------------------------------


def _build(
    topic: str,
    *,
    bootstrap_servers: str | Sequence[str],
    group_id: str | None = None,
    partitions: Sequence[int] | None = None,
    start: StartPosition = "committed",
    isolation: Isolation = "read_committed",
    mode: Literal["direct", "receiver"] = "direct",
    max_rate: float | None = None,
    on_out_of_range: OutOfRangePolicy = "fail",
    connect_timeout: float = 30.0,
    fetch_timeout: float = 30.0,
    consumer_config: Mapping[str, object] | None = None,
    name: str | None = None,
    headers: bool = False,
) -> KafkaDirectSource | KafkaReceiver:
    """``KafkaSource(...)``: validate the settings, then build the kind ``mode`` asks for."""
    config = KafkaSourceConfig(
        topic=topic,
        bootstrap_servers=bootstrap_servers,
        group_id=group_id,
        partitions=partitions,
        start=start,
        isolation=isolation,
        max_rate=max_rate,
        on_out_of_range=on_out_of_range,
        connect_timeout=connect_timeout,
        fetch_timeout=fetch_timeout,
        consumer_config=consumer_config if consumer_config is not None else {},
        name=name,
        headers=headers,
    )
    if mode == "direct":
        return KafkaDirectSource(config)
    if mode == "receiver":
        return KafkaReceiver(config)
    raise ConfigError(f"KafkaSource({topic!r}) mode must be 'direct' or 'receiver', not {mode!r}")
