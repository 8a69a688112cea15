"""DirectorySource at scale: 10,000 small files, and a 1 GiB file read in bounded memory."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import anyio

from streamlet import App, Batch, DirectorySource, SQLiteSink
from streamlet.metrics import BatchInfo

FILES = 10_000
BIG = 1 << 30  # bytes
LINE = 1024  # bytes per line of the big file, its newline included
PEAK_RSS = 200 << 20  # bytes: batches of 16 MiB, never the whole file (62 MiB measured)


def _insert(conn: sqlite3.Connection, batch: Batch, outputs: object) -> None:
    conn.executemany("INSERT INTO seen (value) VALUES (?)", outputs)  # type: ignore[arg-type]


async def test_ten_thousand_small_files_every_line_once_and_every_file_removed(
    tmp_path: Path,
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for n in range(FILES):
        (inbox / f"{n:05d}.log").write_bytes(b"%d:a\n%d:b\n" % (n, n))
    seen = 0
    done = anyio.Event()

    def on_batch(info: BatchInfo) -> None:
        nonlocal seen
        seen += info.records
        if seen >= 2 * FILES:
            done.set()

    app = _many_app(tmp_path, inbox)
    app.add_listener(on_batch)
    async with anyio.create_task_group() as tg:
        tg.start_soon(app.serve)
        with anyio.fail_after(60):
            await done.wait()
        app.stop()
    with sqlite3.connect(tmp_path / "out.db") as conn:
        count, distinct = conn.execute(
            "SELECT count(*), count(DISTINCT value) FROM seen"
        ).fetchone()
    conn.close()
    assert (count, distinct) == (2 * FILES, 2 * FILES)
    # The files of the last batch go once it is done and the next batch is
    # planned, or, as here, when the app starts again.
    assert 0 < len(list(inbox.glob("*.log"))) < FILES
    await _many_app(tmp_path, inbox).serve(duration=0.1)
    assert list(inbox.glob("*.log")) == []


def _many_app(tmp_path: Path, inbox: Path) -> App:
    app = App("many", state_dir=tmp_path / "state", batch_interval=0.02)
    src = app.source(DirectorySource(inbox, pattern="*.log", finished="delete"), name="files")
    sink = SQLiteSink(
        tmp_path / "out.db", _insert, table_ddl="CREATE TABLE IF NOT EXISTS seen (value TEXT)"
    )

    @app.handler(src, sink=sink)
    async def store(batch: Batch) -> list[tuple[str]]:
        return [(r.value.decode(),) for r in batch]

    return app


BIG_APP = """
import os, sys
import anyio
from streamlet import App, DirectorySource

inbox, state, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
app = App("big", state_dir=state, batch_interval=0.05, max_batch_bytes=16 << 20)
src = app.source(DirectorySource(inbox), name="files")
counted = {"lines": 0, "bad": 0}


@app.handler(src)
async def check(batch):
    bad = 0
    for r in batch:
        if int(r.value[:12]) != r.offset:
            bad += 1
    counted["lines"] += len(batch)
    counted["bad"] += bad
    if counted["lines"] >= total:
        app.stop()
    return []


anyio.run(app.serve)
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
print(counted["lines"], counted["bad"], peak)
"""


def test_a_one_gib_file_is_read_in_bounded_memory(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    lines = BIG // LINE
    try:
        pad = b"x" * (LINE - 13) + b"\n"
        per_chunk = 8192
        with (inbox / ".big.txt.tmp").open("wb") as f:
            for start in range(0, lines, per_chunk):
                f.write(b"".join(b"%012d" % i + pad for i in range(start, start + per_chunk)))
        (inbox / ".big.txt.tmp").rename(inbox / "big.txt")
        assert (inbox / "big.txt").stat().st_size == BIG
        (tmp_path / "big_app.py").write_text(BIG_APP)
        result = subprocess.run(
            [
                sys.executable,
                str(tmp_path / "big_app.py"),
                str(inbox),
                str(tmp_path / "state"),
                str(lines),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        read, bad, peak = (int(v) for v in result.stdout.split())
        assert (read, bad) == (lines, 0)
        assert peak < PEAK_RSS, f"peak RSS {peak >> 20} MiB reading a {BIG >> 20} MiB file"
    finally:
        # 1 GiB is too much to leave behind in pytest's kept temporary directories.
        for name in (".big.txt.tmp", "big.txt"):
            (inbox / name).unlink(missing_ok=True)
