"""Exactly-once from Kafka, through twenty SIGKILLs: Kafka, SQLite and file outputs, each once.

A real ``streamlet run`` worker reads 200,000 keyed records from a Kafka topic
(in direct mode, and in receiver mode through the data WAL) and writes every
record to a transactional KafkaSink, a SQLiteSink and a FileSink. It is
SIGKILLed at random at least twenty times and restarted each time on the same
state directory. In the end a ``read_committed`` consumer of the output topic
must see every record exactly once and in order per key, and the database and
files must hold every record exactly once.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from streamlet.sinks.file import FileSink
from streamlet.wal.tools import verify
from tests.conftest import TopicFactory

pytestmark = pytest.mark.kafka

RECORDS = 200_000
KEYS = 64
KILLS = 20

APP = """
import streamlet as sl
from streamlet.sinks.file import FileSink
from streamlet.kafka.sink import KafkaSink
from streamlet.sinks.sqlite import SQLiteSink


def insert(conn, batch, outputs):
    conn.executemany("INSERT INTO seen (value) VALUES (?)", [(o[1],) for o in outputs])


app = sl.App("eos-{mode}", state_dir={state!r}, batch_interval=0.2, checkpoint_interval=1.0)
source = sl.KafkaSource({topic!r}, bootstrap_servers={bootstrap!r}, group_id="eos-in-{mode}",
                        start="earliest", max_rate=5_000, mode={mode!r})
numbers = app.source(source, name="numbers")


def pairs(batch):
    return [(r.key, r.value) for r in batch]


@app.handler(numbers, sink=KafkaSink({output!r}, bootstrap_servers={bootstrap!r},
             key=lambda o: o[0], value=lambda o: o[1], consume_from=source, open_timeout=60))
async def to_kafka(batch):
    return pairs(batch)


@app.handler(numbers, sink=SQLiteSink({db!r}, insert,
             table_ddl="CREATE TABLE IF NOT EXISTS seen (value BLOB NOT NULL)"))
async def to_db(batch):
    return pairs(batch)


@app.handler(numbers, sink=FileSink({files!r}))
async def to_files(batch):
    return [r.value for r in batch]
"""


async def _produce(bootstrap: str, topic: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20)
    await producer.start()
    try:
        pending = []
        for i in range(RECORDS):
            key = b"k%d" % (i % KEYS)
            pending.append(await producer.send(topic, b"%d" % i, key=key))
            if len(pending) >= 5000:
                await anyio.lowlevel.checkpoint()
                for future in pending:
                    await future
                pending.clear()
        for future in pending:
            await future
    finally:
        await producer.stop()


async def _read_output(bootstrap: str, topic: str, want: int) -> list[tuple[bytes, bytes]]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    seen: list[tuple[bytes, bytes]] = []
    try:
        idle = 0
        while idle < 10:
            batches = await consumer.getmany(timeout_ms=500, max_records=50_000)
            got = [(m.key or b"", m.value or b"") for msgs in batches.values() for m in msgs]
            seen.extend(got)
            idle = 0 if got or len(seen) < want else idle + 1
            if len(seen) >= want and not got:
                idle += 1
    finally:
        await consumer.stop()
    return seen


def _start(cwd: Path, *args: str, capture: bool = False) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "streamlet", "run", "eosapp:app", "--quiet", *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE if capture else subprocess.DEVNULL,
    )


async def test_kafka_to_kafka_sqlite_and_files_exactly_once_through_twenty_kills(
    tmp_path: Path, kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    """Direct and receiver mode, side by side: each run mostly waits between kills."""
    async with anyio.create_task_group() as tg:
        for mode in ("direct", "receiver"):
            (tmp_path / mode).mkdir()
            tg.start_soon(_through_kills, tmp_path / mode, kafka_bootstrap, new_topic, mode)


async def _through_kills(
    tmp_path: Path, kafka_bootstrap: str, new_topic: TopicFactory, mode: str
) -> None:
    source_topic = await new_topic(partitions=4)
    output_topic = await new_topic(partitions=4)
    await _produce(kafka_bootstrap, source_topic)
    (tmp_path / "eosapp.py").write_text(
        APP.format(
            state=str(tmp_path / "state"),
            topic=source_topic,
            output=output_topic,
            bootstrap=kafka_bootstrap,
            db=str(tmp_path / "out.db"),
            files=str(tmp_path / "files"),
            mode=mode,
        )
    )
    seed = int(os.environ.get("STREAMLET_TEST_SEED", "777"))
    rng = random.Random(seed)
    for _ in range(KILLS):
        worker = _start(tmp_path)
        await anyio.sleep(rng.uniform(1.0, 2.5))
        worker.send_signal(signal.SIGKILL)
        await anyio.to_thread.run_sync(worker.wait)
        assert worker.returncode == -signal.SIGKILL

    # Finish: run until every record is in the database, then stop gracefully.
    with anyio.fail_after(300):
        while True:
            worker = _start(tmp_path, "--duration", "3", capture=True)
            _, stderr = await anyio.to_thread.run_sync(worker.communicate)
            assert worker.returncode == 0, stderr.decode()[-3000:]
            with sqlite3.connect(tmp_path / "out.db") as conn:
                (count,) = conn.execute("SELECT count(DISTINCT value) FROM seen").fetchone()
            conn.close()
            if count >= RECORDS:
                break

    expected = Counter(b"%d" % i for i in range(RECORDS))
    with sqlite3.connect(tmp_path / "out.db") as conn:
        in_db = Counter(bytes(v) for (v,) in conn.execute("SELECT value FROM seen"))
    conn.close()
    assert in_db == expected, f"{mode} mode, seed {seed}"
    parts = FileSink.read_committed(tmp_path / "files")
    in_files = Counter(line for lines in parts.values() for line in lines)
    assert in_files == expected, f"{mode} mode, seed {seed}"

    output = await _read_output(kafka_bootstrap, output_topic, RECORDS)
    in_kafka = Counter(value for _, value in output)
    duplicated = [v for v, n in in_kafka.items() if n > 1]
    assert duplicated == [], f"{len(duplicated)} duplicated in Kafka ({mode} mode, seed {seed})"
    assert in_kafka == expected, f"{mode} mode, seed {seed}"
    last: dict[bytes, int] = {}
    for key, value in output:
        number = int(value)
        assert number > last.get(key, -1), f"key {key!r} out of order at {number} (seed {seed})"
        last[key] = number
    for log in ("tracker", "data") if mode == "receiver" else ("tracker",):
        assert verify(tmp_path / "state" / log).problem is None
