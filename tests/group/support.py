"""Worker processes of tests/group/group_worker.py, and reading their output."""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

from tests.kafka.test_kafka_sink import _read_all

WORKER = Path(__file__).with_name("group_worker.py")
RECORDS = 20_000


class Worker:
    """One `streamlet run --group` process; its stderr kept for the failure message."""

    def __init__(
        self, tmp_path: Path, name: str, env: dict[str, str], extra: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "streamlet",
                "run",
                "group_worker:app",
                "--quiet",
                "--worker",
                name,
                "--log-level",
                "info",
            ],
            cwd=tmp_path,
            env={
                **os.environ,
                **env,
                **(extra or {}),
                "GROUP_STATE": str(tmp_path / f"state-{name}"),
            },
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    def log(self) -> str:
        return f"--- {self.name} ---\n" + "".join(self.lines[-60:])

    def owns_tasks(self) -> bool:
        return any("this worker owns tasks [" in line for line in self.lines)

    def alive(self) -> bool:
        return self.process.poll() is None

    def last_assignment(self) -> float:
        """When this worker last logged its tasks (its log's clock), 0 if never."""
        for line in reversed(self.lines):
            if "this worker owns tasks" in line:
                stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
                return stamp.timestamp()
        return 0.0

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout)
        self.reader.join(10)
        if self.process.stderr is not None:
            self.process.stderr.close()
        return code


async def output(bootstrap: str, topic: str) -> list[bytes]:
    return [r.value for r in await _read_all(bootstrap, topic, partitions=4)]


async def setup_group_app(
    bootstrap: str, new_topic: Callable[..., Awaitable[str]], directory: Path
) -> tuple[str, str, dict[str, str]]:
    """Input and output topics of 4 partitions, the worker module in ``directory``, its env.

    Returns ``(input topic, output topic, environment of the workers)``.
    """
    source, out = await new_topic(4, prefix="in"), await new_topic(4, prefix="out")
    shutil.copy(WORKER, directory / "group_worker.py")
    env = {
        "GROUP_BOOTSTRAP": bootstrap,
        "GROUP_IN": source,
        "GROUP_OUT": out,
        "GROUP_NAME": f"group-{source}",
    }
    return source, out, env
