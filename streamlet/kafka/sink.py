"""KafkaSink: each batch's outputs go to a Kafka topic in one transaction, exactly once.

Exactly-once (``transactional=True``, the default) rests on these rules.

**One transactional id per app and handler**, ``streamlet.<app>.<handler>``.
Starting the producer runs Kafka's InitProducerId: the coordinator bumps the
id's epoch, which fences every older producer of the id (a zombie worker
still running after a restart), and it aborts or finishes that producer's
open transaction before it answers. So one worker runs one app's handler; a
second worker of the same app takes the id over and the first gets a
:class:`~streamlet.errors.SinkError` at its next commit. Several workers
share an app in group mode (below), with an id per task.

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

**Group mode** (``SinkContext.group`` set): workers of one app share its
Kafka sources' partitions through a consumer group, and each batch belongs
to one *task*, partition ``p`` of every source. Batch ids are then a
worker's own and say nothing across workers, so the sink keys what it wrote
by input offsets, per task:

* *A transactional id per task*, ``streamlet.<app>.<handler>.t<p>``.
  aiokafka 0.14 has no KIP-447: its TxnOffsetCommit (v0) carries no group
  generation, and the broker accepts it from a worker that lost the
  partition long ago. So the transactional id is the only fence against
  such a zombie, and it must change hands with the task.
  :meth:`KafkaSink.acquire` starts the task's producer, whose InitProducerId
  fences the previous owner's and settles its open transaction; only then
  is the marker read, and no commit of the task is taken before.
* *A marker per task, keyed by input offsets*, in a group of its own,
  ``streamlet-tasks.<app>.<handler>`` (with the same hash suffix under
  ``consume_from``). Each transaction commits, for each of the batch's
  ranges, the offset ``until`` of the source topic's partition ``p``, with
  metadata ``streamlet-task/2 <start> <batch>`` (the range it ends, and the
  batch: :func:`~streamlet.kafka.policy.batch_tag`). The marker says
  where the task's input resumes, which acquire returns, and a batch is
  checked against it (:func:`~streamlet.kafka.policy.task_standing`): ranges
  that end at or below it were written (the commit returns False), ranges
  that start at it are written now, and a range crossing it or starting
  past it means two owners or a bug, refused with an error naming the
  task, the ranges and the marker. An idle batch (no input: its ranges are
  empty, at the marker) was written only if the marker names it.
* *Fenced*: a task whose producer was fenced raises
  :class:`~streamlet.errors.FencedError` and is dropped; the worker
  releases it. An unknown outcome is settled as above, with a new producer
  of the task's id and its marker read again. If the task has moved
  meanwhile, that producer fences the new owner in turn; the offset check
  then refuses whatever the two could write twice.
* The state directory is not checked (any worker may own a task; the marker,
  not a state directory, is the truth) and :meth:`KafkaSink.last_committed`
  is None. Without transactions, one idempotent producer serves every task,
  at-least-once, as above.

Limits: the marker lives as long as Kafka keeps the group's offsets
(``offsets.retention.minutes``, 7 days by default, counted from the last
commit): an app that crashed and stays down longer than that re-writes the
batch that was in flight when it restarts, and a new state directory is
then no longer refused. To start over on purpose, stop the app and delete
the marker group, or give the app a new name.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

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

from streamlet._retry import OutOfTime, Patience, describe_error, retrying_until
from streamlet.errors import (
    ConfigError,
    FencedError,
    OutputError,
    SinkError,
    SinkUnavailableError,
    StateError,
    TaskNotHeldError,
)
from streamlet.kafka._producer import (
    Message,
    PartitionerFailed,
    Producer,
    checked_partitioner,
    delivered,
)
from streamlet.kafka.changelog import client_settings, ensure_changelog
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
    batch_tag,
    legacy_marker_group,
    marker_group,
    marker_metadata,
    marker_owner,
    task_marker_batch,
    task_marker_group,
    task_marker_metadata,
    task_marker_start,
    task_standing,
    transaction_failure,
    transactional_id,
)
from streamlet.records import Batch, OffsetRange
from streamlet.sinks.base import Guarantee, Sink, SinkContext, encode_output, sink_ahead
from streamlet.state._changelog import ChangelogWrite

__all__ = [
    "ConsumedTopic",
    "HeadersFunction",
    "KafkaSink",
    "KeyFunction",
    "Partitioner",
    "ValueFunction",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

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
    text = describe_error(exc, cause=False)
    if cause and exc.__cause__ is not None:
        text += f" (caused by {_describe(exc.__cause__, cause=False)})"
    return text


async def _unread(producer: Producer) -> None:
    """Reads nothing: for a producer started only to reach the cluster."""


def _check_task_topics(context: SinkContext) -> None:
    """Refuse sources sharing a topic: task markers are kept per topic-partition."""
    topics = sorted(context.source_topics.values())
    shared = sorted({t for t in topics if topics.count(t) > 1})
    if shared:
        raise ConfigError(
            f"KafkaSink of handler {context.handler!r} (app {context.app!r}): in group mode"
            " the task markers are kept per source topic, and several sources read"
            f" {', '.join(shared)}; give each source its own topic"
        )


def _ranges(ranges: Sequence[OffsetRange]) -> str:
    """``orders[1] 5..9, ...``: offset ranges for a message."""
    return ", ".join(f"{r.source}[{r.partition}] {r.start}..{r.until}" for r in ranges)


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


class _Task:
    """One task of group mode: its producer, transactional id and marker."""

    def __init__(self, number: int, transactional_id: str) -> None:
        self.number = number
        self.transactional_id = transactional_id
        self.producer: Producer | None = None
        # Source name -> the next offset to read, as committed; None while
        # unknown: until the producer started, and after a commit whose
        # outcome is unknown until a new producer has read the marker again.
        self.marker: dict[str, int] | None = None
        # Source name -> the batch tag its marker names (None: an older marker).
        self.marked: dict[str, str | None] = {}
        # Producers dropped by a cancelled commit, stopped by the next stop().
        self.orphans: list[Producer] = []

    def forget(self) -> None:
        """Drop the producer without waiting (a commit is being cancelled)."""
        if self.producer is not None:
            self.orphans.append(self.producer)
        self.producer, self.marker = None, None

    async def stop(self) -> None:
        """Stop the producer and any dropped ones; the marker is unknown after."""
        self.forget()
        producers, self.orphans = self.orphans, []
        with anyio.CancelScope(shield=True):
            for producer in producers:
                await producer.stop()

    def advance(self, ranges: Sequence[OffsetRange], tag: str) -> None:
        """The batch ``tag`` of ``ranges`` committed: the marker moves to their ends."""
        assert self.marker is not None
        for r in ranges:
            self.marker[r.source] = r.until
            self.marked[r.source] = tag


class KafkaSink(Sink):
    """Writes each batch's outputs to a Kafka topic; exactly once by default.

    See the module docstring for how: a transaction per batch carrying the
    outputs, a marker offset (the batch id plus one) and the offsets of
    ``consume_from`` sources. One worker runs one app's handler: a second
    worker with the same app and handler names fences the first. In group
    mode each task has its own producer and marker (:meth:`acquire`).

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
        open_timeout: seconds :meth:`open`, :meth:`acquire` (and a reconnect
            after a failed commit) keep trying to reach the cluster, with
            logged retries and growing pauses, before they fail.

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
        # Group mode with transactions: the tasks acquired, a lock per task
        # number (acquire, commit and release of a task take turns), and the
        # reason of each task dropped because it was fenced.
        self._tasks: dict[int, _Task] = {}
        self._task_locks: dict[int, anyio.Lock] = {}
        self._fenced_tasks: dict[int, str] = {}

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
        """The producer's transactional id, once opened (None without transactions).

        None in group mode too: each task has its own, ``<this>.t<task>``.
        """
        return self._transactional_id or None

    @property
    def marker_group(self) -> str | None:
        """The group holding the marker, once opened (None without transactions).

        In group mode, the group holding the task markers.
        """
        return self._marker_group or None

    def _grouped(self) -> bool:
        """Group mode with transactions: producers and markers per task."""
        return self._transactional and self._context is not None and self._context.group is not None

    def describe(self) -> str:
        return f"KafkaSink({self._topic})"

    def _where(self) -> str:
        context = self._context
        who = f" of handler {context.handler!r} (app {context.app!r})" if context else ""
        return f"KafkaSink {self._topic!r}{who}"

    async def open(self, context: SinkContext) -> None:
        """Start the producer: fence older ones, settle their transaction, read the marker.

        In group mode with transactions no producer starts here (each task's
        starts in :meth:`acquire`); the cluster and the topic are checked.

        Raises:
            ConfigError: ``consume_from`` sources are unusable (no group, or
                several groups), the broker refuses the transaction timeout,
                or (group mode) two sources read one topic.
            SinkError: the cluster stayed unreachable for ``open_timeout``
                (retriable), or refused access (not retriable).
        """
        if self._context is not None:
            raise SinkError(f"{self._where()} is already open")
        self._resolve_sources()
        if self._transactional and context.group is not None:
            _check_task_topics(context)
        self._context = context
        # Opening again after being fenced is a deliberate restart: it takes
        # the transactional id back.
        self._fenced = None
        self._owner_checked = False
        if self._transactional and context.group is not None:
            self._open_grouped(context)
        elif self._transactional:
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
                if self._grouped():
                    # No producer before a task is acquired; this only finds
                    # a missing topic or an unreachable cluster early.
                    await self._retrying(self._probe, "")
                else:
                    await self._connect()
        except BaseException:
            self._context = None
            raise

    def _open_grouped(self, context: SinkContext) -> None:
        self._transactional_id = ""
        self._marker_group = task_marker_group(context, self._source_group)
        # The plain name too, as for the single marker: the markers stay
        # found when consume_from is added to an app between runs.
        self._marker_groups = tuple(dict.fromkeys((self._marker_group, task_marker_group(context))))

    async def _probe(self) -> None:
        """Reach the cluster and the topic's metadata with a plain producer."""
        context = self._context
        assert context is not None
        producer, _ = await self._ready(probe_settings(self._settings(context)), _unread)
        try:
            if context.changelog is not None and context.source_topics:
                first = min(context.source_topics.values())
                tasks = len(await producer.partitions(first))
                await ensure_changelog(self.changelog_settings(), context.changelog, tasks)
        finally:
            with anyio.CancelScope(shield=True):
                await producer.stop()

    def changelog_settings(self) -> dict[str, Any]:
        """How a client reaches the sink's cluster, to make and read back the changelog."""
        context = self._context
        assert context is not None
        return client_settings(
            self._servers,
            self._config.producer_config,
            f"streamlet.{context.app}.{context.handler}.changelog",
        )

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

    def _settings(self, context: SinkContext, task: int | None = None) -> dict[str, Any]:
        settings = self._config.producer_settings(context, task)
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
        settings = self._settings(context)
        producer, next_batch = await self._retrying(
            lambda: self._start(settings), self._transactional_id
        )
        self._producer, self._next = producer, next_batch
        if self._transactional:
            log.info(
                "%s: producer %r ready, next batch to write is %d",
                self._where(),
                transactional_id(context),
                next_batch,
            )

    async def _retrying(self, start: Callable[[], Awaitable[_T]], txn_id: str) -> _T:
        """``start()``, tried again with growing pauses for ``open_timeout`` seconds.

        ``txn_id`` names the transactional id in a refusal's message.
        """
        servers = ", ".join(self._servers)
        try:
            return await retrying_until(
                Patience(self._open_timeout, backoff=_FIRST_BACKOFF, max_backoff=_MAX_BACKOFF),
                f"{self._where()}: connecting to Kafka at {servers}",
                start,
                # Anything but a bad setting or a refusal may pass.
                transient=lambda exc: not isinstance(exc, (ConfigError, *_PERMANENT)),
            )
        except OutOfTime as gave_up:
            failure = SinkUnavailableError(
                f"{self._where()} could not connect to Kafka at {servers}"
                f" within {self._open_timeout:g}s ({gave_up.attempts} attempt(s)); last error:"
                f" {_describe(gave_up.error)}. Check bootstrap_servers, that the broker is up"
                f" and reachable, that topic {self._topic!r} exists, and the security settings"
                " in producer_config"
            )
            raise failure from gave_up.error
        except _PERMANENT as exc:
            raise self._refused(exc, txn_id) from exc

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

        async def read(producer: Producer) -> int | None:
            return await self._read_marker(producer) if self._transactional else None

        return await self._ready(settings, read)

    async def _ready(
        self, settings: Mapping[str, Any], read: Callable[[Producer], Awaitable[_T]]
    ) -> tuple[Producer, _T]:
        """Start a producer, wait for the topic's metadata, then ``read(producer)``.

        Waiting for the metadata makes a missing topic fail here, not in the
        middle of a batch.
        """
        producer = await Producer.start(settings)
        try:
            await producer.partitions(self._topic)
            return producer, await read(producer)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await producer.stop()
            raise

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
                raise ConfigError(self._not_a_marker(group, tp, found.offset, found.metadata))
            if owner and context.state_id and owner != context.state_id and found.offset > 1:
                raise ConfigError(self._foreign(group, owner, found.offset - 1))
            next_batch = max(next_batch, found.offset)
        return next_batch

    def _not_a_marker(self, group: str, tp: TopicPartition, offset: int, metadata: str) -> str:
        return (
            f"consumer group {group!r} holds offset {offset} for {tp.topic}[{tp.partition}]"
            f" with metadata {metadata!r}, which no streamlet KafkaSink wrote;"
            f" the group is reserved for {self._where()}. Delete the group"
            " (kafka-consumer-groups --delete) if nothing of this app is pending"
        )

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

    def _refused(self, exc: BaseException, txn_id: str) -> BaseException:
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
                f", WRITE and DESCRIBE on transactional id {txn_id or '?'!r}"
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
        if self._grouped():
            return await self._commit_task(batch, outputs)
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
        """The newest batch written, from the marker (None without transactions).

        None in group mode: batch ids are each worker's own there.
        """
        if not self._transactional or self._grouped():
            return None
        async with self._lock:
            if self._next is None:
                if self._fenced is not None:
                    raise FencedError(self._fenced)
                await self._connect()
            assert self._next is not None
            return max(0, self._next - 1)

    # -- group mode ---------------------------------------------------------------------

    async def acquire(self, task: int) -> Mapping[str, int] | None:
        """Group mode: fence the task's earlier owners, then read where its input resumes.

        Starts the producer of the task's transactional id: its InitProducerId
        fences every older producer of the id (a worker that lost the task
        but may still run) and settles their open transaction. Then the
        task's marker is read. A task held already is taken over afresh.

        Returns:
            Source name -> the next offset of its partition ``task`` to read,
            for each source the task committed a batch of ({} for a new
            task); None without transactions or outside group mode, where
            the sink keeps no positions.

        Raises:
            SinkError: the cluster stayed unreachable for ``open_timeout``
                (retriable), or refused access (not retriable).
            ConfigError: the marker group holds an offset no KafkaSink wrote.
        """
        if self._context is None:
            raise SinkError(f"{self._where()} is not open; call open() first")
        if not self._grouped():
            return None
        async with self._task_lock(task):
            await self._drop(task)
            state = _Task(task, transactional_id(self._context, task))
            await self._take_over(state)
            assert state.marker is not None
            self._tasks[task] = state
            return dict(state.marker)

    async def release(self, task: int) -> None:
        """Group mode: stop the task's producer and forget its marker.

        A transaction is open only if a commit was cancelled; the next
        owner's InitProducerId settles it.
        """
        async with self._task_lock(task):
            await self._drop(task)

    def _task_lock(self, number: int) -> anyio.Lock:
        lock = self._task_locks.get(number)
        if lock is None:
            lock = self._task_locks[number] = anyio.Lock()
        return lock

    async def _drop(self, number: int, fenced: str | None = None) -> None:
        """Stop task ``number``'s producers and forget it (``fenced``: why, for later commits).

        Caller holds the task's lock.
        """
        task = self._tasks.pop(number, None)
        if fenced is None:
            self._fenced_tasks.pop(number, None)
        else:
            self._fenced_tasks[number] = fenced
        if task is not None:
            await task.stop()

    async def _take_over(self, task: _Task) -> None:
        """Start the task's producer (fencing older ones) and read its marker, with retries."""
        context = self._context
        assert context is not None
        await task.stop()
        settings = self._settings(context, task.number)

        async def read(producer: Producer) -> tuple[dict[str, int], dict[str, str | None]]:
            return await self._read_task_marker(producer, task.number)

        task.producer, (task.marker, task.marked) = await self._retrying(
            lambda: self._ready(settings, read), task.transactional_id
        )
        log.info(
            "%s: producer %r ready, task %d resumes at %s",
            self._where(),
            task.transactional_id,
            task.number,
            task.marker or "the sources' start (no marker)",
        )

    async def _read_task_marker(
        self, producer: Producer, number: int
    ) -> tuple[dict[str, int], dict[str, str | None]]:
        """The task's marker in the sink's groups: source name -> next offset to read, and
        source name -> the batch tag it names.

        Raises:
            ConfigError: a marker group holds an offset no KafkaSink wrote.
        """
        context = self._context
        assert context is not None
        marker: dict[str, int] = {}
        marked: dict[str, str | None] = {}
        for name, topic in context.source_topics.items():
            tp = TopicPartition(topic, number)
            for group in self._marker_groups:
                found = await producer.committed(group, tp)
                if found is None:
                    continue
                if task_marker_start(found.metadata) is None:
                    raise ConfigError(self._not_a_marker(group, tp, found.offset, found.metadata))
                # Ties go to the first group, the one written now: an idle
                # batch leaves the offset where an older group may hold it.
                if name not in marker or found.offset > marker[name]:
                    marker[name] = found.offset
                    marked[name] = task_marker_batch(found.metadata)
        return marker, marked

    def _task_of(self, batch: Batch) -> int:
        """The task ``batch`` belongs to: the one partition of all its ranges."""
        context = self._context
        assert context is not None
        partitions = {r.partition for r in batch.ranges}
        unknown = sorted({r.source for r in batch.ranges} - set(context.source_topics))
        if len(partitions) != 1 or unknown:
            raise SinkError(
                f"{self._where()}: batch {batch.id} reads {_ranges(batch.ranges) or 'nothing'};"
                " in group mode a batch reads one partition (its task) of the app's Kafka"
                " sources" + (f", and {', '.join(unknown)} is not one of them" if unknown else "")
            )
        return partitions.pop()

    async def commit_changelog(
        self, batch: Batch, outputs: Sequence[object], changelog: ChangelogWrite
    ) -> bool:
        """Group mode: commit ``outputs`` and the state changes ``changelog`` in one transaction.

        On success ``changelog.next_offset`` is the changelog offset after
        the batch's records (it stays None when the batch had been written
        before, or wrote no state). See :meth:`commit` for the rest.
        """
        if self._context is None:
            raise SinkError(f"{self._where()} is not open; call open() first")
        if not self._grouped() or changelog.topic != self._context.changelog:
            raise SinkError(
                f"{self._where()}: state changes go with a batch only in group mode with"
                f" transactions, to the changelog the sink was opened with"
                f" ({self._context.changelog!r}), not {changelog.topic!r}"
            )
        return await self._commit_task(batch, outputs, changelog)

    async def _commit_task(
        self, batch: Batch, outputs: Sequence[object], changelog: ChangelogWrite | None = None
    ) -> bool:
        """Group mode: write ``batch`` with its task's producer, unless the marker covers it."""
        number = self._task_of(batch)
        async with self._task_lock(number):
            task = self._tasks.get(number)
            if task is None:
                fenced = self._fenced_tasks.get(number)
                if fenced is not None:
                    raise FencedError(fenced)
                raise TaskNotHeldError(
                    f"{self._where()}: batch {batch.id} belongs to task {number}, which this"
                    f" worker has not acquired (or has released); call acquire({number}) first"
                )
            if task.producer is None:
                # The last commit's outcome is unknown, or its producer
                # failed: a new one settles it and the marker is read again.
                await self._take_over(task)
            producer, marker = task.producer, task.marker
            assert producer is not None
            assert marker is not None
            standing = task_standing(
                batch.ranges, marker, batch=self._tag(batch), marked=task.marked
            )
            if standing == "written":
                return False
            if standing != "write":
                raise SinkError(self._misplaced(batch, task, standing))
            messages = self._encode(batch, outputs)
            large = producer.too_large(changelog.records) if changelog is not None else None
            if large is not None:
                # Before the transaction: aiokafka would send it, and the
                # broker's refusal would read as one of the outputs'.
                key, size = large
                raise StateError(
                    f"{self._where()}: batch {batch.id} sets a state value of {size} bytes (key"
                    f" {key[:40]!r}), over the producer's max_request_size, so it cannot go to"
                    " the changelog. Keep smaller values per key, or raise max_request_size in"
                    " producer_config (and the changelog topic's max.message.bytes); nothing"
                    " of the batch is written"
                )
            return await self._transact(producer, batch, messages, task, changelog)

    def _misplaced(self, batch: Batch, task: _Task, standing: str) -> str:
        """Why a batch that does not follow its task's marker is refused."""
        marker = task.marker or {}
        at = ", ".join(f"{name} {offset}" for name, offset in sorted(marker.items()))
        what = (
            "starts past the marker: the input between would never be written"
            if standing == "gap"
            else "overlaps what the task committed: that input would be written twice"
        )
        return (
            f"{self._where()}: batch {batch.id} of task {task.number} reads"
            f" {_ranges(batch.ranges)}, but the task's marker says its input resumes at {at}:"
            f" the batch {what}. This does not happen while one worker owns the task and"
            " resumes it where acquire() said: two workers own it, or the input did not"
            " resume there. Nothing of the batch is written"
        )

    def _tag(self, batch: Batch) -> str:
        """``batch``'s name in its task marker."""
        context = self._context
        assert context is not None
        return batch_tag(context.state_id, batch.id, batch.time)

    def _task_marker(
        self, batch: Batch
    ) -> tuple[dict[TopicPartition, int], dict[TopicPartition, str]]:
        """The task marker's offsets of ``batch`` and their metadata."""
        context = self._context
        assert context is not None
        offsets: dict[TopicPartition, int] = {}
        metadata: dict[TopicPartition, str] = {}
        tag = self._tag(batch)
        for r in batch.ranges:
            tp = TopicPartition(context.source_topics[r.source], r.partition)
            offsets[tp] = r.until
            metadata[tp] = task_marker_metadata(r.start, tag)
        return offsets, metadata

    # -- writing ------------------------------------------------------------------------

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

    async def _transact(
        self,
        producer: Producer,
        batch: Batch,
        messages: list[Message],
        task: _Task | None = None,
        changelog: ChangelogWrite | None = None,
    ) -> bool:
        """One transaction: outputs, marker, source offsets; see the module docstring.

        ``task``: the group-mode task whose producer and marker this is;
        ``changelog``: the batch's state changes, in the same transaction.
        """
        source_offsets = self._source_offsets(batch)
        marker: Mapping[TopicPartition, int]
        metadata: str | Mapping[TopicPartition, str]
        if task is None:
            marker = {TopicPartition(self._topic, 0): batch.id + 1}
            metadata = marker_metadata(self._context.state_id if self._context else "")
        else:
            marker, metadata = self._task_marker(batch)
        committing = False
        stage = "starting the transaction"
        try:
            with anyio.fail_after(self._transaction_timeout):
                await producer.begin()
                stage = "sending the outputs"
                futures = await producer.send_many(self._topic, messages)
                state_futures: list[asyncio.Future[Any]] = []
                last_count = 0
                if changelog is not None and changelog.records:
                    stage = "sending the state changes"
                    state_futures, last_count = await producer.send_to_partition(
                        changelog.topic, changelog.partition, changelog.records
                    )
                # Invariant: the marker and the outputs commit or abort together.
                stage = "adding the marker and source offsets"
                await producer.send_offsets(self._marker_group, marker, metadata)
                if source_offsets:
                    assert self._source_group is not None
                    await producer.send_offsets(self._source_group, source_offsets)
                stage = "waiting for the broker to acknowledge the outputs"
                await delivered(futures)
                await delivered(state_futures)
                stage = "committing"
                committing = True
                await producer.commit()
        except Exception as exc:
            return await self._failed(producer, batch, exc, committing, stage, task)
        except BaseException:
            # Cancelled: the commit may still complete in the background, so
            # the outcome is unknown until a new producer settles it.
            self._forget(producer, task)
            raise
        if task is None:
            self._next = batch.id + 1
        else:
            task.advance(batch.ranges, self._tag(batch))
        if changelog is not None and state_futures:
            changelog.next_offset = int(state_futures[-1].result().offset) + last_count
        return True

    def _forget(self, producer: Producer, task: _Task | None = None) -> None:
        """Drop ``producer`` (``task``'s, if given) without waiting; a later call stops it."""
        if task is not None:
            task.forget()
            return
        self._producer = None
        self._next = None
        self._orphans.append(producer)

    async def _failed(
        self,
        producer: Producer,
        batch: Batch,
        exc: Exception,
        committing: bool,
        stage: str,
        task: _Task | None,
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
        if kind == "fenced" and task is not None:
            fenced = (
                f"{self._where()}: task {task.number} was fenced while writing batch"
                f" {batch.id}: another producer with transactional id"
                f" {task.transactional_id!r} started, so another worker took the task over (or"
                " the transaction ran longer than"
                f" transaction_timeout={self._transaction_timeout:g}s and the broker aborted"
                " it). This worker's transaction was aborted and the task dropped: release it,"
                " and acquire it again only once it is assigned here again"
            )
            log.error("%s", fenced)
            await self._drop(task.number, fenced)
            raise FencedError(fenced) from cause
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
            await self._abort(producer, batch, task)
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
            await self._abort(producer, batch, task)
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
            if task is None:
                await self._connect()
            else:
                await self._take_over(task)
        except SinkError as reconnect:
            raise _sink_error(
                reconnect,
                f"{self._where()}: {phase} batch {batch.id} failed ({_describe(cause)}) and"
                f" whether it committed is unknown until Kafka is reachable again: {reconnect}",
            ) from cause
        if task is None:
            assert self._next is not None
            committed = self._next > batch.id
        else:
            assert task.marker is not None
            standing = task_standing(
                batch.ranges, task.marker, batch=self._tag(batch), marked=task.marked
            )
            committed = standing == "written"
        if committed:
            log.info("%s: batch %d did commit", self._where(), batch.id)
            return True
        raise SinkUnavailableError(
            f"{self._where()}: {phase} batch {batch.id} failed ({_describe(cause)}); the"
            " transaction was rolled back, nothing of the batch is visible"
        ) from cause

    async def _abort(self, producer: Producer, batch: Batch, task: _Task | None) -> None:
        """Abort the open transaction; if that fails too, drop the producer (``task``'s)."""
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
            await (self._retire() if task is None else task.stop())
        except BaseException:
            self._forget(producer, task)
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
        """Stop the producer (and any dropped after a cancelled commit), and every task's."""
        async with self._lock:
            await self._retire()
        for number in list(self._tasks):
            async with self._task_lock(number):
                await self._drop(number)
        self._fenced_tasks.clear()
        self._context = None
