"""Chaos harness: run a real worker, break it on purpose, and count every record.

A *scenario* injects one kind of fault into a *pipeline* while numbered input
flows, restarting the worker after each fault; at the end the harness checks
what a user relies on:

* every acknowledged input record is in every exactly-once sink (or, where
  the app sends failures aside, in the dead-letter sink), none twice, and
  nothing is there that was never sent;
* per key (a partition, a TCP client) the records come out in input order;
* ``streamlet wal verify`` finds the state directory's ``tracker/`` and
  ``data/`` logs clean.

The worker is always a real process, ``python -m streamlet run
chaos_app:app``, started in a working directory the harness writes the app
module into; faults are real signals, real files damaged on disk, and I/O
errors injected into the worker's file layer through the hooks of
:mod:`streamlet.faults`. Random choices come from one seed, printed with the
report, so a failing run can be repeated.

Use it from the command line::

    streamlet chaos --profile short                 # the CI profile, a few minutes
    streamlet chaos --profile long --seed 7         # 1,000,000+ records, 200+ kills
    python -m streamlet.testing.chaos --scenarios sigkill_random,torn_tail --records 5000

or from Python::

    from streamlet.testing.chaos import run_scenario
    result = run_scenario("sigkill_random", "sequence", records=5000, faults=5, seed=1,
                          workdir=tmp_path)
    assert result.ok, result.describe()

Scenarios and pipelines are plug-ins: :func:`register` adds a
:class:`Scenario` (a function that injects faults through a :class:`Run`),
and :data:`PIPELINES` maps a name to a :class:`Pipeline` subclass (the app
module it writes and the input it feeds). A pipeline's app writes each
record's value ``"<key>:<number>"`` to a FileSink in ``files/`` and to a
SQLiteSink table ``seen(v)`` in ``out.db``, and its dead letters (if any) to
a FileSink in ``dead/``; the checks read those.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar

import anyio

__all__ = [
    "PIPELINES",
    "PROFILES",
    "SCENARIOS",
    "Pipeline",
    "Report",
    "Run",
    "Scenario",
    "ScenarioResult",
    "Worker",
    "register",
    "run_profile",
    "run_scenario",
]

APP_MODULE = "chaos_app"
TARGET = f"{APP_MODULE}:app"
# The dead-letter app raises on, or hangs over, records whose number n has
# n % EVERY == AT; a batch holding one goes to the dead-letter sink whole.
RAISE_EVERY, RAISE_AT = 997, 13
HANG_EVERY, HANG_AT = 4999, 2500
HANDLER_TIMEOUT = 2.0
_STATUS = re.compile(r"^batch (\d+): (\d+) records .* commit ([\d.]+) ms")
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_CLEAN_ENV = ("STREAMLET_CRASH_AT", "STREAMLET_FAULT_FS", "STREAMLET_FAULT_CLOCK")


def poisoned(number: int) -> str | None:
    """How the dead-letter app's handlers treat record ``number``: "raise", "hang" or None."""
    if number % RAISE_EVERY == RAISE_AT:
        return "raise"
    if number % HANG_EVERY == HANG_AT:
        return "hang"
    return None


# -- the worker process ---------------------------------------------------------------


class Worker:
    """One ``streamlet run`` process of the app under test.

    Its stdout (one status line per batch) is read on a thread and each
    batch line is time-stamped; stderr (the log) goes to ``log``.

    Args:
        workdir: the directory holding the app module (the process's cwd).
        env: extra environment variables (fault hooks).
        log: file the process's stderr is appended to.
    """

    def __init__(self, workdir: Path, *, env: Mapping[str, str], log: Path) -> None:
        base = {k: v for k, v in os.environ.items() if k not in _CLEAN_ENV}
        # The worker runs the streamlet this harness imported, wherever it lives.
        base["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, base.get("PYTHONPATH")]))
        self.env = dict(env)
        self.log = log
        with log.open("ab") as stream:
            stream.write(f"--- worker start, env {self.env}\n".encode())
            self._log_start = stream.tell()
        self._stderr: IO[bytes] = log.open("ab")
        self.started = time.monotonic()
        self.ended: float | None = None
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "streamlet", "run", TARGET, "--log-level", "warning"],
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


# -- pipelines ----------------------------------------------------------------------

_APP = '''\
"""Chaos worker ({pipeline}): numbered records to a FileSink and a SQLiteSink."""

import anyio

import streamlet as sl
from streamlet.sinks.file import FileSink
from streamlet.sinks.sqlite import SQLiteSink


def insert(conn, batch, outputs):
    conn.executemany("INSERT INTO seen (v) VALUES (?)", [(o,) for o in outputs])


app = sl.App(
    "chaos",
    state_dir={state!r},
    batch_interval=0.1,
    block_interval=0.02,
    checkpoint_interval=0.5,
    {settings}
)
source = app.source({source}, name="input")


async def outputs(batch):
    out = []
    for record in batch:
        value = record.value.decode()
        {poison}
        out.append(value)
    return out


@app.handler(source, sink=FileSink({files!r}))
async def to_files(batch):
    return await outputs(batch)


@app.handler(
    source,
    sink=SQLiteSink({db!r}, insert, table_ddl="CREATE TABLE IF NOT EXISTS seen (v TEXT NOT NULL)"),
)
async def to_db(batch):
    return await outputs(batch)
{extra}'''

_POISON = f"""number = int(value.rpartition(":")[2])
        if number % {RAISE_EVERY} == {RAISE_AT}:
            raise ValueError(f"poison record {{value}}")
        if number % {HANG_EVERY} == {HANG_AT}:
            await anyio.sleep(3600)"""

_DEAD_LETTER_SETTINGS = (
    "on_failure='dead_letter', dead_letter=FileSink({dead!r}),"
    f" handler_timeout={HANDLER_TIMEOUT}, max_retries=1, retry_backoff=0.1,"
)


class Pipeline(ABC):
    """A worker app and the numbered input fed to it.

    Subclasses say what source the app reads and how input reaches it;
    the app module, sinks and output checks are shared.

    Args:
        workdir: where the app module, state directory and outputs live.
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

    @abstractmethod
    def source_code(self) -> str:
        """The Python expression of the app's source."""

    @abstractmethod
    def expected(self) -> dict[str, range]:
        """Per key, the record numbers that must come out, in order."""

    def extra_code(self) -> str:
        """More of the app module (handlers of further sinks), appended to it."""
        return ""

    def extra_outputs(self) -> dict[str, list[str]]:
        """What further sinks hold, by sink name, in commit order (blocking)."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the pipeline started (a broker); called after the checks."""

    def write_app(self) -> None:
        """Write the app module into the working directory."""
        settings = ""
        if self.dead_letter:
            settings = _DEAD_LETTER_SETTINGS.format(dead=str(self.dead))
        code = _APP.format(
            pipeline=self.name,
            state=str(self.state),
            settings=settings,
            source=self.source_code(),
            poison=_POISON if self.dead_letter else "",
            files=str(self.files),
            db=str(self.db),
            extra=self.extra_code(),
        )
        (self.workdir / f"{APP_MODULE}.py").write_text(code)

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
    def consumed(self, state: Any) -> bool:
        """Whether the tracker ``state`` has every acknowledged record in done batches."""


class SequencePipeline(Pipeline):
    """A direct source: ``SequenceSource`` with 3 partitions, paced by its rate."""

    name = "sequence"
    receiver = False
    partitions = 3

    @property
    def per_partition(self) -> int:
        return -(-self.records // self.partitions)

    def source_code(self) -> str:
        rate = None if self.pace <= 0 else max(1.0, self.per_partition / self.pace)
        return (
            f"sl.SequenceSource(rate={rate!r}, partitions={self.partitions},"
            f" limit={self.per_partition}, max_rate=20000,"
            ' value=lambda p, o: b"p%d:%d" % (p, o))'
        )

    def expected(self) -> dict[str, range]:
        return {f"p{p}": range(self.per_partition) for p in range(self.partitions)}

    def consumed(self, state: Any) -> bool:
        committed = state.committed.get("input", {})
        return not state.pending and all(
            committed.get(p) == self.per_partition for p in range(self.partitions)
        )


class _FedPipeline(Pipeline):
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


class TcpPipeline(_FedPipeline):
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

    def source_code(self) -> str:
        return f"sl.TcpSource(port={self.port})"

    def expected(self) -> dict[str, range]:
        return {f"c{c}": range(1, self.per_client + 1) for c in range(self.clients)}

    def _before_feed(self) -> None:
        _quiet("streamlet.tcp")  # the client reports each reconnect: here they are the point

    def input_done(self) -> bool:
        return self._done == self.clients

    def consumed(self, state: Any) -> bool:
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


class KafkaPipeline(_FedPipeline):
    """A direct ``KafkaSource`` to a transactional ``KafkaSink``, besides the file and SQLite sinks.

    The pipeline runs its own broker (:class:`~streamlet.testing.kafka.EmbeddedKafka`,
    jars from ``STREAMLET_KAFKA_CACHE`` or its default cache), so that a
    scenario may kill and restart it. Input is produced to a
    3-partition topic, key ``k<p>`` to partition ``p``, paced by worker
    uptime. The output topic is read with ``read_committed``.
    """

    name = "kafka"
    receiver = False
    mode = "direct"
    feeder = "Kafka"
    partitions = 3
    sinks = (("file", "to_files"), ("sqlite", "to_db"), ("kafka", "to_kafka"))

    def __init__(self, workdir: Path, *, records: int, pace: float, dead_letter: bool) -> None:
        from streamlet.testing.kafka import EmbeddedKafka

        super().__init__(workdir, records=records, pace=pace, dead_letter=dead_letter)
        _quiet("aiokafka")  # its clients report every broker outage the scenario causes
        self.broker = EmbeddedKafka(
            work_dir=workdir / "kafka", cache_dir=os.environ.get("STREAMLET_KAFKA_CACHE")
        )
        self._started = False
        self._produced = 0

    @property
    def per_partition(self) -> int:
        return -(-self.records // self.partitions)

    def write_app(self) -> None:
        if not self._started:
            self.broker.start(timeout=180)
            self._started = True
        super().write_app()

    def source_code(self) -> str:
        return (
            f"sl.KafkaSource('input', bootstrap_servers={self.broker.bootstrap!r},"
            f" group_id='chaos', start='earliest', max_rate=20000, mode={self.mode!r})"
        )

    def extra_code(self) -> str:
        return f"""

from streamlet.sinks.kafka import KafkaSink


@app.handler(
    source,
    sink=KafkaSink(
        "output",
        bootstrap_servers={self.broker.bootstrap!r},
        key=lambda o: o.partition(":")[0].encode(),
        value=lambda o: o.encode(),
        consume_from=source,
        open_timeout=60,
    ),
)
async def to_kafka(batch):
    return await outputs(batch)
"""

    def expected(self) -> dict[str, range]:
        return {f"k{p}": range(self.per_partition) for p in range(self.partitions)}

    def _before_feed(self) -> None:
        anyio.run(self._create_topics)

    def input_done(self) -> bool:
        return self._produced == self.per_partition

    async def _create_topics(self) -> None:
        from streamlet.testing.kafka import admin_client, create_topics

        async with admin_client(self.broker.bootstrap) as admin:
            await create_topics(admin, ("input", "output"), self.partitions)

    async def _feed_all(self) -> None:
        async with anyio.create_task_group() as tg:

            async def produce() -> None:
                await self._produce()
                tg.cancel_scope.cancel()

            tg.start_soon(produce)
            await anyio.to_thread.run_sync(self._stop.wait, abandon_on_cancel=True)
            tg.cancel_scope.cancel()

    async def _produce(self) -> None:
        """Produce the input paced by worker uptime, like the other pipelines' feeders.

        Idempotent, with a long request timeout: a send caught by a broker
        kill is retried by the producer once the broker is back, never twice.
        """
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(
            bootstrap_servers=self.broker.bootstrap,
            enable_idempotence=True,
            linger_ms=5,
            request_timeout_ms=600_000,
        )
        await producer.start()
        interval = self.pace / self.per_partition if self.pace > 0 else 0.0
        try:
            for first in range(0, self.per_partition, 25):
                numbers = range(first, min(first + 25, self.per_partition))
                sent = [
                    await producer.send("input", b"k%d:%d" % (p, n), key=b"k%d" % p, partition=p)
                    for n in numbers
                    for p in range(self.partitions)
                ]
                for future in sent:
                    await future
                self._produced = numbers[-1] + 1
                ahead = self._produced * interval - self.uptime()
                if ahead > 0:
                    await anyio.sleep(ahead)
        finally:
            with anyio.CancelScope(shield=True):  # close its connections even when cancelled
                await producer.stop()

    def consumed(self, state: Any) -> bool:
        if not self.input_done():
            return False
        if state.pending or any(state.blocks.get(name) for name in state.blocks):
            return False
        try:
            conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        except sqlite3.Error:
            return False
        try:
            (count,) = conn.execute("SELECT count(*) FROM seen").fetchone()
        except sqlite3.Error:
            return False
        finally:
            conn.close()
        return int(count) >= self.per_partition * self.partitions

    def extra_outputs(self) -> dict[str, list[str]]:
        return {"kafka": anyio.run(self._read_output)}

    async def _read_output(self) -> list[str]:
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(
            "output",
            bootstrap_servers=self.broker.bootstrap,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        seen: list[str] = []
        want = self.per_partition * self.partitions
        try:
            idle = 0
            # Read until nothing new comes for a while once everything (or more) is in.
            while idle < (4 if len(seen) >= want else 20):
                batches = await consumer.getmany(timeout_ms=500, max_records=50_000)
                got = [m.value.decode() for msgs in batches.values() for m in msgs]
                seen.extend(got)
                idle = 0 if got else idle + 1
        finally:
            with anyio.CancelScope(shield=True):  # close its connections even when cancelled
                await consumer.stop()
        return seen

    def close(self) -> None:
        self.broker.stop()


class KafkaReceiverPipeline(KafkaPipeline):
    """The same with ``KafkaSource(mode="receiver")``: records go through the data WAL."""

    name = "kafka-receiver"
    receiver = True
    mode = "receiver"


def _quiet(logger: str) -> None:
    """Keep a client library's warnings off stderr (unless logging is set up)."""
    log = logging.getLogger(logger)
    if not any(isinstance(h, logging.NullHandler) for h in log.handlers):
        log.addHandler(logging.NullHandler())


PIPELINES: dict[str, type[Pipeline]] = {
    "sequence": SequencePipeline,
    "tcp": TcpPipeline,
    "kafka": KafkaPipeline,
    "kafka-receiver": KafkaReceiverPipeline,
}
"""Pipelines by name; add a :class:`Pipeline` subclass here to test another app."""


# -- checks ---------------------------------------------------------------------------


def _parse(value: str) -> tuple[str, int] | None:
    key, sep, number = value.rpartition(":")
    if not sep or not number.isdigit():
        return None
    return key, int(number)


@dataclass
class Outputs:
    """What the sinks hold, per sink in commit order."""

    by_sink: dict[str, list[str]]
    dead: dict[str, list[str]]
    """Dead letters' values per handler."""
    dead_errors: Counter[str]
    """Dead letters per error type."""
    file_batches: set[int]
    db_batches: set[int]
    db_commit_times: list[float]


def read_outputs(pipeline: Pipeline) -> Outputs:
    """Read both sinks and the dead-letter sink of ``pipeline`` (blocking)."""
    from streamlet.sinks.file import FileSink

    parts = FileSink.read_committed(pipeline.files) if pipeline.files.exists() else {}
    in_files = [line.decode() for _, lines in sorted(parts.items()) for line in lines]
    in_db: list[str] = []
    db_batches: set[int] = set()
    commit_times: list[float] = []
    if pipeline.db.exists():
        conn = sqlite3.connect(f"file:{pipeline.db}?mode=ro", uri=True)
        try:
            in_db = [v for (v,) in conn.execute("SELECT v FROM seen ORDER BY rowid")]
            for batch_id, when in conn.execute(
                "SELECT batch_id, committed_at FROM streamlet_batches WHERE handler = 'to_db'"
            ):
                db_batches.add(int(batch_id))
                commit_times.append(float(when))
        finally:
            conn.close()
    dead: dict[str, list[str]] = {"to_files": [], "to_db": []}
    errors: Counter[str] = Counter()
    if pipeline.dead.exists():
        for _, lines in sorted(FileSink.read_committed(pipeline.dead).items()):
            for line in lines:
                letter = json.loads(line)
                dead.setdefault(letter["handler"], []).append(
                    base64.b64decode(letter["value"]).decode()
                )
                errors[str(letter["error"]).partition(":")[0]] += 1
    by_sink = {"file": in_files, "sqlite": in_db, **pipeline.extra_outputs()}
    return Outputs(by_sink, dead, errors, set(parts), db_batches, commit_times)


@dataclass
class SinkCheck:
    """One sink's outputs against the input."""

    out: int = 0
    lost: int = 0
    duplicated: int = 0
    unexpected: int = 0
    out_of_order: int = 0
    examples: list[str] = field(default_factory=list)


def check_sink(
    expected: Mapping[str, range], outputs: Sequence[str], dead: Sequence[str]
) -> SinkCheck:
    """Lost, duplicated, unexpected and out-of-order records of one sink."""
    check = SinkCheck(out=len(outputs))
    seen: Counter[tuple[str, int]] = Counter()
    last: dict[str, int] = {}
    for value in outputs:
        parsed = _parse(value)
        if parsed is None or parsed[0] not in expected or parsed[1] not in expected[parsed[0]]:
            check.unexpected += 1
            if len(check.examples) < 5:
                check.examples.append(f"unexpected {value!r}")
            continue
        key, number = parsed
        seen[parsed] += 1
        if number <= last.get(key, -1):
            check.out_of_order += 1
            if len(check.examples) < 5:
                check.examples.append(f"{value} after {key}:{last[key]}")
        last[key] = number
    for value in dead:
        parsed = _parse(value)
        if parsed is None or parsed[0] not in expected:
            check.unexpected += 1
            continue
        seen[parsed] += 1
    for (key, number), count in seen.items():
        if count > 1:
            check.duplicated += count - 1
            if len(check.examples) < 5:
                check.examples.append(f"{key}:{number} x{count}")
    for key, numbers in expected.items():
        for number in numbers:
            if (key, number) not in seen:
                check.lost += 1
                if len(check.examples) < 5:
                    check.examples.append(f"lost {key}:{number}")
    return check


def wal_verify(log_dir: Path) -> tuple[bool, str]:
    """Run ``streamlet wal verify`` on a log directory: (clean, its output)."""
    done = subprocess.run(
        [sys.executable, "-m", "streamlet", "wal", "verify", str(log_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done.returncode == 0, (done.stdout + done.stderr).strip()


# -- a scenario run -------------------------------------------------------------------


@dataclass
class ScenarioResult:
    """The outcome of one scenario on one pipeline."""

    scenario: str
    pipeline: str
    seed: int
    records_in: int = 0
    records_out: dict[str, int] = field(default_factory=dict)
    dead_letters: int = 0
    """Dead letters written, over both handlers (each failed record once per handler)."""
    lost: int = 0
    duplicated: int = 0
    unexpected: int = 0
    out_of_order: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    recovery: list[float] = field(default_factory=list)
    """Seconds from each restart after a fault to the first batch done."""
    wal_clean: bool = False
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    workdir: str = ""

    @property
    def ok(self) -> bool:
        return (
            not self.problems
            and self.wal_clean
            and self.lost == self.duplicated == self.unexpected == self.out_of_order == 0
        )

    @property
    def fault_count(self) -> int:
        return sum(self.faults.values())

    def describe(self) -> str:
        """A few lines for a failing test or the report."""
        head = (
            f"{self.scenario}/{self.pipeline} seed {self.seed}: {'ok' if self.ok else 'FAILED'};"
            f" faults {self.faults}; in {self.records_in}, out {self.records_out},"
            f" dead letters {self.dead_letters}; lost {self.lost}, duplicated"
            f" {self.duplicated}, unexpected {self.unexpected}, out of order"
            f" {self.out_of_order}; WAL {'clean' if self.wal_clean else 'NOT clean'};"
            f" {self.seconds:.1f}s in {self.workdir}"
        )
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "pipeline": self.pipeline,
            "seed": self.seed,
            "ok": self.ok,
            "records_in": self.records_in,
            "records_out": self.records_out,
            "dead_letters": self.dead_letters,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "unexpected": self.unexpected,
            "out_of_order": self.out_of_order,
            "faults": self.faults,
            "recovery_p50_s": _p50(self.recovery),
            "recovery_max_s": max(self.recovery, default=None),
            "wal_clean": self.wal_clean,
            "seconds": round(self.seconds, 1),
            "problems": self.problems,
        }


class Run:
    """One scenario on one pipeline: starts workers, counts faults, checks the end.

    Scenario functions use :meth:`start`, :meth:`pause`, :meth:`fault` and
    :meth:`problem`; :meth:`finish` (called by the harness) runs the worker
    until every record is through, stops it gracefully and checks.
    """

    def __init__(
        self,
        scenario: Scenario,
        pipeline: Pipeline,
        *,
        faults: int,
        seed: int,
        timeout: float,
    ) -> None:
        self.scenario = scenario
        self.pipeline = pipeline
        self.faults_wanted = faults
        self.rng = random.Random(seed)
        self.timeout = timeout
        self.result = ScenarioResult(
            scenario.name, pipeline.name, seed, workdir=str(pipeline.workdir)
        )
        self.log = pipeline.workdir / "worker.log"
        self._after_fault = False
        self.workers: list[Worker] = []
        pipeline.uptime = self.uptime

    # Used by scenarios.

    def start(self, env: Mapping[str, str] | None = None) -> Worker:
        """Start a worker (with fault hooks in ``env``)."""
        worker = Worker(self.pipeline.workdir, env=env or {}, log=self.log)
        self.workers.append(worker)
        return worker

    def uptime(self) -> float:
        """Seconds workers of this run have been running, in all."""
        return sum(w.uptime() for w in list(self.workers))

    def note_recovery(self, worker: Worker, since: float | None = None) -> None:
        """Record the worker's recovery time if it follows a fault.

        That is from its start (or from ``since``, when the fault was not a
        restart) to its first batch done.
        """
        took = worker.first_batch_after if since is None else worker.first_batch_since(since)
        if took is not None and self._after_fault:
            self.result.recovery.append(took)
            self._after_fault = False

    def fault(self, kind: str) -> None:
        """Count one injected fault of ``kind``."""
        self.result.faults[kind] = self.result.faults.get(kind, 0) + 1
        self._after_fault = True

    def problem(self, text: str) -> None:
        """Record a broken expectation (the run fails)."""
        self.result.problems.append(text)

    def pause(self, worker: Worker, *, early: float = 0.15, longest: float = 1.5) -> None:
        """Wait a random moment to strike: usually after the first batch, sometimes before."""
        if self.rng.random() < early:
            time.sleep(self.rng.uniform(0.0, 1.0))
            return
        worker.wait_batches(1, self.timeout)
        self.note_recovery(worker)
        time.sleep(self.rng.uniform(0.05, longest))

    def state(self) -> Any:
        """The tracker state as recovery would rebuild it (read-only)."""
        from streamlet.state import read_state
        from streamlet.tracker import TrackerState

        if not (self.pipeline.state / "tracker").exists():
            return TrackerState()  # the first worker has not started yet
        return read_state(str(self.pipeline.state)).state

    def input_left(self) -> bool:
        """Whether records are still to come (faults landing now meet moving data)."""
        try:
            return not self.pipeline.consumed(self.state())
        except Exception:
            return True

    def expect_exit(self, worker: Worker, code: int, what: str, timeout: float) -> int | None:
        """Wait for the worker to exit; record a problem unless it exits with ``code``."""
        got = worker.wait(timeout)
        if got is None:
            worker.stop()
            self.problem(f"{what}: the worker did not exit within {timeout:.0f}s")
        elif got != code:
            tail = worker.stderr()[-1500:]
            self.problem(f"{what}: the worker exited with {got}, not {code}:\n{tail}")
        return got

    def kill(self, worker: Worker, sig: int = signal.SIGKILL) -> None:
        """Signal the worker and reap it; it must not have died on its own before."""
        if not worker.alive():
            code = worker.wait(10)
            tail = worker.stderr()[-1500:]
            self.problem(f"the worker exited on its own ({code}) before the fault:\n{tail}")
            return
        if sig == signal.SIGTERM and not worker.wait_ready(self.timeout):
            self.problem(f"the worker never armed its SIGTERM handler:\n{worker.stderr()[-1500:]}")
        worker.signal(sig)
        expected = -sig if sig == signal.SIGKILL else 0
        self.expect_exit(worker, expected, f"after {signal.Signals(sig).name}", self.timeout)

    # Used by the harness.

    def finish(self) -> None:
        """Run the worker until all input is through, stop it gracefully, check everything."""
        pipeline = self.pipeline
        deadline = time.monotonic() + self.timeout * 4
        worker = self.start()
        try:
            while time.monotonic() < deadline:
                if not worker.alive():
                    break
                if pipeline.input_error() is not None:
                    break
                try:
                    if pipeline.consumed(self.state()):
                        break
                except Exception as exc:
                    self.problem(f"the state directory cannot be read: {exc}")
                    break
                worker.wait_batches(len(worker.batches) + 1, 0.5)
            self.note_recovery(worker)
            if worker.alive():
                self.kill(worker, signal.SIGTERM)
            else:
                code = worker.wait(10)
                self.problem(f"the final worker exited with {code}:\n{worker.stderr()[-1500:]}")
        finally:
            if worker.alive():
                worker.stop()
            pipeline.stop_input()
        if pipeline.input_error():
            self.problem(str(pipeline.input_error()))
        if not pipeline.input_done():
            self.problem("not all input was acknowledged before the deadline")
        self.check()

    def check(self) -> None:
        """Compare the sinks with the input and verify the logs."""
        pipeline, result = self.pipeline, self.result
        expected = pipeline.expected()
        result.records_in = sum(len(r) for r in expected.values())
        outputs = read_outputs(pipeline)
        result.dead_letters = sum(len(v) for v in outputs.dead.values())
        for sink, handler in pipeline.sinks:
            check = check_sink(expected, outputs.by_sink[sink], outputs.dead.get(handler, []))
            result.records_out[sink] = check.out
            result.lost += check.lost
            result.duplicated += check.duplicated
            result.unexpected += check.unexpected
            result.out_of_order += check.out_of_order
            if check.examples:
                self.problem(f"{sink}: {'; '.join(check.examples)}")
        if outputs.file_batches != outputs.db_batches:
            only = sorted(outputs.file_batches ^ outputs.db_batches)[:10]
            self.problem(f"the two sinks committed different batches: {only}")
        if pipeline.dead_letter:
            self.check_dead_letters(outputs, expected)
        self.scenario.verify(self, outputs)
        clean = True
        for name in ("tracker", "data"):
            log_dir = pipeline.state / name
            if name == "data" and not pipeline.receiver:
                continue
            ok, text = wal_verify(log_dir)
            if not ok:
                clean = False
                self.problem(f"streamlet wal verify {log_dir}: {text}")
        result.wal_clean = clean

    def check_dead_letters(self, outputs: Outputs, expected: Mapping[str, range]) -> None:
        poisoned_out = [
            v for v in outputs.by_sink["file"] + outputs.by_sink["sqlite"] if _poisoned_value(v)
        ]
        if poisoned_out:
            self.problem(f"poisoned records reached a sink: {poisoned_out[:5]}")
        wanted = {f"{key}:{n}" for key, numbers in expected.items() for n in numbers if poisoned(n)}
        for handler, values in outputs.dead.items():
            missing = wanted - set(values)
            if missing:
                self.problem(f"poisoned records not dead-lettered by {handler}: {sorted(missing)}")
        kinds = {poisoned(n) for numbers in expected.values() for n in numbers} - {None}
        if "raise" in kinds and not outputs.dead_errors.get("ValueError"):
            self.problem("no dead letter says ValueError, though records raise")
        if "hang" in kinds and not outputs.dead_errors.get("TimeoutError"):
            self.problem("no dead letter says TimeoutError, though records hang")


def _poisoned_value(value: str) -> bool:
    parsed = _parse(value)
    return parsed is not None and poisoned(parsed[1]) is not None


# -- scenarios --------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """A named way to break the worker.

    Attributes:
        name: the name used on the command line and in reports.
        inject: ``inject(run)`` starts workers through ``run`` and injects
            ``run.faults_wanted`` faults, leaving no worker running.
        description: one line for the report.
        pipelines: the pipelines it applies to.
        dead_letter: the app under test uses the dead-letter policy.
        verify: extra checks on the outputs (besides the common ones).
    """

    name: str
    inject: Callable[[Run], None]
    description: str
    pipelines: tuple[str, ...] = ("sequence", "tcp")
    dead_letter: bool = False
    verify: Callable[[Run, Outputs], None] = lambda run, outputs: None
    uptime_per_fault: float = 1.5
    """Seconds of worker uptime one fault takes, about: input is spread over them all."""


SCENARIOS: dict[str, Scenario] = {}
"""Registered scenarios by name."""


def register(scenario: Scenario) -> Scenario:
    """Add ``scenario`` to :data:`SCENARIOS` (a plug-in point); return it."""
    SCENARIOS[scenario.name] = scenario
    return scenario


def _kill_loop(run: Run, sig: int, env: Mapping[str, str] | None = None) -> None:
    kind = "sigkill" if sig == signal.SIGKILL else "sigterm"
    for _ in range(run.faults_wanted):
        worker = run.start(env)
        if sig == signal.SIGKILL:
            run.pause(worker)
        else:  # before its signal handler is up, SIGTERM is not graceful: wait for a batch
            run.pause(worker, early=0.0)
        run.kill(worker, sig)
        run.fault(kind)
        if run.result.problems:
            return
        if sig == signal.SIGTERM:
            state = run.state()
            leftover = [a.id for a in state.pending]
            blocks = sum(len(b) for b in state.blocks.values())
            if leftover or blocks:
                run.problem(
                    f"after a graceful stop, batches {leftover} are pending and {blocks}"
                    " blocks unallocated"
                )
                return


def _sigkill_random(run: Run) -> None:
    _kill_loop(run, signal.SIGKILL)


def _sigterm_random(run: Run) -> None:
    _kill_loop(run, signal.SIGTERM)


def _sigkill_steps(run: Run) -> None:
    from streamlet.faults import POINTS

    for index in range(run.faults_wanted):
        point = POINTS[index % len(POINTS)]
        target = run.state().next_batch_id + run.rng.randint(0, 2)
        worker = run.start({"STREAMLET_CRASH_AT": f"{point}:{target}"})
        if (
            run.expect_exit(worker, -signal.SIGKILL, f"crash at {point} of batch {target}", 90)
            is None
        ):
            return
        run.note_recovery(worker)
        run.fault(f"crash_at:{point}")
        committed = point in ("after_sink_commit", "before_done", "after_done")
        part = run.pipeline.files / f"part-{target:012d}.jsonl"
        if part.exists() != committed:
            run.problem(
                f"killed at {point} of batch {target}, but its FileSink part"
                f" {'exists' if part.exists() else 'is missing'}"
            )
        if run.result.problems:
            return


def _slow_fsync(run: Run) -> None:
    for index in range(run.faults_wanted):
        if index == 0:
            # Slower than the WAL's slow-fsync warning (1 s), on the tracker log only.
            delay, where = 1100, f"{run.pipeline.state}/tracker/*"
        else:
            delay, where = run.rng.choice((20, 50, 100, 200)), "*"
        worker = run.start({"STREAMLET_FAULT_FS": f"slow_fsync:{delay}:{where}"})
        if not worker.wait_batches(1, run.timeout):
            run.problem(f"with fsync slowed by {delay} ms no batch was done")
        run.note_recovery(worker)
        time.sleep(run.rng.uniform(0.05, 1.0))
        run.kill(worker)
        run.fault("slow_fsync")
        # A batch's commit logs "done" in the tracker: at least one slow fsync.
        commits = [ms for _, _, _, ms in worker.batches]
        if commits and min(commits) < delay:
            run.problem(f"fsync slowed by {delay} ms, yet a batch committed in {min(commits)} ms")
        if index == 0 and "took" not in worker.stderr():
            run.problem("a 1.1 s fsync was not reported as slow by the WAL")
        if run.result.problems:
            return


def _io_targets(run: Run) -> list[tuple[str, str, dict[str, tuple[int, int]]]]:
    """(what, glob, per fault kind the range of its amount) for each place I/O fails."""
    state, files = run.pipeline.state, run.pipeline.files
    targets = [
        ("tracker WAL", f"{state}/tracker/*", {"fsync_eio": (2, 20), "enospc": (100, 1500)}),
        ("checkpoint", f"{state}/checkpoints/*", {"fsync_eio": (0, 2), "enospc": (0, 600)}),
        ("FileSink output", f"{files}/*", {"fsync_eio": (1, 8), "enospc": (50, 2000)}),
    ]
    if run.pipeline.receiver:
        data = ("data WAL", f"{state}/data/*", {"fsync_eio": (1, 15), "enospc": (200, 5000)})
        targets.insert(0, data)
    return targets


def _io_fault(run: Run, kind: str, message: str) -> None:
    targets = _io_targets(run)
    for index in range(run.faults_wanted):
        what, pattern, amounts = targets[index % len(targets)]
        spec = f"{kind}:{pattern}:{run.rng.randint(*amounts[kind])}"
        if not run.input_left():
            run.problem(f"input ran out before the {kind} fault on the {what}")
            return
        worker = run.start({"STREAMLET_FAULT_FS": spec})
        code = run.expect_exit(worker, 1, f"{kind} on the {what} ({spec})", run.timeout)
        run.fault(f"{kind}:{what}")
        stderr = worker.stderr()
        if code is not None and message not in stderr:
            run.problem(f"{kind} on the {what}: no {message!r} in the worker's log:\n{stderr}")
        elif code is not None and not re.search(r"^error: ", stderr, re.MULTILINE):
            run.problem(f"{kind} on the {what}: the worker did not say 'error:':\n{stderr}")
        if run.result.problems:
            return
        # The fault cleared: a worker without it recovers and goes on.
        worker = run.start()
        if not worker.wait_batches(1, run.timeout):
            run.problem(f"after the {kind} fault on the {what} cleared, no batch was done")
        run.note_recovery(worker)
        run.kill(worker, signal.SIGTERM)
        if run.result.problems:
            return


def _fsync_eio(run: Run) -> None:
    _io_fault(run, "fsync_eio", os.strerror(5))


def _enospc(run: Run) -> None:
    _io_fault(run, "enospc", os.strerror(28))


def _segments(log_dir: Path) -> list[Path]:
    return sorted(log_dir.glob("*.wal"))


def _torn_tail(run: Run) -> None:
    from streamlet.wal.format import encode_frame

    logs = ["tracker", "data"] if run.pipeline.receiver else ["tracker"]
    for index in range(run.faults_wanted):
        worker = run.start()
        run.pause(worker)
        run.kill(worker)
        if run.result.problems:
            return
        log_dir = run.pipeline.state / logs[index % len(logs)]
        last = _segments(log_dir)[-1]
        frame = encode_frame(b'{"e":"done","id":999999999}' + bytes(run.rng.randrange(64)))
        cut = run.rng.randint(13, len(frame) - 1)  # a whole header, part of the payload
        with last.open("ab") as stream:
            stream.write(frame[:cut])
        run.fault(f"torn_tail:{log_dir.name}")
        worker = run.start()
        if not worker.wait_batches(1, run.timeout):
            run.problem(f"after a torn tail in {last}, no batch was done:\n{worker.stderr()}")
        run.note_recovery(worker)
        if worker.alive():
            run.kill(worker, signal.SIGTERM)
        if "torn tail" not in worker.stderr() or str(last) not in worker.stderr():
            run.problem(f"the torn tail of {last} was not reported")
        if run.result.problems:
            return


async def _roll(log_dir: Path) -> None:
    from streamlet.wal import WriteAheadLog

    log = await WriteAheadLog.open(log_dir)
    try:
        await log.roll()
    finally:
        await log.aclose()


def _flip_target(run: Run, log_name: str) -> tuple[Path, int, int] | None:
    """A record recovery will read, in a sealed segment: (segment path, frame offset, length)."""
    from streamlet.checkpoint import load_latest
    from streamlet.fs import OsFileSystem
    from streamlet.wal.format import segment_name
    from streamlet.wal.tools import read_records

    log_dir = run.pipeline.state / log_name
    last_seq = int(_segments(log_dir)[-1].stem)
    if log_name == "data":
        state = run.state()
        refs = [b for a in state.pending for b in a.blocks]
        refs += [b for blocks in state.blocks.values() for b in blocks]
        candidates = [(r.segment, r.offset, r.length) for r in refs]
    else:
        checkpoint = load_latest(OsFileSystem(), str(run.pipeline.state / "checkpoints"))
        after = (0, 0)
        if checkpoint is not None and checkpoint.body.get("last_event"):
            after = tuple(checkpoint.body["last_event"][:2])
        candidates = [p for p, _ in read_records(log_dir) if tuple(p[:2]) >= after]
    candidates = [c for c in candidates if c[0] < last_seq and c[2] > 0]
    if not candidates:
        return None
    segment, offset, length = run.rng.choice(candidates)
    return log_dir / segment_name(segment), offset, length


def _bitflip(run: Run) -> None:
    from streamlet.wal.format import FRAME_HEADER_SIZE

    logs = ["tracker", "data"] if run.pipeline.receiver else ["tracker"]
    for index in range(run.faults_wanted):
        wanted = logs[index % len(logs)]
        if wanted == "data":
            # Killed right after an allocation, so recovery must read that batch's blocks.
            batch = run.state().next_batch_id + 1
            worker = run.start({"STREAMLET_CRASH_AT": f"after_allocate:{batch}"})
            run.expect_exit(worker, -signal.SIGKILL, f"crash after allocating {batch}", 90)
        else:
            worker = run.start()
            run.pause(worker, early=0.0)
            run.kill(worker)
        run.note_recovery(worker)
        if run.result.problems:
            return
        target = None
        for log_name in [wanted, *(name for name in logs if name != wanted)]:
            # Sealed as when a segment fills up, so the record sits in an older segment.
            anyio.run(_roll, run.pipeline.state / log_name)
            target = _flip_target(run, log_name)
            if target is not None:
                break
        if target is None:
            run.problem("no record that recovery reads was found to damage")
            return
        path, frame, length = target
        at = frame + FRAME_HEADER_SIZE + run.rng.randrange(length)
        bit = 1 << run.rng.randrange(8)
        with path.open("r+b") as stream:
            stream.seek(at)
            original = stream.read(1)
            stream.seek(at)
            stream.write(bytes([original[0] ^ bit]))
        run.fault(f"bitflip:{path.parent.name}")
        before = read_outputs(run.pipeline)
        worker = run.start()
        code = run.expect_exit(worker, 1, f"a bit flip in {path} at {at}", run.timeout)
        named = f"{path}: corrupt at offset {frame}"
        if code is not None and named not in worker.stderr():
            run.problem(f"the worker did not name {named!r}:\n{worker.stderr()[-1500:]}")
        after = read_outputs(run.pipeline)
        if after.file_batches != before.file_batches or after.db_batches != before.db_batches:
            run.problem("a batch was committed from a log with a bit flip")
        if path.parent.name == "tracker":
            ok, text = wal_verify(path.parent)
            if ok or f"{path} at offset {frame}:" not in text:
                run.problem(f"streamlet wal verify did not report {path} at {frame}: {text}")
        if not path.exists():
            run.problem(f"{path}, damaged, was deleted by a worker that should have refused it")
            return
        with path.open("r+b") as stream:  # the operator restores the damaged byte
            stream.seek(at)
            stream.write(original)
        if run.result.problems:
            return


def _dead_letter(run: Run) -> None:
    _kill_loop(run, signal.SIGKILL)


def _clock_jump(run: Run) -> None:
    for _ in range(run.faults_wanted):
        back = -run.rng.uniform(600, 7200)
        ahead = run.rng.uniform(3600, 86400)
        first = run.rng.uniform(0.2, 1.0)
        spec = f"{back:.0f}@{first:.2f};{ahead:.0f}@{first + run.rng.uniform(0.3, 1.0):.2f}"
        worker = run.start({"STREAMLET_FAULT_CLOCK": spec})
        if not worker.wait_batches(1, run.timeout):
            run.problem(f"with the clock jumping ({spec}) no batch was done")
        run.note_recovery(worker)
        time.sleep(run.rng.uniform(1.5, 2.5))  # both jumps happen while it runs
        run.kill(worker)
        run.fault("clock_jump")
        if run.result.problems:
            return


def _broker_kill(run: Run) -> None:
    broker = getattr(run.pipeline, "broker", None)
    if broker is None:
        run.problem(f"pipeline {run.pipeline.name} has no broker to kill")
        return
    worker = run.start()
    try:
        for _ in range(run.faults_wanted):
            if not worker.wait_batches(len(worker.batches) + 1, run.timeout):
                run.problem(f"no batch was done before the broker kill:\n{worker.stderr()[-1500:]}")
                return
            run.note_recovery(worker)
            time.sleep(run.rng.uniform(0.05, 1.0))
            moving = run.input_left()
            broker.kill()
            run.fault("broker_kill")
            time.sleep(run.rng.uniform(0.5, 4.0))
            broker.start(timeout=180)
            back = time.monotonic()
            if not worker.alive():
                # Failing loudly while the broker is gone is allowed; hanging is not.
                code = worker.wait(10)
                if code != 1 or "error: " not in worker.stderr():
                    run.problem(f"the worker died with {code} without an error line")
                    return
                worker = run.start()
            done = len(worker.batches)
            if not moving:
                run.problem("the input ran out before the broker kill: give the run more records")
                return
            if not worker.wait_batches(done + 1, run.timeout * 2):
                tail = worker.stderr()[-1500:]
                run.problem(f"no batch was done after the broker came back:\n{tail}")
                return
            run.note_recovery(worker, since=back)
    finally:
        if worker.alive():
            run.kill(worker, signal.SIGTERM)
        else:
            worker.wait(10)


def _verify_clock(run: Run, outputs: Outputs) -> None:
    ids = sorted(outputs.file_batches)
    if ids != list(range(1, len(ids) + 1)):
        gaps = sorted(set(range(1, (ids or [0])[-1] + 1)) - set(ids))[:10]
        run.problem(f"batch ids are not dense after clock jumps: missing {gaps}")
    now = time.time()
    jumped = [t for t in outputs.db_commit_times if abs(t - now) > 500]
    if not jumped:
        run.problem("no batch was committed under a jumped clock: the fault did not take")


_ALL_PIPELINES = ("sequence", "tcp", "kafka", "kafka-receiver")

register(
    Scenario(
        "sigkill_random", _sigkill_random, "SIGKILL at random moments", pipelines=_ALL_PIPELINES
    )
)
register(
    Scenario(
        "sigkill_steps",
        _sigkill_steps,
        "SIGKILL at each named step of the commit protocol (STREAMLET_CRASH_AT)",
        pipelines=_ALL_PIPELINES,
        uptime_per_fault=1.0,
    )
)
register(
    Scenario(
        "sigterm_random",
        _sigterm_random,
        "SIGTERM at random moments: exit 0, nothing left pending",
        pipelines=_ALL_PIPELINES,
    )
)
register(
    Scenario(
        "slow_fsync",
        _slow_fsync,
        "every fsync delayed 20 ms to 1.1 s, with SIGKILLs",
        uptime_per_fault=4.0,
    )
)
register(
    Scenario(
        "fsync_eio",
        _fsync_eio,
        "fsync fails with EIO on a WAL, a checkpoint, a FileSink output: exit 1, then recover",
        uptime_per_fault=4.0,
    )
)
register(
    Scenario(
        "enospc",
        _enospc,
        "disk full while writing a WAL, a checkpoint, a FileSink output: exit 1, then recover",
        uptime_per_fault=4.0,
    )
)
register(
    Scenario(
        "torn_tail",
        _torn_tail,
        "a torn frame at the end of the last WAL segment: cut off, nothing lost",
        uptime_per_fault=2.5,
    )
)
register(
    Scenario(
        "bitflip",
        _bitflip,
        "a bit flipped in a sealed WAL segment: refuse to start naming file and offset",
        uptime_per_fault=2.5,
    )
)
register(
    Scenario(
        "dead_letter",
        _dead_letter,
        "handlers raise on some records, hang on others (timeout): dead letters, with SIGKILLs",
        dead_letter=True,
        uptime_per_fault=2.5,
    )
)
register(
    Scenario(
        "clock_jump",
        _clock_jump,
        "the wall clock jumps back and forward: batch ids stay dense",
        verify=_verify_clock,
        uptime_per_fault=3.5,
    )
)


register(
    Scenario(
        "broker_kill",
        _broker_kill,
        "the Kafka broker SIGKILLed and restarted under a running worker",
        pipelines=("kafka", "kafka-receiver"),
        # A broker restart takes tens of seconds, and the input goes on meanwhile.
        uptime_per_fault=30.0,
    )
)


def run_scenario(
    scenario: str,
    pipeline: str,
    *,
    records: int,
    faults: int,
    seed: int,
    workdir: str | os.PathLike[str],
    pace: float | None = None,
    timeout: float = 60.0,
) -> ScenarioResult:
    """Run one scenario on one pipeline in ``workdir`` (created; must be new or empty).

    Args:
        scenario: a name in :data:`SCENARIOS`.
        pipeline: a name in :data:`PIPELINES`.
        records: input records in all.
        faults: faults to inject.
        seed: seeds every random choice of the run.
        workdir: where the app module, its state and its outputs go.
        pace: seconds of worker uptime the input is spread over (default:
            about as long as the faults take).
        timeout: seconds any one wait for the worker may take.
    """
    chosen = SCENARIOS[scenario]
    if pipeline not in chosen.pipelines:
        raise ValueError(f"scenario {scenario!r} does not apply to pipeline {pipeline!r}")
    path = Path(workdir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    if pace is None:
        pace = max(3.0, faults * chosen.uptime_per_fault)
    pipe = PIPELINES[pipeline](path, records=records, pace=pace, dead_letter=chosen.dead_letter)
    run = Run(chosen, pipe, faults=faults, seed=seed, timeout=timeout)
    started = time.monotonic()
    try:
        pipe.write_app()
        pipe.start_input()
        chosen.inject(run)
        run.finish()
    finally:
        pipe.stop_input()
        pipe.close()
        run.result.seconds = time.monotonic() - started
    return run.result


# -- profiles and the report -------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """One scenario on one pipeline with its size."""

    scenario: str
    pipeline: str
    records: int
    faults: int


def _plans(rows: Iterable[tuple[str, str, int, int]]) -> tuple[Plan, ...]:
    return tuple(Plan(*row) for row in rows)


PROFILES: dict[str, tuple[Plan, ...]] = {
    "short": _plans(
        [
            ("sigkill_random", "sequence", 6000, 6),
            ("sigkill_random", "tcp", 6000, 6),
            ("sigkill_steps", "sequence", 6000, 5),
            ("sigkill_steps", "tcp", 6000, 5),
            ("sigterm_random", "sequence", 3000, 3),
            ("sigterm_random", "tcp", 3000, 3),
            ("slow_fsync", "tcp", 3000, 3),
            ("fsync_eio", "sequence", 3000, 3),
            ("fsync_eio", "tcp", 3000, 4),
            ("enospc", "sequence", 3000, 3),
            ("enospc", "tcp", 3000, 4),
            ("torn_tail", "tcp", 3000, 4),
            ("bitflip", "sequence", 3000, 2),
            ("bitflip", "tcp", 3000, 2),
            ("dead_letter", "sequence", 12000, 3),
            ("clock_jump", "sequence", 3000, 2),
            ("sigkill_random", "kafka-receiver", 3000, 3),
            ("broker_kill", "kafka", 3000, 2),
        ]
    ),
    "long": _plans(
        [
            ("sigkill_random", "sequence", 600_000, 130),
            ("sigkill_random", "tcp", 400_000, 80),
            ("sigkill_steps", "sequence", 20_000, 20),
            ("sigkill_steps", "tcp", 20_000, 20),
            ("sigterm_random", "sequence", 20_000, 10),
            ("sigterm_random", "tcp", 20_000, 10),
            ("slow_fsync", "sequence", 10_000, 6),
            ("slow_fsync", "tcp", 10_000, 6),
            ("fsync_eio", "sequence", 10_000, 6),
            ("fsync_eio", "tcp", 10_000, 8),
            ("enospc", "sequence", 10_000, 6),
            ("enospc", "tcp", 10_000, 8),
            ("torn_tail", "sequence", 10_000, 6),
            ("torn_tail", "tcp", 10_000, 8),
            ("bitflip", "sequence", 10_000, 4),
            ("bitflip", "tcp", 10_000, 6),
            ("dead_letter", "sequence", 30_000, 8),
            ("dead_letter", "tcp", 30_000, 8),
            ("clock_jump", "sequence", 10_000, 4),
            ("clock_jump", "tcp", 10_000, 4),
            ("sigkill_random", "kafka", 60_000, 25),
            ("sigkill_random", "kafka-receiver", 60_000, 25),
            ("sigkill_steps", "kafka", 10_000, 10),
            ("sigkill_steps", "kafka-receiver", 10_000, 10),
            ("broker_kill", "kafka", 10_000, 4),
            ("broker_kill", "kafka-receiver", 10_000, 4),
        ]
    ),
}
"""Named sets of runs: ``short`` for CI, ``long`` for the published figures."""

PROCESS_KILLS = ("sigkill", "crash_at:")


def _p50(values: Sequence[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


@dataclass
class Report:
    """All runs of a profile, with totals."""

    profile: str
    seed: int
    command: str
    results: list[ScenarioResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def totals(self) -> dict[str, Any]:
        results = self.results
        recovery = [t for r in results for t in r.recovery]
        faults: Counter[str] = Counter()
        for r in results:
            faults.update(r.faults)
        return {
            "scenarios": sorted({r.scenario for r in results}),
            "runs": len(results),
            "faults": sum(faults.values()),
            "process_kills": sum(n for k, n in faults.items() if k.startswith(PROCESS_KILLS)),
            "records_in": sum(r.records_in for r in results),
            "records_out": sum(r.records_out.get("file", 0) for r in results),
            "dead_letters": sum(r.dead_letters for r in results),
            "lost": sum(r.lost for r in results),
            "duplicated": sum(r.duplicated for r in results),
            "unexpected": sum(r.unexpected for r in results),
            "out_of_order": sum(r.out_of_order for r in results),
            "recovery_p50_s": _p50(recovery),
            "recovery_max_s": round(max(recovery), 3) if recovery else None,
            "failed_runs": [f"{r.scenario}/{r.pipeline}" for r in results if not r.ok],
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "report": "streamlet.chaos",
            "profile": self.profile,
            "seed": self.seed,
            "command": self.command,
            "ok": self.ok,
            "seconds": round(self.seconds, 1),
            "totals": self.totals(),
            "runs": [r.to_json() for r in self.results],
        }

    def table(self) -> str:
        """The report as a readable table."""
        rows = [
            (
                "scenario",
                "pipeline",
                "faults",
                "in",
                "out",
                "dead",
                "lost",
                "dup",
                "order",
                "wal",
                "rec p50",
                "rec max",
                "secs",
                "result",
            )
        ]
        for r in self.results:
            rows.append(
                (
                    r.scenario,
                    r.pipeline,
                    str(r.fault_count),
                    str(r.records_in),
                    str(r.records_out.get("file", 0)),
                    str(r.dead_letters),
                    str(r.lost),
                    str(r.duplicated),
                    str(r.out_of_order),
                    "ok" if r.wal_clean else "BAD",
                    _seconds(_p50(r.recovery)),
                    _seconds(max(r.recovery, default=None)),
                    f"{r.seconds:.0f}",
                    "ok" if r.ok else "FAILED",
                )
            )
        t = self.totals()
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append("")
        lines.append(
            f"{t['runs']} runs of {len(t['scenarios'])} scenarios, {t['faults']} faults"
            f" ({t['process_kills']} process kills); {t['records_in']} records in,"
            f" {t['records_out']} out per sink, {t['dead_letters']} dead letters (both"
            " handlers);"
            f" lost {t['lost']}, duplicated {t['duplicated']}, out of order"
            f" {t['out_of_order']}; recovery p50 {_seconds(t['recovery_p50_s'])},"
            f" max {_seconds(t['recovery_max_s'])}; {self.seconds:.0f}s; seed {self.seed}:"
            f" {'PASS' if self.ok else 'FAIL'}"
        )
        for r in self.results:
            if not r.ok:
                lines.append(r.describe())
        return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def run_profile(
    profile: str = "short",
    *,
    records: int | None = None,
    faults: int | None = None,
    seed: int | None = None,
    scenarios: Sequence[str] | None = None,
    pipelines: Sequence[str] | None = None,
    workdir: str | os.PathLike[str] | None = None,
    keep: bool = False,
    command: str = "",
    echo: Callable[[str], object] = print,
) -> Report:
    """Run a profile's plans (filtered, resized) and return the report.

    ``records`` and ``faults`` replace every plan's sizes; ``scenarios`` and
    ``pipelines`` keep only those; a scenario not in the profile is run on
    each of its pipelines. The working directory is deleted afterwards
    unless a run failed or ``keep`` is set.
    """
    if seed is None:
        seed = random.SystemRandom().randrange(1, 2**31)
    plans = list(PROFILES[profile])
    if scenarios:
        unknown = [s for s in scenarios if s not in SCENARIOS]
        if unknown:
            raise ValueError(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}")
        listed = {p.scenario for p in plans}
        plans = [p for p in plans if p.scenario in scenarios]
        base = PROFILES[profile][0]
        for name in scenarios:
            if name not in listed:
                plans += [
                    Plan(name, pipe, base.records, base.faults)
                    for pipe in SCENARIOS[name].pipelines
                ]
    if pipelines:
        plans = [p for p in plans if p.pipeline in pipelines]
    if any(p.pipeline.startswith("kafka") for p in plans):
        from streamlet.testing.kafka import missing_tools

        missing = missing_tools()
        if missing:
            echo(f"chaos: skipping the Kafka pipelines: they need {' and '.join(missing)}")
            plans = [p for p in plans if not p.pipeline.startswith("kafka")]
    root = (
        Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="streamlet-chaos-"))
    )
    report = Report(profile, seed, command)
    echo(f"chaos: profile {profile}, seed {seed}, {len(plans)} runs, in {root}")
    started = time.monotonic()
    for plan in plans:
        size = records if records is not None else plan.records
        count = faults if faults is not None else plan.faults
        run_seed = _derive(seed, plan.scenario, plan.pipeline)
        result = run_scenario(
            plan.scenario,
            plan.pipeline,
            records=size,
            faults=count,
            seed=run_seed,
            workdir=root / f"{plan.scenario}-{plan.pipeline}",
        )
        report.results.append(result)
        echo(result.describe())
    report.seconds = time.monotonic() - started
    if report.ok and not keep:
        shutil.rmtree(root, ignore_errors=True)
    return report


def _derive(seed: int, *names: str) -> int:
    digest = hashlib.sha256(":".join([str(seed), *names]).encode()).digest()
    return int.from_bytes(digest[:4], "big")


def write_report(report: Report, path: str | os.PathLike[str]) -> None:
    """Write the report's JSON to ``path`` (directories created)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(report.to_json(), indent=2) + "\n")


if __name__ == "__main__":
    from streamlet.cli import chaos

    chaos(prog_name="python -m streamlet.testing.chaos")
