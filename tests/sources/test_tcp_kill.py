"""A TcpSource worker SIGKILLed over and over while a client sends; every line lands once.

The worker is a real ``streamlet run`` subprocess writing to a FileSink and a
SQLiteSink. The client (in this process) numbers its lines and resends what
was not acknowledged after each reconnect; the worker's duplicate filter and
the sinks' batch ids must make each line appear exactly once in both sinks.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import anyio

from streamlet.sinks.file import FileSink
from streamlet.tcp import TcpClient
from streamlet.wal.tools import verify

LINES = 100_000
KILLS = 20

APP = """
import streamlet as sl
from streamlet.sinks.file import FileSink
from streamlet.sinks.sqlite import SQLiteSink


def insert(conn, batch, outputs):
    conn.executemany("INSERT INTO seen (line) VALUES (?)", [(o,) for o in outputs])


app = sl.App("tcpkill", state_dir={state!r}, batch_interval=0.1, block_interval=0.02,
             checkpoint_interval=0.5)
lines = app.source(sl.TcpSource(port={port}), name="lines")


@app.handler(lines, sink=FileSink({files!r}))
async def to_files(batch):
    return [r.value.decode() for r in batch]


@app.handler(lines, sink=SQLiteSink({db!r}, insert,
             table_ddl="CREATE TABLE IF NOT EXISTS seen (line TEXT NOT NULL)"))
async def to_db(batch):
    return [r.value.decode() for r in batch]
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(cwd: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "streamlet", "run", "tcpkill:app", "--quiet", *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def test_lines_survive_twenty_kills_exactly_once(tmp_path: Path) -> None:
    port = _free_port()
    (tmp_path / "tcpkill.py").write_text(
        APP.format(
            state=str(tmp_path / "state"),
            port=port,
            files=str(tmp_path / "files"),
            db=str(tmp_path / "out.db"),
        )
    )
    seed = int(os.environ.get("STREAMLET_TEST_SEED", "4242"))
    rng = random.Random(seed)
    worker = _start(tmp_path)
    kills = 0
    sent_all = anyio.Event()

    async def killer() -> None:
        nonlocal worker, kills
        while kills < KILLS or not sent_all.is_set():
            await anyio.sleep(rng.uniform(0.3, 1.0))
            worker.send_signal(signal.SIGKILL)
            await anyio.to_thread.run_sync(worker.wait)
            kills += 1
            worker = _start(tmp_path)
            if kills >= 200:  # the client is stuck: fail below rather than loop forever
                return

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(killer)
            with anyio.fail_after(240):
                async with TcpClient(
                    "127.0.0.1", port, "chaos-client", reconnect_backoff=0.05, max_backoff=0.5
                ) as client:
                    for i in range(1, LINES + 1):
                        await client.send(b"line-%d" % i)
                    await client.flush()
                    acked = client.acked
            sent_all.set()
        assert acked == LINES
        assert kills >= KILLS, f"only {kills} kills (seed {seed})"
        worker.send_signal(signal.SIGKILL)
        await anyio.to_thread.run_sync(worker.wait)
        # A last run recovers and stops gracefully: the last blocks go into a batch.
        worker = _start(tmp_path, "--duration", "1.5")
        await anyio.to_thread.run_sync(worker.wait)
        assert worker.returncode == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()

    expected = Counter(f"line-{i}" for i in range(1, LINES + 1))
    parts = FileSink.read_committed(tmp_path / "files")
    in_files = Counter(line.decode() for batch in parts.values() for line in batch)
    with sqlite3.connect(tmp_path / "out.db") as conn:
        in_db = Counter(line for (line,) in conn.execute("SELECT line FROM seen"))
    conn.close()
    duplicated = sorted(v for v, n in in_files.items() if n > 1)
    missing = sorted(set(expected) - set(in_files))
    assert duplicated == [], f"{len(duplicated)} duplicated, e.g. {duplicated[:5]} (seed {seed})"
    assert missing == [], f"{len(missing)} missing, e.g. {missing[:5]} (seed {seed})"
    assert in_files == expected
    assert in_db == expected
    for log in ("tracker", "data"):
        assert verify(tmp_path / "state" / log).problem is None
