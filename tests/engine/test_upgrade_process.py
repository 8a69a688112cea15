"""Upgrading an app under ``streamlet run``, across SIGKILLs: every output once, refusals clear.

The worker is a real ``streamlet run`` subprocess. Version 1 is killed in the
middle of a commit; version 2 changes what an operator changes (the
function renamed with its handler's name kept, a second partition, another
batch interval, a sink for a handler that had none, a new handler with a
sink of its own) and starts on the same
state directory, is killed twice more, and finishes. Every number must be
in the first handler's sink exactly once; the new handler's sink must hold,
per partition, every number from where it started to the end, once, and so must the
sink given to the handler that had none. Then a
version 3 that renames the handler without keeping its name is refused
with the name to keep, and its state directory's manifest is left as it was.
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

from streamlet.sinks.file import FileSink

LIMIT = 300  # numbers per partition

APP = """
import streamlet as sl
from streamlet.sinks.file import FileSink
from streamlet.sinks.sqlite import SQLiteSink


def insert(conn, batch, outputs):
    conn.executemany("INSERT INTO seen (value) VALUES (?)", [(o,) for o in outputs])


app = sl.App("shop", state_dir={state!r}, batch_interval={interval}, checkpoint_interval=0.2)
numbers = app.source(
    sl.SequenceSource(rate=None, limit={limit}, max_rate=150, partitions={partitions},
                      value=lambda p, o: b"%d:%d" % (p, o + 1)),
    name="numbers",
)


@app.handler(numbers, sink=SQLiteSink({db!r}, insert,
             table_ddl="CREATE TABLE IF NOT EXISTS seen (value TEXT NOT NULL)"){name})
async def {function}(batch):
    return [r.value.decode() for r in batch]


@app.handler(numbers, sink={tally_sink})
async def tally(batch):
    return [r.value.decode() for r in batch]
{extra}
"""

AUDIT = """

@app.handler(numbers, sink=FileSink({audit!r}))
async def audit(batch):
    return [r.value.decode() for r in batch]
"""


def _write(cwd: Path, *, version: int) -> None:
    v2 = version >= 2
    (cwd / "shop.py").write_text(
        APP.format(
            state=str(cwd / "state"),
            db=str(cwd / "out.db"),
            limit=LIMIT,
            partitions=2 if v2 else 1,
            interval=0.03 if v2 else 0.05,
            function={1: "copy", 2: "copy_v2", 3: "copy_v3"}[version],
            name=', name="copy"' if version == 2 else "",
            tally_sink=f"FileSink({str(cwd / 'tally')!r})" if v2 else "None",
            extra=AUDIT.format(audit=str(cwd / "audit")) if v2 else "",
        )
    )


def _start(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "streamlet", "run", "shop:app", "--quiet", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _copied(cwd: Path) -> Counter[str]:
    with sqlite3.connect(cwd / "out.db") as conn:
        found = Counter(v for (v,) in conn.execute("SELECT value FROM seen"))
    conn.close()
    return found


def test_an_upgrade_across_kills_writes_every_output_once_and_a_bad_rename_is_refused(
    tmp_path: Path,
) -> None:
    cwd = tmp_path
    _write(cwd, version=1)
    first = _start(cwd, "--duration", "30", env={"STREAMLET_CRASH_AT": "after_sink_commit:3"})
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL, stderr

    _write(cwd, version=2)
    rng = random.Random(int(os.environ.get("STREAMLET_TEST_SEED", "20261125")))
    for _ in range(2):
        before = sum(_copied(cwd).values())
        worker = _start(cwd, "--duration", "30")
        # Killed while it writes: once it has written, whatever the start-up took.
        deadline = time.monotonic() + 30
        while sum(_copied(cwd).values()) == before and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        worker.send_signal(signal.SIGKILL)
        worker.communicate(timeout=30)
        assert sum(_copied(cwd).values()) > before, "version 2 wrote nothing before the kill"
    expected = Counter(f"{p}:{n}" for p in (0, 1) for n in range(1, LIMIT + 1))
    deadline = time.monotonic() + 60
    while True:
        worker = _start(cwd, "--duration", "1.5")
        _, stderr = worker.communicate(timeout=60)
        assert worker.returncode == 0, stderr
        if set(_copied(cwd)) >= set(expected) or time.monotonic() > deadline:
            break
    copied = _copied(cwd)
    assert {v: n for v, n in copied.items() if n > 1} == {}
    assert copied == expected

    for sink in ("audit", "tally"):
        found = Counter(
            line.decode()
            for lines in FileSink.read_committed(cwd / sink).values()
            for line in lines
        )
        assert {v: n for v, n in found.items() if n > 1} == {}, sink
        for p in (0, 1):
            numbers = sorted(int(v.split(":")[1]) for v in found if v.startswith(f"{p}:"))
            assert numbers, f"{sink} saw nothing of partition {p}"
            assert numbers == list(range(numbers[0], LIMIT + 1)), f"{sink}, partition {p}: gaps"
        assert found["1:1"] == 1  # the new partition was read from its start

    _write(cwd, version=3)
    manifest = (cwd / "state" / "app.json").read_bytes()
    refused = _start(cwd, "--duration", "5")
    _, stderr = refused.communicate(timeout=60)
    assert refused.returncode != 0
    assert "handler 'copy' appears renamed to 'copy_v3'" in stderr, stderr
    assert "name='copy'" in stderr
    assert (cwd / "state" / "app.json").read_bytes() == manifest  # not upgraded
