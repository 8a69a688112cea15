"""The PostgreSQL server restarts under a running worker: it waits, resumes, loses nothing.

A real ``streamlet run`` worker writes a SequenceSource's records to a
server of the test's own. Mid-run the server is shut down twice, fast
(clients disconnected, a checkpoint) and immediate (processes quit, crash
recovery at the next start), and each time stays down a while before it
starts again on the same port. The worker must keep running, wait for the
server, and go on; in the end every record is in the table exactly once.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import anyio
import asyncpg

from streamlet.testing.postgres import EmbeddedPostgres, ShutdownMode

PARTITIONS = 2
LIMIT = 2000  # records per partition

APP = """
import streamlet as sl


async def insert(conn, batch, outputs):
    await conn.executemany("INSERT INTO seen (partition, number) VALUES ($1, $2)", outputs)


app = sl.App("pgrestart", state_dir={state!r}, batch_interval=0.05, checkpoint_interval=0.5)
numbers = app.source(
    sl.SequenceSource(rate=None, limit={limit}, partitions={partitions}, max_rate=300),
    name="numbers",
)


@app.handler(numbers, sink=sl.PostgresSink({dsn!r}, insert, retry_timeout=60,
             table_ddl="CREATE TABLE IF NOT EXISTS seen (partition int, number bigint)"))
async def to_postgres(batch):
    return [(r.partition, r.offset) for r in batch]
"""


async def _count(dsn: str) -> int:
    """Rows in the table; 0 while the server is down or the table not there yet."""
    try:
        conn = await asyncpg.connect(dsn, timeout=2)
    except (OSError, asyncpg.PostgresError):
        return 0
    try:
        return int(await conn.fetchval("SELECT count(*) FROM seen"))
    except asyncpg.UndefinedTableError:
        return 0
    finally:
        await conn.close()


async def _grows_past(dsn: str, rows: int, worker: subprocess.Popen[bytes]) -> int:
    with anyio.fail_after(60):
        while (count := await _count(dsn)) < rows:
            assert worker.poll() is None, "the worker stopped"
            await anyio.sleep(0.1)
    return count


def _start(cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "streamlet", "run", "pgrestart:app", "--quiet"],
            cwd=cwd,
            env=os.environ.copy(),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


async def _restart(server: EmbeddedPostgres, mode: ShutdownMode) -> None:
    await anyio.to_thread.run_sync(lambda: server.restart(mode, down_for=1.5))


async def test_the_worker_waits_for_a_restarted_server_and_nothing_is_lost_or_doubled(
    tmp_path: Path, own_postgres: EmbeddedPostgres
) -> None:
    dsn = own_postgres.dsn
    (tmp_path / "pgrestart.py").write_text(
        APP.format(state=str(tmp_path / "state"), limit=LIMIT, partitions=PARTITIONS, dsn=dsn)
    )
    log = tmp_path / "worker.log"
    worker = _start(tmp_path, log)
    try:
        count = await _grows_past(dsn, 200, worker)
        await _restart(own_postgres, "fast")
        count = await _grows_past(dsn, count + 200, worker)
        await _restart(own_postgres, "immediate")
        await _grows_past(dsn, count + 200, worker)
        await _grows_past(dsn, PARTITIONS * LIMIT, worker)
        worker.send_signal(signal.SIGTERM)
        with anyio.fail_after(30):
            await anyio.to_thread.run_sync(worker.wait)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    output = log.read_text(errors="replace")
    assert worker.returncode == 0, output[-3000:]
    # The sink waited for the server at both restarts (and said so), rather
    # than the app stopping.
    waits = set(re.findall(r"batch (\d+): \w+.*\(attempt 1\); retrying in", output))
    assert len(waits) >= 2, output[-3000:]
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT partition, number FROM seen")
    finally:
        await conn.close()
    seen = Counter((r["partition"], r["number"]) for r in rows)
    duplicated = [k for k, n in seen.items() if n > 1]
    assert duplicated == [], f"{len(duplicated)} duplicated, e.g. {duplicated[:5]}"
    assert set(seen) == {(p, n) for p in range(PARTITIONS) for n in range(LIMIT)}
    assert own_postgres.password not in output
