"""The Kafka examples, run as their docstrings say, against the test broker."""

from __future__ import annotations

import os
import shutil
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from streamlet.sinks.file import FileSink
from tests.conftest import TopicFactory
from tests.kafka.test_kafka_sink import _read_all

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.kafka


async def _crash_then_run(
    target: str, cwd: Path, env: dict[str, str], *, crashed: Sequence[str], then: Sequence[str]
) -> None:
    """``streamlet run target``: killed right after its first sink commit, then 3 s clean."""
    command = [sys.executable, "-m", "streamlet", "run", target]
    with anyio.fail_after(240):
        first = await anyio.run_process(
            [*command, "--duration", "20", *crashed],
            cwd=cwd,
            env={**env, "STREAMLET_CRASH_AT": "after_sink_commit:1"},
            check=False,
        )
        assert first.returncode == -9, first.stderr.decode()
        second = await anyio.run_process(
            [*command, "--duration", "3", *then], cwd=cwd, env=env, check=False
        )
    assert second.returncode == 0, second.stderr.decode()


async def test_kafka_to_sqlite_counts_every_view_once_and_dead_letters_bad_json(
    tmp_path: Path, kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    topic = await new_topic(partitions=2)
    pages = [f"/page/{i % 7}" for i in range(3000)]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        for i, page in enumerate(pages):
            await producer.send(topic, orjson.dumps({"page": page}), partition=i % 2)
        await producer.send_and_wait(topic, b"not json", partition=0)
    finally:
        await producer.stop()

    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    env = {**os.environ, "STREAMLET_KAFKA": kafka_bootstrap, "STREAMLET_TOPIC": topic}
    # A crash mid-batch first, then a clean run: counts must still be exact.
    await _crash_then_run(
        "examples.kafka_to_sqlite:app", tmp_path, env, crashed=(), then=("--batch-interval", "0.2")
    )
    with sqlite3.connect(tmp_path / "out" / "page_views.db") as conn:
        counted = dict(conn.execute("SELECT page, views FROM views"))
    conn.close()
    expected: dict[str, int] = {}
    for page in pages:
        expected[page] = expected.get(page, 0) + 1
    assert counted == expected
    dead = FileSink.read_committed(tmp_path / "out" / "page_views_dead")
    letters = [orjson.loads(line) for lines in dead.values() for line in lines]
    assert len(letters) == 1
    assert letters[0]["source"] == "views"
    assert letters[0]["partition"] == 0
    assert letters[0]["offset"] == 1500
    assert "JSONDecodeError" in letters[0]["error"]


async def test_kafka_to_kafka_writes_each_order_total_once_across_a_crash(
    tmp_path: Path, kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    from aiokafka import AIOKafkaConsumer

    orders_topic = await new_topic(partitions=2)
    totals_topic = await new_topic(partitions=2)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        for i in range(2000):
            order = {"customer": f"c{i % 9}", "items": [{"price": 1.25, "qty": i % 4 + 1}]}
            await producer.send(orders_topic, orjson.dumps(order), key=b"c%d" % (i % 9))
        await producer.flush()
    finally:
        await producer.stop()

    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    env = {
        **os.environ,
        "STREAMLET_KAFKA": kafka_bootstrap,
        "STREAMLET_TOPIC": orders_topic,
        "STREAMLET_OUTPUT_TOPIC": totals_topic,
    }
    fast = ("--batch-interval", "0.1")
    await _crash_then_run("examples.kafka_to_kafka:app", tmp_path, env, crashed=fast, then=fast)

    consumer = AIOKafkaConsumer(
        totals_topic,
        bootstrap_servers=kafka_bootstrap,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
    )
    await consumer.start()
    totals: list[dict[str, object]] = []
    try:
        with anyio.fail_after(60):
            while len(totals) < 2000:
                got = await consumer.getmany(timeout_ms=1000)
                totals.extend(orjson.loads(m.value or b"") for ms in got.values() for m in ms)
        extra = await consumer.getmany(timeout_ms=1000)
        assert not any(extra.values())
    finally:
        await consumer.stop()
    positions = [(t["partition"], t["offset"]) for t in totals]
    assert len(set(positions)) == 2000
    assert sum(int(t["cents"]) for t in totals) == sum(125 * (i % 4 + 1) for i in range(2000))  # type: ignore[call-overload]


async def test_running_counts_ends_at_each_users_exact_count_across_a_crash(
    tmp_path: Path, kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    clicks_topic = await new_topic(partitions=2)
    counts_topic = await new_topic(partitions=2)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        for i in range(3000):
            await producer.send(clicks_topic, b"click", key=b"u%d" % (i % 7))
        await producer.flush()
    finally:
        await producer.stop()
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    env = {
        **os.environ,
        "STREAMLET_KAFKA": kafka_bootstrap,
        "STREAMLET_TOPIC": clicks_topic,
        "STREAMLET_OUTPUT_TOPIC": counts_topic,
    }
    fast = ("--batch-interval", "0.1")
    # Killed after the first batch's transaction, before its state commits:
    # the batch runs again on the counts it saw, and the sink skips it.
    await _crash_then_run("examples.running_counts:app", tmp_path, env, crashed=fast, then=fast)

    seen: dict[str, list[int]] = {}
    for record in await _read_all(kafka_bootstrap, counts_topic, partitions=2):
        out = orjson.loads(record.value or b"")
        seen.setdefault(out["user"], []).append(out["count"])
    expected = {f"u{u}": len(range(u, 3000, 7)) for u in range(7)}
    assert {user: counts[-1] for user, counts in seen.items()} == expected
    for counts in seen.values():  # each batch's count once, only ever growing
        assert counts == sorted(set(counts))
