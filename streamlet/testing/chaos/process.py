"""A chaos worker process, seen from the harness: start it, watch its batches, signal it.

The harness never runs the app in its own process: a fault must be able to
kill the worker outright, and a crash point ends it with SIGKILL. So each
worker is ``python -m streamlet run streamlet.testing.chaos.worker:app``,
whose per-batch status lines the harness reads to know when to strike and
how long recovery took.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from streamlet.testing.chaos.config import CONFIG_ENV, WORKER_TARGET

__all__ = ["Worker"]

_STATUS = re.compile(r"^batch (\d+): (\d+) records .* commit ([\d.]+) ms")
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[3])
# Fault hooks and a configuration the harness did not choose must not leak into a worker.
_CLEAN_ENV = ("STREAMLET_CRASH_AT", "STREAMLET_FAULT_FS", "STREAMLET_FAULT_CLOCK", CONFIG_ENV)


class Worker:
    """One ``streamlet run`` process of the app under test.

    Its stdout (one status line per batch) is read on a thread and each
    batch line is time-stamped; stderr (the log) goes to ``log``.

    Args:
        workdir: the run's directory (the process's cwd).
        config: the worker's JSON configuration file (see
            :mod:`streamlet.testing.chaos.config`).
        env: extra environment variables (fault hooks).
        log: file the process's stderr is appended to.
    """

    def __init__(self, workdir: Path, *, config: Path, env: Mapping[str, str], log: Path) -> None:
        base = {k: v for k, v in os.environ.items() if k not in _CLEAN_ENV}
        # The worker runs the streamlet this harness imported, wherever it lives.
        base["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, base.get("PYTHONPATH")]))
        base[CONFIG_ENV] = str(config)
        self.env = dict(env)
        self.log = log
        with log.open("ab") as stream:
            stream.write(f"--- worker start, env {self.env}\n".encode())
            self._log_start = stream.tell()
        self._stderr: IO[bytes] = log.open("ab")
        self.started = time.monotonic()
        self.ended: float | None = None
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "streamlet", "run", WORKER_TARGET, "--log-level", "warning"],
            cwd=workdir,
            env={**base, "PYTHONUNBUFFERED": "1", **self.env},
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self.batches: list[tuple[float, int, int, float]] = []
        """Per batch line: (monotonic time, batch id, records, commit ms)."""
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        stdout = self._proc.stdout
        assert stdout is not None
        for line in stdout:
            match = _STATUS.match(line)
            if match:
                with self._changed:
                    self.batches.append(
                        (
                            time.monotonic(),
                            int(match.group(1)),
                            int(match.group(2)),
                            float(match.group(3)),
                        )
                    )
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def first_batch_after(self) -> float | None:
        """Seconds from the start to the first batch done, if one was."""
        return self.first_batch_since(self.started)

    def first_batch_since(self, moment: float) -> float | None:
        """Seconds from ``moment`` (monotonic) to the first batch done after it, if any."""
        with self._changed:
            later = [when for when, _, _, _ in self.batches if when >= moment]
        return later[0] - moment if later else None

    def alive(self) -> bool:
        return self._proc.poll() is None

    def uptime(self) -> float:
        """Seconds the process ran (so far), as the harness saw it."""
        if self.ended is None and not self.alive():
            self.ended = time.monotonic()
        return (self.ended or time.monotonic()) - self.started

    def wait_batches(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` batches were done in this run; False if it exited or timed out."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.batches) < count:
                left = deadline - time.monotonic()
                if left <= 0 or (not self._reader.is_alive() and len(self.batches) < count):
                    return False
                self._changed.wait(min(left, 0.2))
        return True

    def handles(self, sig: int) -> bool | None:
        """Whether the process has a handler for ``sig`` (Linux /proc); None if unknown."""
        try:
            status = Path(f"/proc/{self._proc.pid}/status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
        return None

    def wait_ready(self, timeout: float) -> bool:
        """Wait until a SIGTERM would stop the worker gracefully (its handler is up).

        Without /proc, waits for the first batch instead.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.alive():
            handled = self.handles(signal.SIGTERM)
            if handled is None:
                return self.wait_batches(1, deadline - time.monotonic())
            if handled:
                return True
            time.sleep(0.02)
        return False

    def signal(self, sig: int) -> None:
        """Send ``sig`` (a zombie still takes it, so a worker that just died is fine)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._proc.pid, sig)

    def wait(self, timeout: float) -> int | None:
        """The exit status (negative: killed by that signal), or None if still running."""
        try:
            code = self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        if self.ended is None:
            self.ended = time.monotonic()
        self._reader.join(timeout=10)
        self._close()
        return code

    def stop(self) -> int:
        """SIGKILL the worker if it still runs, reap it; return its status."""
        self.signal(signal.SIGKILL)
        code = self.wait(60)
        assert code is not None, f"worker {self.pid} survived SIGKILL"
        return code

    def _close(self) -> None:
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._stderr.close()

    def stderr(self) -> str:
        """What this run logged so far."""
        with self.log.open("rb") as stream:
            stream.seek(self._log_start)
            return stream.read().decode(errors="replace")
