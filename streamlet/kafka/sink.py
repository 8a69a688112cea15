"""KafkaSink: each batch's outputs go to a Kafka topic in one transaction, exactly once.

Exactly-once (``transactional=True``, the default) rests on these rules.

**One transactional id per app and handler**, ``streamlet.<app>.<handler>``.
Starting the producer runs Kafka's InitProducerId: the coordinator bumps the
id's epoch, which fences every older producer of the id (a zombie worker
still running after a restart), and it aborts or finishes that producer's
open transaction before it answers. So one worker runs one app's handler; a
second worker of the same app takes the id over and the first gets a
:class:`~streamlet.errors.SinkError` at its next commit. Scaling out means
separate apps over separate partitions for now; transactional ids per input
partition (the scheme without KIP-447 group metadata, which aiokafka 0.14
lacks) are left for later.

**A marker committed in the same transaction as the outputs.** Each
transaction also commits, with ``send_offsets_to_transaction``, the offset
``batch.id + 1`` (the next batch to write, as Kafka commits "the next offset
to read") for partition 0 of the output topic under a consumer group of the
sink's own, the *marker group* (``streamlet-sink.<app>.<handler>``). Group
offsets are metadata: nothing reads the output topic with that group. The
marker and the outputs commit or abort together, so the marker is exactly
"batches below it are written". A commit of a batch below the marker does
nothing and returns False. Batches commit in increasing id order (the
scheduler runs them one at a time), which is what makes one number enough.

The marker is read from the broker when the producer (re)starts, after
InitProducerId has settled any transaction of an earlier producer, and kept
in memory after that: while this producer lives, only it can move the
marker. The read uses OffsetFetch and checks the response's group-level
error code too: aiokafka's own helpers ignore it, and an error such as
"coordinator loading" would otherwise read as "no offset", that is, as "no
batch committed".

**Unknown outcomes are reconciled, never guessed.** A commit that timed out
or was cancelled after ``commit_transaction`` started may have committed or
not (aiokafka shields the request, so it runs on). The sink drops the
producer, starts a new one with the same id (which fences the old one and
settles its transaction) and reads the marker again. A failure before
``commit_transaction`` aborts the transaction. A fenced producer stops the
sink until it is opened again, with an error that says another worker took
over: starting a new producer would fence that worker in turn.

**Offsets of Kafka sources** (``consume_from``) are committed in the same
transaction, under the source's consumer group: ``until`` of each of the
batch's offset ranges of that source, the next offset to read. aiokafka 0.14
adds only the first group of a transaction to it (one AddOffsetsToTxn per
transaction), and brokers that verify transactional offset commits (KIP-890;
Kafka 4.1 does) reject an offset commit for a group whose
``__consumer_offsets`` partition is not in the transaction
(INVALID_TXN_STATE), which also kills the producer. Kafka places a group in
``__consumer_offsets`` by the Java ``String.hashCode`` of its id.
So with ``consume_from``, the marker group's name gets a suffix of capital
letters chosen to give it the same hash as the source group
(:func:`marker_group`): both groups then live in one partition of
``__consumer_offsets``, on any cluster, and one AddOffsetsToTxn covers both.
For the same reason all ``consume_from`` sources must share one group. The
marker is read under the plain name too, so that it is still found after
``consume_from`` was added to or removed from an app between runs.

Non-transactional mode (``transactional=False``) uses an idempotent producer
(no duplicates from the producer's own retries) and writes a batch again
when it runs again after a crash: at-least-once.

**The marker names its state directory.** Batch ids restart from 1 in a new
state directory, so a marker written under another one would make this sink
take new batches for old ones and skip them, or, read naively, write every
re-read input again. The marker's metadata is ``streamlet-sink/2 <state id>``
and the group's name does not depend on the state directory: a sink opened
under another state directory finds the marker and refuses to start (a wiped
state directory, a relative ``state_dir`` resolved from another working
directory, a second worker with its own state directory). The check runs
with a plain producer before the transactional one starts, so a refused
worker does not fence the one that owns the marker. Markers of older
streamlets (``streamlet-sink/1`` under a group name holding the start of
the state id) are still read as this state directory's.

Limits: the marker lives as long as Kafka keeps the group's offsets
(``offsets.retention.minutes``, 7 days by default, counted from the last
commit): an app that crashed and stays down longer than that re-writes the
batch that was in flight when it restarts, and a new state directory is
then no longer refused. To start over on purpose, stop the app and delete
the marker group, or give the app a new name.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import anyio
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    InvalidProducerEpoch,
    InvalidTransactionTimeout,
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    ProducerFenced,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)
from aiokafka.structs import TopicPartition

from streamlet.errors import (
    ConfigError,
    FencedError,
    OutputError,
    SinkError,
    SinkUnavailableError,
)
from streamlet.kafka._producer import (
    Message,
    PartitionerFailed,
    Producer,
    checked_partitioner,
    delivered,
)
from streamlet.kafka.config import (
    ConsumedTopic,
    HeadersFunction,
    KafkaSinkConfig,
    KeyFunction,
    Partitioner,
    ValueFunction,
    probe_settings,
)
from streamlet.kafka.policy import (
    legacy_marker_group,
    marker_group,
    marker_metadata,
    marker_owner,
    transaction_failure,
    transactional_id,
)
from streamlet.records import Batch
from streamlet.sinks.base import Guarantee, Sink, SinkContext, encode_output, sink_ahead

__all__ = [
    "ConsumedTopic",
    "HeadersFunction",
    "KafkaSink",
    "KeyFunction",
    "Partitioner",
    "ValueFunction",
]

log = logging.getLogger(__name__)

# Errors that no retry fixes: settings or permissions.
_PERMANENT: tuple[type[BaseException], ...] = (
    TransactionalIdAuthorizationFailed,
    TopicAuthorizationFailedError,
    GroupAuthorizationFailedError,
    ClusterAuthorizationFailedError,
    InvalidTransactionTimeout,
)
_FIRST_BACKOFF = 0.25
_MAX_BACKOFF = 5.0


def _is_fenced(exc: BaseException | None) -> bool:
    return isinstance(exc, ProducerFenced | InvalidProducerEpoch)


def _retriable(exc: BaseException) -> bool:
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, KafkaConnectionError | KafkaTimeoutError | TimeoutError):
        return True
    return bool(getattr(exc, "retriable", False))


def _sink_error(cause: BaseException, message: str) -> SinkError:
    """A SinkError, of the class that says it may pass when ``cause`` may."""
    return (SinkUnavailableError if _retriable(cause) else SinkError)(message)


def _describe(exc: BaseException, *, cause: bool = True) -> str:
    """``Type: message``, plus the error aiokafka wrapped, if it wrapped one."""
    if isinstance(exc, TimeoutError):
        return "no answer in time (TimeoutError)"
    name = type(exc).__name__
    text = str(exc) or name
    if not text.startswith(name):  # aiokafka's errors already start with their name
        text = f"{name}: {text}"
    if cause and exc.__cause__ is not None:
        text += f" (caused by {_describe(exc.__cause__, cause=False)})"
    return text


def _check_headers(headers: object) -> list[tuple[str, bytes]]:
    if headers is None:
        return []
    if isinstance(headers, str | bytes) or not isinstance(headers, Iterable):
        raise TypeError(f"headers() returned {type(headers).__name__}, not a list of (str, bytes)")
    checked: list[tuple[str, bytes]] = []
    for item in headers:
        if (
            not isinstance(item, tuple)
            or len(item) != 2
            or not isinstance(item[0], str)
            or not isinstance(item[1], bytes)
        ):
            raise TypeError(f"header {item!r} is not a (str, bytes) pair")
        checked.append((item[0], item[1]))
    return checked


class KafkaSink(Sink):
    """Writes each batch's outputs to a Kafka topic; exactly once by default.

    See the module docstring for how: a transaction per batch carrying the
    outputs, a marker offset (the batch id plus one) and the offsets of
    ``consume_from`` sources. One worker runs one app's handler: a second
    worker with the same app and handler names fences the first.

    Args:
        topic: the output topic; it must exist (or the broker create it).
        bootstrap_servers: ``host:port`` (or a list of them) of the cluster.
        transactional: True (default) for exactly-once transactions; False for
            an idempotent producer without transactions: at-least-once, a
            batch re-run after a crash is written again.
        key: maps an output to its record key, bytes or None (default: no key).
        value: maps an output to its record value, bytes or None (default:
            :func:`~streamlet.sinks.base.encode_output`: bytes as they are,
            str as UTF-8, anything else as JSON).
        headers: maps an output to its headers, ``[(str, bytes), ...]`` or None.
        partitioner: ``partitioner(key, all_partitions, available_partitions)``
            returning the partition, as aiokafka calls it (default: aiokafka's,
            murmur2 of the key as the Java client does, random without a key).
        consume_from: Kafka sources (or one) whose offsets after each batch
            are committed in the batch's transaction, under their consumer
            group: objects with ``name``, ``topic`` and ``group_id``
            (:class:`ConsumedTopic`). All must share one group; needs
            ``transactional=True``.
        producer_config: more aiokafka producer settings, passed through:
            ``security_protocol``, ``ssl_context``, ``sasl_mechanism``,
            ``sasl_plain_username``, ``sasl_plain_password``,
            ``sasl_oauth_token_provider``, ``compression_type``, ``linger_ms``,
            ``max_batch_size``, ``request_timeout_ms``, ``client_id`` and the
            like. The settings the sink owns (bootstrap servers, transactional
            id, idempotence, acks, serializers, partitioner) are refused.
        transaction_timeout: seconds. The broker aborts a transaction open
            longer than this, and the sink gives up waiting on one commit
            after this long (the outcome is then reconciled, see above).
        open_timeout: seconds :meth:`open` (and a reconnect after a failed
            commit) keeps trying to reach the cluster, with logged retries and
            growing pauses, before it fails.

    Raises:
        ConfigError: an argument is invalid.
    """

    def __init__(
        self,
        topic: str,
        *,
        bootstrap_servers: str | Sequence[str],
        transactional: bool = True,
        key: KeyFunction | None = None,
        value: ValueFunction = encode_output,
        headers: HeadersFunction | None = None,
        partitioner: Partitioner | None = None,
        consume_from: ConsumedTopic | Sequence[ConsumedTopic] | None = None,
        producer_config: Mapping[str, Any] | None = None,
        transaction_timeout: float = 60.0,
        open_timeout: float = 30.0,
    ) -> None:
        config = KafkaSinkConfig(
            topic,
            bootstrap_servers,
            transactional=transactional,
            key=key,
            value=value,
            headers=headers,
            partitioner=partitioner,
            consume_from=consume_from,
            producer_config=producer_config,
            transaction_timeout=transaction_timeout,
            open_timeout=open_timeout,
        )
        self._config = config
        self._topic = topic
        self._servers = config.servers
        self._transactional = config.transactional
        self._key = key
        self._value = value
        self._headers = headers
        self._partitioner = partitioner
        self._sources = config.sources
        self._transaction_timeout = config.transaction_timeout
        self._open_timeout = config.open_timeout
        self._context: SinkContext | None = None
        self._source_group: str | None = None
        self._by_source: dict[str, str] = {}  # source name -> topic
        self._transactional_id = ""
        self._marker_group = ""
        self._marker_groups: tuple[str, ...] = ()
        self._producer: Producer | None = None
        # The next batch id not yet written (transactional mode); None while
        # unknown, i.e. until a producer started and read the marker.
        self._next: int | None = None
        # Whether the marker's owner was checked before the first InitProducerId.
        self._owner_checked = False
        # Set once fenced: this sink never starts another producer.
        self._fenced: str | None = None
        # Producers dropped by a cancelled commit, stopped by the next _retire.
        self._orphans: list[Producer] = []
        self._lock = anyio.Lock()

    # A property, not the base's class attribute: it depends on transactional.
    @property
    def guarantee(self) -> Guarantee:  # type: ignore[override]
        """``"exactly-once"`` with transactions, ``"at-least-once"`` without."""
        return "exactly-once" if self._transactional else "at-least-once"

    @property
    def topic(self) -> str:
        """The output topic."""
        return self._topic

    @property
    def transactional_id(self) -> str | None:
        """The producer's transactional id, once opened (None without transactions)."""
        return self._transactional_id or None

    @property
    def marker_group(self) -> str | None:
        """The group holding the marker, once opened (None without transactions)."""
        return self._marker_group or None

    def describe(self) -> str:
        return f"KafkaSink({self._topic})"

    def _where(self) -> str:
        context = self._context
        who = f" of handler {context.handler!r} (app {context.app!r})" if context else ""
        return f"KafkaSink {self._topic!r}{who}"

    async def open(self, context: SinkContext) -> None:
        """Start the producer: fence older ones, settle their transaction, read the marker.

        Raises:
            ConfigError: ``consume_from`` sources are unusable (no group, or
                several groups), or the broker refuses the transaction timeout.
            SinkError: the cluster stayed unreachable for ``open_timeout``
                (retriable), or refused access (not retriable).
        """
        if self._context is not None:
            raise SinkError(f"{self._where()} is already open")
        self._resolve_sources()
        self._context = context
        # Opening again after being fenced is a deliberate restart: it takes
        # the transactional id back.
        self._fenced = None
        self._owner_checked = False
        if self._transactional:
            self._transactional_id = transactional_id(context)
            base = marker_group(context)
            self._marker_group = marker_group(context, self._source_group)
            # The plain name too: the marker stays found when consume_from
            # is added to or removed from an app between runs; and the names
            # of older streamlets, which held the state directory's id.
            self._marker_groups = tuple(
                dict.fromkeys(
                    (
                        self._marker_group,
                        base,
                        legacy_marker_group(context, self._source_group),
                        legacy_marker_group(context),
                    )
                )
            )
        try:
            async with self._lock:
                await self._connect()
        except BaseException:
            self._context = None
            raise

    def _resolve_sources(self) -> None:
        by_source: dict[str, str] = {}
        groups: dict[str, str] = {}
        for source in self._sources:
            name, topic, group = source.name, source.topic, source.group_id
            if not isinstance(name, str) or not name:
                raise ConfigError(
                    f"KafkaSink {self._topic!r}: consume_from source {source!r} has no name;"
                    " register it with app.source() first"
                )
            if not isinstance(topic, str) or not topic:
                raise ConfigError(
                    f"KafkaSink {self._topic!r}: consume_from source {name!r} has no topic"
                )
            if not isinstance(group, str) or not group:
                raise ConfigError(
                    f"KafkaSink {self._topic!r}: consume_from source {name!r} has no consumer"
                    " group to commit offsets to; give it a group_id, or leave it out of"
                    " consume_from"
                )
            if by_source.get(name, topic) != topic:
                raise ConfigError(
                    f"KafkaSink {self._topic!r}: two consume_from sources named {name!r}"
                )
            by_source[name] = topic
            groups[name] = group
        distinct = sorted(set(groups.values()))
        if len(distinct) > 1:
            raise ConfigError(
                f"KafkaSink {self._topic!r}: consume_from sources use several consumer groups"
                f" ({', '.join(distinct)}); one transaction can commit the offsets of one group"
                " only (aiokafka 0.14 adds a single group to a transaction), so give them the"
                " same group_id"
            )
        self._by_source = by_source
        self._source_group = distinct[0] if distinct else None

    def _settings(self, context: SinkContext) -> dict[str, Any]:
        settings = self._config.producer_settings(context)
        if self._partitioner is not None:
            settings["partitioner"] = checked_partitioner(self._partitioner)
        return settings

    async def _connect(self) -> None:
        """Start a producer and read the marker, retrying for ``open_timeout`` seconds.

        Caller holds the lock. Invariant: never called once fenced (a new
        producer would fence the worker that took over).
        """
        context = self._context
        assert context is not None
        assert self._fenced is None
        await self._retire()
        deadline = time.monotonic() + self._open_timeout
        settings = self._settings(context)
        backoff = _FIRST_BACKOFF
        attempt = 0
        while True:
            attempt += 1
            error: BaseException
            try:
                with anyio.fail_after(max(deadline - time.monotonic(), 0.001)):
                    producer, next_batch = await self._start(settings)
            except TimeoutError as exc:
                error = exc
            except ConfigError:
                raise
            except _PERMANENT as exc:
                raise self._refused(exc) from exc
            except Exception as exc:
                error = exc
            else:
                self._producer, self._next = producer, next_batch
                if self._transactional:
                    log.info(
                        "%s: producer %r ready, next batch to write is %d",
                        self._where(),
                        transactional_id(context),
                        next_batch,
                    )
                return
            left = deadline - time.monotonic()
            if left <= 0:
                failure = SinkUnavailableError(
                    f"{self._where()} could not connect to Kafka at {', '.join(self._servers)}"
                    f" within {self._open_timeout:g}s ({attempt} attempt(s)); last error:"
                    f" {_describe(error)}. Check bootstrap_servers, that the broker is up and"
                    f" reachable, that topic {self._topic!r} exists, and the security settings"
                    " in producer_config"
                )
                raise failure from error
            pause = min(backoff, left)
            log.warning(
                "%s: cannot connect to Kafka at %s (attempt %d): %s; retrying in %.2fs",
                self._where(),
                ", ".join(self._servers),
                attempt,
                _describe(error),
                pause,
            )
            await anyio.sleep(pause)
            backoff = min(backoff * 2, _MAX_BACKOFF)

    async def _start(self, settings: Mapping[str, Any]) -> tuple[Producer, int | None]:
        if self._transactional and not self._owner_checked:
            # Before InitProducerId, which would fence the producer of a
            # worker that may rightly own the marker: a refused start must
            # not stop that worker.
            probe = await Producer.start(probe_settings(settings))
            try:
                written = await self._read_marker(probe) - 1
                context = self._context
                assert context is not None
                ahead = sink_ahead(
                    context.handler, self.describe(), written, context.allocated, context.state_dir
                )
                if ahead is not None:
                    raise ConfigError(ahead)
            finally:
                with anyio.CancelScope(shield=True):
                    await probe.stop()
            self._owner_checked = True
        producer = await Producer.start(settings)
        try:
            # Waits for the topic's metadata: a missing topic fails here, not
            # in the middle of a batch.
            await producer.partitions(self._topic)
            next_batch = await self._read_marker(producer) if self._transactional else None
        except BaseException:
            with anyio.CancelScope(shield=True):
                await producer.stop()
            raise
        return producer, next_batch

    async def _read_marker(self, producer: Producer) -> int:
        """The next batch id to write: the highest marker of the sink's groups.

        Raises:
            ConfigError: a marker group holds an offset no KafkaSink wrote, or
                the marker was written under another state directory.
        """
        context = self._context
        assert context is not None
        tp = TopicPartition(self._topic, 0)
        next_batch = 0
        for group in self._marker_groups:
            found = await producer.committed(group, tp)
            if found is None:
                continue
            owner = marker_owner(found.metadata)
            if owner is None:
                raise ConfigError(
                    f"consumer group {group!r} holds offset {found.offset} for {self._topic}[0]"
                    f" with metadata {found.metadata!r}, which no streamlet KafkaSink wrote;"
                    f" the group is reserved for {self._where()}. Delete the group"
                    " (kafka-consumer-groups --delete) if nothing of this app is pending"
                )
            if owner and context.state_id and owner != context.state_id and found.offset > 1:
                raise ConfigError(self._foreign(group, owner, found.offset - 1))
            next_batch = max(next_batch, found.offset)
        return next_batch

    def _foreign(self, group: str, owner: str, written: int) -> str:
        """Why outputs of another state directory refuse this sink, and what to do."""
        context = self._context
        assert context is not None
        return (
            f"{self._where()}: topic {self._topic!r} already holds this handler's outputs of"
            f" batches 1..{written} written under another state directory (id {owner}, see"
            f" the marker in consumer group {group!r}); this app's state_dir"
            f" {context.state_dir} has id {context.state_id}. Batch ids restart with a new"
            " state directory, so every input it reads again would be written again (with"
            " start='earliest', all of them). This happens when the state directory was"
            " wiped or lost, when the app runs from another working directory (a relative"
            " state_dir), or when a second worker with its own state_dir is started. Run"
            " the app with its original state_dir; or, to start over on purpose, stop every"
            f" worker of the app and delete the group (kafka-consumer-groups --delete --group"
            f" {group}), knowing that outputs already in the topic may be written again; or"
            " give the app or handler a new name"
        )

    def _refused(self, exc: BaseException) -> BaseException:
        if isinstance(exc, InvalidTransactionTimeout):
            return ConfigError(
                f"{self._where()}: the broker refuses transaction_timeout="
                f"{self._transaction_timeout:g}s; it must not exceed the broker's"
                " transaction.max.timeout.ms (15 minutes by default)"
            )
        return SinkError(
            f"{self._where()}: Kafka refused access: {_describe(exc)}. The producer needs"
            f" WRITE on topic {self._topic!r}"
            + (
                f", WRITE and DESCRIBE on transactional id {self._txn_id()!r}"
                f" and READ on the consumer group(s) {', '.join(self._marker_groups)}"
                if self._transactional
                else ""
            )
            + "; fix the ACLs or the credentials in producer_config"
        )

    def _txn_id(self) -> str:
        return self._transactional_id or "?"

    async def _retire(self) -> None:
        """Stop the current producer and any forgotten ones; the marker is unknown after."""
        producers = self._orphans
        if self._producer is not None:
            producers.append(self._producer)
        self._producer, self._orphans = None, []
        if self._transactional:
            self._next = None
        with anyio.CancelScope(shield=True):
            for producer in producers:
                await producer.stop()

    async def commit(self, batch: Batch, outputs: Sequence[object]) -> bool:
        """Write ``outputs`` of ``batch`` in one transaction, unless already written.

        Returns:
            True if this call wrote the batch; False if the batch was written
            before (transactional mode only; without transactions always True).

        Raises:
            SinkError: an output cannot be encoded, the partitioner failed
                (not retriable); Kafka failed (retriable where trying again
                can help); the producer was fenced by another worker (not
                retriable: this sink stops). Nothing of the batch is visible
                to ``read_committed`` consumers then.
        """
        if self._context is None:
            raise SinkError(f"{self._where()} is not open; call open() first")
        async with self._lock:
            if self._fenced is not None:
                raise FencedError(self._fenced)
            if self._producer is None:
                await self._connect()
            producer = self._producer
            assert producer is not None
            if self._transactional:
                assert self._next is not None
                if batch.id < self._next:
                    return False
            messages = self._encode(batch, outputs)
            if not self._transactional:
                await self._send_plain(producer, batch, messages)
                return True
            return await self._transact(producer, batch, messages)

    async def last_committed(self) -> int | None:
        """The newest batch written, from the marker (None without transactions)."""
        if not self._transactional:
            return None
        async with self._lock:
            if self._next is None:
                if self._fenced is not None:
                    raise FencedError(self._fenced)
                await self._connect()
            assert self._next is not None
            return max(0, self._next - 1)

    def _encode(self, batch: Batch, outputs: Sequence[object]) -> list[Message]:
        messages: list[Message] = []
        for index, output in enumerate(outputs):
            try:
                message = self._encode_one(output)
            except Exception as exc:
                raise OutputError(
                    f"output {index} of batch {batch.id} cannot be encoded for {self._where()}:"
                    f" {exc!r}. Return bytes, str or JSON-serializable values, or fix the sink's"
                    " key/value/headers functions; the batch is not written"
                ) from exc
            messages.append(message)
        return messages

    def _encode_one(self, output: object) -> Message:
        value = self._value(output)
        key = self._key(output) if self._key is not None else None
        headers = self._headers(output) if self._headers is not None else None
        if value is not None and not isinstance(value, bytes):
            raise TypeError(f"value() returned {type(value).__name__}, not bytes or None")
        if key is not None and not isinstance(key, bytes):
            raise TypeError(f"key() returned {type(key).__name__}, not bytes or None")
        if key is None and value is None:
            raise TypeError("a record needs a key or a value; both are None")
        return Message(key, value, _check_headers(headers))

    def _source_offsets(self, batch: Batch) -> dict[TopicPartition, int]:
        offsets: dict[TopicPartition, int] = {}
        for r in batch.ranges:
            topic = self._by_source.get(r.source)
            if topic is None:
                continue
            tp = TopicPartition(topic, r.partition)
            offsets[tp] = max(offsets.get(tp, r.until), r.until)
        return offsets

    async def _transact(self, producer: Producer, batch: Batch, messages: list[Message]) -> bool:
        """One transaction: outputs, marker, source offsets; see the module docstring."""
        source_offsets = self._source_offsets(batch)
        committing = False
        stage = "starting the transaction"
        try:
            with anyio.fail_after(self._transaction_timeout):
                await producer.begin()
                stage = "sending the outputs"
                futures = await producer.send_many(self._topic, messages)
                # Invariant: the marker and the outputs commit or abort together.
                stage = "adding the marker and source offsets"
                await producer.send_offsets(
                    self._marker_group,
                    {TopicPartition(self._topic, 0): batch.id + 1},
                    marker_metadata(self._context.state_id if self._context else ""),
                )
                if source_offsets:
                    assert self._source_group is not None
                    await producer.send_offsets(self._source_group, source_offsets)
                stage = "waiting for the broker to acknowledge the outputs"
                await delivered(futures)
                stage = "committing"
                committing = True
                await producer.commit()
        except Exception as exc:
            return await self._failed(producer, batch, exc, committing, stage)
        except BaseException:
            # Cancelled: the commit may still complete in the background, so
            # the outcome is unknown until a new producer settles it.
            self._forget(producer)
            raise
        self._next = batch.id + 1
        return True

    def _forget(self, producer: Producer) -> None:
        """Drop ``producer`` without waiting; a later call stops it."""
        self._producer = None
        self._next = None
        self._orphans.append(producer)

    async def _failed(
        self, producer: Producer, batch: Batch, exc: Exception, committing: bool, stage: str
    ) -> bool:
        """Turn a failed transaction into a SinkError, or True if it committed after all."""
        cause = producer.failure() or exc
        kind = transaction_failure(
            fenced=_is_fenced(cause) or _is_fenced(exc),
            partitioner_failed=isinstance(exc, PartitionerFailed),
            too_large=isinstance(cause, MessageSizeTooLargeError),
            committing=committing,
            timed_out=isinstance(exc, TimeoutError),
            producer_broken=producer.failure() is not None,
        )
        if kind == "fenced":
            self._fenced = (
                f"{self._where()} was fenced while writing batch {batch.id}: another producer"
                f" with transactional id {self._txn_id()!r} started, so"
                " another worker of this app took over (or the transaction ran longer than"
                f" transaction_timeout={self._transaction_timeout:g}s and the broker aborted it)."
                f" This worker's transaction was aborted and it stops writing; run one worker"
                " per app, and restart this one only after the other stopped: unfinished"
                " batches run again"
            )
            log.error("%s", self._fenced)
            await self._retire()
            raise FencedError(self._fenced) from cause
        if kind == "output":
            await self._abort(producer, batch)
            if isinstance(exc, PartitionerFailed):
                raise OutputError(
                    f"the partitioner of {self._where()} failed {stage} of batch {batch.id}:"
                    f" {exc}. The transaction was aborted; fix the partitioner"
                ) from exc.__cause__ or exc
            raise OutputError(
                f"{self._where()} could not write batch {batch.id} ({stage}):"
                f" {_describe(cause)}. The transaction was aborted; nothing of the batch"
                " is visible"
            ) from cause
        if kind == "aborted":
            await self._abort(producer, batch)
            raise _sink_error(
                cause,
                f"{self._where()} could not write batch {batch.id} ({stage}):"
                f" {_describe(cause)}. The transaction was aborted; nothing of the batch is"
                " visible",
            ) from cause
        # Unknown outcome (timed out, or failed while committing): a new
        # producer settles the transaction, then the marker says what happened.
        phase = "committing" if committing else f"writing ({stage})"
        log.warning(
            "%s: %s batch %d failed (%s); reconnecting to learn whether it committed",
            self._where(),
            phase,
            batch.id,
            _describe(cause),
        )
        try:
            await self._connect()
        except SinkError as reconnect:
            raise _sink_error(
                reconnect,
                f"{self._where()}: {phase} batch {batch.id} failed ({_describe(cause)}) and"
                f" whether it committed is unknown until Kafka is reachable again: {reconnect}",
            ) from cause
        assert self._next is not None
        if self._next > batch.id:
            log.info("%s: batch %d did commit", self._where(), batch.id)
            return True
        raise SinkUnavailableError(
            f"{self._where()}: {phase} batch {batch.id} failed ({_describe(cause)}); the"
            " transaction was rolled back, nothing of the batch is visible"
        ) from cause

    async def _abort(self, producer: Producer, batch: Batch) -> None:
        """Abort the open transaction; if that fails too, drop the producer."""
        try:
            with anyio.fail_after(self._transaction_timeout):
                await producer.abort()
        except Exception as exc:
            # The next producer of the id aborts the transaction on start.
            log.warning(
                "%s: aborting the transaction of batch %d failed (%s); starting a new producer",
                self._where(),
                batch.id,
                _describe(producer.failure() or exc),
            )
            await self._retire()
        except BaseException:
            self._forget(producer)
            raise

    async def _send_plain(self, producer: Producer, batch: Batch, messages: list[Message]) -> None:
        """Non-transactional: send and wait for every acknowledgement."""
        try:
            with anyio.fail_after(self._transaction_timeout):
                futures = await producer.send_many(self._topic, messages)
                await delivered(futures)
        except Exception as exc:
            cause = producer.failure() or exc
            # A fresh producer for the next try: an idempotent producer can
            # wedge on a sequence error (aiokafka #1017).
            await self._retire()
            if isinstance(exc, PartitionerFailed):
                raise OutputError(
                    f"the partitioner of {self._where()} failed on batch {batch.id}: {exc};"
                    " fix the partitioner"
                ) from exc.__cause__ or exc
            if isinstance(cause, MessageSizeTooLargeError):
                raise OutputError(
                    f"{self._where()} could not write batch {batch.id}: {_describe(cause)}"
                ) from cause
            raise _sink_error(
                cause,
                f"{self._where()} could not write batch {batch.id}: {_describe(cause)}. Some"
                " of its outputs may have been written; retrying writes them again"
                " (at-least-once)",
            ) from cause
        except BaseException:
            self._forget(producer)
            raise

    async def aclose(self) -> None:
        """Stop the producer (and any dropped after a cancelled commit)."""
        async with self._lock:
            await self._retire()
        self._context = None
