"""A receiver's records are acknowledged only once durable in the data WAL and the tracker.

A real worker (``streamlet run``, a TcpSource into a FileSink) is SIGKILLed by
its own crash point (``STREAMLET_CRASH_AT``, see :mod:`streamlet._faults`) at
a step of the block generator's cut while a client in this process sends
numbered lines:

- ``block_before_tracker_event``: the cut's blocks are in the data WAL, their
  ``block`` events are not in the tracker. No line of theirs may have been
  acknowledged: the restarted worker has no batch that reads them (an orphan
  block), and the client does not send acknowledged lines again.
- ``block_after_tracker_event``: the blocks are durable in both logs and no
  line of theirs was acknowledged. The client sends them again and the
  duplicate filter, restored from the acks logged with the blocks, drops them.

Either way, once the worker is restarted and the client has sent everything,
every line must be in the sink exactly once.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import anyio
import pytest

from streamlet.sinks.file import FileSink
from streamlet.tcp import TcpClient
from streamlet.wal.tools import verify

LINES = 3000
#: The cut to crash at: earlier cuts' lines are durable and acknowledged.
CUT = 3

APP = """
import streamlet as sl
from streamlet.sinks.file import FileSink

app = sl.App("blockcrash", state_dir={state!r}, batch_interval=0.2, block_interval=0.05,
             checkpoint_interval=0.5)
lines = app.source(sl.TcpSource(port={port}), name="lines")


@app.handler(lines, sink=FileSink({files!r}))
async def to_files(batch):
    return [r.value.decode() for r in batch]
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(cwd: Path, log: Path, crash_at: str | None) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.pop("STREAMLET_CRASH_AT", None)
    if crash_at is not None:
        env["STREAMLET_CRASH_AT"] = crash_at
    with log.open("ab") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "streamlet", "run", "blockcrash:app", "--quiet"],
            cwd=cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


@pytest.mark.parametrize("point", ["block_before_tracker_event", "block_after_tracker_event"])
async def test_a_crash_inside_a_cut_loses_no_acknowledged_line_and_repeats_none(
    tmp_path: Path, point: str
) -> None:
    port = _free_port()
    (tmp_path / "blockcrash.py").write_text(
        APP.format(state=str(tmp_path / "state"), port=port, files=str(tmp_path / "files"))
    )
    log = tmp_path / "worker.log"
    worker = _start(tmp_path, log, f"{point}:{CUT}")
    acked_at_kill = -1
    try:
        async with anyio.create_task_group() as tg:

            async def restart_after_the_crash() -> None:
                nonlocal worker, acked_at_kill
                code = await anyio.to_thread.run_sync(worker.wait)
                acked_at_kill = client.acked
                assert code == -signal.SIGKILL, (
                    f"the worker did not crash at {point}:{CUT} (exit {code}):\n{log.read_text()}"
                )
                worker = _start(tmp_path, log, None)

            with anyio.fail_after(120):
                async with TcpClient(
                    "127.0.0.1",
                    port,
                    "durability",
                    reconnect_backoff=0.05,
                    max_backoff=0.5,
                    connect_timeout=60,
                ) as client:
                    tg.start_soon(restart_after_the_crash)
                    for i in range(1, LINES + 1):
                        await client.send(b"line-%d" % i)
                        if i % 20 == 0:
                            await anyio.sleep(0.01)  # a steady stream over many cuts
                    await client.flush()
        assert client.acked == LINES
        assert 0 < acked_at_kill < LINES, f"acked {acked_at_kill} lines when killed"
        # A graceful stop makes the last blocks into a batch.
        worker.send_signal(signal.SIGTERM)
        code = await anyio.to_thread.run_sync(worker.wait)
        assert code == 0, log.read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()

    parts = FileSink.read_committed(tmp_path / "files")
    seen = Counter(line.decode() for lines in parts.values() for line in lines)
    expected = Counter(f"line-{i}" for i in range(1, LINES + 1))
    repeated = sorted(v for v, n in seen.items() if n > 1)
    missing = sorted(set(expected) - set(seen), key=lambda v: int(v.split("-")[1]))
    assert repeated == [], f"{len(repeated)} lines repeated, e.g. {repeated[:5]}"
    assert missing == [], (
        f"{len(missing)} lines lost, e.g. {missing[:5]}; {acked_at_kill} were acknowledged"
        " when the worker was killed"
    )
    assert seen == expected
    for name in ("tracker", "data"):
        assert verify(tmp_path / "state" / name).problem is None
