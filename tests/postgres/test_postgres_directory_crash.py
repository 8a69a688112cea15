"""DirectorySource → PostgresSink through a kill at every commit step and twenty random SIGKILLs.

A real ``streamlet run`` worker reads the lines of the files of a directory
(they appear by rename, some while it runs) and writes each to a PostgreSQL
table through PostgresSink; finished files are moved to ``done/``. It is
SIGKILLed at each named step of the commit protocol, then at random twenty
times, always restarted on the same state directory; then it runs until
every line is in. Every line must be in the table exactly once, and every
file in ``done/``.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import anyio
import asyncpg

from streamlet._faults import POINTS

FILES = 12
LINES = 1000  # per file

APP = """
import streamlet as sl


async def insert(conn, batch, outputs):
    await conn.copy_records_to_table("seen", records=outputs, columns=["value"])


app = sl.App("pgdir", state_dir={state!r}, batch_interval=0.1, checkpoint_interval=0.5)
lines = app.source(
    sl.DirectorySource({inbox!r}, pattern="*.txt", finished="move", max_rate=1500),
    name="lines",
)


@app.handler(lines, sink=sl.PostgresSink({dsn!r}, insert, retry_timeout=30,
             table_ddl="CREATE TABLE IF NOT EXISTS seen (value bigint NOT NULL)"))
async def to_postgres(batch):
    return [(int(r.value),) for r in batch]
"""


def _write_file(inbox: Path, index: int) -> None:
    """File ``index`` holds the numbers index*LINES .. +LINES-1, renamed into place whole."""
    body = "".join(f"{index * LINES + n}\n" for n in range(LINES))
    hidden = inbox / f".file-{index:03d}.txt"
    hidden.write_text(body)
    hidden.rename(inbox / f"file-{index:03d}.txt")


def _start(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "streamlet", "run", "pgdir:app", "--quiet", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def _values(dsn: str) -> Counter[int]:
    conn = await asyncpg.connect(dsn)
    try:
        return Counter(r["value"] for r in await conn.fetch("SELECT value FROM seen"))
    finally:
        await conn.close()


async def test_directory_to_postgres_exactly_once_through_every_commit_step_and_twenty_kills(
    tmp_path: Path, pg_database: str
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for index in range(FILES // 2):
        _write_file(inbox, index)
    (tmp_path / "pgdir.py").write_text(
        APP.format(state=str(tmp_path / "state"), inbox=str(inbox), dsn=pg_database)
    )

    for n, point in enumerate(POINTS):
        if point == "after_state_commit":
            continue  # the app keeps no keyed state
        worker = _start(
            tmp_path, "--duration", "60", env={"STREAMLET_CRASH_AT": f"{point}:{3 + 2 * n}"}
        )
        _, stderr = await anyio.to_thread.run_sync(worker.communicate)
        assert worker.returncode == -signal.SIGKILL, stderr.decode()[-3000:]

    rng = random.Random(int(os.environ.get("STREAMLET_TEST_SEED", "20261204")))
    for kill in range(20):
        if kill % 3 == 0 and kill // 3 + FILES // 2 < FILES:
            _write_file(inbox, kill // 3 + FILES // 2)  # more files arrive meanwhile
        worker = _start(tmp_path)
        await anyio.sleep(rng.uniform(0.6, 1.4))
        worker.send_signal(signal.SIGKILL)
        await anyio.to_thread.run_sync(worker.communicate)
    for index in range(FILES):
        if (
            not (inbox / f"file-{index:03d}.txt").exists()
            and not (inbox / "done" / f"file-{index:03d}.txt").exists()
        ):
            _write_file(inbox, index)

    expected = Counter(range(FILES * LINES))
    with anyio.fail_after(120):
        while True:
            worker = _start(tmp_path, "--duration", "3")
            _, stderr = await anyio.to_thread.run_sync(worker.communicate)
            assert worker.returncode == 0, stderr.decode()[-3000:]
            seen = await _values(pg_database)
            if set(seen) >= set(expected):
                break
    duplicated = sorted(v for v, n in seen.items() if n > 1)
    assert duplicated == [], f"{len(duplicated)} lines written twice, e.g. {duplicated[:5]}"
    assert seen == expected
    assert sorted(p.name for p in (inbox / "done").iterdir()) == [
        f"file-{i:03d}.txt" for i in range(FILES)
    ]
