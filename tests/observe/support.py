"""Support of the monitoring tests: a real ``streamlet run`` worker of observed_app.py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

APP_SOURCE = Path(__file__).with_name("observed_app.py")
URL_LINE = re.compile(r"status page on (http://\S+/)")
MARKER = "payload-never-served"  # in every record value of observed_app.py


@dataclass
class Worker:
    process: subprocess.Popen[str]
    stderr: list[str] = field(default_factory=list)
    url: str = ""
    reader: threading.Thread | None = None

    def close(self) -> None:
        """Stop the worker (SIGTERM, then SIGKILL) and close its pipe."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.reader is not None:
            self.reader.join(10)
        if self.process.stderr is not None:
            self.process.stderr.close()

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
        url = self.url + path.lstrip("/")
        request = urllib.request.Request(url, headers=headers or {})  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.headers, exc.read()

    def json(self, path: str) -> Any:
        status, _, body = self.get(path)
        assert status == 200, (path, status, body)
        return orjson.loads(body)

    def log(self) -> str:
        return "".join(self.stderr)


def _start(tmp_path: Path, *args: str, **env: str) -> Worker:
    shutil.copy(APP_SOURCE, tmp_path / "observed.py")
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlet", "run", "observed:app", "--quiet", *args],
        cwd=tmp_path,
        env={
            **os.environ,
            "OBSERVED_STATE": str(tmp_path / "state"),
            "OBSERVED_OUT": str(tmp_path / "out"),
            "OBSERVED_RECORDS": "2000",
            **env,
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    worker = Worker(process)
    found = threading.Event()

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            worker.stderr.append(line)
            match = URL_LINE.search(line)
            if match and not found.is_set():
                worker.url = match.group(1)
                found.set()
        found.set()

    worker.reader = threading.Thread(target=read, daemon=True)
    worker.reader.start()
    if "--http" in args:
        found.wait(30)  # the URL line, or the end of its output
    return worker


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Any]:
    """Start workers with `start(*run_args, **env)`; each is stopped at the end."""
    workers: list[Worker] = []

    def starter(*args: str, **env: str) -> Worker:
        worker = _start(tmp_path, *args, **env)
        workers.append(worker)
        return worker

    yield starter
    for worker in workers:
        worker.close()


def wait_until_all_taken(worker: Worker, records: int, within: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        status = worker.json("/api/status")
        taken = sum(p["position"] for s in status["sources"] for p in s["partitions"])
        if taken == records and not status["pending"] and status["last_batch"] is not None:
            return status
        assert time.monotonic() < deadline, f"not all taken: {status}\n{worker.log()}"
        time.sleep(0.1)
