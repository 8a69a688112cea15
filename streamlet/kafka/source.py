"""Kafka as a streamlet source: direct (by offset range) or receiver (through the WAL).

One :class:`KafkaSource` reads **one topic**: all of its partitions, or the
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

from abc import ABCMeta
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, overload

from streamlet.errors import ConfigError
from streamlet.kafka.config import (
    Isolation,
    KafkaSourceConfig,
    OutOfRangePolicy,
    StartPosition,
)

if TYPE_CHECKING:
    from streamlet.kafka.direct import KafkaDirectSource
    from streamlet.kafka.receiver import KafkaReceiver

__all__ = ["KafkaSource"]


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


# -- the factory ---------------------------------------------------------------


def _build(
    topic: str,
    *,
    mode: str = "direct",
    consumer_config: Mapping[str, object] | None = None,
    **settings: Any,
) -> KafkaDirectSource | KafkaReceiver:
    """``KafkaSource(...)``: validate the settings, then build the kind ``mode`` asks for.

    The settings are the keyword arguments of :class:`KafkaSourceConfig`,
    typed for callers by ``KafkaSource.__new__``'s overloads.
    """
    # Imported here: both kinds subclass KafkaSource, defined above.
    from streamlet.kafka.direct import KafkaDirectSource
    from streamlet.kafka.receiver import KafkaReceiver

    config = KafkaSourceConfig(
        topic=topic,
        consumer_config=consumer_config if consumer_config is not None else {},
        **settings,
    )
    if mode == "direct":
        return KafkaDirectSource(config)
    if mode == "receiver":
        return KafkaReceiver(config)
    raise ConfigError(f"KafkaSource({topic!r}) mode must be 'direct' or 'receiver', not {mode!r}")
