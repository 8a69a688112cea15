"""What operators do to a state directory, done to real worker processes.

Restoring a backup of the state directory alone, wiping it, or starting a
second copy must never make a sink skip new input or write old input again:
each is refused with an error that says what to do.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import orjson

from streamlet.sinks.file import FileSink
from tests.engine.test_cli import streamlet_cli

APP = """
import os

import streamlet as sl

app = sl.App("backups", state_dir="state", batch_interval=0.05, checkpoint_interval=0)
numbers = app.source(
    sl.SequenceSource(rate=None, limit=int(os.environ["LIMIT"]), max_rate=400), name="numbers"
)


DDL = "CREATE TABLE IF NOT EXISTS seen (n INTEGER NOT NULL)"


def insert(conn, batch, outputs):
    conn.executemany("INSERT INTO seen (n) VALUES (?)", [(n,) for n in outputs])


@app.handler(numbers, sink=sl.FileSink("out/files"))
async def to_files(batch: sl.Batch) -> list[int]:
    return [int(r.value) for r in batch]


@app.handler(
    numbers,
    sink=sl.SQLiteSink("out/seen.db", insert, table_ddl=DDL),
)
async def to_sqlite(batch: sl.Batch) -> list[int]:
    return [int(r.value) for r in batch]
"""


def _run(cwd: Path, limit: int, *extra: str) -> subprocess.CompletedProcess[str]:
    return streamlet_cli(
        cwd, "run", "backupapp:app", "--duration", "2", *extra, env={"LIMIT": str(limit)}
    )


def _outputs(cwd: Path) -> tuple[list[int], list[int]]:
    files = FileSink.read_committed(cwd / "out" / "files")
    in_files = sorted(orjson.loads(line) for lines in files.values() for line in lines)
    with sqlite3.connect(cwd / "out" / "seen.db") as conn:
        in_db = sorted(n for (n,) in conn.execute("SELECT n FROM seen"))
    conn.close()
    return in_files, in_db


def test_a_restored_backup_of_the_state_alone_is_refused_and_nothing_is_skipped(
    tmp_path: Path,
) -> None:
    (tmp_path / "backupapp.py").write_text(APP)
    first = _run(tmp_path, 100)
    assert first.returncode == 0, first.stderr
    shutil.copytree(tmp_path / "state", tmp_path / "backup")
    second = _run(tmp_path, 300)
    assert second.returncode == 0, second.stderr
    assert _outputs(tmp_path) == (list(range(300)), list(range(300)))
    shutil.move(tmp_path / "state", tmp_path / "newest")

    # The operator restores the older backup of the state directory alone.
    shutil.copytree(tmp_path / "backup", tmp_path / "state")
    started = time.monotonic()
    refused = _run(tmp_path, 500)
    assert refused.returncode == 2, refused.stderr
    assert time.monotonic() - started < 30
    assert "error: sink " in refused.stderr
    assert "holds batches up to" in refused.stderr
    assert "Restore the newest copy of the state directory" in refused.stderr
    # Nothing was written, skipped or repeated.
    assert _outputs(tmp_path) == (list(range(300)), list(range(300)))

    # Doing what the message says: the newest state resumes where it stopped.
    shutil.rmtree(tmp_path / "state")
    shutil.move(tmp_path / "newest", tmp_path / "state")
    resumed = _run(tmp_path, 500)
    assert resumed.returncode == 0, resumed.stderr
    assert _outputs(tmp_path) == (list(range(500)), list(range(500)))


def test_a_wiped_state_directory_is_refused_by_the_sinks_that_hold_its_outputs(
    tmp_path: Path,
) -> None:
    (tmp_path / "backupapp.py").write_text(APP)
    first = _run(tmp_path, 100)
    assert first.returncode == 0, first.stderr
    shutil.rmtree(tmp_path / "state")
    refused = _run(tmp_path, 200)
    assert refused.returncode == 2, refused.stderr
    assert "another state directory" in refused.stderr
    assert _outputs(tmp_path) == (list(range(100)), list(range(100)))


def test_a_second_worker_on_a_live_state_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "backupapp.py").write_text(APP)
    # A slow first worker: it holds the lock for the whole of its run.
    live = subprocess.Popen(
        [*_cli(), "run", "backupapp:app", "--duration", "6"],
        cwd=tmp_path,
        env=_env(400),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "state" / "app.json").exists():
            assert time.monotonic() < deadline, "the first worker never started"
            time.sleep(0.05)
        second = _run(tmp_path, 400)
        assert second.returncode == 2, second.stderr
        assert "is in use" in second.stderr
    finally:
        _, stderr = live.communicate(timeout=60)
    assert live.returncode == 0, stderr
    assert _outputs(tmp_path) == (list(range(400)), list(range(400)))


def _cli() -> list[str]:
    return [sys.executable, "-m", "streamlet"]


def _env(limit: int) -> dict[str, str]:
    return {**os.environ, "LIMIT": str(limit)}
