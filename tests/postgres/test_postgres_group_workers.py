"""Group mode with PostgresSink: worker processes join, die and take tasks over, exactly once.

Worker A starts alone on a four-partition topic and owns every task; worker B
joins, and the rebalance moves half the tasks to it (B's acquire fences A
and reads where each task resumes from streamlet_offsets); more records
arrive; then A is SIGKILLed mid-batch, and after the session timeout B takes
A's tasks over too. Every record must be in the table once, and each
partition's offset row must stand at its end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import anyio
import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from tests.conftest import TopicFactory

pytestmark = pytest.mark.kafka

PARTITIONS = 4
WAVE = 12_000  # records produced before A starts, and again once B owns tasks

APP = """
import os

import streamlet as sl


async def insert(conn, batch, outputs):
    await conn.copy_records_to_table("seen", records=outputs, columns=["value", "worker"])


app = sl.App("pggroup", state_dir=os.environ["STATE"], batch_interval=0.1,
             group="pggroup-{topic}", session_timeout=6.0)
numbers = app.source(
    sl.KafkaSource({topic!r}, bootstrap_servers={bootstrap!r}, start="earliest", max_rate=2000),
    name="numbers",
)


@app.handler(numbers, sink=sl.PostgresSink({dsn!r}, insert, retry_timeout=30,
             table_ddl="CREATE TABLE IF NOT EXISTS seen (value bigint NOT NULL, worker text)"))
async def to_postgres(batch):
    return [(int(r.value), os.environ["WORKER"]) for r in batch]
"""


async def _produce(bootstrap: str, topic: str, first: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20)
    await producer.start()
    try:
        pending = [
            await producer.send(topic, b"%d" % i, partition=i % PARTITIONS)
            for i in range(first, first + WAVE)
        ]
        for future in pending:
            await future
    finally:
        await producer.stop()


def _start(cwd: Path, name: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as stderr:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "streamlet",
                "run",
                "pggroup:app",
                "--quiet",
                "--worker",
                name,
                "--log-level",
                "info",
            ],
            cwd=cwd,
            env={**os.environ, "STATE": str(cwd / f"state-{name}"), "WORKER": name},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


async def _rows(dsn: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql))
    except asyncpg.UndefinedTableError:
        return []
    finally:
        await conn.close()


async def _count(dsn: str, worker: str | None = None) -> int:
    where = f" WHERE worker = '{worker}'" if worker else ""
    rows = await _rows(dsn, f"SELECT count(*) FROM seen{where}")  # noqa: S608 - test names
    return int(rows[0][0]) if rows else 0


async def _until(check: object, what: str, workers: list[subprocess.Popen[bytes]]) -> None:
    with anyio.fail_after(60):
        while not await check():  # type: ignore[operator]
            for w in workers:
                assert w.poll() is None, f"a worker stopped while waiting for {what}"
            await anyio.sleep(0.2)


async def test_workers_join_die_and_take_tasks_over_and_every_record_is_written_once(
    tmp_path: Path, kafka_bootstrap: str, new_topic: TopicFactory, pg_database: str
) -> None:
    topic = await new_topic(partitions=PARTITIONS)
    await _produce(kafka_bootstrap, topic, 0)
    (tmp_path / "pggroup.py").write_text(
        APP.format(topic=topic, bootstrap=kafka_bootstrap, dsn=pg_database)
    )
    a = _start(tmp_path, "a", tmp_path / "a.log")
    b: subprocess.Popen[bytes] | None = None
    try:

        async def a_wrote() -> bool:
            return await _count(pg_database, "a") >= 1000

        await _until(a_wrote, "worker a's first rows", [a])
        b = _start(tmp_path, "b", tmp_path / "b.log")

        async def b_wrote() -> bool:
            return await _count(pg_database, "b") >= 500

        async def b_joined() -> bool:
            return "this worker owns tasks [" in (tmp_path / "b.log").read_text()

        await _until(b_joined, "worker b's first tasks", [a, b])
        await _produce(kafka_bootstrap, topic, WAVE)
        await _until(b_wrote, "worker b's first rows after the rebalance", [a, b])
        a.send_signal(signal.SIGKILL)
        a.wait()

        async def all_in() -> bool:
            return await _count(pg_database) >= 2 * WAVE

        await _until(all_in, "every record", [b])
        b.send_signal(signal.SIGTERM)
        with anyio.fail_after(30):
            await anyio.to_thread.run_sync(b.wait)
        assert b.returncode == 0, (tmp_path / "b.log").read_text()[-3000:]
    finally:
        for w in (a, b):
            if w is not None and w.poll() is None:
                w.kill()
                w.wait()
    seen = Counter(r["value"] for r in await _rows(pg_database, "SELECT value FROM seen"))
    duplicated = sorted(v for v, n in seen.items() if n > 1)
    assert duplicated == [], f"{len(duplicated)} duplicated, e.g. {duplicated[:5]}"
    assert seen == Counter(range(2 * WAVE))
    offsets = await _rows(
        pg_database,
        "SELECT partition, next_offset FROM streamlet_offsets ORDER BY partition",
    )
    assert [tuple(r) for r in offsets] == [(p, 2 * WAVE // PARTITIONS) for p in range(PARTITIONS)]
    # Both workers wrote, and the batch rows record each worker's state directory.
    by_worker = await _rows(pg_database, "SELECT count(DISTINCT state_id) FROM streamlet_batches")
    assert by_worker[0][0] == 2
