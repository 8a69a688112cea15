"""KafkaSink against the real broker: exactly-once by transaction and marker.

Every check reads the output topic back with a ``read_committed`` consumer
(what downstream readers see) and, where it proves a point, with
``read_uncommitted`` too (what really reached the log).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaTimeoutError
from aiokafka.structs import OffsetAndMetadata
from anyio.streams.buffered import BufferedByteReceiveStream

from streamlet.errors import ConfigError, SinkError
from streamlet.kafka.policy import (
    MARKER_METADATA,
    _tail,
    java_string_hash,
    legacy_marker_group,
    marker_group,
    marker_metadata,
    transactional_id,
)
from streamlet.kafka.sink import KafkaSink
from streamlet.records import Batch, OffsetRange, Record
from streamlet.sinks.base import SinkContext
from streamlet.testing.kafka import admin_client
from tests.conftest import StdoutLines, TopicFactory

pytestmark = pytest.mark.kafka

HERE = Path(__file__).resolve().parent
READ_PATIENCE = 30.0  # seconds a reader waits for the end of a topic
WORKER = HERE / "kafka_sink_worker.py"


@dataclass
class FakeSource:
    """Stands for a KafkaSource: what consume_from reads of one."""

    name: str
    topic: str
    group_id: str | None


def _context() -> SinkContext:
    """A context of its own per test: transactional ids must not collide."""
    return SinkContext(f"app-{uuid.uuid4().hex[:8]}", "copy", "unused")


def _batch(batch_id: int, ranges: Sequence[OffsetRange] = ()) -> Batch:
    return Batch(batch_id, float(batch_id), [Record(b"in")], tuple(ranges))


@pytest.fixture
async def admin(kafka_bootstrap: str) -> AsyncIterator[AIOKafkaAdminClient]:
    async with admin_client(kafka_bootstrap) as client:
        yield client


async def _read_all(
    bootstrap: str,
    topic: str,
    *,
    partitions: int = 1,
    isolation: str = "read_committed",
) -> list[Any]:
    """Every record of ``topic`` up to its end now, by partition and offset.

    Reads until each partition's position reaches its high watermark. With
    ``read_committed`` a transaction left open would stop the position at
    the last stable offset, so this also fails on leaked transactions.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level=isolation,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        records: list[Any] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READ_PATIENCE
        while True:
            behind = [tp for tp in tps if await consumer.position(tp) < end[tp]]
            if not behind:
                break
            assert loop.time() < deadline, (
                f"{isolation} reader stuck before the end of {behind} (an open transaction?)"
            )
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return sorted(records, key=lambda r: (r.partition, r.offset))


async def _values(bootstrap: str, topic: str, **kw: Any) -> list[bytes]:
    return [record.value for record in await _read_all(bootstrap, topic, **kw)]


async def _offsets_become(
    admin: AIOKafkaAdminClient, group: str, expected: dict[TopicPartition, Any]
) -> None:
    """Wait until ``group``'s committed offsets equal ``expected``.

    Offsets committed in a transaction become readable when the commit
    marker reaches ``__consumer_offsets``, a moment after commit_transaction
    returned; a new producer of the same id waits for that, a reader does not.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READ_PATIENCE
    while True:
        found = dict(await admin.list_consumer_group_offsets(group))
        if found == expected:
            return
        assert loop.time() < deadline, f"group {group!r} has {found}, not {expected}"
        await anyio.sleep(0.05)  # polling the broker for the materialised commit


async def _open(sink: KafkaSink, context: SinkContext) -> KafkaSink:
    await sink.open(context)
    return sink


# -- pure parts ----------------------------------------------------------------------


def test_java_string_hash_matches_java() -> None:
    assert java_string_hash("") == 0
    assert java_string_hash("hello") == 99162322
    # "polygenelubricants".hashCode() is Integer.MIN_VALUE in Java.
    assert java_string_hash("polygenelubricants") == 2**31
    # Outside the BMP Java hashes the two UTF-16 surrogates.
    assert java_string_hash("\U0001f600") == 0xD83D * 31 + 0xDE00


@pytest.mark.parametrize("group", ["orders", "g", "streamlet.app", "grüße-😀", "x" * 300])
def test_marker_group_hashes_like_the_source_group(group: str) -> None:
    context = SinkContext("shop", "copy", "unused")
    name = marker_group(context, group)
    prefix = "streamlet-sink.shop.copy."
    assert name.startswith(prefix)
    suffix = name[len(prefix) :]
    assert len(suffix) == 9
    assert all("A" <= c <= "Z" for c in suffix), suffix
    assert java_string_hash(name) == java_string_hash(group)
    assert marker_group(context, group) == name  # the same every run
    assert marker_group(context) == "streamlet-sink.shop.copy"
    assert transactional_id(context) == "streamlet.shop.copy"


def test_the_fallback_suffix_reaches_any_hash() -> None:
    # Seven characters from "A" to "_" reach every hash: the rare case where
    # no letters-only suffix is found falls back to them.
    rng = random.Random(5)
    for _ in range(200):
        start, target = rng.randrange(2**32), rng.randrange(2**32)
        tail = _tail(start, target, 7, 31)
        assert tail is not None
        h = start
        for c in tail:
            h = (31 * h + ord(c)) % 2**32
        assert h == target


def test_settings_the_sink_owns_are_refused() -> None:
    with pytest.raises(ConfigError, match="transactional_id"):
        KafkaSink("t", bootstrap_servers="h:1", producer_config={"transactional_id": "x"})
    with pytest.raises(ConfigError, match="bootstrap_servers"):
        KafkaSink("t", bootstrap_servers="")
    with pytest.raises(ConfigError, match="consume_from"):
        KafkaSink("t", bootstrap_servers="h:1", consume_from=[object()])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="transactional=True"):
        KafkaSink(
            "t",
            bootstrap_servers="h:1",
            transactional=False,
            consume_from=FakeSource("in", "in", "group"),
        )


async def test_consume_from_sources_must_share_one_group() -> None:
    sink = KafkaSink(
        "t",
        bootstrap_servers="127.0.0.1:1",
        consume_from=[FakeSource("a", "in-a", "g1"), FakeSource("b", "in-b", "g2")],
    )
    with pytest.raises(ConfigError, match="one group"):
        await sink.open(_context())
    nameless = KafkaSink(
        "t", bootstrap_servers="127.0.0.1:1", consume_from=FakeSource("a", "in", None)
    )
    with pytest.raises(ConfigError, match="no consumer group"):
        await nameless.open(_context())


async def test_unreachable_broker_fails_open_after_logged_retries(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again below: nothing listens there
    sink = KafkaSink("t", bootstrap_servers=f"127.0.0.1:{port}", open_timeout=1.5)
    started = time.monotonic()
    with pytest.raises(SinkError) as caught:
        await sink.open(_context())
    assert time.monotonic() - started < 15
    assert caught.value.retriable
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert "could not connect" in str(caught.value)
    retries = [r for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) >= 2, [r.getMessage() for r in caplog.records]
    with pytest.raises(SinkError, match="not open"):
        await sink.commit(_batch(1), ["x"])


# -- against the broker --------------------------------------------------------------


async def test_commit_is_visible_to_read_committed_with_its_marker(
    kafka_bootstrap: str, new_topic: TopicFactory, admin: AIOKafkaAdminClient
) -> None:
    topic = await new_topic()
    context = _context()
    sink = await _open(KafkaSink(topic, bootstrap_servers=kafka_bootstrap), context)
    try:
        assert sink.guarantee == "exactly-once"
        assert sink.transactional_id == f"streamlet.{context.app}.copy"
        assert await sink.commit(_batch(7), ["text", {"n": 1}, b"\x00raw"])
        assert await sink.commit(_batch(8), [])  # no outputs: still a marker
    finally:
        await sink.aclose()
    assert await _values(kafka_bootstrap, topic) == [b"text", b'{"n":1}', b"\x00raw"]
    await _offsets_become(
        admin,
        f"streamlet-sink.{context.app}.copy",
        {TopicPartition(topic, 0): OffsetAndMetadata(9, marker_metadata(context.state_id))},
    )


async def test_recommitting_a_batch_returns_false_and_writes_nothing(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    topic = await new_topic()
    context = _context()
    first = await _open(KafkaSink(topic, bootstrap_servers=kafka_bootstrap), context)
    try:
        assert await first.commit(_batch(1), ["one-a", "one-b"])
        assert await first.commit(_batch(1), ["one-a", "one-b"]) is False
    finally:
        await first.aclose()
    # A restarted worker knows it only from the broker.
    second = await _open(KafkaSink(topic, bootstrap_servers=kafka_bootstrap), context)
    try:
        assert await second.commit(_batch(1), ["again"]) is False
        assert await second.commit(_batch(0), ["older"]) is False
        assert await second.commit(_batch(2), ["two"])
    finally:
        await second.aclose()
    assert await _values(kafka_bootstrap, topic) == [b"one-a", b"one-b", b"two"]


async def test_second_instance_fences_the_first(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    topic = await new_topic()
    context = _context()
    old = await _open(KafkaSink(topic, bootstrap_servers=kafka_bootstrap), context)
    new: KafkaSink | None = None
    try:
        assert await old.commit(_batch(1), ["old-1"])
        new = await _open(KafkaSink(topic, bootstrap_servers=kafka_bootstrap), context)
        with pytest.raises(SinkError) as caught:
            await old.commit(_batch(2), ["old-2"])
        message = str(caught.value)
        assert "fenced" in message
        assert "another worker" in message
        assert f"streamlet.{context.app}.copy" in message
        assert not caught.value.retriable
        # Stays stopped: it must not start a producer that fences the new one.
        with pytest.raises(SinkError, match="fenced"):
            await old.commit(_batch(2), ["old-2"])
        assert await new.commit(_batch(2), ["new-2"])
        assert await new.commit(_batch(3), ["new-3"])
    finally:
        await old.aclose()
        if new is not None:
            await new.aclose()
    assert await _values(kafka_bootstrap, topic) == [b"old-1", b"new-2", b"new-3"]


async def test_a_failing_partitioner_aborts_the_batch_before_anything_is_sent(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    topic = await new_topic()

    def partitioner(key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
        if key == b"boom":
            raise RuntimeError("injected")
        return all_partitions[0]

    sink = await _open(
        KafkaSink(
            topic,
            bootstrap_servers=kafka_bootstrap,
            key=lambda output: str(output).encode(),
            partitioner=partitioner,
            # One record per record batch: "lost-1" would be queued before "boom"
            # if outputs were not all partitioned before the first is queued.
            producer_config={"max_batch_size": 16},
        ),
        _context(),
    )
    try:
        with pytest.raises(SinkError) as caught:
            await sink.commit(_batch(1), ["lost-1", "lost-2", "boom", "lost-3"])
        assert "partitioner" in str(caught.value)
        assert "of batch 1: on output 2:" in str(caught.value)
        assert not caught.value.retriable
        # The aborted transaction did not move the marker: batch 1 is written.
        assert await sink.commit(_batch(1), ["kept-1"])
    finally:
        await sink.aclose()
    assert await _values(kafka_bootstrap, topic) == [b"kept-1"]
    # Nothing of the failed batch reached the log, not even uncommitted.
    raw = await _values(kafka_bootstrap, topic, isolation="read_uncommitted")
    assert raw == [b"kept-1"]


async def test_outputs_of_a_sigkilled_writer_stay_invisible(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    topic = await new_topic()
    context = _context()
    cmd = [sys.executable, str(WORKER), "hold", kafka_bootstrap, topic, context.app, "5", "20"]
    async with await anyio.open_process(cmd, stderr=subprocess.STDOUT) as proc:
        try:
            assert proc.stdout is not None
            output = BufferedByteReceiveStream(proc.stdout)
            lines: list[bytes] = []
            with anyio.fail_after(60):
                while not lines or lines[-1] != b"holding":
                    lines.append(await output.receive_until(b"\n", 64 * 1024))
            # The worker's open transaction holds all 20 records in the log.
            raw = await _values(kafka_bootstrap, topic, isolation="read_uncommitted")
            assert raw == [f"ghost-{i}".encode() for i in range(20)]
        finally:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # The restarted worker's producer aborts the open transaction on start;
    # batch 5 was never committed, so it is written now, once.
    sink = await _open(KafkaSink(topic, bootstrap_servers=kafka_bootstrap), context)
    try:
        assert await sink.commit(_batch(5), ["real-0", "real-1"])
    finally:
        await sink.aclose()
    assert await _values(kafka_bootstrap, topic) == [b"real-0", b"real-1"]


async def _offsets_partitions(bootstrap: str, admin: AIOKafkaAdminClient) -> int:
    """Partitions of __consumer_offsets; a fresh broker makes it at the first group lookup."""
    described = await admin.describe_topics(["__consumer_offsets"])
    if described and described[0].get("partitions"):
        return len(described[0]["partitions"])
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id="streamlet-test-bootstrap")
    await consumer.start()  # looks up the group coordinator, which creates the topic
    try:
        with anyio.fail_after(30):
            while True:
                described = await admin.describe_topics(["__consumer_offsets"])
                if described and described[0].get("partitions"):
                    return len(described[0]["partitions"])
                await anyio.sleep(0.1)
    finally:
        await consumer.stop()


async def test_consume_from_offsets_commit_with_the_batch(
    kafka_bootstrap: str, new_topic: TopicFactory, admin: AIOKafkaAdminClient
) -> None:
    topic = await new_topic()
    source_topic = await new_topic(partitions=2, prefix="in")
    context = _context()
    # A group whose __consumer_offsets partition differs from the plain
    # marker group's: committing both in one transaction then works only
    # because the marker group is named into the same partition.
    count = await _offsets_partitions(kafka_bootstrap, admin)

    def partition_of(group: str) -> int:
        h = java_string_hash(group)
        return (0 if h == 2**31 else abs(h - 2**32 if h >= 2**31 else h)) % count

    group = next(
        g
        for g in (f"group-{i}-{context.app}" for i in range(100))
        if count == 1 or partition_of(g) != partition_of(marker_group(context))
    )
    source = FakeSource("events", source_topic, group)
    sink = await _open(
        KafkaSink(topic, bootstrap_servers=kafka_bootstrap, consume_from=source), context
    )
    try:
        assert sink.marker_group == marker_group(context, group)
        ranges = [
            OffsetRange("events", 0, 0, 5),
            OffsetRange("events", 1, 2, 7),
            OffsetRange("other", 0, 0, 3),  # not a consume_from source
        ]
        assert await sink.commit(_batch(1, ranges), ["out-1"])
        await _offsets_become(
            admin,
            group,
            {
                TopicPartition(source_topic, 0): OffsetAndMetadata(5, ""),
                TopicPartition(source_topic, 1): OffsetAndMetadata(7, ""),
            },
        )
        assert await sink.commit(
            _batch(2, [OffsetRange("events", 0, 5, 9), OffsetRange("events", 1, 7, 7)]), []
        )
        await _offsets_become(
            admin,
            group,
            {
                TopicPartition(source_topic, 0): OffsetAndMetadata(9, ""),
                TopicPartition(source_topic, 1): OffsetAndMetadata(7, ""),
            },
        )
    finally:
        await sink.aclose()
    # A restart finds the marker in the group named after the source group.
    again = await _open(
        KafkaSink(topic, bootstrap_servers=kafka_bootstrap, consume_from=source), context
    )
    try:
        assert await again.commit(_batch(2, [OffsetRange("events", 0, 5, 9)]), ["dup"]) is False
    finally:
        await again.aclose()
    assert await _values(kafka_bootstrap, topic) == [b"out-1"]


async def test_keys_headers_and_partitioner_are_honoured(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    topic = await new_topic(partitions=3)
    sink = await _open(
        KafkaSink(
            topic,
            bootstrap_servers=kafka_bootstrap,
            key=lambda o: str(o["k"]).encode(),  # type: ignore[index]
            value=lambda o: json.dumps(o).encode(),
            headers=lambda o: [("n", str(o["n"]).encode()), ("kind", b"test")],  # type: ignore[index]
            partitioner=lambda key, all_partitions, available: int(key or b"0") % 3,
        ),
        _context(),
    )
    outputs = [{"k": k, "n": k * 10} for k in range(9)]
    try:
        assert await sink.commit(_batch(1), outputs)
    finally:
        await sink.aclose()
    records = await _read_all(kafka_bootstrap, topic, partitions=3)
    assert len(records) == 9
    for record in records:
        output = json.loads(record.value)
        assert record.key == str(output["k"]).encode()
        assert record.partition == output["k"] % 3
        assert list(record.headers) == [("n", str(output["n"]).encode()), ("kind", b"test")]
    assert sorted(json.loads(r.value)["k"] for r in records) == list(range(9))


@pytest.mark.parametrize("transactional", [True, False])
async def test_outputs_spanning_many_record_batches_keep_order_per_partition(
    kafka_bootstrap: str, new_topic: TopicFactory, transactional: bool
) -> None:
    """Outputs are packed into record batches per partition; a small batch size makes many."""
    topic = await new_topic(partitions=3)
    sink = await _open(
        KafkaSink(
            topic,
            bootstrap_servers=kafka_bootstrap,
            transactional=transactional,
            key=lambda o: b"k%d" % (o % 7),  # type: ignore[operator]
            value=lambda o: b"%06d" % o + b"." * 100,  # type: ignore[str-format]
            producer_config={"max_batch_size": 1024},
        ),
        _context(),
    )
    try:
        assert await sink.commit(_batch(1), list(range(3000)))
        assert await sink.commit(_batch(2), list(range(3000, 3500)))
    finally:
        await sink.aclose()
    records = await _read_all(kafka_bootstrap, topic, partitions=3)
    numbers = [int(r.value[:6]) for r in records]
    assert sorted(numbers) == list(range(3500))
    by_key: dict[bytes, list[int]] = {}
    partition_of: dict[bytes, set[int]] = {}
    for record, n in zip(records, numbers, strict=True):
        assert record.key == b"k%d" % (n % 7)
        by_key.setdefault(record.key, []).append(n)
        partition_of.setdefault(record.key, set()).add(record.partition)
    assert all(len(p) == 1 for p in partition_of.values())  # one key, one partition
    assert all(ns == sorted(ns) for ns in by_key.values())  # in order per key
    assert len({p for ps in partition_of.values() for p in ps}) > 1


async def test_an_output_over_max_request_size_fails_the_batch_cleanly(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    topic = await new_topic()
    sink = await _open(
        KafkaSink(
            topic, bootstrap_servers=kafka_bootstrap, producer_config={"max_request_size": 4096}
        ),
        _context(),
    )
    try:
        with pytest.raises(SinkError, match="max_request_size") as caught:
            await sink.commit(_batch(1), [b"small", b"x" * 10_000])
        assert not caught.value.retriable
        assert await sink.commit(_batch(1), [b"small"])
    finally:
        await sink.aclose()
    assert await _values(kafka_bootstrap, topic) == [b"small"]


async def test_unencodable_output_fails_the_batch_before_kafka(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    topic = await new_topic()
    sink = await _open(KafkaSink(topic, bootstrap_servers=kafka_bootstrap), _context())
    try:
        with pytest.raises(SinkError, match="output 1 of batch 1") as caught:
            await sink.commit(_batch(1), ["fine", object()])
        assert not caught.value.retriable
        assert await sink.commit(_batch(1), ["fine"])
    finally:
        await sink.aclose()
    assert await _values(kafka_bootstrap, topic) == [b"fine"]


async def test_non_transactional_mode_is_idempotent_at_least_once(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    topic = await new_topic()
    sink = await _open(
        KafkaSink(topic, bootstrap_servers=kafka_bootstrap, transactional=False), _context()
    )
    try:
        assert sink.guarantee == "at-least-once"
        assert sink.transactional_id is None
        assert await sink.commit(_batch(1), ["a", "b"])
        # Nothing remembers batch 1: a re-run writes it again.
        assert await sink.commit(_batch(1), ["a", "b"])
    finally:
        await sink.aclose()
    assert await _values(kafka_bootstrap, topic, isolation="read_uncommitted") == [
        b"a",
        b"b",
        b"a",
        b"b",
    ]


# -- unknown outcomes ----------------------------------------------------------------


async def test_commit_that_succeeded_but_reported_a_timeout_is_reconciled(
    kafka_bootstrap: str, new_topic: TopicFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = await new_topic()
    real = AIOKafkaProducer.commit_transaction
    injected: list[str] = []

    async def commit_then_time_out(self: AIOKafkaProducer) -> None:
        await real(self)
        if not injected:
            injected.append("timeout")
            raise KafkaTimeoutError("injected after the commit")

    monkeypatch.setattr(AIOKafkaProducer, "commit_transaction", commit_then_time_out)
    sink = await _open(KafkaSink(topic, bootstrap_servers=kafka_bootstrap), _context())
    try:
        # The sink reconnects, reads the marker and finds the batch written.
        assert await sink.commit(_batch(1), ["once"])
        assert injected == ["timeout"]
        assert await sink.commit(_batch(1), ["once"]) is False
        assert await sink.commit(_batch(2), ["twice"])
    finally:
        await sink.aclose()
    assert await _values(kafka_bootstrap, topic) == [b"once", b"twice"]


async def test_commit_that_never_reached_the_broker_is_rolled_back(
    kafka_bootstrap: str, new_topic: TopicFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = await new_topic()
    real = AIOKafkaProducer.commit_transaction
    injected: list[str] = []

    async def time_out_before_commit(self: AIOKafkaProducer) -> None:
        if not injected:
            injected.append("timeout")
            raise KafkaTimeoutError("injected before the commit")
        await real(self)

    monkeypatch.setattr(AIOKafkaProducer, "commit_transaction", time_out_before_commit)
    sink = await _open(KafkaSink(topic, bootstrap_servers=kafka_bootstrap), _context())
    try:
        with pytest.raises(SinkError, match="rolled back") as caught:
            await sink.commit(_batch(1), ["first-try"])
        assert caught.value.retriable
        assert await sink.commit(_batch(1), ["second-try"])  # the scheduler's retry
    finally:
        await sink.aclose()
    assert await _values(kafka_bootstrap, topic) == [b"second-try"]
    raw = await _values(kafka_bootstrap, topic, isolation="read_uncommitted")
    assert raw == [b"first-try", b"second-try"]


async def test_cancelled_commit_is_reconciled_on_the_next_call(
    kafka_bootstrap: str, new_topic: TopicFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = await new_topic()
    real = AIOKafkaProducer.commit_transaction
    committed = anyio.Event()

    async def commit_then_hang(self: AIOKafkaProducer) -> None:
        await real(self)
        if not committed.is_set():
            committed.set()
            await anyio.sleep_forever()

    monkeypatch.setattr(AIOKafkaProducer, "commit_transaction", commit_then_hang)
    sink = await _open(KafkaSink(topic, bootstrap_servers=kafka_bootstrap), _context())
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(sink.commit, _batch(1), ["only-once"])
            await committed.wait()
            tg.cancel_scope.cancel()
        assert await sink.commit(_batch(1), ["only-once"]) is False
        assert await sink.commit(_batch(2), ["next"])
    finally:
        await sink.aclose()
    assert await _values(kafka_bootstrap, topic) == [b"only-once", b"next"]


# -- a real app, SIGKILLed at random -------------------------------------------------

RECORDS = 6000
# Each run is killed: "random" by the test at a random moment after the run's
# first batch; a crash point by the worker itself (STREAMLET_CRASH_AT) at that
# step of the first batch it reaches there. after_sink_commit and before_done
# leave a batch written to Kafka but not done: the next run must skip it.
KILLS = (
    "random",
    "random",
    "after_sink_commit",
    "random",
    "random",
    "before_done",
    "random",
    "random",
    "after_sink_commit",
    "random",
    "random",
)


@dataclass
class Run:
    """What one killed run of the app reported."""

    kill: str
    batches: int  # batches reported done
    recovered: int  # of those, re-runs of a batch the previous run left unfinished


def _run_until_killed(
    cmd: list[str], cwd: Path, env: dict[str, str], kill: str, rng: random.Random, log: Path
) -> Run:
    """Run the app until it is killed as ``kill`` says (see KILLS)."""
    if kill != "random":
        env = {**env, "STREAMLET_CRASH_AT": kill}
    with log.open("a") as errors:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=errors, text=True
        )
    output = StdoutLines(proc)
    try:
        if kill == "random":
            deadline = time.monotonic() + 60
            while not output.first.wait(timeout=0.05):
                assert proc.poll() is None, f"app exited with {proc.returncode}:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"no batch in 60 s:\n{log.read_text()}"
            time.sleep(rng.uniform(0.05, 0.6))  # the chaos, not a synchronisation
        else:
            proc.wait(timeout=60)  # the worker kills itself at the crash point
    finally:
        proc.kill()  # a no-op if it died at its crash point
        proc.wait(timeout=30)
        output.close(timeout=30)
    assert proc.returncode == -signal.SIGKILL, log.read_text()
    done = [line for line in output.lines if line.startswith("batch ") and line.endswith("\n")]
    return Run(kill, len(done), sum("(recovered)" in line for line in done))


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_sigkilled_app_writes_every_output_exactly_once_in_order(
    kafka_bootstrap: str, new_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = await new_topic()
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    env = dict(os.environ)
    env.pop("STREAMLET_CRASH_AT", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    env.update(
        KSW_BOOTSTRAP=kafka_bootstrap,
        KSW_TOPIC=topic,
        KSW_APP=f"eos-{uuid.uuid4().hex[:8]}",
        KSW_RECORDS=str(RECORDS),
        KSW_MAX_RATE="1000",  # 50 records per 50 ms batch: 120 batches
    )
    cmd = [sys.executable, "-m", "streamlet", "run", "kafka_sink_worker:app"]
    cmd += ["--log-level", "warning"]
    log = tmp_path / "app.log"
    runs = [
        await anyio.to_thread.run_sync(_run_until_killed, cmd, tmp_path, env, kill, rng, log)
        for kill in KILLS
    ]
    # Every run killed by the test got a batch done first; every crash point
    # left a written batch that the next run re-ran (and the sink skipped).
    assert all(run.batches >= 1 for run in runs if run.kill == "random"), runs
    for before, after in itertools.pairwise(runs):
        assert before.kill == "random" or after.recovered >= 1, runs
    # The last run is left to finish, then stopped gracefully.
    with log.open("a") as errors:
        proc = await anyio.open_process(
            cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=errors
        )
    async with proc:
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 90
            while len(await _read_all(kafka_bootstrap, topic)) < RECORDS:
                assert proc.returncode is None, log.read_text()
                assert loop.time() < deadline, f"seed {seed}: outputs incomplete\n{log.read_text()}"
                await anyio.sleep(0.5)  # polling the topic, not synchronising with the app
        finally:
            proc.send_signal(signal.SIGTERM)
            with anyio.fail_after(30):
                await proc.wait()
    assert proc.returncode == 0, log.read_text()
    values = await _values(kafka_bootstrap, topic)
    raw = await _values(kafka_bootstrap, topic, isolation="read_uncommitted")
    # How hard the kills hit: records of transactions a kill left open,
    # aborted by the next run's producer.
    print(f"seed {seed}: {runs}; {len(raw) - len(values)} aborted records in the log")
    expected = [str(i).encode() for i in range(RECORDS)]
    if values != expected:
        seen: dict[bytes, int] = {}
        for v in values:
            seen[v] = seen.get(v, 0) + 1
        duplicates = sorted((int(v), n) for v, n in seen.items() if n > 1)[:10]
        missing = sorted(int(v) for v in set(expected) - set(seen))[:10]
        raise AssertionError(
            f"seed {seed}, runs {runs}: {len(values)} outputs for {RECORDS} records;"
            f" duplicates {duplicates}, missing {missing}"
        )


async def _commit_marker(bootstrap: str, group: str, topic: str, offset: int, meta: str) -> None:
    """Leave a marker as another (or an older) KafkaSink would have."""
    from aiokafka import AIOKafkaConsumer

    # No auto-commit: stopping the consumer would commit its position over the marker.
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.commit({tp: OffsetAndMetadata(offset, meta)})
    finally:
        await consumer.stop()


async def test_a_marker_of_another_state_directory_refuses_the_sink(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    topic = await new_topic()
    context = _context()._replace(state_id="b" * 32)
    group = marker_group(context)
    await _commit_marker(kafka_bootstrap, group, topic, 6, marker_metadata("a" * 32))
    sink = KafkaSink(topic, bootstrap_servers=kafka_bootstrap)
    with pytest.raises(ConfigError, match=r"batches 1\.\.5 written under another state directory"):
        await sink.open(context)
    # The same state directory is welcome, and knows what it wrote.
    mine = await _open(
        KafkaSink(topic, bootstrap_servers=kafka_bootstrap), context._replace(state_id="a" * 32)
    )
    try:
        assert await mine.last_committed() == 5
        assert await mine.commit(_batch(5), ["again"]) is False
        assert await mine.commit(_batch(6), ["six"])
    finally:
        await mine.aclose()
    assert await _values(kafka_bootstrap, topic) == [b"six"]


async def test_a_marker_of_an_older_streamlet_is_still_read_as_this_state_directorys(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    topic = await new_topic()
    context = _context()._replace(state_id="c" * 32)
    await _commit_marker(kafka_bootstrap, legacy_marker_group(context), topic, 4, MARKER_METADATA)
    sink = await _open(KafkaSink(topic, bootstrap_servers=kafka_bootstrap), context)
    try:
        assert await sink.last_committed() == 3
        assert await sink.commit(_batch(3), ["old"]) is False
        assert await sink.commit(_batch(4), ["four"])
    finally:
        await sink.aclose()
    assert await _values(kafka_bootstrap, topic) == [b"four"]


async def test_an_oversized_output_without_transactions_writes_nothing_of_the_batch(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    """Sizes are checked before anything is queued: no partial batch behind an OutputError."""
    from streamlet.errors import OutputError

    topic = await new_topic()
    sink = await _open(
        KafkaSink(
            topic,
            bootstrap_servers=kafka_bootstrap,
            transactional=False,
            producer_config={"max_request_size": 100_000},
        ),
        _context(),
    )
    try:
        outputs = [b"x" * 1000 for _ in range(40)] + [b"y" * 200_000]
        with pytest.raises(OutputError, match="output 40 is larger"):
            await sink.commit(_batch(1), outputs)
        assert await sink.commit(_batch(2), [b"after"])
    finally:
        await sink.aclose()
    assert await _values(kafka_bootstrap, topic) == [b"after"]


async def test_a_stale_copy_of_the_state_is_refused_before_it_fences_the_live_worker(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    """A restored copy of the state directory started elsewhere must not stop the original."""
    topic = await new_topic()
    context = _context()._replace(state_id="d" * 32)
    live = await _open(KafkaSink(topic, bootstrap_servers=kafka_bootstrap), context)
    try:
        for batch_id in (1, 2, 3):
            assert await live.commit(_batch(batch_id), [b"%d" % batch_id])
        stale = KafkaSink(topic, bootstrap_servers=kafka_bootstrap)
        with pytest.raises(ConfigError, match="holds batches up to 3"):
            await stale.open(context._replace(allocated=1))
        # Not fenced: the live worker goes on committing.
        assert await live.commit(_batch(4), [b"4"])
    finally:
        await live.aclose()
    assert await _values(kafka_bootstrap, topic) == [b"1", b"2", b"3", b"4"]
