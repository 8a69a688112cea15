"""``streamlet send FILE`` against a real ``streamlet run`` worker: files rewritten, re-sent, grown.

The worker is a subprocess serving a TcpSource into a FileSink; every
``streamlet send`` is a subprocess too. Each line the sink holds carries the
client id and sequence number it was sent with, so a test can tell which
version of a file a line came from and that none arrived twice.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from streamlet.sinks.file import FileSink

APP = """
import streamlet as sl

app = sl.App("sendfiles", state_dir={state!r}, batch_interval=0.05, block_interval=0.01)
lines = app.source(sl.TcpSource(port={port}), name="lines")


@app.handler(lines, sink=sl.FileSink({out!r}))
async def keep(batch):
    return [[r.key.decode(), r.offset, r.value.decode()] for r in batch]
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Worker:
    """A ``streamlet run`` process serving a TcpSource into a FileSink."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = _free_port()
        self.out = workdir / "out"
        (workdir / "sendfiles.py").write_text(
            APP.format(state=str(workdir / "state"), port=self.port, out=str(self.out))
        )
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streamlet", "run", "sendfiles:app", "--quiet"],
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 20
        while not self._listening():
            assert self.process.poll() is None, self.process.communicate()[1].decode()
            assert time.monotonic() < deadline, "the worker did not start listening"
            time.sleep(0.05)

    def _listening(self) -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    def send(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "streamlet", "send", "--port", str(self.port), *args],
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "PYTHONWARNINGS": "error"},
        )

    def outputs(self) -> list[tuple[str, int, str]]:
        """Every line the sink committed: (client id, seq, text), in batch order."""
        if not self.out.exists():
            return []
        parts = FileSink.read_committed(self.out)
        return [
            tuple(orjson.loads(line))  # type: ignore[misc]
            for _, batch in sorted(parts.items())
            for line in batch
        ]

    def wait_for(self, count: int) -> list[tuple[str, int, str]]:
        """The sink's lines once it holds ``count`` (and, a moment later, still no more)."""
        deadline = time.monotonic() + 20
        while len(found := self.outputs()) < count:
            assert time.monotonic() < deadline, f"{len(found)} of {count} lines reached the sink"
            time.sleep(0.05)
        time.sleep(0.3)  # a few more batches: anything sent twice would show up now
        return self.outputs()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.communicate()


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    running = Worker(tmp_path)
    try:
        yield running
    finally:
        running.stop()


def by_client(outputs: list[tuple[str, int, str]]) -> dict[str, list[tuple[int, str]]]:
    grouped: dict[str, list[tuple[int, str]]] = {}
    for client_id, seq, text in outputs:
        grouped.setdefault(client_id, []).append((seq, text))
    return grouped


def numbered(lines: list[str]) -> list[tuple[int, str]]:
    return list(enumerate(lines, start=1))


def test_a_file_regenerated_at_the_same_path_is_sent_in_full(worker: Worker) -> None:
    path = worker.workdir / "report.csv"
    first = ["id,amount", *(f"{i},{i * 10}" for i in range(1, 6))]
    path.write_text("\n".join(first) + "\n")
    sent = worker.send(str(path))
    assert sent.returncode == 0, sent.stderr
    assert "6 lines: 6 sent, 0 skipped" in sent.stdout

    # The same path, the same file (inode) and header, other rows: a new export.
    second = ["id,amount", *(f"{i},{i * 7}" for i in range(100, 109))]
    with path.open("r+") as rewrite:
        rewrite.truncate(0)
        rewrite.write("\n".join(second) + "\n")
    sent = worker.send(str(path))
    assert sent.returncode == 0, sent.stderr
    assert "10 lines: 10 sent, 0 skipped" in sent.stdout
    assert "skipped:" not in sent.stdout

    outputs = worker.wait_for(len(first) + len(second))
    versions = by_client(outputs)
    assert sorted(versions.values()) == sorted([numbered(first), numbered(second)])
    assert Counter(text for _, _, text in outputs) == Counter(first + second)


def test_a_file_replaced_by_a_new_one_with_the_same_first_lines_is_sent_in_full(
    worker: Worker,
) -> None:
    path = worker.workdir / "export.txt"
    first = ["header", "a", "b", "c"]
    path.write_text("\n".join(first) + "\n")
    assert worker.send(str(path)).returncode == 0

    # Written beside and renamed over the old one: a new file, with the old
    # one's first lines (all of them) and more.
    second = [*first, "d", "e"]
    (worker.workdir / "export.tmp").write_text("\n".join(second) + "\n")
    (worker.workdir / "export.tmp").replace(path)
    sent = worker.send(str(path))
    assert sent.returncode == 0, sent.stderr
    assert "6 lines: 6 sent, 0 skipped" in sent.stdout

    versions = by_client(worker.wait_for(len(first) + len(second)))
    assert sorted(versions.values()) == sorted([numbered(first), numbered(second)])


def test_resending_skips_what_is_durable_says_why_and_sends_only_appended_lines(
    worker: Worker,
) -> None:
    path = worker.workdir / "events.log"
    lines = [f"event {i}" for i in range(1, 6)]
    path.write_text("\n".join(lines) + "\n")
    first = worker.send(str(path))
    assert first.returncode == 0, first.stderr
    assert "5 lines: 5 sent, 0 skipped" in first.stdout
    client_id = first.stdout.rsplit("(client id ", 1)[1].split(")")[0]

    again = worker.send(str(path))
    assert again.returncode == 0, again.stderr
    assert "5 lines: 0 sent, 5 skipped" in again.stdout
    assert (
        f"5 line(s) skipped: the server already holds lines 1 to 5 durably for client id"
        f" {client_id}" in again.stdout
    )
    assert "--no-resume" in again.stdout

    # Appended past several powers of two of lines, and past the first 4 KiB.
    more = [f"event {i} " + "x" * 60 for i in range(6, 120)]
    with path.open("a") as log:
        log.write("\n".join(more) + "\n")
    grown = worker.send(str(path))
    assert grown.returncode == 0, grown.stderr
    assert f"{len(lines + more)} lines: {len(more)} sent, 5 skipped" in grown.stdout
    assert f"(client id {client_id})" in grown.stdout

    outputs = worker.wait_for(len(lines + more))
    assert by_client(outputs) == {client_id: numbered(lines + more)}

    # --no-resume sends every line again, under a new client id.
    fresh = worker.send("--no-resume", str(path))
    assert fresh.returncode == 0, fresh.stderr
    assert f"{len(lines + more)} lines: {len(lines + more)} sent, 0 skipped" in fresh.stdout
    versions = by_client(worker.wait_for(2 * len(lines + more)))
    assert len(versions) == 2
    assert all(sent == numbered(lines + more) for sent in versions.values())
