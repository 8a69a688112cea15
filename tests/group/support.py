"""Worker processes of tests/group/group_worker.py, and reading their output."""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import anyio

from streamlet.errors import StreamletError
from streamlet.kafka._group import GroupView, describe_group
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
    bootstrap: str,
    new_topic: Callable[..., Awaitable[str]],
    directory: Path,
    *,
    partitions: int = 4,
) -> tuple[str, str, dict[str, str]]:
    """Input and output topics of ``partitions``, the worker module in ``directory``, its env.

    Returns ``(input topic, output topic, environment of the workers)``.
    """
    source = await new_topic(partitions, prefix="in")
    out = await new_topic(partitions, prefix="out")
    shutil.copy(WORKER, directory / "group_worker.py")
    env = {
        "GROUP_BOOTSTRAP": bootstrap,
        "GROUP_IN": source,
        "GROUP_OUT": out,
        "GROUP_NAME": f"group-{source}",
        # An app per test: a stateful app's changelog topic is named after it.
        "GROUP_APP": f"app-{source}",
    }
    return source, out, env


async def group_settled(
    bootstrap: str, group: str, workers: Iterable[Worker], *, quiet: float = 1.5, within: float = 45
) -> GroupView:
    """Wait until the group is Stable with exactly ``workers``, each working, for ``quiet`` s.

    Each worker must own tasks (by the group and by its own log) and have
    logged no new assignment for ``quiet`` seconds. So a SIGKILLed worker's
    old member is gone (after the session timeout), and a worker stopped now
    is evicted rather than waited for in a rebalance. Returns the group's view.
    """
    names = sorted(w.name for w in workers)
    with anyio.fail_after(within):
        while True:
            try:
                view = await describe_group(group, bootstrap)
            except StreamletError:
                view = None
            calm = all(
                w.owns_tasks() and time.time() - w.last_assignment() > quiet for w in workers
            )
            if (
                view is not None
                and view.state == "Stable"
                and sorted(m.worker for m in view.members) == names
                and all(m.tasks for m in view.members)
                and calm
            ):
                return view
            await anyio.sleep(0.3)
