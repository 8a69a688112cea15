"""KafkaSource against the real broker: ranges, isolation, positions, policies, both modes."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import cast

import anyio
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import NewPartitions, NewTopic
from aiokafka.admin.records_to_delete import RecordsToDelete

from streamlet.app import App
from streamlet.errors import ConfigError, StreamletError
from streamlet.kafka.config import OutOfRangePolicy
from streamlet.kafka.direct import KafkaDirectSource
from streamlet.kafka.receiver import KafkaReceiver
from streamlet.records import Batch, OffsetRange, Record
from streamlet.sinks.base import Sink
from streamlet.sources import KafkaSource
from streamlet.testing.kafka import EmbeddedKafka, admin_client, group_offsets, missing_tools
from tests.conftest import REPO_ROOT, TopicFactory

pytestmark = pytest.mark.kafka


# -- helpers -------------------------------------------------------------------


async def _produce(
    bootstrap: str, topic: str, values: Sequence[bytes], *, partition: int | None = None
) -> list[tuple[int, int]]:
    """Send ``values`` (key = value), acks=all; return their (partition, offset)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, v, key=v, partition=partition) for v in values]
        await producer.flush()
        return [(m.partition, m.offset) for m in [await f for f in futures]]
    finally:
        await producer.stop()


@asynccontextmanager
async def _started(source: KafkaDirectSource) -> AsyncIterator[KafkaDirectSource]:
    await source.start()
    try:
        yield source
    finally:
        await source.aclose()


async def _waitgroup_offsets(bootstrap: str, group: str, want: Mapping[int, int]) -> None:
    """Poll the broker (the only way to observe a group) until it shows ``want``."""
    seen: dict[int, int] = {}
    with anyio.move_on_after(20):
        while seen != want:
            seen = await group_offsets(bootstrap, group)
            if seen != want:
                await anyio.sleep(0.05)
    assert seen == want


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _r(topic: str, partition: int, start: int, until: int) -> OffsetRange:
    return OffsetRange(topic, partition, start, until)


# -- direct mode: ranges and isolation -------------------------------------------


async def test_read_returns_exactly_the_records_of_each_range(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    topic = await new_topic(partitions=2)
    before = time.time()
    await _produce(kafka_bootstrap, topic, [f"a{i}".encode() for i in range(20)], partition=0)
    await _produce(kafka_bootstrap, topic, [f"b{i}".encode() for i in range(10)], partition=1)
    source = KafkaSource(topic, bootstrap_servers=kafka_bootstrap, name="clicks")
    async with _started(source):
        assert await source.latest() == {0: 20, 1: 10}

        first = await source.read([_r("clicks", 0, 0, 7), _r("clicks", 1, 3, 5)])
        assert [(r.partition, r.offset, r.value) for r in first] == [
            *[(0, i, f"a{i}".encode()) for i in range(7)],
            (1, 3, b"b3"),
            (1, 4, b"b4"),
        ]
        record = first[0]
        assert record.key == b"a0"
        assert record.source == "clicks"
        assert before - 1 <= record.timestamp <= time.time() + 1

        # The next ranges continue where the last ones ended.
        rest = await source.read([_r("clicks", 0, 7, 20), _r("clicks", 1, 5, 10)])
        assert [(r.partition, r.offset) for r in rest] == [
            *[(0, i) for i in range(7, 20)],
            *[(1, i) for i in range(5, 10)],
        ]
        # A re-run of an earlier range reads the same records again.
        again = await source.read([_r("clicks", 0, 2, 4)])
        assert [(r.offset, r.value) for r in again] == [(2, b"a2"), (3, b"a3")]


async def test_an_offset_lookup_does_not_wait_behind_a_fetch_waiting_for_records(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    """Once a source has read all there is, its consumer's next fetch waits at the broker.

    The broker answers one connection's requests in order, so a lookup sent
    on that connection would wait for the fetch: here up to 5 s
    (``fetch_max_wait_ms``), at every tick of a caught-up source.
    """
    topic = await new_topic(partitions=2)
    await _produce(kafka_bootstrap, topic, [b"a", b"b"], partition=0)
    source = KafkaSource(
        topic, bootstrap_servers=kafka_bootstrap, consumer_config={"fetch_max_wait_ms": 5000}
    )
    async with _started(source):
        assert await source.latest() == {0: 2, 1: 0}
        assert [r.value for r in await source.read([_r(topic, 0, 0, 2)])] == [b"a", b"b"]
        await anyio.sleep(0.5)  # the consumer's next fetch is now waiting at the broker
        took = []
        for _ in range(3):
            began = time.monotonic()
            assert await source.latest() == {0: 2, 1: 0}
            took.append(time.monotonic() - began)
        assert max(took) < 2.5, took


async def test_range_over_aborted_transactions_reads_committed_records_and_stops_at_until(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    topic = await new_topic(partitions=1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=f"{topic}-tx")
    await producer.start()
    try:
        async with producer.transaction():  # offsets 0-2, marker 3
            for i in range(3):
                await producer.send(topic, f"c{i}".encode(), partition=0)
        await producer.begin_transaction()  # offsets 4-6, marker 7
        for i in range(3):
            await producer.send(topic, f"aborted{i}".encode(), partition=0)
        await producer.abort_transaction()
        async with producer.transaction():  # offsets 8-9, marker 10
            for i in range(2):
                await producer.send(topic, f"d{i}".encode(), partition=0)
    finally:
        await producer.stop()

    source = KafkaSource(topic, bootstrap_servers=kafka_bootstrap)
    async with _started(source):
        assert await source.latest() == {0: 11}
        with anyio.fail_after(10):
            whole = await source.read([_r(topic, 0, 0, 11)])
            # Only an aborted transaction and its marker: nothing to return,
            # and the read must not wait for records that will never come.
            gap = await source.read([_r(topic, 0, 4, 8)])
            head = await source.read([_r(topic, 0, 0, 6)])
            tail = await source.read([_r(topic, 0, 6, 11)])
    assert [(r.offset, r.value) for r in whole] == [
        (0, b"c0"),
        (1, b"c1"),
        (2, b"c2"),
        (8, b"d0"),
        (9, b"d1"),
    ]
    assert gap == []
    assert [r.offset for r in head] == [0, 1, 2]
    assert [r.offset for r in tail] == [8, 9]


async def test_latest_never_passes_an_open_transaction(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    topic = await new_topic(partitions=1)
    await _produce(kafka_bootstrap, topic, [b"p0", b"p1", b"p2"], partition=0)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=f"{topic}-tx")
    await producer.start()
    committed = KafkaSource(topic, bootstrap_servers=kafka_bootstrap)
    uncommitted = KafkaSource(
        topic, bootstrap_servers=kafka_bootstrap, isolation="read_uncommitted"
    )
    try:
        await producer.begin_transaction()  # offsets 3-6 stay open
        for i in range(4):
            await producer.send(topic, f"open{i}".encode(), partition=0)
        await producer.flush()
        await _produce(kafka_bootstrap, topic, [b"after0", b"after1"], partition=0)  # 7, 8
        async with _started(committed), _started(uncommitted):
            # The last stable offset is the open transaction's first offset.
            assert await committed.latest() == {0: 3}
            assert await uncommitted.latest() == {0: 9}
            with anyio.fail_after(10):
                assert [r.value for r in await committed.read([_r(topic, 0, 0, 3)])] == [
                    b"p0",
                    b"p1",
                    b"p2",
                ]
            await producer.commit_transaction()  # marker at 9
            # The commit returns once the coordinator logged it; the markers
            # reach the partition, and move its stable offset, just after.
            with anyio.fail_after(10):
                while await committed.latest() != {0: 10}:  # noqa: ASYNC110 - polls the broker
                    await anyio.sleep(0.05)
            rest = await committed.read([_r(topic, 0, 3, 10)])
            values = [r.value for r in rest]
            assert values == [b"open0", b"open1", b"open2", b"open3", b"after0", b"after1"]
    finally:
        await producer.stop()


# -- direct mode: positions, group offsets, lost offsets ---------------------------


async def test_start_positions_follow_start(
    kafka_bootstrap: str, new_topic: TopicFactory, caplog: pytest.LogCaptureFixture
) -> None:
    topic = await new_topic(partitions=1)
    await _produce(kafka_bootstrap, topic, [str(i).encode() for i in range(10)], partition=0)
    async with admin_client(kafka_bootstrap) as admin:
        await admin.delete_records({TopicPartition(topic, 0): RecordsToDelete(2)})
    group = f"{topic}-g"

    async def positions(**settings: object) -> Mapping[int, int]:
        source: KafkaDirectSource = KafkaSource(  # type: ignore[call-overload]
            topic, bootstrap_servers=kafka_bootstrap, **settings
        )
        async with _started(source):
            return await source.start_positions([0])

    assert await positions(start="earliest") == {0: 2}
    assert await positions(start="latest") == {0: 10}
    assert await positions(start={0: 5}) == {0: 5}
    with caplog.at_level(logging.INFO, logger="streamlet.kafka"):
        assert await positions(start="committed", group_id=group) == {0: 2}
    assert f"group {group!r} has no committed offset" in caplog.text

    # Commit 7 for the group, as a finished batch would; committed now finds it.
    committer = KafkaSource(topic, bootstrap_servers=kafka_bootstrap, group_id=group)
    async with _started(committer):
        await committer.commit([_r(topic, 0, 2, 7)])
    assert await positions(start="committed", group_id=group) == {0: 7}

    # An explicit start before the oldest stored offset is lost data: the policy decides.
    with pytest.raises(StreamletError, match=rf"offsets \[1, 2\) of {topic}-0 were deleted"):
        await positions(start={0: 1})
    assert await positions(start={0: 1}, on_out_of_range="earliest") == {0: 2}
    assert await positions(start={0: 1}, on_out_of_range="latest") == {0: 10}


async def test_commit_makes_the_group_offsets_visible_to_tooling(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    topic = await new_topic(partitions=2)
    await _produce(kafka_bootstrap, topic, [b"x"] * 6, partition=0)
    await _produce(kafka_bootstrap, topic, [b"y"] * 4, partition=1)
    group = f"{topic}-g"
    source = KafkaSource(topic, bootstrap_servers=kafka_bootstrap, group_id=group)
    async with _started(source):
        ranges = [_r(topic, 0, 0, 6), _r(topic, 1, 0, 3)]
        assert len(await source.read(ranges)) == 9
        assert await group_offsets(kafka_bootstrap, group) == {}
        await source.commit(ranges)
    assert await group_offsets(kafka_bootstrap, group) == {0: 6, 1: 3}


async def test_deleted_offsets_follow_on_out_of_range_and_are_logged(
    kafka_bootstrap: str, new_topic: TopicFactory, caplog: pytest.LogCaptureFixture
) -> None:
    topic = await new_topic(partitions=1)
    await _produce(kafka_bootstrap, topic, [str(i).encode() for i in range(10)], partition=0)
    async with admin_client(kafka_bootstrap) as admin:
        await admin.delete_records({TopicPartition(topic, 0): RecordsToDelete(5)})
    planned = [_r(topic, 0, 0, 10)]  # allocated before retention removed 0-4

    def source(policy: OutOfRangePolicy) -> KafkaDirectSource:
        return KafkaSource(topic, bootstrap_servers=kafka_bootstrap, on_out_of_range=policy)

    async with _started(source("fail")) as failing:
        with pytest.raises(StreamletError, match=rf"\[0, 5\) of {topic}-0 were deleted") as info:
            await failing.read(planned)
    assert "on_out_of_range='earliest'" in str(info.value)

    with caplog.at_level(logging.ERROR, logger="streamlet.kafka"):
        async with _started(source("earliest")) as earliest:
            assert [r.offset for r in await earliest.read(planned)] == [5, 6, 7, 8, 9]
        assert f"offsets [0, 5) of {topic}-0 were deleted" in caplog.text
        caplog.clear()
        async with _started(source("latest")) as latest:
            assert await latest.read(planned) == []
        assert "records of [0, 10) are not read" in caplog.text


async def test_a_partition_added_while_running_is_read_from_its_start(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    topic = await new_topic(partitions=1)
    source = KafkaSource(
        topic,
        bootstrap_servers=kafka_bootstrap,
        start="latest",
        consumer_config={"metadata_max_age_ms": 200},
    )
    async with _started(source):
        assert await source.latest() == {0: 0}
        async with admin_client(kafka_bootstrap) as admin:
            await admin.create_partitions({topic: NewPartitions(total_count=2)})
        await _produce(kafka_bootstrap, topic, [b"new"], partition=1)
        latest: Mapping[int, int] = {}
        with anyio.move_on_after(20):
            # The client learns of the partition with its next metadata refresh.
            while latest.get(1) != 1:
                latest = await source.latest()
                await anyio.sleep(0.05)
        assert latest == {0: 0, 1: 1}
        # start="latest" is for partitions present at start; a new one is all new.
        assert await source.start_positions([1]) == {1: 0}
        assert [r.value for r in await source.read([_r(topic, 1, 0, 1)])] == [b"new"]


async def test_a_range_that_cannot_be_read_fails_after_fetch_timeout(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    topic = await new_topic(partitions=1)
    await _produce(kafka_bootstrap, topic, [b"only"], partition=0)
    # As if the topic was recreated after the batch was planned: offsets 1-4 never come.
    source = KafkaSource(topic, bootstrap_servers=kafka_bootstrap, fetch_timeout=1.0)
    async with _started(source):
        began = time.monotonic()
        with pytest.raises(StreamletError, match="made no progress for fetch_timeout=1") as info:
            await source.read([_r(topic, 0, 0, 5)])
    assert time.monotonic() - began < 10
    assert f"{topic}-0 at offset 1 of range [0, 5), readable up to 1" in str(info.value)


# -- connection and settings ------------------------------------------------------


async def test_an_unreachable_broker_fails_clearly_within_connect_timeout() -> None:
    servers = f"127.0.0.1:{_closed_port()}"
    source = KafkaSource("clicks", bootstrap_servers=servers, connect_timeout=1.0)
    began = time.monotonic()
    with pytest.raises(StreamletError, match="could not connect to Kafka") as info:
        await source.start()
    assert time.monotonic() - began < 10
    assert servers in str(info.value)
    assert "connect_timeout=1" in str(info.value)
    assert info.value.retriable


async def test_a_missing_topic_is_a_config_error_and_is_not_created(
    kafka_bootstrap: str,
) -> None:
    topic = f"missing-{time.monotonic_ns()}"
    source = KafkaSource(topic, bootstrap_servers=kafka_bootstrap, connect_timeout=1.0)
    with pytest.raises(ConfigError, match=f"topic {topic!r} does not exist"):
        await source.start()
    async with admin_client(kafka_bootstrap) as admin:
        assert topic not in await admin.list_topics()


async def test_a_partition_the_topic_lacks_is_a_config_error(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    topic = await new_topic(partitions=2)
    for wrong in ([1, 5], [5]):
        source = KafkaSource(topic, bootstrap_servers=kafka_bootstrap, partitions=wrong)
        with anyio.fail_after(10), pytest.raises(ConfigError, match=r"no partition\(s\) \[5\]"):
            await source.start()
    only = KafkaSource(topic, bootstrap_servers=kafka_bootstrap, partitions=[1])
    async with _started(only):
        assert await only.latest() == {1: 0}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"topic": "a topic"}, "is not a Kafka topic name"),
        ({"bootstrap_servers": ""}, "bootstrap_servers must be"),
        ({"start": "newest"}, "start must be 'committed'"),
        ({"start": {0: -1}}, "start offset of partition 0 must be an integer >= 0"),
        ({"partitions": [0], "start": {1: 3}}, r"start names partitions \[1\]"),
        ({"partitions": [0, 0]}, "distinct partition numbers"),
        ({"isolation": "serializable"}, "isolation must be"),
        ({"mode": "push"}, "mode must be 'direct' or 'receiver'"),
        ({"on_out_of_range": "skip"}, "on_out_of_range must be"),
        ({"max_rate": 0}, "max_rate must be a positive number"),
        ({"connect_timeout": -1}, "connect_timeout must be a positive number of seconds"),
        ({"consumer_config": {"enable_auto_commit": True}}, "must not set 'enable_auto_commit'"),
        ({"consumer_config": {"isolation_level": "x"}}, "use the isolation argument"),
        ({"consumer_config": {"sasl_mechanizm": "PLAIN"}}, "does not take"),
        ({"group_id": ""}, "group_id must be a non-empty string"),
    ],
)
def test_invalid_settings_are_config_errors(settings: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"topic": "clicks", "bootstrap_servers": "localhost:9092"}
    args.update(settings)
    with pytest.raises(ConfigError, match=message):
        KafkaSource(**args)  # type: ignore[call-overload]


def test_security_settings_pass_through_and_the_mode_picks_the_class() -> None:
    direct = KafkaSource(
        "clicks",
        bootstrap_servers=["k1:9093", "k2:9093"],
        consumer_config={"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN"},
    )
    receiver = KafkaSource("clicks", bootstrap_servers="k1:9093", mode="receiver")
    assert isinstance(direct, KafkaDirectSource)
    assert isinstance(receiver, KafkaReceiver)
    kwargs = direct.config.consumer_kwargs()
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert kwargs["bootstrap_servers"] == ["k1:9093", "k2:9093"]
    assert kwargs["enable_auto_commit"] is False
    assert kwargs["auto_offset_reset"] == "none"
    assert kwargs["isolation_level"] == "read_committed"
    assert direct.name == receiver.name == "clicks"
    assert direct.describe() != receiver.describe()


# -- receiver mode through a fake context -------------------------------------------


class FakeStored:
    """A store handle the test makes durable when it chooses."""

    def __init__(self) -> None:
        self.durable = anyio.Event()

    def done(self) -> bool:
        return self.durable.is_set()

    async def wait(self) -> None:
        await self.durable.wait()


class FakeContext:
    """A :class:`ReceiverContext` that keeps every store for the test to inspect."""

    def __init__(self, acks: Mapping[str, int] | None = None) -> None:
        self.name = "recv"
        self.acks: Mapping[str, int] = dict(acks or {})
        self.stopping = anyio.Event()
        self.stores: list[tuple[list[Record], dict[str, int], FakeStored]] = []
        self._changed = anyio.Event()

    async def store(
        self, records: Sequence[Record], *, acks: Mapping[str, int] | None = None
    ) -> FakeStored:
        handle = FakeStored()
        self.stores.append((list(records), dict(acks or {}), handle))
        self._changed.set()
        self._changed = anyio.Event()
        return handle

    @property
    def records(self) -> list[Record]:
        return [r for records, _, _ in self.stores for r in records]

    async def wait_for(self, count: int) -> None:
        with anyio.fail_after(20):
            while len(self.records) < count:
                await self._changed.wait()

    def make_durable(self) -> None:
        for _, _, handle in self.stores:
            handle.durable.set()

    def last_acks(self) -> dict[str, int]:
        merged: dict[str, int] = {}
        for _, acks, _ in self.stores:
            merged.update(acks)
        return merged


@asynccontextmanager
async def _receiving(receiver: KafkaReceiver, context: FakeContext) -> AsyncIterator[None]:
    """Run ``receiver``; on exit, set ``stopping`` and require it to return soon."""
    async with anyio.create_task_group() as tg:
        finished = anyio.Event()

        async def run() -> None:
            await receiver.run(context)
            finished.set()

        tg.start_soon(run)
        yield
        context.stopping.set()
        with anyio.fail_after(10):
            await finished.wait()


async def test_receiver_stores_with_acks_and_commits_the_group_only_when_durable(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    topic = await new_topic(partitions=2)
    await _produce(kafka_bootstrap, topic, [f"a{i}".encode() for i in range(10)], partition=0)
    await _produce(kafka_bootstrap, topic, [f"b{i}".encode() for i in range(5)], partition=1)
    group = f"{topic}-g"
    receiver = KafkaSource(
        topic, bootstrap_servers=kafka_bootstrap, group_id=group, mode="receiver"
    )
    context = FakeContext()
    async with _receiving(receiver, context):
        await context.wait_for(15)
        assert sorted((r.partition, r.offset, r.value) for r in context.records) == [
            *[(0, i, f"a{i}".encode()) for i in range(10)],
            *[(1, i, f"b{i}".encode()) for i in range(5)],
        ]
        assert context.last_acks() == {"0": 10, "1": 5}
        # Nothing is durable yet, so the group has nothing committed.
        assert await group_offsets(kafka_bootstrap, group) == {}
        context.make_durable()
        await _waitgroup_offsets(kafka_bootstrap, group, {0: 10, 1: 5})

        await _produce(kafka_bootstrap, topic, [b"a10", b"a11"], partition=0)
        await context.wait_for(17)
        assert context.last_acks()["0"] == 12
        assert await group_offsets(kafka_bootstrap, group) == {0: 10, 1: 5}
        context.make_durable()
        await _waitgroup_offsets(kafka_bootstrap, group, {0: 12, 1: 5})


async def test_receiver_resumes_after_the_acked_offsets(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    topic = await new_topic(partitions=2)
    await _produce(kafka_bootstrap, topic, [str(i).encode() for i in range(10)], partition=0)
    await _produce(kafka_bootstrap, topic, [str(i).encode() for i in range(3)], partition=1)
    receiver = KafkaSource(topic, bootstrap_servers=kafka_bootstrap, mode="receiver")
    # Partition 0 is durable up to offset 6; partition 1 has no ack and starts per `start`.
    context = FakeContext(acks={"0": 6})
    async with _receiving(receiver, context):
        await context.wait_for(7)
    assert sorted((r.partition, r.offset) for r in context.records) == [
        (0, 6),
        (0, 7),
        (0, 8),
        (0, 9),
        (1, 0),
        (1, 1),
        (1, 2),
    ]


async def test_receiver_applies_on_out_of_range_to_deleted_offsets(
    kafka_bootstrap: str, new_topic: TopicFactory, caplog: pytest.LogCaptureFixture
) -> None:
    topic = await new_topic(partitions=1)
    await _produce(kafka_bootstrap, topic, [str(i).encode() for i in range(8)], partition=0)
    async with admin_client(kafka_bootstrap) as admin:
        await admin.delete_records({TopicPartition(topic, 0): RecordsToDelete(5)})

    failing = KafkaSource(topic, bootstrap_servers=kafka_bootstrap, mode="receiver")
    with anyio.fail_after(20), pytest.raises(StreamletError, match=r"\[2, 5\) of .* deleted"):
        await failing.run(FakeContext(acks={"0": 2}))

    earliest = KafkaSource(
        topic, bootstrap_servers=kafka_bootstrap, mode="receiver", on_out_of_range="earliest"
    )
    context = FakeContext(acks={"0": 2})
    with caplog.at_level(logging.ERROR, logger="streamlet.kafka"):
        async with _receiving(earliest, context):
            await context.wait_for(3)
    assert [r.offset for r in context.records] == [5, 6, 7]
    assert f"offsets [2, 5) of {topic}-0 were deleted" in caplog.text


async def test_receiver_keeps_to_max_rate(kafka_bootstrap: str, new_topic: TopicFactory) -> None:
    topic = await new_topic(partitions=1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        for i in range(120):  # one producer batch each, so that fetches can be small
            await (await producer.send(topic, b"%03d" % i, partition=0))
    finally:
        await producer.stop()
    receiver = KafkaSource(
        topic,
        bootstrap_servers=kafka_bootstrap,
        mode="receiver",
        start="earliest",
        max_rate=200,
        # Small fetches, so that the rate shows between chunks.
        consumer_config={"max_partition_fetch_bytes": 512},
    )
    context = FakeContext()
    async with _receiving(receiver, context):
        await context.wait_for(1)
        began = time.monotonic()
        first = len(context.records)
        await context.wait_for(120)
        elapsed = time.monotonic() - began
    assert [r.offset for r in context.records] == list(range(120))
    assert first < 120, "one fetch took everything; the rate was not exercised"
    # What followed the first chunk may not arrive faster than max_rate allows.
    assert elapsed >= (120 - 2 * first) / 200


# -- end to end with the App ----------------------------------------------------------


Output = tuple[int, int, int]  # partition, offset, the number the record carries


class ListSink(Sink):
    """Keeps committed batches in memory, idempotent by batch id."""

    def __init__(self) -> None:
        self.batches: dict[int, list[Output]] = {}
        self._changed = anyio.Event()

    async def commit(self, batch: Batch, outputs: Sequence[object]) -> bool:
        if batch.id in self.batches:
            return False
        self.batches[batch.id] = [cast(Output, o) for o in outputs]
        self._changed.set()
        self._changed = anyio.Event()
        return True

    def values(self) -> list[Output]:
        return [v for _, outs in sorted(self.batches.items()) for v in outs]

    async def wait_for(self, count: int) -> None:
        with anyio.fail_after(30):
            while len(self.values()) < count:
                await self._changed.wait()


def _app(state_dir: Path, source: KafkaDirectSource | KafkaReceiver, sink: Sink) -> App:
    app = App("kafka-e2e", state_dir=state_dir, batch_interval=0.1, block_interval=0.05)
    if isinstance(source, KafkaReceiver):
        app.source(source)
    else:
        app.source(source)

    @app.handler(source, sink=sink)
    async def decode(batch: Batch) -> list[Output]:
        return [(r.partition, r.offset, int(r.value)) for r in batch]

    return app


async def _run_until(app: App, sink: ListSink, count: int) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(app.serve)
        await sink.wait_for(count)
        app.stop()


@pytest.mark.parametrize("mode", ["direct", "receiver"])
async def test_app_processes_every_record_once_and_a_restart_continues(
    kafka_bootstrap: str, new_topic: TopicFactory, tmp_path: Path, mode: str
) -> None:
    topic = await new_topic(partitions=3)
    group = f"{topic}-g"
    first = list(range(5000))
    sent = await _produce(kafka_bootstrap, topic, [str(i).encode() for i in first])

    def source() -> KafkaDirectSource | KafkaReceiver:
        if mode == "receiver":
            return KafkaSource(
                topic, bootstrap_servers=kafka_bootstrap, group_id=group, mode="receiver"
            )
        return KafkaSource(topic, bootstrap_servers=kafka_bootstrap, group_id=group)

    sink = ListSink()
    await _run_until(_app(tmp_path / "state", source(), sink), sink, len(first))
    outputs = sink.values()
    assert len(outputs) == len(first), "a record was processed twice"
    assert sorted(v for _, _, v in outputs) == first
    assert sorted((p, o) for p, o, _ in outputs) == sorted(sent)
    ends: dict[int, int] = {}
    for partition, offset in sent:
        ends[partition] = max(ends.get(partition, 0), offset + 1)
    await _waitgroup_offsets(kafka_bootstrap, group, ends)

    second = list(range(5000, 6000))
    await _produce(kafka_bootstrap, topic, [str(i).encode() for i in second])
    resumed = ListSink()
    await _run_until(_app(tmp_path / "state", source(), resumed), resumed, len(second))
    assert sorted(v for _, _, v in resumed.values()) == second


@pytest.mark.parametrize("mode", ["direct", "receiver"])
async def test_headers_reach_the_handler_when_asked_for(
    kafka_bootstrap: str, new_topic: TopicFactory, tmp_path: Path, mode: str
) -> None:
    """headers=True: each record's headers, in order, null values too; receiver mode
    keeps them through the data WAL. Default: none."""
    topic = await new_topic(partitions=2)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(200):
            headers = [("n", b"%d" % i), ("trace-ü", None if i % 3 == 0 else b"t")] if i % 2 else []
            await producer.send(topic, b"%d" % i, key=b"%d" % i, headers=headers)
        await producer.flush()
    finally:
        await producer.stop()

    def expected(i: int) -> tuple[tuple[str, bytes | None], ...]:
        if not i % 2:
            return ()
        return (("n", b"%d" % i), ("trace-ü", None if i % 3 == 0 else b"t"))

    for wanted in (True, False):
        if mode == "receiver":
            seen = await _headers_seen(
                tmp_path / f"state-{wanted}",
                KafkaSource(
                    topic, bootstrap_servers=kafka_bootstrap, mode="receiver", headers=wanted
                ),
                200,
            )
        else:
            seen = await _headers_seen(
                tmp_path / f"state-{wanted}",
                KafkaSource(topic, bootstrap_servers=kafka_bootstrap, headers=wanted),
                200,
            )
        assert seen == {i: expected(i) if wanted else () for i in range(200)}


async def _headers_seen(
    state_dir: Path, source: KafkaDirectSource | KafkaReceiver, count: int
) -> dict[int, object]:
    """Run an app on ``source`` until ``count`` records are in; their headers by value."""
    app = App("headers", state_dir=state_dir, batch_interval=0.1)
    if isinstance(source, KafkaReceiver):
        app.source(source)
    else:
        app.source(source)
    seen: dict[int, object] = {}
    done = anyio.Event()

    @app.handler(source)
    async def collect(batch: Batch) -> list[int]:
        for r in batch:
            seen[int(r.value)] = r.headers
        if len(seen) >= count:
            done.set()
        return []

    async with anyio.create_task_group() as tg:
        await tg.start(app.serve)
        with anyio.fail_after(30):
            await done.wait()
        app.stop()
    return seen


@pytest.mark.slow
async def test_a_broker_restart_mid_run_loses_and_repeats_nothing(tmp_path: Path) -> None:
    if missing_tools():
        pytest.skip("restarting a broker needs the embedded one: " + ", ".join(missing_tools()))
    broker = EmbeddedKafka(
        work_dir=tmp_path / "kafka",
        cache_dir=os.environ.get("STREAMLET_KAFKA_CACHE", REPO_ROOT / ".cache" / "kafka"),
    )
    await anyio.to_thread.run_sync(broker.start)
    try:
        bootstrap = broker.bootstrap
        async with admin_client(bootstrap) as admin:
            await admin.create_topics(
                [NewTopic(t, num_partitions=2, replication_factor=1) for t in ("d", "r")]
            )
        # One app per mode, side by side, through the same restart.
        sinks = {"d": ListSink(), "r": ListSink()}
        apps = [
            _app(tmp_path / "direct", KafkaSource("d", bootstrap_servers=bootstrap), sinks["d"]),
            _app(
                tmp_path / "receiver",
                KafkaSource("r", bootstrap_servers=bootstrap, mode="receiver"),
                sinks["r"],
            ),
        ]
        for topic in sinks:
            await _produce(bootstrap, topic, [str(i).encode() for i in range(1000)])
        async with anyio.create_task_group() as tg:
            for app in apps:
                await tg.start(app.serve)
            for sink in sinks.values():
                await sink.wait_for(1000)
            await anyio.to_thread.run_sync(broker.stop)
            await anyio.to_thread.run_sync(broker.start)
            for topic in sinks:
                await _produce(bootstrap, topic, [str(i).encode() for i in range(1000, 2000)])
            for sink in sinks.values():
                await sink.wait_for(2000)
            for app in apps:
                app.stop()
        for sink in sinks.values():
            assert sorted(v for _, _, v in sink.values()) == list(range(2000))
    finally:
        await anyio.to_thread.run_sync(broker.stop)
