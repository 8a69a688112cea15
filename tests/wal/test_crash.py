"""The WAL under SIGKILL: a real writer process killed at random times, again and again.

``crash_writer.py`` appends numbered records to a log and prints each number
once its append returned. It is killed with SIGKILL at a random moment (most
of the time while appending, sometimes while it starts up and recovers the
log) and restarted on the same directory, at least 50 times. A SIGKILL keeps
the page cache, so this tests that a record is written before it is
acknowledged and that recovery copes with whatever a kill leaves behind
(interrupted rolls and recoveries, now and then a torn write); missing fsyncs
are test_power_loss.py's business.

After each restart the writer says where it resumes: past every number it
ever printed. At the end the log must hold 0..M exactly once each, in order,
every payload intact, with every printed number among them.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from streamlet.wal import WriteAheadLog
from tests.wal.crash_writer import SEGMENT_SIZE, number_of

WRITER = Path(__file__).with_name("crash_writer.py")
KILLS = 40
STARTUP_TIMEOUT = 30.0  # seconds for the writer to open the log; only a hang comes near it


def printed_numbers(output: bytes) -> tuple[int | None, list[int]]:
    """The ``ready`` number and the numbers a writer printed (a cut-off last line is dropped)."""
    lines = output.decode().split("\n")[:-1]  # the last piece has no newline yet
    ready = None
    numbers = []
    for line in lines:
        if line.startswith("ready "):
            ready = int(line.removeprefix("ready "))
        else:
            numbers.append(int(line))
    return ready, numbers


def run_and_kill(directory: Path, seed: int, rng: random.Random, log: Path) -> tuple[str, bytes]:
    """Start the writer, SIGKILL it at a random moment; return (when, its whole output)."""
    with log.open("ab") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(WRITER), str(directory), str(seed)],
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        assert proc.stdout is not None
        watchdog = threading.Timer(STARTUP_TIMEOUT, proc.kill)  # a hung writer fails, not hangs
        watchdog.start()
        try:
            first = b""
            if rng.random() < 0.2:
                # Anywhere from start-up through recovery into the first appends.
                delay = rng.uniform(0.0, 0.5)
                when = f"{delay:.3f}s after start"
            else:
                first = proc.stdout.readline()  # "ready N", once the log is open
                assert first.startswith(b"ready "), (first, log.read_text()[-3000:])
                delay = rng.uniform(0.0, 0.15)
                when = f"{delay:.3f}s after ready"
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            output = first + proc.stdout.read()
            code = proc.wait()
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
    # Anything but our SIGKILL means the writer failed on its own.
    assert code == -signal.SIGKILL, f"writer exited with {code}:\n{log.read_text()[-3000:]}"
    return when, output


async def replay_numbers(directory: Path) -> list[int]:
    """The number of every record in the log, in log order; each record checked byte for byte."""
    async with await WriteAheadLog.open(directory, segment_size=SEGMENT_SIZE) as log:
        return [number_of(payload) async for _, payload in log.replay()]


@pytest.mark.slow
def test_every_printed_record_survives_repeated_sigkills(tmp_path: Path) -> None:
    seed = int(os.environ.get("STREAMLET_CRASH_SEED", random.randrange(2**32)))
    print(f"crash test seed: {seed} (set STREAMLET_CRASH_SEED={seed} to replay the schedule)")
    rng = random.Random(seed)
    directory = tmp_path / "wal"
    stderr_log = tmp_path / "writer.stderr"
    printed: list[int] = []
    rounds_with_appends = 0
    started = time.monotonic()
    for kill in range(KILLS):
        when, output = run_and_kill(directory, rng.randrange(2**32), rng, stderr_log)
        ready, numbers = printed_numbers(output)
        print(f"kill {kill}: {when}, resumed at {ready}, {len(numbers)} records acknowledged")
        if ready is not None:
            # It resumes past everything acknowledged before: all of that is in the log.
            assert ready >= max(printed, default=-1) + 1, (kill, ready, max(printed, default=-1))
            assert all(ready <= n for n in numbers), (kill, ready)
        printed += numbers
        rounds_with_appends += bool(numbers)
    elapsed = time.monotonic() - started
    print(f"{KILLS} kills in {elapsed:.1f}s; {len(printed)} records acknowledged")

    # Every number is printed once at most: a resumed writer never re-appends one.
    assert len(set(printed)) == len(printed)
    # The kills fell where they matter: most rounds got appends acknowledged.
    assert rounds_with_appends >= KILLS // 2, rounds_with_appends
    # Segments rolled many times under the kills.
    segments = [p for p in directory.iterdir() if p.suffix == ".wal"]
    assert len(segments) > 5

    numbers = asyncio.run(replay_numbers(directory))
    # 0..M, each once and in order: nothing lost in the middle, nothing doubled.
    assert numbers == list(range(len(numbers)))
    # Every acknowledged number is there (intact: number_of checked every byte).
    assert max(printed) < len(numbers)
