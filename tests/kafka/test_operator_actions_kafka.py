"""Operators' actions against the Kafka → Kafka example, with real workers and the real broker.

A wiped state directory, a second worker with a state directory of its own,
and a backup of the state directory restored alone must each be refused by
the KafkaSink, and the output topic must hold every input exactly once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import anyio
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from tests.conftest import TopicFactory

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.kafka
TARGET = "examples.kafka_to_kafka:app"
STATE = Path(".streamlet") / "order_totals"


async def _produce(bootstrap: str, topic: str, start: int, count: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for i in range(start, start + count):
            order = {"customer": f"c{i % 5}", "items": [{"price": 1.0, "qty": 1}]}
            await producer.send(topic, orjson.dumps(order), key=b"k%d" % i)
        await producer.flush()
    finally:
        await producer.stop()


async def _run(
    cwd: Path, env: dict[str, str], *args: str, duration: float = 3
) -> subprocess.CompletedProcess[bytes]:
    command = [sys.executable, "-m", "streamlet", "run", TARGET, "--duration", str(duration)]
    with anyio.fail_after(120):
        return await anyio.run_process([*command, *args], cwd=cwd, env=env, check=False)


async def _totals(bootstrap: str, topic: str, expected: int) -> list[tuple[int, int]]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
    )
    await consumer.start()
    found: list[tuple[int, int]] = []
    try:
        with anyio.fail_after(60):
            while len(found) < expected:
                got = await consumer.getmany(timeout_ms=1000)
                for messages in got.values():
                    for m in messages:
                        total = orjson.loads(m.value or b"")
                        found.append((total["partition"], total["offset"]))
        extra = await consumer.getmany(timeout_ms=1500)
        for messages in extra.values():
            found.extend((-1, m.offset) for m in messages)
    finally:
        await consumer.stop()
    return found


async def test_kafka_sink_refuses_a_wiped_a_second_and_a_restored_state_directory(
    tmp_path: Path, kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    orders = await new_topic(partitions=2)
    totals = await new_topic(partitions=2)
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    env = {
        **os.environ,
        "STREAMLET_KAFKA": kafka_bootstrap,
        "STREAMLET_TOPIC": orders,
        "STREAMLET_OUTPUT_TOPIC": totals,
    }
    fast = ("--batch-interval", "0.1")
    await _produce(kafka_bootstrap, orders, 0, 300)
    first = await _run(tmp_path, env, *fast)
    assert first.returncode == 0, first.stderr.decode()
    shutil.copytree(tmp_path / STATE, tmp_path / "backup")
    await _produce(kafka_bootstrap, orders, 300, 300)
    second = await _run(tmp_path, env, *fast)
    assert second.returncode == 0, second.stderr.decode()
    shutil.copytree(tmp_path / STATE, tmp_path / "newest")

    # A second worker with a state directory of its own (or the same app
    # run from another working directory: the state_dir is relative).
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(ROOT / "examples", elsewhere / "examples")
    other = await _run(elsewhere, env, *fast)
    assert other.returncode == 2, other.stderr.decode()
    assert "another state directory" in other.stderr.decode()
    assert "kafka-consumer-groups --delete" in other.stderr.decode()

    # The state directory wiped.
    shutil.rmtree(tmp_path / STATE)
    wiped = await _run(tmp_path, env, *fast)
    assert wiped.returncode == 2, wiped.stderr.decode()
    assert "another state directory" in wiped.stderr.decode()

    # A backup of the state directory restored alone.
    shutil.rmtree(tmp_path / STATE)
    shutil.copytree(tmp_path / "backup", tmp_path / STATE)
    restored = await _run(tmp_path, env, *fast)
    assert restored.returncode == 2, restored.stderr.decode()
    assert "holds batches up to" in restored.stderr.decode()

    # The newest state directory resumes, and new input goes through once.
    shutil.rmtree(tmp_path / STATE)
    shutil.copytree(tmp_path / "newest", tmp_path / STATE)
    await _produce(kafka_bootstrap, orders, 600, 300)
    resumed = await _run(tmp_path, env, *fast)
    assert resumed.returncode == 0, resumed.stderr.decode()

    found = await _totals(kafka_bootstrap, totals, 900)
    assert len(found) == 900
    assert len(set(found)) == 900


async def test_a_refused_second_worker_does_not_fence_the_running_one(
    tmp_path: Path, kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    orders = await new_topic(partitions=1)
    totals = await new_topic(partitions=1)
    shutil.copytree(ROOT / "examples", tmp_path / "a" / "examples")
    shutil.copytree(ROOT / "examples", tmp_path / "b" / "examples")
    env = {
        **os.environ,
        "STREAMLET_KAFKA": kafka_bootstrap,
        "STREAMLET_TOPIC": orders,
        "STREAMLET_OUTPUT_TOPIC": totals,
    }
    await _produce(kafka_bootstrap, orders, 0, 100)
    async with anyio.create_task_group() as tg:
        results: dict[str, subprocess.CompletedProcess[bytes]] = {}

        async def live() -> None:
            results["live"] = await _run(
                tmp_path / "a", env, "--batch-interval", "0.1", duration=12
            )

        tg.start_soon(live)
        # Wait until the live worker committed a batch: its marker exists.
        await _totals(kafka_bootstrap, totals, 100)
        second = await _run(tmp_path / "b", env, "--batch-interval", "0.1")
        assert second.returncode == 2, second.stderr.decode()
        assert "another state directory" in second.stderr.decode()
        # The live worker still commits (it was not fenced by the refused one).
        await _produce(kafka_bootstrap, orders, 100, 100)
    assert results["live"].returncode == 0, results["live"].stderr.decode()
    found = await _totals(kafka_bootstrap, totals, 200)
    assert sorted(found) == [(0, i) for i in range(200)]


BACKLOG_APP = """
import os

import streamlet as sl

SETTINGS = (("max_batch_records", "MAX_RECORDS"), ("max_batch_bytes", "MAX_BYTES"))
limits = {
    setting: int(os.environ[variable]) for setting, variable in SETTINGS if variable in os.environ
}
app = sl.App("backlog", state_dir="state", batch_interval=0.05, **limits)
source = app.source(
    sl.KafkaSource(os.environ["TOPIC"], bootstrap_servers=os.environ["KAFKA"], start="earliest"),
    name="in",
)


@app.handler(source, sink=sl.FileSink("out"))
async def keep(batch: sl.Batch) -> list[list[int]]:
    return [[r.partition, r.offset] for r in batch]
"""


@pytest.mark.parametrize(
    ("size", "max_records", "max_bytes", "bound"),
    [(100, None, None, 20_000), (100, 4_000, None, 4_000), (2_000, None, 2**20, 600)],
    ids=["defaults", "by-records", "by-bytes"],
)
async def test_a_fresh_start_on_a_backlog_drains_it_in_bounded_batches(
    tmp_path: Path,
    kafka_bootstrap: str,
    new_topic: TopicFactory,
    size: int,
    max_records: int | None,
    max_bytes: int | None,
    bound: int,
) -> None:
    """A worker started on a large backlog takes it over many batches, every record once."""
    from streamlet.sinks.file import FileSink

    topic = await new_topic(partitions=2)
    count = 20_000
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=20)
    await producer.start()
    try:
        for i in range(count):
            await producer.send(topic, b"x" * size, partition=i % 2)
        await producer.flush()
    finally:
        await producer.stop()
    (tmp_path / "backlogapp.py").write_text(BACKLOG_APP)
    env = {
        **os.environ,
        "KAFKA": kafka_bootstrap,
        "TOPIC": topic,
    }
    if max_records is not None:
        env["MAX_RECORDS"] = str(max_records)
    if max_bytes is not None:
        env["MAX_BYTES"] = str(max_bytes)
    command = [sys.executable, "-m", "streamlet", "run", "backlogapp:app", "--duration", "5"]
    with anyio.fail_after(120):
        run = await anyio.run_process(command, cwd=tmp_path, env=env, check=False)
    assert run.returncode == 0, run.stderr.decode()
    sizes = [
        int(line.split(": ")[1].split(" records")[0])
        for line in run.stdout.decode().splitlines()
        if line.startswith("batch ")
    ]
    assert sum(sizes) == count
    assert sizes[0] <= 1_000  # before the records' size is known
    assert max(sizes[1:]) <= bound, sizes
    written = FileSink.read_committed(tmp_path / "out")
    positions = [tuple(orjson.loads(line)) for lines in written.values() for line in lines]
    assert sorted(positions) == sorted((i % 2, i // 2) for i in range(count))
