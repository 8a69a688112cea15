"""The test broker is a real Kafka fit for what streamlet relies on.

Each test checks one broker behaviour the exactly-once design depends on:
plain produce/consume at volume, transactions with ``read_committed``
isolation, and consumer groups splitting partitions.
"""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tests.conftest import TopicFactory

pytestmark = pytest.mark.kafka


async def _drain(consumer: AIOKafkaConsumer, expected: int) -> list[bytes]:
    """Read until ``expected`` values arrived, or 30 s passed (the caller asserts)."""
    values: list[bytes] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while len(values) < expected and loop.time() < deadline:
        batches = await consumer.getmany(timeout_ms=500)
        for records in batches.values():
            values.extend(record.value for record in records)
    return values


async def test_produce_and_consume_10000_records(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    topic = await new_topic(partitions=3)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, str(i).encode()) for i in range(10_000)]
        await producer.flush()
        metadata = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    assert {m.partition for m in metadata} == {0, 1, 2}

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        values = await _drain(consumer, 10_000)
    finally:
        await consumer.stop()
    assert sorted(int(v) for v in values) == list(range(10_000))


async def test_read_committed_sees_only_committed_transaction(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    topic = await new_topic(partitions=1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=f"{topic}-tx")
    await producer.start()
    try:
        async with producer.transaction():
            for i in range(5):
                await producer.send(topic, f"committed-{i}".encode(), partition=0)
        await producer.begin_transaction()
        for i in range(5):
            await producer.send(topic, f"aborted-{i}".encode(), partition=0)
        await producer.abort_transaction()
        # A committed transaction after the aborted one proves the consumer
        # reads past the aborted records and their marker.
        async with producer.transaction():
            await producer.send(topic, b"committed-last", partition=0)
    finally:
        await producer.stop()

    committed = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    uncommitted = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_uncommitted",
    )
    await committed.start()
    await uncommitted.start()
    try:
        seen = await _drain(committed, 6)
        raw = await _drain(uncommitted, 11)
    finally:
        await committed.stop()
        await uncommitted.stop()
    assert seen == [f"committed-{i}".encode() for i in range(5)] + [b"committed-last"]
    # The aborted records really reached the log: only isolation hides them.
    assert sum(v.startswith(b"aborted-") for v in raw) == 5


async def test_consumer_group_of_two_splits_partitions(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    topic = await new_topic(partitions=4)
    group = f"{topic}-group"

    def member() -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            topic,
            bootstrap_servers=kafka_bootstrap,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=10_000,
            heartbeat_interval_ms=500,
        )

    first, second = member(), member()
    await first.start()
    await second.start()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while loop.time() < deadline:
            # Polling drives the group protocol; both must be in the group.
            await asyncio.gather(first.getmany(timeout_ms=200), second.getmany(timeout_ms=200))
            a, b = first.assignment(), second.assignment()
            if a and b and len(a) + len(b) == 4:
                break
        a, b = first.assignment(), second.assignment()
    finally:
        await first.stop()
        await second.stop()
    assert a, f"the first member got no partitions (second has {b})"
    assert b, f"the second member got no partitions (first has {a})"
    assert a.isdisjoint(b)
    assert a | b == {TopicPartition(topic, p) for p in range(4)}
