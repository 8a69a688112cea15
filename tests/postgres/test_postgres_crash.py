"""Kafka → PostgresSink through a kill at every commit step and twenty random SIGKILLs.

A real ``streamlet run`` worker reads keyed records from a Kafka topic (four
partitions) and writes each to a PostgreSQL table through PostgresSink. It is
first SIGKILLed at each named step of the commit protocol (a different
batch each time), then at random twenty times, always restarted on the same
state directory; then it runs until every record is in. Every record must be
in the table exactly once, and streamlet_offsets must hold each partition's
end.
"""

from __future__ import annotations

import json
import os
import random
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

RECORDS = 12_000
PARTITIONS = 4
KILLS = 20
POINTS = ("after_allocate", "after_handler", "after_sink_commit", "before_done", "after_done")

APP = """
import streamlet as sl


async def insert(conn, batch, outputs):
    await conn.copy_records_to_table("seen", records=outputs, columns=["value"])


app = sl.App("pgcrash", state_dir={state!r}, batch_interval=0.1, checkpoint_interval=0.5)
numbers = app.source(
    sl.KafkaSource({topic!r}, bootstrap_servers={bootstrap!r}, start="earliest", max_rate=600),
    name="numbers",
)


@app.handler(numbers, sink=sl.PostgresSink({dsn!r}, insert, retry_timeout=30,
             table_ddl="CREATE TABLE IF NOT EXISTS seen (value bigint NOT NULL)"))
async def to_postgres(batch):
    return [(int(r.value),) for r in batch]
"""


async def _produce(bootstrap: str, topic: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20)
    await producer.start()
    try:
        pending = [
            await producer.send(topic, b"%d" % i, partition=i % PARTITIONS) for i in range(RECORDS)
        ]
        for future in pending:
            await future
    finally:
        await producer.stop()


def _start(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "streamlet", "run", "pgapp:app", "--quiet", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def _fetch(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def _batch_committed(dsn: str, state: Path, batch_id: int) -> bool:
    state_id = json.loads((state / "app.json").read_text())["state_id"]
    rows = await _fetch(
        dsn,
        "SELECT 1 FROM streamlet_batches WHERE app = 'pgcrash' AND state_id = $1 AND batch_id = $2",
        state_id,
        batch_id,
    )
    return bool(rows)


async def test_kafka_to_postgres_exactly_once_through_every_commit_step_and_twenty_kills(
    tmp_path: Path, kafka_bootstrap: str, new_topic: TopicFactory, pg_database: str
) -> None:
    topic = await new_topic(partitions=PARTITIONS)
    await _produce(kafka_bootstrap, topic)
    state = tmp_path / "state"
    (tmp_path / "pgapp.py").write_text(
        APP.format(state=str(state), topic=topic, bootstrap=kafka_bootstrap, dsn=pg_database)
    )

    # A kill at each step of the commit protocol, a later batch each time.
    for n, point in enumerate(POINTS):
        batch_id = 3 + 2 * n
        worker = _start(
            tmp_path, "--duration", "60", env={"STREAMLET_CRASH_AT": f"{point}:{batch_id}"}
        )
        _, stderr = await anyio.to_thread.run_sync(worker.communicate)
        assert worker.returncode == -signal.SIGKILL, stderr.decode()[-3000:]
        # The kill came where it was asked: the sink holds the batch from the
        # sink-commit step on, and not before.
        committed = point in ("after_sink_commit", "before_done", "after_done")
        assert await _batch_committed(pg_database, state, batch_id) == committed, point

    (before,) = await _fetch(pg_database, "SELECT count(*) FROM seen")
    seed = int(os.environ.get("STREAMLET_TEST_SEED", "1515"))
    rng = random.Random(seed)
    for _ in range(KILLS):
        worker = _start(tmp_path)
        # Some kills land while the worker starts or recovers, most mid-batch.
        await anyio.sleep(rng.uniform(0.7, 1.7))
        worker.send_signal(signal.SIGKILL)
        await anyio.to_thread.run_sync(worker.communicate)
        assert worker.returncode == -signal.SIGKILL

    (after,) = await _fetch(pg_database, "SELECT count(*) FROM seen")
    assert after[0] > before[0], "the killed workers never committed a batch"

    with anyio.fail_after(120):
        while True:
            worker = _start(tmp_path, "--duration", "4")
            _, stderr = await anyio.to_thread.run_sync(worker.communicate)
            assert worker.returncode == 0, stderr.decode()[-3000:]
            (count,) = await _fetch(pg_database, "SELECT count(DISTINCT value) FROM seen")
            if count[0] >= RECORDS:
                break

    seen = Counter(r["value"] for r in await _fetch(pg_database, "SELECT value FROM seen"))
    duplicated = sorted(v for v, n in seen.items() if n > 1)
    assert duplicated == [], f"{len(duplicated)} duplicated, e.g. {duplicated[:5]} (seed {seed})"
    assert seen == Counter(range(RECORDS)), f"seed {seed}"
    offsets = await _fetch(
        pg_database,
        "SELECT partition, next_offset FROM streamlet_offsets WHERE app = 'pgcrash'"
        " ORDER BY partition",
    )
    assert [tuple(r) for r in offsets] == [(p, RECORDS // PARTITIONS) for p in range(PARTITIONS)]
