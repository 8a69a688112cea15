"""Chaos pipelines: the app each worker runs and the numbered input fed to it.

A :class:`Pipeline` says what its worker reads (as a
:class:`~streamlet.testing.chaos.config.SourceConfig`), feeds that input
while the worker runs, and says which records must come out. Input is
paced by the workers' uptime, so faults land while it flows and a worker
that is down does not fall behind. The Kafka pipelines, which bring their
own broker, are in :mod:`streamlet.testing.chaos.kafka`.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import anyio

from streamlet._tracker import TrackerState
from streamlet.testing.chaos.config import SequenceInput, SourceConfig, TcpInput, WorkerConfig

__all__ = ["FedPipeline", "Pipeline", "SequencePipeline", "TcpPipeline", "quiet"]


class Pipeline(ABC):
    """A worker app and the numbered input fed to it.

    Subclasses say what source the app reads and how input reaches it;
    the worker module, sinks and output checks are shared.

    Args:
        workdir: where the worker's configuration, state directory and outputs live.
        records: how many input records in all.
        pace: seconds of worker running time over which input is spread
            (so that faults land while it flows); 0 for all at once.
        dead_letter: the handlers raise on / hang over poisoned records and
            the app sends those batches to a dead-letter sink.
    """

    name: ClassVar[str]
    receiver: ClassVar[bool]
    """True when input goes through the data WAL (a receiver)."""
    sinks: ClassVar[tuple[tuple[str, str], ...]] = (("file", "to_files"), ("sqlite", "to_db"))
    """The exactly-once sinks checked: (name in reports, handler)."""

    def __init__(self, workdir: Path, *, records: int, pace: float, dead_letter: bool) -> None:
        self.workdir = workdir
        self.records = records
        self.pace = pace
        self.dead_letter = dead_letter
        created = time.monotonic()
        # Seconds workers have run so far; input is spread over it. The
        # harness sets it; by default it is the time since creation.
        self.uptime: Callable[[], float] = lambda: time.monotonic() - created
        self.state = workdir / "state"
        self.files = workdir / "files"
        self.db = workdir / "out.db"
        self.dead = workdir / "dead"
        self.config_path = workdir / "worker.json"

    @abstractmethod
    def source_config(self) -> SourceConfig:
        """What the worker's app reads."""

    @abstractmethod
    def expected(self) -> dict[str, range]:
        """Per key, the record numbers that must come out, in order."""

    def extra_outputs(self) -> dict[str, list[str]]:
        """What further sinks hold, by sink name, in commit order (blocking)."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the pipeline started (a broker); called after the checks."""

    def config(self) -> WorkerConfig:
        """The worker's configuration: this pipeline's source, sinks and failure policy."""
        return WorkerConfig(
            pipeline=self.name,
            state_dir=str(self.state),
            files=str(self.files),
            db=str(self.db),
            dead_letter=str(self.dead) if self.dead_letter else None,
            poison=self.dead_letter,
            source=self.source_config(),
        )

    def write_config(self) -> None:
        """Write the worker's configuration into the working directory (before any worker)."""
        self.config().write(self.config_path)

    def start_input(self) -> None:  # noqa: B027 - optional hook
        """Start feeding input (a direct source needs nothing)."""

    def stop_input(self) -> None:  # noqa: B027 - optional hook
        """Stop feeding input; returns once the feeder has stopped."""

    def input_done(self) -> bool:
        """Whether all input was offered and acknowledged."""
        return True

    def input_error(self) -> str | None:
        """What broke the feeder, if anything did."""
        return None

    @abstractmethod
    def consumed(self, state: TrackerState) -> bool:
        """Whether the tracker ``state`` has every acknowledged record in done batches."""


class SequencePipeline(Pipeline):
    """A direct source: ``SequenceSource`` with 3 partitions, paced by its rate."""

    name = "sequence"
    receiver = False
    partitions = 3

    @property
    def per_partition(self) -> int:
        return -(-self.records // self.partitions)

    def source_config(self) -> SourceConfig:
        rate = None if self.pace <= 0 else max(1.0, self.per_partition / self.pace)
        return SequenceInput(partitions=self.partitions, limit=self.per_partition, rate=rate)

    def expected(self) -> dict[str, range]:
        return {f"p{p}": range(self.per_partition) for p in range(self.partitions)}

    def consumed(self, state: TrackerState) -> bool:
        committed = state.committed.get("input", {})
        return not state.pending and all(
            committed.get(p) == self.per_partition for p in range(self.partitions)
        )


class FedPipeline(Pipeline):
    """A pipeline whose input a feeder thread sends while the worker runs.

    Subclasses write ``_feed_all`` (run in the thread's own event loop until
    all input is sent or ``_stop`` is set) and may prepare in ``_before_feed``.
    """

    feeder: ClassVar[str]
    """What the feeder talks to, for its thread name and its error."""

    def __init__(self, workdir: Path, *, records: int, pace: float, dead_letter: bool) -> None:
        super().__init__(workdir, records=records, pace=pace, dead_letter=dead_letter)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: str | None = None

    def _before_feed(self) -> None:
        """Runs in the harness before the feeder starts."""

    @abstractmethod
    async def _feed_all(self) -> None:
        """Send all input (until ``_stop`` is set)."""

    def start_input(self) -> None:
        self._before_feed()
        self._thread = threading.Thread(
            target=self._feed, name=f"chaos-{self.feeder.lower()}-feeder", daemon=True
        )
        self._thread.start()

    def stop_input(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def input_error(self) -> str | None:
        return self._error

    def _feed(self) -> None:
        try:
            anyio.run(self._feed_all)
        except Exception as exc:
            self._error = f"the {self.feeder} feeder failed: {exc!r}"


class TcpPipeline(FedPipeline):
    """A receiver: ``TcpSource`` fed by 3 ``TcpClient`` s, each numbering its lines."""

    name = "tcp"
    receiver = True
    feeder = "TCP"
    clients = 3

    def __init__(self, workdir: Path, *, records: int, pace: float, dead_letter: bool) -> None:
        super().__init__(workdir, records=records, pace=pace, dead_letter=dead_letter)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self._done = 0
        self.acked: dict[str, int] = {}

    @property
    def per_client(self) -> int:
        return -(-self.records // self.clients)

    def source_config(self) -> SourceConfig:
        return TcpInput(port=self.port)

    def expected(self) -> dict[str, range]:
        return {f"c{c}": range(1, self.per_client + 1) for c in range(self.clients)}

    def _before_feed(self) -> None:
        quiet("streamlet.tcp")  # the client reports each reconnect: here they are the point

    def input_done(self) -> bool:
        return self._done == self.clients

    def consumed(self, state: TrackerState) -> bool:
        return (
            self.input_done()
            and not state.pending
            and not any(state.blocks.get(name) for name in state.blocks)
        )

    async def _feed_all(self) -> None:
        async with anyio.create_task_group() as tg:

            async def clients() -> None:
                async with anyio.create_task_group() as senders:
                    for client in range(self.clients):
                        senders.start_soon(self._feed_one, client)
                tg.cancel_scope.cancel()

            tg.start_soon(clients)
            await anyio.to_thread.run_sync(self._stop.wait, abandon_on_cancel=True)
            tg.cancel_scope.cancel()

    async def _feed_one(self, client: int) -> None:
        from streamlet.tcp import TcpClient

        name = f"c{client}"
        interval = self.pace / self.per_client if self.pace > 0 else 0.0
        async with TcpClient(
            "127.0.0.1",
            self.port,
            name,
            start_seq=1,
            reconnect_backoff=0.05,
            max_backoff=0.5,
            connect_timeout=None,
        ) as sender:
            for number in range(1, self.per_client + 1):
                await sender.send(b"%s:%d" % (name.encode(), number))
                self.acked[name] = sender.acked
                if interval and number % 25 == 0:
                    # Paced by worker uptime, like the sequence source: a
                    # worker that is down does not fall behind its input.
                    ahead = number * interval - self.uptime()
                    if ahead > 0:
                        await anyio.sleep(ahead)
            await sender.flush()
            self.acked[name] = sender.acked
        self._done += 1


def quiet(logger: str) -> None:
    """Keep a client library's warnings off stderr (unless logging is set up)."""
    log = logging.getLogger(logger)
    if not any(isinstance(h, logging.NullHandler) for h in log.handlers):
        log.addHandler(logging.NullHandler())
