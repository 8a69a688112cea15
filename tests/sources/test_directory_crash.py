"""SIGKILL a DirectorySource worker at every commit step and at random; count every line.

The worker is a real ``streamlet run`` subprocess reading a directory into a
FileSink and a SQLiteSink, and removing (or moving) each file once its
lines are done. Files keep arriving while it runs, some of them written
slowly under a temporary name first. After each kill it is restarted on the
same state directory; in the end every line of every file must be in each
sink exactly once, and every file must be finished.
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

APP = """
import os
import streamlet as sl
from streamlet.sinks.file import FileSink
from streamlet.sinks.sqlite import SQLiteSink


def insert(conn, batch, outputs):
    conn.executemany("INSERT INTO seen (value) VALUES (?)", [(o,) for o in outputs])


rate = os.environ.get("TEST_RATE")
app = sl.App("dircrash", state_dir={state!r}, batch_interval=0.05, checkpoint_interval=0.2)
files = app.source(
    sl.DirectorySource({inbox!r}, pattern="*.txt", finished={finished!r},
                       max_rate=float(rate) if rate else None),
    name="files",
)


@app.handler(files, sink=FileSink({files!r}))
async def to_files(batch):
    return [r.value.decode() for r in batch]


@app.handler(files, sink=SQLiteSink({db!r}, insert,
             table_ddl="CREATE TABLE IF NOT EXISTS seen (value TEXT NOT NULL)"))
async def to_db(batch):
    return [r.value.decode() for r in batch]
"""

LINES_PER_FILE = 7  # batches of 20 lines end inside files, not at their ends


class Inbox:
    """The input directory, and every line the test put into it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir()
        self.expected: Counter[str] = Counter()
        self.count = 0

    def lines(self, n: int) -> bytes:
        name = f"f{n:04d}"
        return b"".join(f"{name}:{i}\n".encode() for i in range(LINES_PER_FILE))

    def add(self) -> None:
        """A file, whole, by rename."""
        n = self.count
        self.count += 1
        temp = self.path / f".f{n:04d}.txt.tmp"
        temp.write_bytes(self.lines(n))
        os.rename(temp, self.path / f"f{n:04d}.txt")
        self.expected.update(f"f{n:04d}:{i}" for i in range(LINES_PER_FILE))

    def start_slow(self) -> tuple[int, Path]:
        """Half a file under a temporary name: a writer still at work."""
        n = self.count
        self.count += 1
        temp = self.path / f".f{n:04d}.txt"  # matches the glob, but hidden
        data = self.lines(n)
        temp.write_bytes(data[: len(data) // 2])
        return n, temp

    def end_slow(self, n: int, temp: Path) -> None:
        data = self.lines(n)
        with temp.open("ab") as f:
            f.write(data[len(data) // 2 :])
        os.rename(temp, self.path / f"f{n:04d}.txt")
        self.expected.update(f"f{n:04d}:{i}" for i in range(LINES_PER_FILE))


def _setup(tmp_path: Path, finished: str) -> Inbox:
    inbox = Inbox(tmp_path / "inbox")
    (tmp_path / "dircrash.py").write_text(
        APP.format(
            state=str(tmp_path / "state"),
            inbox=str(inbox.path),
            finished=finished,
            files=str(tmp_path / "files"),
            db=str(tmp_path / "out.db"),
        )
    )
    return inbox


def _start(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "streamlet", "run", "dircrash:app", "--quiet", *args],
        cwd=cwd,
        env={**os.environ, "TEST_RATE": "400", **(env or {})},
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


def _finish(cwd: Path, inbox: Inbox, finished: str) -> None:
    """Run (no rate limit) until every line is in, then check both sinks, files and logs."""
    for _ in range(5):
        worker = _start(cwd, "--duration", "1", env={"TEST_RATE": ""})
        _, stderr = worker.communicate(timeout=60)
        assert worker.returncode == 0, stderr
        in_files, in_db, file_batches, db_batches = _outputs(cwd)
        if set(in_files) >= set(inbox.expected):
            break
    duplicated = {v: n for v, n in in_files.items() if n > 1}
    assert duplicated == {}, f"duplicated in files: {sorted(duplicated)[:10]}"
    assert in_files == inbox.expected, (
        f"missing in files: {sorted(set(inbox.expected) - set(in_files))[:10]},"
        f" unexpected: {sorted(set(in_files) - set(inbox.expected))[:10]}"
    )
    assert in_db == inbox.expected
    assert file_batches == db_batches
    assert verify(cwd / "state" / "tracker").problem is None
    # Every file is finished, once its batches were done: only the manifest is left.
    assert sorted(p.name for p in inbox.path.iterdir() if p.is_file()) == [".streamlet-files.json"]
    moved = sorted(p.name for p in (inbox.path / "done").iterdir()) if finished == "move" else []
    assert moved == ([f"f{n:04d}.txt" for n in range(inbox.count)] if finished == "move" else [])


@pytest.mark.parametrize(
    "point", ["after_allocate", "after_handler", "after_sink_commit", "before_done", "after_done"]
)
def test_a_kill_at_each_commit_step_loses_and_repeats_nothing(tmp_path: Path, point: str) -> None:
    inbox = _setup(tmp_path, "delete")
    for _ in range(30):  # 210 lines: batch 4 (lines 60-79) reads the ends of two files
        inbox.add()
    worker = _start(tmp_path, "--duration", "30", env={"STREAMLET_CRASH_AT": f"{point}:4"})
    _, stderr = worker.communicate(timeout=60)
    assert worker.returncode == -signal.SIGKILL, stderr
    _, _, file_batches, _ = _outputs(tmp_path)
    committed = point in ("after_sink_commit", "before_done", "after_done")
    assert max(file_batches) == (4 if committed else 3)
    # Batch 4 read lines 60-79: the ends of f0008 and f0010 (lines 56-62 and
    # 70-76) and all of f0009. They stay until its done is logged and the
    # next batch is planned, so a re-run finds them; the files batches 1-3
    # read wholly (f0000-f0007) were deleted when batch 4 was planned.
    assert all((inbox.path / f"f{n:04d}.txt").exists() for n in (8, 9, 10, 11))
    assert not any((inbox.path / f"f{n:04d}.txt").exists() for n in range(8))
    inbox.add()  # a file that arrives while the worker is down
    _finish(tmp_path, inbox, "delete")


def test_random_kills_lose_and_repeat_nothing(tmp_path: Path) -> None:
    inbox = _setup(tmp_path, "move")
    rng = random.Random(int(os.environ.get("STREAMLET_TEST_SEED", "20261204")))
    for _ in range(20):
        inbox.add()
    kills = 0
    progress: list[tuple[int, int, int]] = []
    for _ in range(20):
        worker = _start(tmp_path, "--duration", "30", env={"TEST_RATE": "100"})
        wait = rng.uniform(0.3, 0.9)
        time.sleep(wait / 3)
        for _ in range(rng.randint(1, 3)):
            inbox.add()  # files that arrive while the worker runs
        slow = inbox.start_slow()  # and one being written across the kill
        time.sleep(wait * 2 / 3)
        worker.send_signal(signal.SIGKILL)
        worker.communicate(timeout=30)
        kills += 1
        inbox.end_slow(*slow)
        in_files, _, batches, _ = _outputs(tmp_path)
        progress.append((len(batches), sum(in_files.values()), sum(inbox.expected.values())))
    assert kills == 20
    # Every kill came while lines were still waiting, and the runs made progress.
    assert all(done < total for _, done, total in progress), progress
    assert progress[-1][1] > progress[0][1]
    _finish(tmp_path, inbox, "move")


def test_a_file_removed_before_its_batch_runs_again_stops_the_worker_naming_it(
    tmp_path: Path,
) -> None:
    inbox = _setup(tmp_path, "delete")
    for _ in range(10):
        inbox.add()
    worker = _start(tmp_path, "--duration", "30", env={"STREAMLET_CRASH_AT": "after_handler:2"})
    _, stderr = worker.communicate(timeout=60)
    assert worker.returncode == -signal.SIGKILL, stderr
    # Batch 2 (lines 20-39) is logged, not committed; one of its files goes away.
    gone = inbox.path / "f0003.txt"
    kept = gone.read_bytes()
    gone.unlink()
    worker = _start(tmp_path, "--duration", "5")
    _, stderr = worker.communicate(timeout=60)
    assert worker.returncode != 0
    assert f"error: file {gone} of source 'files' is gone" in stderr, stderr
    assert "Traceback" not in stderr
    assert "Put the file back" in stderr
    _, _, file_batches, _ = _outputs(tmp_path)
    assert max(file_batches) == 1  # nothing of batch 2 was skipped or half written
    gone.write_bytes(kept)
    _finish(tmp_path, inbox, "delete")
