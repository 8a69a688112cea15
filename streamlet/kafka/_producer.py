"""The typed adapter over aiokafka's producer: the one door KafkaSink goes through.

aiokafka ships no type information; everything it returns is turned into
typed values here, and its private parts (the sender's failure, the client's
OffsetFetch, the record size estimate) are reached through
:mod:`streamlet.kafka._aiokafka`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import anyio
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, for_code
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from streamlet.kafka import _aiokafka
from streamlet.kafka.config import Partitioner

__all__ = [
    "CLOSE_TIMEOUT",
    "Message",
    "PartitionerFailed",
    "Producer",
    "checked_partitioner",
    "delivered",
]

log = logging.getLogger(__name__)

# Kafka's group coordinator errors that mean "ask again soon".
_COORDINATOR_BUSY = frozenset({14, 15, 16})  # LOAD_IN_PROGRESS, NOT_AVAILABLE, NOT_COORDINATOR
CLOSE_TIMEOUT = 10.0
_MAX_REQUEST_SIZE = 1_048_576  # aiokafka's default max_request_size


class Message(NamedTuple):
    """One output, encoded."""

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


class PartitionerFailed(Exception):
    """The user's partitioner raised or returned a partition the topic lacks."""


class Producer:
    """The one door to aiokafka's producer: typed, narrow, and closed safely."""

    def __init__(self, raw: Any, partitioner: Partitioner, max_request_size: int) -> None:
        self._raw = raw
        self._partitioner = partitioner
        self._max_request_size = max_request_size

    @classmethod
    async def start(cls, settings: Mapping[str, Any]) -> Producer:
        """Connect; for a transactional producer also run InitProducerId.

        aiokafka's ``start()`` waits for InitProducerId, so when it returns
        older producers of the id are fenced and their transaction is settled.
        """
        _aiokafka.prepare()
        raw = AIOKafkaProducer(**settings)
        try:
            await raw.start()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await _stop(raw)
            raise
        return cls(
            raw,
            settings.get("partitioner") or DefaultPartitioner(),
            int(settings.get("max_request_size", _MAX_REQUEST_SIZE)),
        )

    async def partitions(self, topic: str) -> set[int]:
        """The topic's partitions; waits for its metadata (KafkaTimeoutError if none)."""
        return {int(p) for p in await self._raw.partitions_for(topic)}

    async def begin(self) -> None:
        await self._raw.begin_transaction()

    async def send_many(self, topic: str, messages: Sequence[Message]) -> list[asyncio.Future[Any]]:
        """Queue records in order; the futures resolve when the broker has them all.

        Records are partitioned here and packed into one record batch per
        partition (as many as ``max_batch_size`` calls for) with aiokafka's
        batch API, rather than sent one ``send()`` at a time: ``send()``
        costs about twenty microseconds a record in Python, most of a
        Kafka-to-Kafka pipeline's time. Order per partition is kept, and a
        transactional producer adds each partition to its transaction as the
        first batch for it is queued, as ``send()`` would.
        """
        raw = self._raw
        all_partitions = sorted(await raw.partitions_for(topic))
        available = _aiokafka.available_partitions(raw, topic)
        partitioner = self._partitioner
        limit = self._max_request_size
        # Every output is sized and partitioned before any is queued: an
        # output that cannot be sent must fail the batch with nothing of it
        # on its way (without transactions, queued records would be sent).
        placed: list[int] = []
        for index, message in enumerate(messages):
            key, value, headers = message
            if _oversize(key, value, headers, limit) is not None:
                raise MessageSizeTooLargeError(
                    f"output {index} is larger than the producer's max_request_size of"
                    f" {limit} bytes; raise it in producer_config (and the topic's"
                    " max.message.bytes), or write smaller outputs"
                )
            try:
                placed.append(partitioner(key, all_partitions, available))
            except PartitionerFailed as exc:
                raise PartitionerFailed(f"on output {index}: {exc}") from exc.__cause__ or exc
        builders: dict[int, Any] = {}
        futures: list[asyncio.Future[Any]] = []

        async def send(builder: Any, partition: int) -> None:
            future = await raw.send_batch(builder, topic, partition=partition)
            # At once: a later send_batch that raises (a fenced producer)
            # must not leave this one's failure unread, logged as an error.
            future.add_done_callback(_retrieve)
            futures.append(future)

        for partition, (key, value, headers) in zip(placed, messages, strict=True):
            builder = builders.get(partition)
            if builder is None:
                builder = builders[partition] = raw.create_batch()
            if builder.append(timestamp=None, key=key, value=value, headers=headers) is None:
                await send(builder, partition)
                builder = builders[partition] = raw.create_batch()
                # An empty batch takes any one record that fits a request.
                builder.append(timestamp=None, key=key, value=value, headers=headers)
        for partition, builder in builders.items():
            await send(builder, partition)
        return futures

    async def send_to_partition(
        self, topic: str, partition: int, records: Sequence[tuple[bytes, bytes | None]]
    ) -> tuple[list[asyncio.Future[Any]], int]:
        """Queue key/value records to one partition, in order, in record batches.

        Returns the futures (one per record batch, each resolving to its
        metadata, whose ``offset`` is the batch's first) and how many
        records the last batch holds: its first offset plus that is the
        offset after the last record.

        The caller checks the records' sizes first (:meth:`too_large`):
        aiokafka's builder takes any first record, however large.
        """
        raw = self._raw
        futures: list[asyncio.Future[Any]] = []
        builder = raw.create_batch()
        count = 0

        async def send() -> None:
            future = await raw.send_batch(builder, topic, partition=partition)
            future.add_done_callback(_retrieve)
            futures.append(future)

        for key, value in records:
            if builder.append(timestamp=None, key=key, value=value, headers=[]) is None:
                await send()
                builder, count = raw.create_batch(), 0
                builder.append(timestamp=None, key=key, value=value, headers=[])
            count += 1
        if count:
            await send()
        return futures, count

    def too_large(self, records: Sequence[tuple[bytes, bytes | None]]) -> tuple[bytes, int] | None:
        """The first record over ``max_request_size``, as (key, size); None if all fit."""
        for key, value in records:
            size = _oversize(key, value, [], self._max_request_size)
            if size is not None:
                return key, size
        return None

    async def send_offsets(
        self,
        group: str,
        offsets: Mapping[TopicPartition, int],
        metadata: str | Mapping[TopicPartition, str] = "",
    ) -> None:
        """Add ``group``'s ``offsets`` to the open transaction.

        ``metadata``: one text for every partition, or one per partition.
        """
        await self._raw.send_offsets_to_transaction(
            {
                tp: OffsetAndMetadata(
                    offset, metadata if isinstance(metadata, str) else metadata[tp]
                )
                for tp, offset in offsets.items()
            },
            group,
        )

    async def commit(self) -> None:
        await self._raw.commit_transaction()

    async def abort(self) -> None:
        await self._raw.abort_transaction()

    def failure(self) -> BaseException | None:
        """The error that killed the producer's background sender, if one did.

        ProducerFenced is reported there and nowhere else; see
        :func:`streamlet.kafka._aiokafka.producer_failure`.
        """
        return _aiokafka.producer_failure(self._raw)

    async def committed(self, group: str, tp: TopicPartition) -> OffsetAndMetadata | None:
        """The offset ``group`` committed for ``tp`` (None: none), read strictly.

        Retries while the group's coordinator is loading or moving; raises
        the broker's error for anything else, so that an error never reads
        as "no offset".
        """
        backoff = 0.1
        while True:
            try:
                codes, found = await _aiokafka.fetch_group_offset(
                    self._raw, group, tp.topic, tp.partition
                )
            except KafkaError as exc:
                if not exc.retriable:
                    raise
                log.debug("reading the offsets of group %r failed (%r); asking again", group, exc)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            busy = [code for code in codes if code in _COORDINATOR_BUSY]
            failed = [code for code in codes if code and code not in _COORDINATOR_BUSY]
            if failed:
                raise for_code(failed[0])(f"cannot read the offsets of consumer group {group!r}")
            if not busy:
                return None if found is None else OffsetAndMetadata(*found)
            log.debug("coordinator of group %r busy (error %d); asking again", group, busy[0])
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def stop(self) -> None:
        await _stop(self._raw)
        # The sender's failure callbacks have run by now: read what they set.
        self.failure()


async def _stop(raw: Any) -> None:
    """Stop an aiokafka producer within ``CLOSE_TIMEOUT`` seconds.

    ``stop()`` waits for queued records; when the broker is unreachable that
    can take a request timeout or more. Past the bound the sender task is
    cancelled and the connections closed: those records are given up (the
    transaction they belong to is aborted by the next producer of the id).
    """
    with anyio.move_on_after(CLOSE_TIMEOUT) as scope:
        await raw.stop()
    if not scope.cancelled_caught:
        return
    log.warning(
        "Kafka producer did not stop within %.0fs; dropping its queued records", CLOSE_TIMEOUT
    )
    task = _aiokafka.sender_task(raw)
    if task is not None and not task.done():
        task.cancel()
        with anyio.move_on_after(CLOSE_TIMEOUT):
            await asyncio.gather(task, return_exceptions=True)
    with anyio.move_on_after(CLOSE_TIMEOUT):
        await _aiokafka.close_client(raw)


def _oversize(
    key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]], limit: int
) -> int | None:
    """The record's size if it is over ``limit`` bytes, else None (exact only near it)."""
    if (len(key) if key else 0) + (len(value) if value else 0) <= limit - 1024:
        return None
    size = _aiokafka.record_size(key, value, headers)
    return size if size > limit else None


def checked_partitioner(partitioner: Partitioner) -> Partitioner:
    """``partitioner`` with its failures and bad answers raised as PartitionerFailed."""

    def partition(key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
        try:
            chosen = partitioner(key, all_partitions, available)
        except Exception as exc:
            raise PartitionerFailed(repr(exc)) from exc
        if isinstance(chosen, bool) or not isinstance(chosen, int) or chosen not in all_partitions:
            raise PartitionerFailed(
                f"it returned {chosen!r}, not one of the topic's partitions"
                f" {sorted(all_partitions)}"
            )
        return chosen

    return partition


def _retrieve(future: asyncio.Future[Any]) -> None:
    # A record's failure is read through the transaction; this keeps asyncio
    # from logging it as never retrieved when nobody waits for it any more.
    if not future.cancelled():
        future.exception()


async def delivered(futures: Sequence[asyncio.Future[Any]]) -> None:
    """Wait until the broker has every record; raise the first failure.

    ``asyncio.wait`` rather than ``gather``: cancelling the wait must not
    cancel aiokafka's futures, which aiokafka resolves itself.
    """
    if not futures:
        return
    await asyncio.wait(futures)
    for future in futures:
        if future.cancelled():
            raise KafkaError("the producer dropped a record before the broker acknowledged it")
        error = future.exception()
        if error is not None:
            raise error
