"""What both kinds of Kafka source share: connection, partitions, positions and policies.

A source's :class:`Link` connects its consumers, finds the topic and assigns
its partitions, retries broker requests for up to ``fetch_timeout``, and
carries out the start and out-of-range decisions of
:mod:`streamlet.kafka.policy` with the lookups and the logging they need.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TypeVar

import anyio
from aiokafka.errors import KafkaError, KafkaTimeoutError

from streamlet._retry import AttemptTimeout, OutOfTime, Patience, retrying_until
from streamlet.errors import ConfigError, SourceError, SourceUnavailableError
from streamlet.kafka._consumer import Consumer, Group, kafka_error
from streamlet.kafka.config import KafkaSourceConfig
from streamlet.kafka.policy import out_of_range, start_offset

__all__ = ["Link"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class _TopicMissing(Exception):
    """The cluster does not list the topic (yet)."""


def _may_connect_later(exc: Exception) -> bool:
    """A consumer's failed start worth another try: a network error or a retriable refusal."""
    return isinstance(exc, OSError) or (isinstance(exc, KafkaError) and exc.retriable)


def _may_answer_later(exc: Exception) -> bool:
    """A failed broker request worth another try: retriable, or timed out."""
    return isinstance(exc, KafkaError) and (exc.retriable or isinstance(exc, KafkaTimeoutError))


def _reason(error: Exception) -> str:
    return "timed out" if isinstance(error, AttemptTimeout) else str(error)


class Link:
    """The source's consumers on the topic, and the decisions both modes make alike."""

    def __init__(self, config: KafkaSourceConfig) -> None:
        self.config = config
        self._consumer: Consumer | None = None
        #: Offset lookups go through a consumer that never fetches. A broker
        #: answers a connection's requests in order, and the fetching
        #: consumer's connection usually has a fetch waiting there for new
        #: records (up to ``fetch_max_wait_ms``, 500 ms by default): a lookup
        #: sent behind it waits as long. That wait fell on every tick that
        #: found its partitions caught up, and held each batch at the end
        #: of a backlog for half a second.
        self._lookups: Consumer | None = None
        self._group = Group(config) if config.group_id is not None else None
        #: Partitions present when the source started; the start policy
        #: applies to them, while partitions added later start at earliest.
        self.initial: frozenset[int] = frozenset()

    @property
    def consumer(self) -> Consumer:
        if self._consumer is None:
            raise SourceError(
                f"KafkaSource({self.config.topic!r}) is not started; start() comes first"
            )
        return self._consumer

    @property
    def lookups(self) -> Consumer:
        """The consumer for offset lookups: it fetches nothing (see ``__init__``)."""
        if self._lookups is None:
            return self.consumer  # raises: not started
        return self._lookups

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
        since = time.monotonic()
        consumer = await self._start_consumer(since)
        try:
            await self._assign_partitions(consumer, since)
            # Assigned and paused, as Group's: the topic's metadata is kept.
            # A connect_timeout of its own: the brokers answered already, and
            # a topic found late must not leave it no time to start.
            lookups = await self._start_consumer(time.monotonic(), paused=consumer.assigned)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await consumer.stop()
            raise
        self._consumer, self._lookups = consumer, lookups
        self.initial = consumer.assigned
        log.info(
            "connected to %s: topic %r, partitions %s, isolation %s",
            config.servers,
            config.topic,
            sorted(consumer.assigned),
            config.isolation,
        )

    async def _assign_partitions(self, consumer: Consumer, since: float) -> None:
        config = self.config

        async def look() -> None:
            if not await consumer.topic_exists():
                raise _TopicMissing("the topic does not exist yet")

        try:
            await retrying_until(
                Patience(config.connect_timeout, backoff=1.0, max_backoff=1.0),
                f"finding topic {config.topic!r} at {config.servers}",
                look,
                transient=lambda exc: isinstance(exc, _TopicMissing),
                since=since,
            )
        except OutOfTime as gave_up:
            if isinstance(gave_up.error, AttemptTimeout):
                # The cluster did not answer: nothing says the topic is missing.
                raise SourceUnavailableError(
                    f"the topics at {config.servers} were not listed within"
                    f" connect_timeout={config.connect_timeout:g} s; check the brokers'"
                    " health, or raise connect_timeout"
                ) from None
            raise ConfigError(
                f"topic {config.topic!r} does not exist at {config.servers} (waited"
                f" {config.connect_timeout:g} s); create it, or fix the topic name"
            ) from None
        existing: frozenset[int] = frozenset()
        with anyio.move_on_after(max(0.0, since + config.connect_timeout - time.monotonic())):
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

    async def _start_consumer(self, since: float, *, paused: Iterable[int] = ()) -> Consumer:
        """A started consumer, tried for ``connect_timeout`` seconds from ``since``.

        ``paused``: partitions assigned to it and never fetched from.
        """
        config = self.config

        async def start() -> Consumer:
            consumer = Consumer(
                config.topic, config.consumer_kwargs(), paused=paused, headers=config.headers
            )
            await consumer.start()  # stops itself if it fails
            return consumer

        try:
            return await retrying_until(
                Patience(config.connect_timeout, backoff=0.25, max_backoff=2.0),
                f"connecting to Kafka at {config.servers}",
                start,
                transient=_may_connect_later,
                since=since,
            )
        except OutOfTime as gave_up:
            failure = SourceUnavailableError(
                f"could not connect to Kafka at {config.servers} within"
                f" connect_timeout={config.connect_timeout:g} s ({gave_up.attempts} attempt(s);"
                f" last error: {_reason(gave_up.error)}). Check that the brokers are"
                " running and reachable from this host, that bootstrap_servers is"
                " right, and that consumer_config holds the listener's security"
                " settings (security_protocol, ssl_context, sasl_*)"
            )
            raise failure from gave_up.error
        except KafkaError as exc:
            raise SourceError(
                f"Kafka at {config.servers} refused the connection: {exc}. Check"
                " bootstrap_servers and the security settings in consumer_config"
                " (security_protocol, ssl_context, sasl_*)"
            ) from exc

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        lookups, self._lookups = self._lookups, None
        try:
            # Side by side: each stop may take CLOSE_TIMEOUT with the brokers
            # down, and Consumer.stop raises only the caller's cancellation.
            async with anyio.create_task_group() as tg:
                for each in (consumer, lookups):
                    if each is not None:
                        tg.start_soon(each.stop)
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
        try:
            return await retrying_until(
                Patience(config.fetch_timeout, backoff=0.1, max_backoff=2.0),
                f"{action} of topic {config.topic!r}",
                fn,
                transient=_may_answer_later,
                since=since,
            )
        except OutOfTime as gave_up:
            failure = SourceUnavailableError(
                f"{action} of topic {config.topic!r} at {config.servers} did not succeed"
                f" within fetch_timeout={config.fetch_timeout:g} s (last error:"
                f" {_reason(gave_up.error)}); check the brokers' health"
            )
            raise failure from gave_up.error
        except KafkaError as exc:
            raise kafka_error(
                f"{action} of topic {config.topic!r} at {config.servers} failed", exc
            ) from exc

    async def end_offsets(
        self, partitions: Iterable[int], *, since: float | None = None
    ) -> dict[int, int]:
        wanted = sorted(partitions)
        return await self.call(
            "looking up end offsets", lambda: self.lookups.end_offsets(wanted), since=since
        )

    async def beginning_offsets(self, partitions: Iterable[int]) -> dict[int, int]:
        wanted = sorted(partitions)
        return await self.call(
            "looking up beginning offsets", lambda: self.lookups.beginning_offsets(wanted)
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
