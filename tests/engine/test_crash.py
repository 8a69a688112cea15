"""SIGKILL the worker at every step of the commit protocol, and at random; count every record.

The worker is a real ``streamlet run`` subprocess with a direct source
(``SequenceSource``) and a receiver, writing to a FileSink and a SQLiteSink.
After each kill it is restarted on the same state directory; in the end every
input number must be in each sink exactly once.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from streamlet.sinks.file import FileSink
from streamlet.wal.tools import verify

DIRECT = 400  # numbers from the SequenceSource
RECEIVED = 400  # numbers from the receiver

APP = '''
import anyio
import streamlet as sl
from streamlet.records import Record
from streamlet.sinks.file import FileSink
from streamlet.sinks.sqlite import SQLiteSink
from streamlet.sources.receiver import Receiver


class Numbers(Receiver):
    """Stores "r:1".."r:{received}" and resumes after what is durable."""

    async def run(self, context):
        n = context.acks.get("n", 0)
        while n < {received} and not context.stopping.is_set():
            n += 1
            await context.store([Record(b"r:%d" % n)], acks={{"n": n}})
            await anyio.sleep(0.002)
        await context.stopping.wait()


def insert(conn, batch, outputs):
    conn.executemany("INSERT INTO seen (value) VALUES (?)", [(o,) for o in outputs])


app = sl.App("crashy", state_dir={state!r}, batch_interval=0.05, block_interval=0.01,
             checkpoint_interval=0.2)
seq = app.source(sl.SequenceSource(rate=None, limit={direct}, max_rate=400,
                 value=lambda p, o: b"s:%d" % (o + 1)), name="seq")
numbers = app.source(Numbers(), name="numbers")


@app.handler([seq, numbers], sink=FileSink({files!r}))
async def to_files(batch):
    return [r.value.decode() for r in batch]


@app.handler([seq, numbers], sink=SQLiteSink({db!r}, insert,
             table_ddl="CREATE TABLE IF NOT EXISTS seen (value TEXT NOT NULL)"))
async def to_db(batch):
    return [r.value.decode() for r in batch]
'''

EXPECTED = Counter(
    [f"s:{i}" for i in range(1, DIRECT + 1)] + [f"r:{i}" for i in range(1, RECEIVED + 1)]
)


def _setup(tmp_path: Path) -> Path:
    (tmp_path / "crashy.py").write_text(
        APP.format(
            state=str(tmp_path / "state"),
            files=str(tmp_path / "files"),
            db=str(tmp_path / "out.db"),
            direct=DIRECT,
            received=RECEIVED,
        )
    )
    return tmp_path


def _start(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "streamlet", "run", "crashy:app", "--quiet", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _outputs(cwd: Path) -> tuple[Counter[str], Counter[str], set[int], set[int]]:
    parts = FileSink.read_committed(cwd / "files")
    in_files = Counter(line.decode() for lines in parts.values() for line in lines)
    with sqlite3.connect(cwd / "out.db") as conn:
        in_db = Counter(v for (v,) in conn.execute("SELECT value FROM seen"))
        db_batches = {b for (b,) in conn.execute("SELECT batch_id FROM streamlet_batches")}
    conn.close()
    return in_files, in_db, set(parts), db_batches


def _finish(cwd: Path) -> None:
    """Run until every number is in, then check both sinks and the logs."""
    deadline = time.monotonic() + 60
    while True:
        worker = _start(cwd, "--duration", "1.5")
        _, stderr = worker.communicate(timeout=60)
        assert worker.returncode == 0, stderr
        in_files, in_db, file_batches, db_batches = _outputs(cwd)
        if set(in_files) >= set(EXPECTED) or time.monotonic() > deadline:
            break
    duplicated = {v: n for v, n in in_files.items() if n > 1}
    assert duplicated == {}, f"duplicated in files: {sorted(duplicated)[:10]}"
    assert in_files == EXPECTED, f"missing in files: {sorted(set(EXPECTED) - set(in_files))[:10]}"
    assert in_db == EXPECTED
    assert file_batches == db_batches
    for log in ("tracker", "data"):
        assert verify(cwd / "state" / log).problem is None


@pytest.mark.parametrize(
    "point", ["after_allocate", "after_handler", "after_sink_commit", "before_done", "after_done"]
)
def test_a_kill_at_each_commit_step_loses_and_repeats_nothing(tmp_path: Path, point: str) -> None:
    cwd = _setup(tmp_path)
    worker = _start(cwd, "--duration", "30", env={"STREAMLET_CRASH_AT": f"{point}:4"})
    _, stderr = worker.communicate(timeout=60)
    assert worker.returncode == -signal.SIGKILL, stderr
    _, _, file_batches, db_batches = _outputs(cwd)
    # The kill came where it was asked to: batch 4's sinks hold it only from
    # the sink-commit step on.
    committed = point in ("after_sink_commit", "before_done", "after_done")
    assert (4 in file_batches) == committed
    assert (4 in db_batches) == committed
    assert max(file_batches) == (4 if committed else 3)
    _finish(cwd)


def test_random_kills_lose_and_repeat_nothing(tmp_path: Path) -> None:
    cwd = _setup(tmp_path)
    rng = random.Random(int(os.environ.get("STREAMLET_TEST_SEED", "20261125")))
    kills = 0
    for _ in range(12):
        worker = _start(cwd, "--duration", "30")
        time.sleep(rng.uniform(0.3, 1.2))
        worker.send_signal(signal.SIGKILL)
        worker.communicate(timeout=30)
        kills += 1
    assert kills == 12
    _finish(cwd)
