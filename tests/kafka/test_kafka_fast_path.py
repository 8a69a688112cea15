"""Records built in aiokafka's fetch buffers: the seam is there, and the records are right.

KafkaSource builds its Records inside aiokafka's fetch buffers (see
streamlet.kafka._aiokafka, "records straight from the fetch buffers"), through
a private class of aiokafka's. tests/kafka/test_aiokafka_seam.py checks the
seam without a broker; these tests check record for record, against the real
broker, that the
fast path returns what aiokafka's own ConsumerRecords say, across keys,
tombstones, headers, timestamps, a committed and an aborted transaction and
its markers; and that consumers other than streamlet's are left alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import aiokafka
import aiokafka.consumer.fetcher as fetcher
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from streamlet.kafka import _aiokafka
from streamlet.kafka._consumer import Consumer
from streamlet.kafka.config import KafkaSourceConfig
from streamlet.records import Record
from tests.conftest import TopicFactory

pytestmark = pytest.mark.kafka

SOURCE = "clicks"


def test_the_seam_is_installed() -> None:
    """With the pinned aiokafka the fast path is on; a new release that moves it fails here."""
    assert _aiokafka.check() == []
    _aiokafka.prepare()  # what the first streamlet consumer does
    assert _aiokafka.fast_reads()
    assert fetcher.PartitionRecords is _aiokafka.partition_records


def _without_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """aiokafka's own fetch buffers back in place, as when the seam has moved."""
    _aiokafka.prepare()
    monkeypatch.setattr(fetcher, "PartitionRecords", _aiokafka._AIOKAFKA_BUFFERS)
    monkeypatch.setattr(_aiokafka, "_FAST_READS", False)


async def _fill(bootstrap: str, topic: str) -> int:
    """Plain records, a committed and an aborted transaction; return the end offset."""
    plain = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await plain.start()
    try:
        await plain.send_and_wait(topic, b"v0", key=b"k0", timestamp_ms=1_700_000_000_123)
        await plain.send_and_wait(topic, None, key=b"gone")  # a tombstone
        await plain.send_and_wait(topic, b"no key", headers=[("h", b"1"), ("h2", b"")])
        await plain.send_and_wait(topic, b"", key=b"")  # empty, not null
    finally:
        await plain.stop()
    tx = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"{topic}-tx")
    await tx.start()
    try:
        async with tx.transaction():
            for i in range(5):
                await tx.send(topic, b"committed-%d" % i, key=b"c")
        await tx.begin_transaction()
        for i in range(5):
            await tx.send(topic, b"aborted-%d" % i, key=b"a")
        await tx.abort_transaction()
        async with tx.transaction():
            await tx.send(topic, b"after", key=b"c")
    finally:
        await tx.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        return int((await consumer.end_offsets([tp]))[tp])
    finally:
        await consumer.stop()


async def _read_all(getmany: Any, end: int, positions: Any) -> list[Any]:
    """Everything below ``end`` through ``getmany``, as returned."""
    out: list[Any] = []
    for _ in range(200):
        if await positions() >= end:
            return out
        fetched = await getmany()
        for messages in fetched.values():
            out.extend(messages)
    raise AssertionError(f"did not reach offset {end}; read {len(out)} records")


@pytest.fixture
async def topic(kafka_bootstrap: str, new_topic: TopicFactory) -> tuple[str, int]:
    name = await new_topic(1, prefix="fast")
    return name, await _fill(kafka_bootstrap, name)


async def _reference(bootstrap: str, topic: str, end: int) -> list[Any]:
    """aiokafka's own ConsumerRecords, from a consumer streamlet does not tag."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level="read_committed", enable_auto_commit=False
    )
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek(tp, 0)
        records = await _read_all(
            lambda: consumer.getmany(tp, timeout_ms=500), end, lambda: consumer.position(tp)
        )
    finally:
        await consumer.stop()
    return records


async def _streamlet(bootstrap: str, topic: str, end: int, *, headers: bool = False) -> list[Any]:
    consumer = Consumer(
        topic, KafkaSourceConfig(topic, bootstrap).consumer_kwargs(), headers=headers
    )
    await consumer.start()
    try:
        consumer.assign([0])
        consumer.seek(0, 0)
        return await _read_all(
            lambda: consumer.getmany([0], wait=0.5, source=SOURCE),
            end,
            lambda: consumer.position(0),
        )
    finally:
        await consumer.stop()


def _expected(reference: Iterable[Any], *, headers: bool = False) -> list[Record]:
    return [
        Record(
            value=b"" if m.value is None else m.value,
            key=m.key,
            timestamp=m.timestamp / 1000.0 if m.timestamp > 0 else 0.0,
            source=SOURCE,
            partition=m.partition,
            offset=m.offset,
            headers=tuple(m.headers) if headers else (),
        )
        for m in reference
    ]


async def test_fast_records_equal_aiokafkas_own(
    kafka_bootstrap: str, topic: tuple[str, int]
) -> None:
    name, end = topic
    reference = await _reference(kafka_bootstrap, name, end)
    # The untagged consumer was not touched: it still gets ConsumerRecords.
    assert reference
    assert all(type(m) is aiokafka.ConsumerRecord for m in reference)
    values = [m.value for m in reference]
    assert b"committed-4" in values
    assert b"after" in values
    assert not any(v is not None and v.startswith(b"aborted") for v in values)
    assert None in values  # the tombstone

    fast = await _streamlet(kafka_bootstrap, name, end)
    assert all(type(r) is Record for r in fast)
    assert fast == _expected(reference)
    assert fast[0].timestamp == 1_700_000_000.123
    # Offsets have gaps where the transaction markers and aborted records are.
    offsets = [r.offset for r in fast]
    assert offsets == sorted(offsets)
    assert offsets[-1] < end - 1
    assert len(offsets) < end


@pytest.mark.parametrize("fast", [True, False])
async def test_headers_come_when_asked_for(
    kafka_bootstrap: str, topic: tuple[str, int], monkeypatch: pytest.MonkeyPatch, fast: bool
) -> None:
    name, end = topic
    if not fast:
        _without_fast_path(monkeypatch)
    records = await _streamlet(kafka_bootstrap, name, end, headers=True)
    monkeypatch.undo()
    reference = await _reference(kafka_bootstrap, name, end)
    assert records == _expected(reference, headers=True)
    assert (("h", b"1"), ("h2", b"")) in [r.headers for r in records]


async def test_without_the_seam_records_are_the_same(
    kafka_bootstrap: str, topic: tuple[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """If a release moved the seam, the source converts ConsumerRecords itself."""
    name, end = topic
    _without_fast_path(monkeypatch)
    slow = await _streamlet(kafka_bootstrap, name, end)
    monkeypatch.undo()
    reference = await _reference(kafka_bootstrap, name, end)
    assert slow == _expected(reference)
