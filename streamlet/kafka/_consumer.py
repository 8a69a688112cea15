"""The typed adapter over aiokafka's consumer, and the consumer group's offsets.

aiokafka ships no type information; everything untyped about its consumer
stays in here, so the sources above deal in ints and Records. The private
parts of aiokafka it leans on are in :mod:`streamlet.kafka._aiokafka`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import anyio
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaTimeoutError, OffsetOutOfRangeError

from streamlet.errors import SourceError, SourceUnavailableError, StreamletError
from streamlet.kafka import _aiokafka
from streamlet.kafka.config import KafkaSourceConfig
from streamlet.records import Record

__all__ = ["CLOSE_TIMEOUT", "POLL", "Consumer", "Group", "OutOfRangeFetch", "kafka_error"]

log = logging.getLogger(__name__)

#: Longest single wait for fetched records; between waits a read checks its
#: progress and a receiver checks whether the app is stopping.
POLL = 0.2
#: The longest a consumer's close may take. Closing needs no broker (nothing
#: is committed on the way out), so a close that takes longer is waiting on
#: brokers that are down, and is abandoned rather than holding up a stop.
CLOSE_TIMEOUT = 5.0


def _cancel_requests() -> int:
    """How many cancellations of the running task are pending (its cancel scopes' doing).

    A ``CancelledError`` raised while this count stayed the same is not the
    task's own: it escaped from some other task that aiokafka awaited.
    """
    task = asyncio.current_task()
    return task.cancelling() if task is not None else 0


async def stop_consumer(consumer: Any, what: str) -> None:
    """Stop an ``AIOKafkaConsumer`` within ``CLOSE_TIMEOUT``; raises only the caller's cancellation.

    aiokafka's close can let a ``CancelledError`` of one of its own tasks
    escape into the caller; that one is not the caller's and is absorbed
    (the close is finished by hand), as are errors of the close itself.
    """
    before = _cancel_requests()
    with anyio.move_on_after(CLOSE_TIMEOUT) as waited:
        try:
            await consumer.stop()
        except asyncio.CancelledError:
            if _cancel_requests() > before:
                raise
            await _aiokafka.finish_consumer_stop(consumer)
        except Exception as exc:
            log.warning("closing %s failed: %r", what, exc)
    if waited.cancelled_caught:
        log.warning("closing %s took over %.0f s (brokers down?); left behind", what, CLOSE_TIMEOUT)


class OutOfRangeFetch(Exception):
    """A fetch asked for offsets the partition no longer (or not yet) holds."""

    def __init__(self, offsets: Mapping[int, int]) -> None:
        super().__init__(dict(offsets))
        self.offsets = dict(offsets)


class Consumer:
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
        self._tag = _aiokafka.RecordTag(headers)
        _aiokafka.prepare()
        self._consumer: Any = AIOKafkaConsumer(**kwargs, value_deserializer=self._tag)
        self._assigned: frozenset[int] = frozenset()
        if paused:
            # Assigned before start, never fetched from: see Group.
            self.assign(paused)
            self._consumer.pause(*(self._tp(p) for p in sorted(self._assigned)))

    def _tp(self, partition: int) -> Any:
        return TopicPartition(self.topic, partition)

    async def start(self) -> None:
        """Connect; a start that fails or is cancelled stops what it had started."""
        try:
            await self._consumer.start()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.stop()
            raise

    async def stop(self) -> None:
        """Close the consumer within ``CLOSE_TIMEOUT`` seconds, brokers up or down.

        Never raises but for the caller's own cancellation: a stop must not
        turn into an error of its own (the app is already on its way out,
        and nothing of streamlet's state depends on the close).
        """
        before = _cancel_requests()
        with anyio.move_on_after(CLOSE_TIMEOUT) as waited:
            try:
                await self._consumer.stop()
            except asyncio.CancelledError:
                if _cancel_requests() > before:
                    raise
                # Not this task's cancellation: one of aiokafka's fetch
                # tasks escaped its close; finish what the close left undone.
                await _aiokafka.finish_consumer_stop(self._consumer)
            except Exception as exc:
                log.warning("closing the consumer of topic %r failed: %r", self.topic, exc)
        if waited.cancelled_caught:
            log.warning(
                "closing the consumer of topic %r took over %.0f s (brokers down?); left"
                " behind, its connections close with the process",
                self.topic,
                CLOSE_TIMEOUT,
            )

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
            OutOfRangeFetch: a partition's fetch position is outside its log.
        """
        tps = [self._tp(p) for p in partitions]
        assert tps, "getmany() without partitions would read every partition"
        self._tag.source = source  # what the fetch buffers put in Record.source
        try:
            fetched = await self._consumer.getmany(*tps, timeout_ms=int(wait * 1000))
        except OffsetOutOfRangeError as exc:
            raw = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
            raise OutOfRangeFetch({int(tp.partition): int(o) for tp, o in raw.items()}) from exc
        if _aiokafka.fast_reads():  # the fetch buffers built Records
            return {tp.partition: messages for tp, messages in fetched.items()}
        out: dict[int, list[Record]] = {}
        new = tuple.__new__  # the order of _aiokafka.RECORD_FIELDS
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


def kafka_error(message: str, exc: BaseException) -> StreamletError:
    may_pass = bool(getattr(exc, "retriable", False)) or isinstance(exc, KafkaTimeoutError)
    return (SourceUnavailableError if may_pass else SourceError)(f"{message}: {exc}")


class Group:
    """The consumer group's offsets, through a consumer of its own.

    Fetching happens on a group-less consumer, whose assignment changes
    freely. This one never fetches (its partitions are paused) and its
    assignment is fixed before it starts: aiokafka's group coordinator can
    fail on an assignment that changes while it looks the coordinator up.
    Partitions added later get a new consumer.
    """

    def __init__(self, config: KafkaSourceConfig) -> None:
        self.config = config
        self._consumer: Consumer | None = None

    async def _for(self, partitions: Iterable[int]) -> Consumer:
        wanted = frozenset(partitions)
        consumer = self._consumer
        if consumer is not None and wanted <= consumer.assigned:
            return consumer
        if consumer is not None:
            wanted |= consumer.assigned
            await self.close()
        consumer = Consumer(
            self.config.topic, self.config.consumer_kwargs(group=True), paused=wanted
        )
        await consumer.start()
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
