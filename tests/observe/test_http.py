"""A real worker (``streamlet run --http``) scraped and read over HTTP, as operators would."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text

from tests.observe.support import MARKER, wait_until_all_taken


def _samples(text: str, *, openmetrics: bool = False) -> dict[tuple[str, frozenset[Any]], float]:
    parse = parse_openmetrics if openmetrics else parse_text
    return {(s.name, frozenset(s.labels.items())): s.value for f in parse(text) for s in f.samples}


def test_metrics_scraped_from_a_running_worker_match_what_happened(start: Any) -> None:
    worker = start("--http", "127.0.0.1:0", OBSERVED_SLOW="0.05", OBSERVED_FAIL_EVERY="3")
    assert worker.url, worker.log()
    status = wait_until_all_taken(worker, 2000)
    last = status["last_done"]
    batches = worker.json(f"/api/batches?after=0&limit={last}")["batches"]
    assert [b["id"] for b in batches] == list(range(1, last + 1))

    code, headers, body = worker.get("/metrics")
    assert code == 200
    assert headers["Content-Type"].startswith("text/plain")
    s = _samples(body.decode())

    def value(name: str, **labels: str) -> float:
        return s[(name, frozenset({"app": "observed", **labels}.items()))]

    # Records in equals what the source had; every batch is counted once.
    assert value("streamlet_batch_input_records_total", source="numbers") == 2000
    failed = [b for b in batches if b["id"] % 3 == 0]
    done = value("streamlet_batches_total", status="done", recovered="false")
    dead = value("streamlet_batches_total", status="dead_lettered", recovered="false")
    assert (done, dead) == (last - len(failed), len(failed))
    assert value("streamlet_batch_processing_seconds_count") == last
    # The slow handler sleeps 50 ms a batch: it shows in processing time.
    assert value("streamlet_batch_processing_seconds_sum") >= 0.05 * last
    assert value("streamlet_sink_commit_seconds_count", handler="slow") == last
    # The failing handler: one failure per batch it refused, one retry each,
    # and its input records dead-lettered.
    assert value("streamlet_handler_failures_total", handler="picky") == len(failed)
    assert value("streamlet_handler_retries_total", handler="picky") == len(failed)
    assert value("streamlet_dead_letters_total", handler="picky") == sum(
        b["records"] for b in failed
    )
    assert value("streamlet_batch_outputs_total", handler="slow") == 2000
    assert value("streamlet_last_batch_id") == last
    for partition in ("0", "1"):
        assert value("streamlet_source_lag_records", source="numbers", partition=partition) == 0
    assert value("streamlet_pending_batches") == 0
    # durability "always": an fsync per group commit, and each tracker event waited for one.
    assert value("streamlet_wal_fsync_seconds_count", log="tracker") >= last
    assert value("streamlet_wal_append_seconds_count", log="tracker") >= 2 * last
    assert value("streamlet_wal_appended_bytes_total", log="tracker") > 0
    assert value("streamlet_wal_segments", log="tracker") >= 1

    code, headers, body = worker.get(
        "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    strict = _samples(body.decode(), openmetrics=True)
    assert (
        strict[
            (
                "streamlet_batch_input_records_total",
                frozenset({"app": "observed", "source": "numbers"}.items()),
            )
        ]
        == 2000
    )
    assert status["errors"][-1]["handler"] == "picky"
    assert "is not to my taste" in status["errors"][-1]["error"]


def test_status_health_and_batches_are_json_read_only_and_carry_no_record_data(
    start: Any,
) -> None:
    worker = start("--http", "127.0.0.1:0")
    assert worker.url, worker.log()
    status = wait_until_all_taken(worker, 2000)
    assert status["app"] == "observed"
    assert status["state"] == "running"
    assert status["settings"]["batch_interval"] == 0.1
    assert {(s["handler"], s["guarantee"]) for s in status["sinks"]} == {
        ("slow", "exactly-once"),
        ("dead-letter", "exactly-once"),
    }
    health = worker.json("/healthz")
    assert health["status"] == "ok"
    newest = worker.json("/api/batches?limit=1")["batches"]
    assert len(newest) == 1
    assert newest[0]["id"] == status["last_done"]
    assert newest[0]["ranges"], newest

    bodies = [worker.get(p)[2] for p in ("/", "/api/status", "/metrics", "/api/batches")]
    for body in bodies:
        assert MARKER.encode() not in body

    _, headers, _ = worker.get("/api/status")
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert worker.get("/nothing-here")[0] == 404
    assert worker.get("/static/..%2f..%2fapp.py")[0] == 404
    post = urllib.request.Request(worker.url + "metrics", data=b"x", method="POST")  # noqa: S310
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(post, timeout=10)  # noqa: S310
    refused.value.close()
    assert refused.value.code == 405  # read-only: no endpoint takes a write
    assert worker.get("/api/status", {"X-Big": "x" * 9 * 1024})[0] in (400, 431)


def test_the_event_stream_sends_each_batch_as_it_is_done(start: Any) -> None:
    worker = start("--http", "127.0.0.1:0", OBSERVED_RECORDS="1000000")
    assert worker.url, worker.log()
    host, port = worker.url.removeprefix("http://").rstrip("/").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(f"GET /api/events HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        seen: list[int] = []
        buffer = b""
        deadline = time.monotonic() + 20
        while len(seen) < 3 and time.monotonic() < deadline:
            buffer += conn.recv(65536)
            for match in re.finditer(rb'event: batch\r?\ndata: \{"id":(\d+)', buffer):
                if int(match.group(1)) not in seen:
                    seen.append(int(match.group(1)))
    assert b"text/event-stream" in buffer
    assert len(seen) >= 3, buffer[:500]
    assert seen == sorted(seen)
    assert seen[1:] == [seen[0] + 1, seen[0] + 2][: len(seen) - 1]
    assert MARKER.encode() not in buffer


def _listening_sockets(pid: int) -> set[int]:
    """Inodes of the TCP sockets process ``pid`` listens on (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[9]) in inodes:  # 0A: LISTEN
                listening.add(int(fields[9]))
    return listening


def test_nothing_is_served_unless_asked(start: Any, tmp_path: Path) -> None:
    worker = start(OBSERVED_RECORDS="1000000")
    deadline = time.monotonic() + 30
    while not any((tmp_path / "out").glob("part-*")):  # well into its batches
        assert time.monotonic() < deadline, worker.log()
        assert worker.process.poll() is None, worker.log()
        time.sleep(0.1)
    assert _listening_sockets(worker.process.pid) == set()
    assert "status page" not in worker.log()
    worker.close()
    asked = start("--http", "127.0.0.1:0", OBSERVED_RECORDS="1000000")
    assert asked.url, asked.log()
    assert len(_listening_sockets(asked.process.pid)) == 1  # the check can see one


def test_a_bind_beyond_loopback_warns_and_a_bad_address_is_refused(start: Any) -> None:
    open_to_all = start("--http", "0.0.0.0:0")
    assert open_to_all.url, open_to_all.log()
    assert "which is not loopback" in open_to_all.log()
    open_to_all.process.terminate()
    open_to_all.process.wait(20)

    bad = start("--http", "localhost:http")
    assert bad.process.wait(30) == 2
    assert "is not HOST:PORT" in bad.log()

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = start("--http", f"127.0.0.1:{port}")
        assert busy.process.wait(30) == 2
    assert f"cannot serve the status page on 127.0.0.1:{port}" in busy.log()


def test_streamlet_status_prints_the_picture_and_says_when_nobody_answers(start: Any) -> None:
    worker = start("--http", "127.0.0.1:0", OBSERVED_FAIL_EVERY="2")
    assert worker.url, worker.log()
    wait_until_all_taken(worker, 2000)
    shown = subprocess.run(
        [sys.executable, "-m", "streamlet", "status", worker.url],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("observed: running, ok; last batch ")
    assert re.search(r"numbers\s+SequenceSource\s+0\s+1000\s+1000\s+0", shown.stdout)
    assert re.search(r"slow\s+FileSink\s+exactly-once", shown.stdout)
    assert "handler picky: ValueError: batch" in shown.stdout
    as_json = subprocess.run(
        [sys.executable, "-m", "streamlet", "status", "--json", worker.url],
        capture_output=True,
        timeout=30,
        check=True,
    )
    assert orjson.loads(as_json.stdout)["app"] == "observed"
    worker.close()
    gone = subprocess.run(
        [sys.executable, "-m", "streamlet", "status", worker.url],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert gone.returncode == 1
    assert "cannot reach" in gone.stderr
    assert "--http" in gone.stderr


async def test_an_app_in_process_serves_while_it_runs_and_not_after(tmp_path: Path) -> None:
    import anyio

    import streamlet as sl

    app = sl.App("inproc", state_dir=tmp_path / "state", batch_interval=0.05, http=":0")
    numbers = app.source(sl.SequenceSource(rate=1000), name="numbers")

    @app.handler(numbers)
    async def count(batch: sl.Batch) -> list[int]:
        return [len(batch)]

    assert app.http_url is None
    async with anyio.create_task_group() as tg:
        await tg.start(app.serve)
        url = app.http_url
        assert url is not None
        assert url.startswith("http://127.0.0.1:")  # ":0" is loopback, any free port
        health = await anyio.to_thread.run_sync(_fetch, url + "healthz")
        assert orjson.loads(health)["status"] == "ok"
        app.stop()
    assert app.http_url is None
    with pytest.raises(urllib.error.URLError):  # closed with the app
        await anyio.to_thread.run_sync(_fetch, url + "healthz")


def _fetch(url: str) -> bytes:
    """A GET from a thread: the server runs in the test's own event loop."""
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
        return bytes(response.read())
