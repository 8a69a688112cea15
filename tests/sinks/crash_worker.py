"""Crash-test worker: commits batches to a durable sink in a loop.

Run by the SIGKILL tests as ``python crash_worker.py file|sqlite TARGET START``.
It commits batches ``START, START+1, ...`` forever and prints
``<batch id> <1 if commit wrote it, 0 if it was committed before>`` after each
commit returned; a printed line plays the part of ``BatchDone``. The parent
kills it at random and restarts it at the batch after the last printed one.
Outputs and ranges are pure functions of the batch id, as on a replay.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence

from streamlet.records import Batch, OffsetRange
from streamlet.sinks import FileSink, SinkContext, SQLiteSink
from streamlet.sinks.base import Sink

CONTEXT = SinkContext("crash", "echo", "unused")
PARTITIONS = 3
TABLE_DDL = "CREATE TABLE IF NOT EXISTS out (batch_id INTEGER, n INTEGER, payload TEXT)"


def outputs_of(batch_id: int) -> list[dict[str, object]]:
    """Every fifth batch has no outputs; the others up to 80, a few KiB each."""
    return [
        {"batch": batch_id, "n": n, "pad": f"{batch_id}:{n}:" + "x" * 120}
        for n in range((batch_id % 5) * 20)
    ]


def ranges_of(batch_id: int) -> tuple[OffsetRange, ...]:
    """Each batch reads 10 offsets of partition ``batch_id % PARTITIONS``."""
    return (OffsetRange("seq", batch_id % PARTITIONS, batch_id * 10, batch_id * 10 + 10),)


def apply(conn: sqlite3.Connection, batch: Batch, outputs: Sequence[object]) -> None:
    """One row per output; no key, so a duplicate would show as an extra row."""
    conn.executemany(
        "INSERT INTO out (batch_id, n, payload) VALUES (?, ?, ?)",
        [(batch.id, o["n"], o["pad"]) for o in outputs if isinstance(o, dict)],
    )


def run_until_killed(
    kind: str, target: str, start: int, rng: random.Random
) -> list[tuple[int, bool]]:
    """Start the worker, SIGKILL it at a random moment, return what it printed.

    The kill comes 20-300 ms after the first printed batch, so that every run
    commits something and most kills land inside a commit.
    """
    # Here, not at the top: this file also runs as the worker script, where
    # the tests package is not importable.
    from tests.conftest import StdoutLines

    proc = subprocess.Popen(
        [sys.executable, __file__, kind, target, str(start)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    output = StdoutLines(proc)
    try:
        deadline = time.monotonic() + 20
        while not output.first.wait(timeout=0.05) and proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError("crash worker printed nothing in 20 s")
        time.sleep(rng.uniform(0.02, 0.3))
    finally:
        # A zombie can still be signalled: this is safe if the worker died.
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        output.close(timeout=10)
        assert proc.stderr is not None
        errors = proc.stderr.read()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, (
        f"crash worker exited with {proc.returncode} before it was killed:\n{errors}"
    )
    done: list[tuple[int, bool]] = []
    for line in output.lines:
        if not line.endswith("\n"):
            break  # cut by the kill: not a complete report
        batch_id, wrote = line.split()
        done.append((int(batch_id), wrote == "1"))
    return done


def check_run(done: list[tuple[int, bool]], start: int, context: str) -> int:
    """Check one run's reports; return the batch the next run starts at.

    Batches come in order from ``start``; only the first may report "committed
    before" (it was committed, but the kill came before its report).
    """
    assert done, f"{context}: no batch reported"
    ids = [batch_id for batch_id, _ in done]
    assert ids == list(range(start, start + len(ids))), f"{context}: {ids[:10]}..."
    assert all(wrote for _, wrote in done[1:]), f"{context}: a new batch was skipped"
    return ids[-1] + 1


async def main(kind: str, target: str, start: int) -> None:
    sink: Sink = (
        FileSink(target) if kind == "file" else SQLiteSink(target, apply, table_ddl=TABLE_DDL)
    )
    await sink.open(CONTEXT)
    batch_id = start
    while True:
        batch = Batch(batch_id, float(batch_id), [], ranges_of(batch_id))
        wrote = await sink.commit(batch, outputs_of(batch_id))
        sys.stdout.write(f"{batch_id} {int(wrote)}\n")
        sys.stdout.flush()
        batch_id += 1


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
