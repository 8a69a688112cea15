"""KafkaSink in group mode against the real broker: a producer and a marker per task.

Each test builds its sinks directly, as a worker of the group would, and
reads the output topic back with ``read_committed`` (what downstream
readers see) and, where it proves a point, ``read_uncommitted`` (what
reached the log).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaTimeoutError
from aiokafka.structs import OffsetAndMetadata

from streamlet.errors import ConfigError, FencedError, SinkError
from streamlet.kafka.policy import java_string_hash, task_marker_group
from streamlet.kafka.sink import KafkaSink
from streamlet.records import Batch, OffsetRange, Record
from streamlet.sinks.base import SinkContext
from streamlet.testing.kafka import admin_client
from tests.conftest import TopicFactory
from tests.kafka.test_kafka_sink import FakeSource, _offsets_become, _values

pytestmark = pytest.mark.kafka


def _context(tmp_path: Path, source_topic: str, **kw: Any) -> SinkContext:
    """A group-mode context; an app of its own per test, so transactional ids never collide."""
    return SinkContext(
        f"app-{uuid.uuid4().hex[:8]}",
        "h",
        str(tmp_path),
        "sid",
        None,
        group="g1",
        source_topics={"orders": source_topic},
        **kw,
    )


def _batch(batch_id: int, partition: int, start: int, until: int) -> Batch:
    return Batch(
        batch_id,
        float(batch_id),
        [Record(b"in")],
        (OffsetRange("orders", partition, start, until),),
    )


def _idle(batch_id: int, partition: int, at: int) -> Batch:
    """An idle batch of task ``partition``: no input, its range empty at ``at``."""
    return Batch(batch_id, float(batch_id), [], (OffsetRange("orders", partition, at, at),))


@dataclass
class Topics:
    """A test's output topic, its source topic (two partitions) and a context naming it."""

    out: str
    src: str
    context: SinkContext


@pytest.fixture
async def topics(new_topic: TopicFactory, tmp_path: Path) -> Topics:
    out, src = await new_topic(), await new_topic(partitions=2, prefix="in")
    return Topics(out, src, _context(tmp_path, src))


class Worker:
    """One worker's KafkaSink, opened in group mode; ``async with`` closes it."""

    def __init__(self, bootstrap: str, topic: str, context: SinkContext, **kw: Any) -> None:
        self.sink = KafkaSink(topic, bootstrap_servers=bootstrap, **kw)
        self.context = context

    async def __aenter__(self) -> KafkaSink:
        await self.sink.open(self.context)
        return self.sink

    async def __aexit__(self, *exc: object) -> None:
        await self.sink.aclose()


async def _offsets_become_marker(
    bootstrap: str, context: SinkContext, expected: dict[TopicPartition, tuple[int, int, int]]
) -> None:
    """The task marker holds ``{tp: (until, start, batch id)}`` (batches of :func:`_batch`)."""
    async with admin_client(bootstrap) as admin:
        await _offsets_become(
            admin,
            task_marker_group(context),
            {
                tp: OffsetAndMetadata(until, f"streamlet-task/2 {start} sid:{bid}:{bid * 1000}")
                for tp, (until, start, bid) in expected.items()
            },
        )


async def test_a_new_owner_fences_the_old_one_and_resumes_from_the_marker(
    kafka_bootstrap: str, topics: Topics
) -> None:
    out, src, context = topics.out, topics.src, topics.context
    async with Worker(kafka_bootstrap, out, context) as old:
        assert old.transactional_id is None  # one per task
        assert old.marker_group == f"streamlet-tasks.{context.app}.h"
        assert await old.last_committed() is None  # batch ids are the worker's own
        assert await old.acquire(0) == {}
        assert await old.commit(_batch(1, 0, 0, 3), ["a1", "a2"])
        assert await old.commit(_batch(2, 0, 3, 5), ["a3"])
        await _offsets_become_marker(kafka_bootstrap, context, {TopicPartition(src, 0): (5, 3, 2)})
        async with Worker(kafka_bootstrap, out, context) as new:
            # Another worker, its batch ids its own: the marker says where to go on.
            assert await new.acquire(0) == {"orders": 5}
            with pytest.raises(FencedError) as caught:
                await old.commit(_batch(3, 0, 5, 7), ["zombie"])
            message = str(caught.value)
            assert "task 0" in message
            assert f"streamlet.{context.app}.h.t0" in message
            assert not caught.value.retriable
            # The task stays dropped: a new producer would fence the new owner.
            with pytest.raises(FencedError):
                await old.commit(_batch(3, 0, 5, 7), ["zombie"])
            assert await new.commit(_batch(1, 0, 5, 7), ["b1"])
    assert await _values(kafka_bootstrap, out) == [b"a1", b"a2", b"a3", b"b1"]


async def test_a_zombies_open_transaction_is_aborted_when_the_task_is_acquired(
    kafka_bootstrap: str, topics: Topics, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, context = topics.out, topics.context
    real = AIOKafkaProducer.commit_transaction
    stuck = anyio.Event()

    async def hang_before_the_commit(self: AIOKafkaProducer) -> None:
        if not stuck.is_set():
            stuck.set()
            await anyio.sleep_forever()
        await real(self)

    monkeypatch.setattr(AIOKafkaProducer, "commit_transaction", hang_before_the_commit)
    async with Worker(kafka_bootstrap, out, context) as zombie:
        assert await zombie.acquire(0) == {}
        async with anyio.create_task_group() as tg:
            tg.start_soon(zombie.commit, _batch(1, 0, 0, 4), ["ghost-1", "ghost-2"])
            await stuck.wait()
            tg.cancel_scope.cancel()
        # The zombie's transaction is open, its outputs in the log.
        raw = await _values(kafka_bootstrap, out, isolation="read_uncommitted")
        assert raw == [b"ghost-1", b"ghost-2"]
        async with Worker(kafka_bootstrap, out, context) as owner:
            # InitProducerId aborted the zombie's transaction: nothing committed.
            assert await owner.acquire(0) == {}
            assert await owner.commit(_batch(1, 0, 0, 4), ["real-1"])
    # read_committed would stop at a transaction left open (see _read_all).
    assert await _values(kafka_bootstrap, out) == [b"real-1"]


async def test_a_batch_is_checked_against_the_task_marker(
    kafka_bootstrap: str, topics: Topics
) -> None:
    out, context = topics.out, topics.context
    async with Worker(kafka_bootstrap, out, context) as sink:
        with pytest.raises(SinkError, match=r"task 0, which this worker has not acquired"):
            await sink.commit(_batch(1, 0, 0, 5), ["early"])
        assert await sink.acquire(0) == {}
        assert await sink.commit(_batch(1, 0, 0, 5), ["one"])
        # A re-run of a committed batch writes nothing.
        assert await sink.commit(_batch(1, 0, 0, 5), ["one"]) is False
        with pytest.raises(SinkError) as overlap:
            await sink.commit(_batch(2, 0, 3, 8), ["overlap"])
        assert "batch 2 of task 0 reads orders[0] 3..8" in str(overlap.value)
        assert "resumes at orders 5" in str(overlap.value)
        assert "written twice" in str(overlap.value)
        assert not overlap.value.retriable
        with pytest.raises(SinkError) as gap:
            await sink.commit(_batch(2, 0, 7, 9), ["gap"])
        assert "batch 2 of task 0 reads orders[0] 7..9" in str(gap.value)
        assert "resumes at orders 5" in str(gap.value)
        assert "never be written" in str(gap.value)
        # Ranges of two partitions, or of a source that is not the app's: no task.
        two = Batch(9, 9.0, [], (OffsetRange("orders", 0, 5, 6), OffsetRange("orders", 1, 0, 1)))
        with pytest.raises(SinkError, match="one partition"):
            await sink.commit(two, ["x"])
        stranger = Batch(9, 9.0, [], (OffsetRange("other", 0, 5, 6),))
        with pytest.raises(SinkError, match="other is not one of them"):
            await sink.commit(stranger, ["x"])
        assert await sink.commit(_batch(2, 0, 5, 8), ["two"])
    # A restarted worker knows it only from the broker.
    async with Worker(kafka_bootstrap, out, context) as again:
        assert await again.acquire(0) == {"orders": 8}
        assert await again.commit(_batch(1, 0, 5, 8), ["two"]) is False
        assert await again.commit(_batch(2, 0, 0, 5), ["one"]) is False
    assert await _values(kafka_bootstrap, out) == [b"one", b"two"]


async def test_tasks_are_fenced_one_by_one(kafka_bootstrap: str, topics: Topics) -> None:
    out, src, context = topics.out, topics.src, topics.context
    async with Worker(kafka_bootstrap, out, context) as first:
        assert await first.acquire(0) == {}
        assert await first.acquire(1) == {}
        assert await first.commit(_batch(1, 0, 0, 2), ["t0-a"])
        assert await first.commit(_batch(2, 1, 0, 3), ["t1-a"])
        async with Worker(kafka_bootstrap, out, context) as second:
            # Task 1 moves; its producer's id is task 1's alone.
            assert await second.acquire(1) == {"orders": 3}
            with pytest.raises(FencedError, match="task 1"):
                await first.commit(_batch(3, 1, 3, 4), ["t1-zombie"])
            assert await first.commit(_batch(4, 0, 2, 4), ["t0-b"])
            assert await second.commit(_batch(1, 1, 3, 4), ["t1-b"])
            # Releasing the fenced task forgets it: no longer fenced, just not held.
            await first.release(1)
            with pytest.raises(SinkError, match="not acquired") as caught:
                await first.commit(_batch(3, 1, 3, 4), ["t1-zombie"])
            assert not isinstance(caught.value, FencedError)
    await _offsets_become_marker(
        kafka_bootstrap,
        context,
        {TopicPartition(src, 0): (4, 2, 4), TopicPartition(src, 1): (4, 3, 1)},
    )
    values = await _values(kafka_bootstrap, out)
    assert sorted(values) == [b"t0-a", b"t0-b", b"t1-a", b"t1-b"]


async def test_release_then_acquire_resumes_from_the_marker(
    kafka_bootstrap: str, topics: Topics
) -> None:
    out, context = topics.out, topics.context
    async with Worker(kafka_bootstrap, out, context) as sink:
        assert await sink.acquire(1) == {}
        assert await sink.commit(_batch(1, 1, 0, 4), ["one"])
        await sink.release(1)
        with pytest.raises(SinkError, match="not acquired"):
            await sink.commit(_batch(2, 1, 4, 6), ["lost"])
        assert await sink.acquire(1) == {"orders": 4}
        assert await sink.commit(_batch(1, 1, 0, 4), ["one"]) is False
        assert await sink.commit(_batch(2, 1, 4, 6), ["two"])
        # Acquiring a task held already takes it over afresh, marker and all.
        assert await sink.acquire(1) == {"orders": 6}
        assert await sink.commit(_batch(3, 1, 6, 7), ["three"])
    assert await _values(kafka_bootstrap, out) == [b"one", b"two", b"three"]


async def test_an_unknown_outcome_is_settled_by_the_tasks_marker(
    kafka_bootstrap: str, topics: Topics, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, context = topics.out, topics.context
    real = AIOKafkaProducer.commit_transaction
    faults: list[str] = []
    committed = anyio.Event()

    async def faulty_commit(self: AIOKafkaProducer) -> None:
        fault = faults.pop(0) if faults else ""
        if fault == "before":
            raise KafkaTimeoutError("injected before the commit")
        await real(self)
        if fault == "after":
            raise KafkaTimeoutError("injected after the commit")
        if fault == "hang":
            committed.set()
            await anyio.sleep_forever()

    monkeypatch.setattr(AIOKafkaProducer, "commit_transaction", faulty_commit)
    async with Worker(kafka_bootstrap, out, context) as sink:
        assert await sink.acquire(0) == {}
        # Committed, then reported a timeout: the re-read marker says written.
        faults.append("after")
        assert await sink.commit(_batch(1, 0, 0, 2), ["one"])
        assert await sink.commit(_batch(1, 0, 0, 2), ["one"]) is False
        # Never committed: the re-read marker says rolled back.
        faults.append("before")
        with pytest.raises(SinkError, match="rolled back") as caught:
            await sink.commit(_batch(2, 0, 2, 4), ["two-lost"])
        assert caught.value.retriable
        assert await sink.commit(_batch(2, 0, 2, 4), ["two"])
        # Cancelled after it committed: the next call settles it first.
        faults.append("hang")
        async with anyio.create_task_group() as tg:
            tg.start_soon(sink.commit, _batch(3, 0, 4, 6), ["three"])
            await committed.wait()
            tg.cancel_scope.cancel()
        assert await sink.commit(_batch(3, 0, 4, 6), ["three"]) is False
        assert await sink.commit(_batch(4, 0, 6, 7), ["four"])
        # Idle batches (no input: empty ranges at the marker, as a window
        # closes on the clock) leave the offset where it was: the marker's
        # batch tag settles them.
        faults.append("after")
        assert await sink.commit(_idle(5, 0, 7), ["five"])
        assert await sink.commit(_idle(5, 0, 7), ["five"]) is False
        faults.append("before")
        with pytest.raises(SinkError, match="rolled back"):
            await sink.commit(_idle(6, 0, 7), ["six-lost"])
        assert await sink.commit(_idle(6, 0, 7), ["six"])
        assert await sink.commit(_batch(7, 0, 7, 8), ["seven"])
    async with Worker(kafka_bootstrap, out, context) as again:
        assert await again.acquire(0) == {"orders": 8}
        assert await again.commit(_batch(7, 0, 7, 8), ["seven"]) is False
        assert await again.commit(_idle(8, 0, 8), ["eight"])
    assert await _values(kafka_bootstrap, out) == [
        b"one",
        b"two",
        b"three",
        b"four",
        b"five",
        b"six",
        b"seven",
        b"eight",
    ]


class _Markers:
    """A producer's ``committed`` over fixed marker groups (no broker)."""

    def __init__(self, found: dict[str, OffsetAndMetadata]) -> None:
        self.found = found

    async def committed(self, group: str, tp: TopicPartition) -> OffsetAndMetadata | None:
        return self.found.get(group)


async def test_of_two_marker_groups_at_one_offset_the_one_written_now_names_the_batch(
    tmp_path: Path,
) -> None:
    """After consume_from is added the plain group keeps an older marker at the offset an
    idle batch leaves unchanged: its batch must not be taken for the idle batch's."""
    sink = KafkaSink("out", bootstrap_servers="127.0.0.1:1")
    sink._context = _context(tmp_path, "src")
    sink._marker_groups = ("now", "plain")
    producer = _Markers(
        {
            "now": OffsetAndMetadata(10, "streamlet-task/2 10 sid:12:12000"),
            "plain": OffsetAndMetadata(10, "streamlet-task/1 7"),
        }
    )
    marker, marked = await sink._read_task_marker(producer, 0)  # type: ignore[arg-type]
    assert (marker, marked) == ({"orders": 10}, {"orders": "sid:12:12000"})
    producer.found["plain"] = OffsetAndMetadata(11, "streamlet-task/2 10 sid:13:13000")
    marker, marked = await sink._read_task_marker(producer, 0)  # type: ignore[arg-type]
    assert (marker, marked) == ({"orders": 11}, {"orders": "sid:13:13000"})


async def test_consume_from_offsets_commit_with_the_task_marker(
    kafka_bootstrap: str, topics: Topics
) -> None:
    out, src, context = topics.out, topics.src, topics.context
    group = f"src-{uuid.uuid4().hex[:8]}"
    source = FakeSource("orders", src, group)
    async with Worker(kafka_bootstrap, out, context) as plain:
        assert await plain.acquire(1) == {}
        assert await plain.commit(_batch(1, 1, 0, 4), ["one"])
    # consume_from added: the marker is found under the plain name too.
    async with Worker(kafka_bootstrap, out, context, consume_from=source) as sink:
        marker = task_marker_group(context, group)
        assert sink.marker_group == marker
        assert java_string_hash(marker) == java_string_hash(group)
        assert await sink.acquire(1) == {"orders": 4}
        assert await sink.commit(_batch(1, 1, 0, 4), ["one"]) is False
        assert await sink.commit(_batch(2, 1, 4, 6), ["two"])
    async with admin_client(kafka_bootstrap) as admin:
        await _offsets_become(admin, group, {TopicPartition(src, 1): OffsetAndMetadata(6, "")})
        await _offsets_become(
            admin,
            marker,
            {TopicPartition(src, 1): OffsetAndMetadata(6, "streamlet-task/2 4 sid:2:2000")},
        )
    async with Worker(kafka_bootstrap, out, context, consume_from=source) as again:
        assert await again.acquire(1) == {"orders": 6}
    assert await _values(kafka_bootstrap, out) == [b"one", b"two"]


async def test_without_transactions_there_is_nothing_to_acquire(
    kafka_bootstrap: str, topics: Topics
) -> None:
    out, context = topics.out, topics.context
    async with Worker(kafka_bootstrap, out, context, transactional=False) as sink:
        assert await sink.acquire(0) is None
        assert await sink.commit(_batch(1, 0, 0, 2), ["a"])
        assert await sink.commit(_batch(1, 0, 0, 2), ["a"])  # at-least-once
        await sink.release(0)
        assert await sink.last_committed() is None
    assert await _values(kafka_bootstrap, out) == [b"a", b"a"]


async def test_sources_sharing_a_topic_are_refused_in_group_mode(tmp_path: Path) -> None:
    context = _context(tmp_path, "in")._replace(source_topics={"a": "in", "b": "in"})
    sink = KafkaSink("out", bootstrap_servers="127.0.0.1:1", open_timeout=1)
    with pytest.raises(ConfigError, match="several sources read in"):
        await sink.open(context)
