"""Keyed state under SIGKILL: counts and sums per key stay exact, at each commit step and at random.

The worker is a real ``streamlet run`` process counting and summing the
values of each key; the outputs are each batch's increments per key. A
duplicate would inflate a count (idempotent outputs would hide it; counts
do not), and a lost batch would leave one short. In the end both the state
store and the sum of the outputs must equal the counts computed here.
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

import orjson
import pytest

from streamlet._faults import POINTS
from streamlet.sinks.file import FileSink

RECORDS = 100_000  # per partition, 2 partitions
KEYS = 997

APP = """
import streamlet as sl
from streamlet.sinks.file import FileSink
from streamlet.sinks.sqlite import SQLiteSink
from streamlet.windows import count, tumbling, windowed


def insert(conn, batch, outputs):
    conn.executemany("INSERT INTO deltas VALUES (?, ?, ?)", outputs)


app = sl.App("counter", state_dir={state!r}, batch_interval=0.02, checkpoint_interval=0.3)
numbers = app.source(
    sl.SequenceSource(
        rate=None,
        limit={records},
        partitions=2,
        max_rate=150_000,
        key=lambda p, o: b"k%d" % ((o * 2 + p) % {keys}),
        value=lambda p, o: b"%d" % (o * 2 + p),
    ),
    name="numbers",
)


def tally(batch, state):
    increments = {{}}
    for r in batch:
        n, total = increments.get(r.key, (0, 0))
        increments[r.key] = (n + 1, total + int(r.value))
    for key, (n, total) in increments.items():
        count, sum_ = state.get(key, (0, 0))
        state[key] = (count + n, sum_ + total)
    return [(key.decode(), n, total) for key, (n, total) in sorted(increments.items())]


@app.handler(numbers, sink=FileSink({files!r}), state=sl.State())
async def to_files(batch, state):
    return [list(t) for t in tally(batch, state)]


@app.handler(numbers, sink=SQLiteSink({db!r}, insert, table_ddl=(
    "CREATE TABLE IF NOT EXISTS deltas (k TEXT NOT NULL, n INTEGER NOT NULL, total INTEGER"
    " NOT NULL)")), state=sl.State())
async def to_db(batch, state):
    return tally(batch, state)


# Event time = the value in ms: 5 s windows of 5,000 values, exact counts.
WINDOW = tumbling(5.0, time="event", lateness=10.0)


@app.handler(numbers, sink=FileSink({windows!r}), state=sl.State())
async def per_window(batch, state):
    done = windowed(state, batch, WINDOW, count(), key=lambda r: "all",
                    event_time=lambda r: int(r.value) / 1000)
    assert not done.late, done.late[:3]
    return [[r.start, r.end, r.value] for r in done.results]
"""


def _expected() -> tuple[Counter[str], Counter[str]]:
    counts: Counter[str] = Counter()
    sums: Counter[str] = Counter()
    for v in range(2 * RECORDS):
        key = f"k{v % KEYS}"
        counts[key] += 1
        sums[key] += v
    return counts, sums


EXPECTED = _expected()


def _setup(tmp_path: Path) -> Path:
    (tmp_path / "counter.py").write_text(
        APP.format(
            state=str(tmp_path / "state"),
            files=str(tmp_path / "files"),
            db=str(tmp_path / "out.db"),
            windows=str(tmp_path / "windows"),
            records=RECORDS,
            keys=KEYS,
        )
    )
    return tmp_path


def _start(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "streamlet", "run", "counter:app", "--quiet", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stored(cwd: Path, handler: str) -> tuple[int, dict[str, tuple[int, int]]]:
    """The store's seq and its (count, sum) per key, read as ``streamlet state show`` does."""
    path = cwd / "state" / "state" / f"{handler}.sqlite"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        (seq,) = conn.execute("SELECT value FROM meta WHERE name = 'seq'").fetchone()
        rows = conn.execute("SELECT k, v FROM kv").fetchall()
    conn.close()
    values = {bytes(k)[1:].decode(): tuple(orjson.loads(v)) for k, v in rows}
    return int(seq), values  # type: ignore[return-value]


def _outputs(cwd: Path) -> tuple[Counter[str], Counter[str], Counter[str], Counter[str]]:
    """Counts and sums per key from the FileSink's and the SQLiteSink's increments."""
    file_counts: Counter[str] = Counter()
    file_sums: Counter[str] = Counter()
    for lines in FileSink.read_committed(cwd / "files").values():
        for line in lines:
            key, n, total = orjson.loads(line)
            file_counts[key] += n
            file_sums[key] += total
    db_counts: Counter[str] = Counter()
    db_sums: Counter[str] = Counter()
    with sqlite3.connect(cwd / "out.db") as conn:
        for key, n, total in conn.execute("SELECT k, n, total FROM deltas"):
            db_counts[key] += n
            db_sums[key] += total
    conn.close()
    return file_counts, file_sums, db_counts, db_sums


def _finish(cwd: Path) -> None:
    """Run to the end, then check the stores and the outputs against the exact figures."""
    counts, sums = EXPECTED
    deadline = time.monotonic() + 90
    while True:
        worker = _start(cwd, "--duration", "2")
        _, stderr = worker.communicate(timeout=90)
        assert worker.returncode == 0, stderr
        file_counts, file_sums, db_counts, db_sums = _outputs(cwd)
        if sum(file_counts.values()) >= 2 * RECORDS or time.monotonic() > deadline:
            break
    assert file_counts == counts, "FileSink increments do not add up to the counts"
    assert file_sums == sums
    assert db_counts == counts, "SQLiteSink increments do not add up to the counts"
    assert db_sums == sums
    windows = [
        orjson.loads(line)
        for lines in FileSink.read_committed(cwd / "windows").values()
        for line in lines
    ]
    starts = [start for start, _, _ in windows]
    assert len(starts) == len(set(starts)), "a window was emitted twice"
    assert all(n == 5000 for _, _, n in windows), [w for w in windows if w[2] != 5000][:5]
    # The watermark ends 10 s behind the last value (199.999 s): windows ending by 185 s close.
    assert sorted(starts) == [5.0 * i for i in range(37)]
    for handler in ("to_files", "to_db"):
        _, stored = _stored(cwd, handler)
        assert {k: c for k, (c, _) in stored.items()} == counts, f"{handler}'s stored counts"
        assert {k: s for k, (_, s) in stored.items()} == sums, f"{handler}'s stored sums"


@pytest.mark.parametrize("point", POINTS)  # every step, after_state_commit included
def test_a_kill_at_each_commit_step_keeps_counts_exact(tmp_path: Path, point: str) -> None:
    cwd = _setup(tmp_path)
    worker = _start(cwd, "--duration", "30", env={"STREAMLET_CRASH_AT": f"{point}:4"})
    _, stderr = worker.communicate(timeout=60)
    assert worker.returncode == -signal.SIGKILL, stderr
    # The kill came where it was asked: the stores hold batch 4 only from
    # the state commit on, and the sinks from their commit on.
    seq, _ = _stored(cwd, "to_files")
    assert seq == (4 if point in ("after_state_commit", "before_done", "after_done") else 3)
    in_files = set(FileSink.read_committed(cwd / "files"))
    assert (4 in in_files) == (point not in ("after_allocate", "after_handler"))
    _finish(cwd)


def test_random_kills_keep_counts_exact(tmp_path: Path) -> None:
    cwd = _setup(tmp_path)
    rng = random.Random(int(os.environ.get("STREAMLET_TEST_SEED", "20261204")))
    for _ in range(20):
        worker = _start(cwd, "--duration", "30")
        time.sleep(rng.uniform(0.4, 1.0))
        worker.send_signal(signal.SIGKILL)
        worker.communicate(timeout=30)
    seq, _ = _stored(cwd, "to_files")
    assert seq > 0  # the kills came while batches ran, not before any
    _finish(cwd)
