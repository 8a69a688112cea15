"""KafkaReceiver: a Kafka topic consumed into the data WAL, a reliable receiver.

One consumer task stores each fetched chunk with the partitions' next
offsets as acks; a restart resumes from them, and the consumer group's
offsets are committed only once a chunk is durable. See
:mod:`streamlet.kafka.source` for the settings and the guarantees.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import NamedTuple

import anyio
from aiokafka.errors import KafkaError
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from streamlet.errors import StreamletError
from streamlet.kafka._consumer import POLL, OutOfRangeFetch, kafka_error
from streamlet.kafka._link import Link
from streamlet.kafka.config import KafkaSourceConfig
from streamlet.kafka.source import KafkaSource
from streamlet.records import Record
from streamlet.sources.receiver import Receiver, ReceiverContext, Stored

__all__ = ["KafkaReceiver"]

log = logging.getLogger(__name__)

#: Stored-but-not-yet-durable chunks a receiver may have queued for commit.
_MAX_PENDING = 1024


class _Pending(NamedTuple):
    stored: Stored
    offsets: dict[int, int]


class KafkaReceiver(KafkaSource, Receiver):
    """A Kafka topic consumed into the data WAL (a reliable receiver); see :mod:`.source`.

    Build it with :class:`KafkaSource` and ``mode="receiver"``. Each chunk is
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
        link = Link(self.config)
        await link.connect()
        try:
            await self._consume(link, context)
        finally:
            with anyio.CancelScope(shield=True):
                await link.close()

    async def _consume(self, link: Link, context: ReceiverContext) -> None:
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
        link: Link,
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
                fetched = await consumer.getmany(ready, wait=POLL, source=self.name)
            except OutOfRangeFetch as exc:
                for p, offset in exc.offsets.items():
                    target = await link.out_of_range(
                        p, offset, until=None, what=f"consuming {link.where(p)}"
                    )
                    consumer.seek(p, target)
                    positions[p] = target
                continue
            except KafkaError as exc:
                raise kafka_error(
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
        self, link: Link, receive: MemoryObjectReceiveStream[_Pending], stopping: anyio.Event
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

    async def _commit(self, link: Link, offsets: Mapping[int, int], stopping: anyio.Event) -> None:
        # Imported here: streamlet._faults starts STREAMLET_FAULT_CLOCK's clock
        # when first imported, which should be once the package is loaded.
        from streamlet._faults import crash_point

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
