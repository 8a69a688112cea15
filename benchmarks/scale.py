"""Group mode: throughput with 1, 2 and 3 workers, rebalance pauses, and the cost
of one transaction per task.

Run from the repository root::

    python -m benchmarks.scale           # about 5 minutes
    python -m benchmarks.scale --quick   # about 2 minutes, a smoke test

One embedded single-node broker (:mod:`streamlet.testing.kafka`, the real
Apache Kafka) is started on loopback for the whole run and stopped at the
end. Every worker is a separate process, ``python -m streamlet run
scale_worker:app --worker NAME``, of the app this module writes into the run's
directory (:data:`WORKER_SOURCE`): one ``KafkaSource`` (direct mode,
``start="earliest"``) whose records an identity handler hands to a
``KafkaSink`` (exactly once: per task, one transaction holds the outputs and
the task's input position), batch interval 0.1 s, session timeout 6 s. The
output topic always has 12 partitions and the outputs are unkeyed, so every
transaction writes to all of them, whatever the input topic. Each
input value is 100 bytes and starts with its input partition and sequence
number, so the output can be checked record by record and its progress
followed per task.

The output is read by one ``read_committed`` consumer in this process (it
shares the machine with the broker and the workers; this is a 2-core VM, so
adding workers also adds contention and scaling is sublinear). It counts
every record, notes when each task's output becomes visible, and counts
values seen twice.

What is measured
----------------
* **Throughput with 1, 2 and 3 workers.** A 12-partition topic is filled once
  with ``--records`` records (default 600,000). For each worker count, a new
  group (a new app name, so new transactional ids and markers) and a new
  12-partition output topic: the workers are started together and read the
  whole input from the beginning; at most ``--batch-records`` records per
  batch (one task per batch). The rate is the input records over the time
  from the first output record visible to ``read_committed`` to the last;
  the startup and the first assignments are before that (the first join may
  take more than one generation; the later ones still fall in the window).
  Worker CPU seconds (utime + stime from ``/proc/<pid>/stat``, read at the
  first output and when the last is visible, before the workers are
  stopped) give records per worker-CPU-second; the broker's CPU and this
  process's (the output reader) over the same window are reported beside
  it, as they share the two cores with the workers. Per-core efficiency is the rate with n
  workers over n times the 1-worker rate. Rounds run in the order 1, 2, 3
  then 3, 2, 1 and so on; figures are medians. Every case must end with the
  output holding each input record exactly once.

* **Rebalance pauses.** A fresh 12-partition input topic is fed at
  ``--rate`` records/s (default 3,000) by a paced producer while two workers
  run; then, ``--cycles`` times: a third worker joins; it leaves (SIGTERM,
  graceful: it leaves the group); another third worker joins; it is
  SIGKILLed. After each event the benchmark waits until every live worker
  has logged its new assignment, the live workers own all 12 tasks, and no
  worker has logged anything about its tasks for 2 s; then 1 s more, and
  the next event (after the last one, a session timeout more). The pauses
  of an event are what the workers that already ran logged in ``group:
  this worker owns tasks [...] (...; batches paused X s)`` from the event
  to the next one (so a second rebalance that follows a settled group
  still counts): the time from aiokafka's revoke callback (no new batch
  starts) to the new tasks being taken over and batches resuming; the
  joiner's own figure (no revoke) is left out. Beside it, from the output
  over the same span: the longest stretch with no new output for any task
  (the whole pipeline stalled) and the longest for a single task (that
  task's owner changed).
  After a SIGKILL the dead worker's tasks wait for the session timeout
  (6 s) before the group notices; the survivors keep running until then, so
  their logged pause is only the rebalance itself, and the per-task gap
  shows the timeout. The target (issue): p99 of the clean join/leave pause
  at most one batch interval + 1 s. At the end the producer stops and the
  output must hold every produced record exactly once.

* **One transaction per task.** One worker, the same records in a
  12-partition topic (12 tasks: 12 batches and 12 transactions per tick)
  and in a 1-partition topic (1 task: 1 batch, 1 transaction per tick).
  Batches on the 12-partition topic take at most ``--batch-records``
  records and those on the 1-partition topic 12 times as many, so each tick
  reads the same number of records either way and only the number of
  transactions (and batches) differs. Rounds alternate which topic goes
  first; the ratio is the median rate of 12 tasks over that of 1 (target
  at least 0.85), with records per worker-CPU-second beside it. Each
  worker's batches report their processing (read and handler) and commit
  times through a listener (a ``scale-batch`` line on stderr), so the
  table says where a batch's time goes.

Error and warning lines of the workers' logs are grouped by message and
counted (``worker_log_problems`` in the JSON: SIGTERM notices and
"rebalancing" heartbeats are expected, anything else is worth a look); the
workers' logs are kept in ``scale-logs/`` in the temporary directory, one
file per case, and a worker that exited with an error on its own is
reported (``worker_failures``). The table goes to stdout,
followed by one JSON line; the same JSON is written to ``--json`` and a plot
(throughput vs workers, pause distribution) to ``--plot``.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import logging
import os
import platform
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from benchmarks.common import (
    REPO_ROOT,
    add_output_options,
    output_paths,
    percentiles,
    work_directory,
    write_result,
)
from streamlet.testing.kafka import KAFKA_VERSION, EmbeddedKafka, admin_client
from streamlet.testing.kafka import create_topics as kafka_topics

PARTITIONS = 12
RECORDS = 600_000
QUICK_RECORDS = 60_000
RECORD_SIZE = 100
BATCH_RECORDS = 5_000  # most records per batch (one task) on the 12-partition topic
BATCH_INTERVAL = 0.1
SESSION_TIMEOUT = 6.0
WORKER_COUNTS = (1, 2, 3)
PAUSE_RATE = 3_000.0  # records/s fed while the group changes
PACE = 0.01  # seconds between sends of the paced producer
SETTLE_QUIET = 2.0  # seconds with no assignment logged before an event counts as settled
TARGET_PAUSE = BATCH_INTERVAL + 1.0  # p99 of a clean join or leave, seconds
TARGET_TXN_RATIO = 0.85  # 12 tasks / 1 task, throughput
CASE_TIMEOUT = 300.0

_HEAD = struct.Struct("<hq")  # input partition, sequence number
_PAD = b"x" * (RECORD_SIZE - _HEAD.size)
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_ASSIGNED = re.compile(
    r"this worker owns tasks (\[[^\]]*\]|none) \(gained .*?; batches paused ([\d.]+)s\)"
)

WORKER_SOURCE = f'''"""A benchmark worker: Kafka in, each value out to a KafkaSink, exactly once."""

import os
import sys

import streamlet as sl

app = sl.App(
    os.environ["SCALE_APP"],
    state_dir=os.environ["SCALE_STATE"],
    batch_interval={BATCH_INTERVAL},
    max_batch_records=int(os.environ["SCALE_BATCH_RECORDS"]),
    group=os.environ["SCALE_GROUP"],
    session_timeout={SESSION_TIMEOUT},
)
source = app.source(
    sl.KafkaSource(
        os.environ["SCALE_IN"], bootstrap_servers=os.environ["SCALE_BOOTSTRAP"], start="earliest"
    ),
    name="input",
)


@app.handler(
    source,
    sink=sl.KafkaSink(os.environ["SCALE_OUT"], bootstrap_servers=os.environ["SCALE_BOOTSTRAP"]),
)
async def copy(batch: sl.Batch) -> list[bytes]:
    return [r.value for r in batch]


def note(info: sl.BatchInfo) -> None:
    print(
        f"scale-batch {{info.records}} {{info.processing_time:.4f}} {{info.commit_time:.4f}}"
        f" {{info.total_delay:.4f}}",
        file=sys.stderr,
        flush=True,
    )


app.add_listener(note)
'''

log = logging.getLogger("benchmarks.scale")


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (0.0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


# ---- workers ----------------------------------------------------------------


@dataclass
class Assignment:
    """One ``group: this worker owns tasks`` line, when this process read it."""

    at: float
    tasks: list[int]
    paused: float


class Worker:
    """One worker process; its stderr is read by a thread that notes assignments."""

    def __init__(self, workdir: str, name: str, env: dict[str, str]) -> None:
        self.name = name
        self.lines: list[str] = []
        self.assignments: list[Assignment] = []
        self.batches: list[tuple[int, float, float, float]] = []
        """Each batch's records, processing, commit and total seconds (from its listener)."""
        state = os.path.join(workdir, f"state-{env['SCALE_APP']}-{name}")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "streamlet",
                "run",
                "scale_worker:app",
                "--quiet",
                "--worker",
                name,
                "--log-level",
                "info",
            ],
            cwd=workdir,
            env={
                **os.environ,
                **env,
                "SCALE_STATE": state,
                "PYTHONPATH": os.pathsep.join([workdir, str(REPO_ROOT)]),
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
            now = time.monotonic()
            self.lines.append(line)
            if line.startswith("scale-batch "):
                records, processing, commit, total = line.split()[1:5]
                self.batches.append((int(records), float(processing), float(commit), float(total)))
                continue
            found = _ASSIGNED.search(line)
            if found:
                tasks = [] if found[1] == "none" else [int(t) for t in re.findall(r"\d+", found[1])]
                self.assignments.append(Assignment(now, tasks, float(found[2])))

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def cpu(self) -> float:
        return cpu_seconds(self.process.pid)

    def problems(self) -> list[str]:
        """Log lines that say error, warning or traceback."""
        return [
            f"{self.name}: {line.rstrip()}"
            for line in self.lines
            if re.search(r"error|warning|traceback|exception", line, re.IGNORECASE)
        ]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
            self.lines.append(f"(still running {timeout:g} s after signal {sig}: killed)\n")
        self.reader.join(10)
        return code


# ---- topics and input -------------------------------------------------------


async def create_topics(bootstrap: str, names: Sequence[str], partitions: int) -> None:
    async with admin_client(bootstrap) as admin:
        await kafka_topics(admin, names, partitions)


async def delete_topics(bootstrap: str, names: Sequence[str]) -> None:
    """Delete ``names``; failures are logged, not raised (this is clean-up)."""
    try:
        async with admin_client(bootstrap) as admin:
            await admin.delete_topics(list(names))
    except Exception as exc:
        log.warning("deleting topics %s failed: %r", ", ".join(names), exc)


def value(partition: int, seq: int) -> bytes:
    return _HEAD.pack(partition, seq) + _PAD


async def fill(bootstrap: str, topic: str, records: int, partitions: int) -> float:
    """Write ``records`` values evenly over ``partitions``; seconds taken."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    began = time.monotonic()
    try:
        await producer.partitions_for(topic)
        futures = []
        for p in range(partitions):
            seq, end = p * records // partitions, (p + 1) * records // partitions
            while seq < end:
                batch = producer.create_batch()
                while seq < end and batch.append(key=None, value=value(p, seq), timestamp=None):
                    seq += 1
                batch.close()
                futures.append(await producer.send_batch(batch, topic, partition=p))
        for future in futures:
            await future
    finally:
        await producer.stop()
    return time.monotonic() - began


class Feeder:
    """Writes ``rate`` records/s over the partitions, paced by the clock, until stopped."""

    def __init__(self, bootstrap: str, topic: str, rate: float, partitions: int) -> None:
        self.bootstrap, self.topic, self.rate, self.partitions = bootstrap, topic, rate, partitions
        self.sent = 0
        self.stopping = anyio.Event()
        self.done = anyio.Event()

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            self.done.set()

    async def _run(self) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5)
        await producer.start()
        try:
            await producer.partitions_for(self.topic)
            began = time.monotonic()
            futures = []
            while not self.stopping.is_set():
                due = int((time.monotonic() - began) * self.rate)
                while self.sent < due:
                    p = self.sent % self.partitions
                    futures.append(
                        await producer.send(self.topic, value(p, self.sent), partition=p)
                    )
                    self.sent += 1
                await anyio.sleep(PACE)
            for future in futures:
                await future
        finally:
            await producer.stop()


# ---- the output -------------------------------------------------------------


class OutputReader:
    """Reads a topic ``read_committed`` from the beginning, counting and timing records."""

    def __init__(self, bootstrap: str, topic: str, partitions: int, on_first: Any = None) -> None:
        self.bootstrap, self.topic, self.partitions = bootstrap, topic, partitions
        self.count = 0
        self.duplicates = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.arrivals: dict[int, list[float]] = {}
        """When output of each input partition (task) became visible, one entry per poll."""
        self.on_first = on_first
        self._seen: set[bytes] = set()
        self.stopping = anyio.Event()

    async def run(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            isolation_level="read_committed",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 << 20,
        )
        await consumer.start()
        try:
            tps = [TopicPartition(self.topic, p) for p in range(self.partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            while not self.stopping.is_set():
                fetched = await consumer.getmany(timeout_ms=50)
                now = time.monotonic()
                tasks: set[int] = set()
                for records in fetched.values():
                    for record in records:
                        head = record.value[: _HEAD.size]
                        if head in self._seen:
                            self.duplicates += 1
                        else:
                            self._seen.add(head)
                        tasks.add(_HEAD.unpack(head)[0])
                        self.count += 1
                if tasks:
                    if self.first_at is None:
                        self.first_at = now
                        if self.on_first is not None:
                            self.on_first()
                    self.last_at = now
                    for task in tasks:
                        self.arrivals.setdefault(task, []).append(now)
        finally:
            await consumer.stop()

    async def wait_for(self, count: int, within: float) -> None:
        with anyio.fail_after(within):
            while self.count < count:  # noqa: ASYNC110 (the count of another task)
                await anyio.sleep(0.02)

    def gaps(self, start: float, end: float) -> tuple[float, float]:
        """Longest stretch in [start, end] with no output at all, and for any one task."""
        every = sorted(t for ts in self.arrivals.values() for t in ts if start <= t <= end)
        return _longest_gap(every, start, end), max(
            (
                _longest_gap([t for t in ts if start <= t <= end], start, end)
                for ts in self.arrivals.values()
            ),
            default=0.0,
        )


def _longest_gap(times: list[float], start: float, end: float) -> float:
    points = [start, *times, end]
    return max(b - a for a, b in itertools.pairwise(points))


# ---- 1: throughput with n workers -------------------------------------------


@dataclass
class ThroughputRun:
    """One pass of the whole input through ``workers`` workers (or one, for part 3)."""

    workers: int
    partitions: int
    records: int
    seconds: float
    worker_cpu: float
    """Worker CPU seconds (all worker processes) in the measured window."""
    broker_cpu: float
    reader_cpu: float
    """CPU seconds of this process (the output reader, mostly) in the window."""
    output: int
    duplicates: int
    assignments: int
    """Assignment lines logged by the workers over the whole run."""
    batches: list[tuple[int, float, float, float]] = field(default_factory=list)
    """Every worker's batches: records, processing, commit and total seconds."""

    def batch_medians(self) -> dict[str, float]:
        if not self.batches:
            return {}
        return {
            "batches": len(self.batches),
            "median_batch_records": statistics.median(b[0] for b in self.batches),
            "median_processing_ms": round(statistics.median(b[1] for b in self.batches) * 1e3, 1),
            "median_commit_ms": round(statistics.median(b[2] for b in self.batches) * 1e3, 1),
            "median_batch_ms": round(statistics.median(b[3] for b in self.batches) * 1e3, 1),
        }

    @property
    def rate(self) -> float:
        return self.records / self.seconds

    @property
    def per_cpu(self) -> float:
        return self.records / self.worker_cpu if self.worker_cpu else 0.0

    @property
    def exact(self) -> bool:
        return self.output == self.records and self.duplicates == 0

    def to_json(self) -> dict[str, Any]:
        return {
            "workers": self.workers,
            "partitions": self.partitions,
            "seconds": round(self.seconds, 3),
            "records_per_s": round(self.rate),
            "worker_cpu_s": round(self.worker_cpu, 2),
            "worker_cores": round(self.worker_cpu / self.seconds, 2),
            "records_per_worker_cpu_s": round(self.per_cpu),
            "broker_cpu_s": round(self.broker_cpu, 2),
            "reader_cpu_s": round(self.reader_cpu, 2),
            "output_records": self.output,
            "duplicates": self.duplicates,
            "assignments_logged": self.assignments,
            "exactly_once": self.exact,
            **self.batch_medians(),
        }


@dataclass
class Context:
    bootstrap: str
    workdir: str
    broker_pid: int | None
    log_dir: str
    """Where every case's worker logs are written (outside the removed work directory)."""
    problems: list[str] = field(default_factory=list)
    exits: list[str] = field(default_factory=list)
    """Workers that exited on their own with an error (not stopped by this benchmark)."""

    def finish(self, case: str, workers: list[Worker], stopped: Collection[str] = ()) -> None:
        """Stop ``workers``, note their log problems and failures, and save their logs."""
        for worker in workers:
            ran = worker.alive
            code = worker.stop()
            self.problems.extend(worker.problems())
            if not ran and worker.name not in stopped and code not in (0, -signal.SIGKILL):
                self.exits.append(f"{case} {worker.name}: exit code {code}")
        save_logs(os.path.join(self.log_dir, f"{case}.log"), workers)

    def broker_cpu(self) -> float:
        return cpu_seconds(self.broker_pid) if self.broker_pid else 0.0


async def run_workers(
    ctx: Context, source: str, partitions: int, records: int, workers: int, batch_records: int
) -> ThroughputRun:
    """Start ``workers`` workers on ``source`` (a new group and output) until all is out."""
    tag = uuid.uuid4().hex[:8]
    out = f"scale-out-{tag}"
    await create_topics(ctx.bootstrap, [out], PARTITIONS)
    env = {
        "SCALE_BOOTSTRAP": ctx.bootstrap,
        "SCALE_IN": source,
        "SCALE_OUT": out,
        "SCALE_GROUP": f"scale-{tag}",
        "SCALE_APP": f"scale{tag}",
        "SCALE_BATCH_RECORDS": str(batch_records),
    }
    running: list[Worker] = []
    marks: dict[str, float] = {}

    def first() -> None:
        marks["cpu"] = sum(w.cpu() for w in running)
        marks["broker"] = ctx.broker_cpu()
        marks["reader"] = time.process_time()

    reader = OutputReader(ctx.bootstrap, out, PARTITIONS, on_first=first)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(reader.run)
            running.extend(Worker(ctx.workdir, f"w{i + 1}", env) for i in range(workers))
            try:
                await reader.wait_for(records, CASE_TIMEOUT)
            except TimeoutError:
                tail = "\n".join("".join(w.lines[-20:]) for w in running)
                raise RuntimeError(
                    f"{reader.count} of {records} records out after {CASE_TIMEOUT:g} s\n{tail}"
                ) from None
            cpu = sum(w.cpu() for w in running) - marks["cpu"]
            broker = ctx.broker_cpu() - marks["broker"]
            own = time.process_time() - marks["reader"]
            await anyio.sleep(1.0)  # anything written twice would show by now
            reader.stopping.set()
    finally:
        ctx.finish(env["SCALE_APP"], running)
        await delete_topics(ctx.bootstrap, [out])
    assert reader.first_at is not None
    assert reader.last_at is not None
    seconds = reader.last_at - reader.first_at
    return ThroughputRun(
        workers,
        partitions,
        records,
        seconds,
        cpu,
        broker,
        own,
        reader.count,
        reader.duplicates,
        sum(len(w.assignments) for w in running),
        [b for w in running for b in w.batches],
    )


# ---- 2: rebalance pauses ----------------------------------------------------


@dataclass
class PauseEvent:
    kind: str
    """"join", "leave" or "kill"."""
    pauses: list[float]
    """What each worker that already ran logged (one entry per assignment line)."""
    settle: float
    """Seconds from the event to the last assignment logged before the next event."""
    stall: float
    """Longest stretch with no output at all, 1 s before the event to its settling."""
    task_gap: float
    """Longest stretch with no output of one task, same window."""

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "pauses_s": [round(p, 3) for p in self.pauses],
            "last_assignment_s": round(self.settle, 3),
            "output_stall_s": round(self.stall, 3),
            "task_gap_s": round(self.task_gap, 3),
        }


@dataclass
class PauseResult:
    events: list[PauseEvent]
    produced: int
    output: int
    duplicates: int

    def pauses(self, *kinds: str) -> list[float]:
        return [p for e in self.events if e.kind in kinds for p in e.pauses]

    @property
    def exact(self) -> bool:
        return self.output == self.produced and self.duplicates == 0

    def summary(self, *kinds: str) -> dict[str, Any]:
        values = self.pauses(*kinds)
        events = [e for e in self.events if e.kind in kinds]
        out: dict[str, Any] = {"events": len(events), "samples": len(values)}
        if values:
            out.update({k: round(v, 3) for k, v in percentiles(values).items()})
        if events:
            out["output_stall_p50"] = round(statistics.median(e.stall for e in events), 3)
            out["output_stall_max"] = round(max(e.stall for e in events), 3)
            out["task_gap_p50"] = round(statistics.median(e.task_gap for e in events), 3)
            out["task_gap_max"] = round(max(e.task_gap for e in events), 3)
            out["last_assignment_max"] = round(max(e.settle for e in events), 3)
        return out

    @property
    def clean_p99(self) -> float:
        values = self.pauses("join", "leave")
        return percentiles(values)["p99"] if values else float("nan")


async def settled(workers: list[Worker], since: float, within: float) -> float:
    """Wait until the live workers own every task and have been quiet; the last line's time."""
    with anyio.fail_after(within):
        while True:
            await anyio.sleep(0.1)
            live = [w for w in workers if w.alive]
            latest = [w.assignments[-1] if w.assignments else None for w in live]
            if any(a is None or a.at < since for a in latest):
                continue
            owned = sorted(t for a in latest if a is not None for t in a.tasks)
            if owned != list(range(PARTITIONS)):
                continue
            last = max(a.at for a in latest if a is not None)
            if time.monotonic() - last >= SETTLE_QUIET:
                return last


def save_logs(path: str, workers: list[Worker]) -> None:
    """Every worker's log lines but the per-batch ones, worker by worker."""
    with open(path, "w", encoding="utf-8") as saved:
        for worker in workers:
            saved.write(f"--- {worker.name} ---\n")
            saved.writelines(line for line in worker.lines if "scale-batch" not in line)


async def run_pauses(ctx: Context, rate: float, cycles: int) -> PauseResult:
    tag = uuid.uuid4().hex[:8]
    source, out = f"scale-pin-{tag}", f"scale-pout-{tag}"
    await create_topics(ctx.bootstrap, [source, out], PARTITIONS)
    env = {
        "SCALE_BOOTSTRAP": ctx.bootstrap,
        "SCALE_IN": source,
        "SCALE_OUT": out,
        "SCALE_GROUP": f"scale-{tag}",
        "SCALE_APP": f"scale{tag}",
        "SCALE_BATCH_RECORDS": str(BATCH_RECORDS),
    }
    feeder = Feeder(ctx.bootstrap, source, rate, PARTITIONS)
    reader = OutputReader(ctx.bootstrap, out, PARTITIONS)
    workers: list[Worker] = []
    stopped: set[str] = set()
    events: list[PauseEvent] = []
    limit = SESSION_TIMEOUT * 4 + 30

    marks: list[tuple[str, float, float, list[Worker], Worker]] = []

    async def event(kind: str, act: Any) -> None:
        before = [w for w in workers if w.alive]
        began, wall = time.monotonic(), time.time()
        affected = act()
        marks.append((kind, began, wall, before, affected))
        await settled(workers, began, limit)

    def attribute(until: float) -> None:
        """Each event gets every assignment and output gap up to the next event.

        Not only up to its settling: a second rebalance may follow seconds
        later (one was seen after a SIGKILL) and belongs to the same event.
        """
        for i, (kind, began, wall, before, affected) in enumerate(marks):
            end = marks[i + 1][1] if i + 1 < len(marks) else until
            lines = [
                a for w in before if w is not affected for a in w.assignments if began <= a.at < end
            ]
            last = max((a.at for a in lines), default=began)
            stall, task_gap = reader.gaps(began, end)
            pauses = [a.paused for a in lines]
            events.append(PauseEvent(kind, pauses, last - began, stall, task_gap))
            print(
                f"  {time.strftime('%H:%M:%S', time.localtime(wall))} {kind:<5}"
                f" pauses {', '.join(f'{p:.2f}' for p in pauses) or '-'} s;"
                f" last assignment after {last - began:.1f} s; output stall {stall:.2f} s,"
                f" longest task gap {task_gap:.2f} s",
                flush=True,
            )

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(feeder.run)
            tg.start_soon(reader.run)
            workers.extend([Worker(ctx.workdir, "w1", env), Worker(ctx.workdir, "w2", env)])
            await settled(workers, 0.0, limit)
            await anyio.sleep(2.0)
            for cycle in range(cycles):

                def join(name: str) -> Worker:
                    worker = Worker(ctx.workdir, name, env)
                    workers.append(worker)
                    return worker

                third = join(f"j{cycle}a")
                await event("join", lambda third=third: third)
                await anyio.sleep(1.0)

                def leave(worker: Worker = third) -> Worker:
                    stopped.add(worker.name)
                    worker.process.send_signal(signal.SIGTERM)
                    return worker

                await event("leave", leave)
                await anyio.sleep(1.0)
                third = join(f"j{cycle}b")
                await event("join", lambda third=third: third)
                await anyio.sleep(1.0)

                def kill(worker: Worker = third) -> Worker:
                    stopped.add(worker.name)
                    worker.process.send_signal(signal.SIGKILL)
                    return worker

                await event("kill", kill)
                await anyio.sleep(1.0)
            await anyio.sleep(SESSION_TIMEOUT)  # room for a late rebalance of the last event
            attribute(time.monotonic())
            feeder.stopping.set()
            await feeder.done.wait()
            await reader.wait_for(feeder.sent, 120)
            await anyio.sleep(2.0)
            reader.stopping.set()
    finally:
        ctx.finish(f"rebalance-{env['SCALE_APP']}", workers, stopped)
        await delete_topics(ctx.bootstrap, [source, out])
    return PauseResult(events, feeder.sent, reader.count, reader.duplicates)


# ---- 3: one transaction per task ----------------------------------------------


@dataclass
class TxnResult:
    many: list[ThroughputRun] = field(default_factory=list)
    one: list[ThroughputRun] = field(default_factory=list)
    order: list[int] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return statistics.median(r.rate for r in self.many) / statistics.median(
            r.rate for r in self.one
        )

    @property
    def per_cpu_ratio(self) -> float:
        return statistics.median(r.per_cpu for r in self.many) / statistics.median(
            r.per_cpu for r in self.one
        )


# ---- report -----------------------------------------------------------------


def _median(runs: list[ThroughputRun], attr: str) -> float:
    return float(statistics.median(getattr(r, attr) for r in runs))


def print_throughput(by_workers: dict[int, list[ThroughputRun]]) -> None:
    base = _median(by_workers[1], "rate")
    print(
        "\n1. throughput, 12 tasks, exactly once (medians)\n"
        f"{'workers':>7} {'records/s':>10} {'per core':>9} {'worker cores':>13}"
        f" {'rec/worker-CPU-s':>17} {'broker cores':>13} {'output':>8}"
    )
    for n, runs in by_workers.items():
        rate = _median(runs, "rate")
        cores = statistics.median(r.worker_cpu / r.seconds for r in runs)
        broker = statistics.median(r.broker_cpu / r.seconds for r in runs)
        exact = "exact" if all(r.exact for r in runs) else "WRONG"
        print(
            f"{n:>7} {rate:>10,.0f} {rate / (n * base):>9.2f} {cores:>13.2f}"
            f" {_median(runs, 'per_cpu'):>17,.0f} {broker:>13.2f} {exact:>8}"
        )


def print_pauses(result: PauseResult) -> None:
    print(
        "\n2. rebalance pauses (logged by the workers that already ran; output gaps)\n"
        f"{'event':<6} {'events':>6} {'p50':>6} {'p99':>6} {'max':>6}"
        f" {'stall p50':>10} {'task gap max':>13}"
    )
    for kind in ("join", "leave", "kill"):
        s = result.summary(kind)
        if not s["samples"]:
            continue
        print(
            f"{kind:<6} {s['events']:>6} {s['p50']:>6.2f} {s['p99']:>6.2f} {s['max']:>6.2f}"
            f" {s['output_stall_p50']:>10.2f} {s['task_gap_max']:>13.2f}"
        )
    verdict = "met" if result.clean_p99 <= TARGET_PAUSE else "not met"
    print(
        f"clean join/leave p99 {result.clean_p99:.2f} s"
        f" (target <= {TARGET_PAUSE:.1f} s: {verdict});"
        f" output {result.output:,} of {result.produced:,} produced,"
        f" {result.duplicates} duplicates"
    )


def print_txn(txn: TxnResult) -> None:
    print("\n3. one worker: 12 tasks (12 transactions per tick) vs 1 task (1 per tick)")
    for label, runs in (("12 tasks", txn.many), ("1 task", txn.one)):
        b = runs[0].batch_medians()
        print(
            f"{label:<9} {_median(runs, 'rate'):>10,.0f} records/s"
            f" {_median(runs, 'per_cpu'):>10,.0f} per worker-CPU-s"
            f"  ({', '.join(f'{r.rate:,.0f}' for r in runs)});"
            f" first round: {b.get('batches', 0)} batches, median"
            f" {b.get('median_batch_records', 0):,.0f} records, processing"
            f" {b.get('median_processing_ms', 0):.0f} ms,"
            f" commit {b.get('median_commit_ms', 0):.0f} ms,"
            f" batch {b.get('median_batch_ms', 0):.0f} ms"
        )
    verdict = "met" if txn.ratio >= TARGET_TXN_RATIO else "not met"
    print(
        f"ratio {txn.ratio:.2f} (target >= {TARGET_TXN_RATIO}: {verdict}),"
        f" per CPU-second {txn.per_cpu_ratio:.2f}"
    )


def plot(by_workers: dict[int, list[ThroughputRun]], pauses: PauseResult, path: str) -> None:
    """Throughput vs workers (with linear scaling dotted) beside the pauses per event kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (tput_ax, pause_ax) = plt.subplots(1, 2, figsize=(11, 4.4), dpi=100)
    counts = list(by_workers)
    rates = [_median(by_workers[n], "rate") / 1e3 for n in counts]
    bars = tput_ax.bar(counts, rates, color="C0", label="measured (median)")
    tput_ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    tput_ax.plot(counts, [rates[0] * n for n in counts], "k:", label="linear")
    for n in counts:
        for r in by_workers[n]:
            tput_ax.plot(n, r.rate / 1e3, "k.", markersize=4)
    tput_ax.set_xticks(counts)
    tput_ax.set_xlabel("workers (2-core VM, broker on the same machine)")
    tput_ax.set_ylabel("thousand records/s, exactly once")
    tput_ax.set_title("throughput, 12 tasks", fontsize=10)
    tput_ax.legend(fontsize=8, loc="upper left")
    tput_ax.grid(axis="y", alpha=0.3)

    kinds = [k for k in ("join", "leave", "kill") if pauses.pauses(k)]
    for i, kind in enumerate(kinds):
        values = pauses.pauses(kind)
        pause_ax.plot([i] * len(values), values, "o", alpha=0.6, color=f"C{i}")
        gaps = [e.task_gap for e in pauses.events if e.kind == kind]
        pause_ax.plot(
            [i + 0.25] * len(gaps),
            gaps,
            "x",
            color=f"C{i}",
            label="longest task output gap" if i == 0 else "_nolegend_",
        )
    pause_ax.axhline(
        TARGET_PAUSE, color="black", linestyle="dashed", linewidth=1, label="target (join/leave)"
    )
    pause_ax.axhline(
        SESSION_TIMEOUT, color="grey", linestyle="dotted", linewidth=1, label="session timeout"
    )
    pause_ax.set_xticks(range(len(kinds)))
    pause_ax.set_xticklabels([f"{k}\n(o logged pause)" for k in kinds])
    pause_ax.set_ylabel("seconds")
    pause_ax.set_title("rebalance pauses", fontsize=10)
    pause_ax.legend(fontsize=8, loc="upper left")
    pause_ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ---- main -------------------------------------------------------------------


def problem_kinds(lines: list[str]) -> list[dict[str, Any]]:
    """Error and warning lines grouped by message (numbers, names and times blanked)."""
    counts: dict[str, list[Any]] = {}
    for line in lines:
        _, _, message = line.partition(": ")
        message = re.sub(r"^\S+ \S+ ", "", message)  # the date and time
        key = re.sub(r"[0-9a-f]{8}|\d+", "N", message)[:100]
        entry = counts.setdefault(key, [0, line])
        entry[0] += 1
    return [
        {"count": n, "example": example}
        for n, example in sorted(counts.values(), key=lambda e: -e[0])
    ]


async def run_all(
    ctx: Context, records: int, rounds: int, batch_records: int, rate: float, cycles: int
) -> tuple[dict[int, list[ThroughputRun]], PauseResult, TxnResult]:
    tag = uuid.uuid4().hex[:8]
    many, one = f"scale-in12-{tag}", f"scale-in1-{tag}"
    await create_topics(ctx.bootstrap, [many], PARTITIONS)
    await create_topics(ctx.bootstrap, [one], 1)
    try:
        took = await fill(ctx.bootstrap, many, records, PARTITIONS)
        took += await fill(ctx.bootstrap, one, records, 1)
        print(f"filled {many} and {one} with {records:,} records each in {took:.1f} s", flush=True)
        by_workers: dict[int, list[ThroughputRun]] = {n: [] for n in WORKER_COUNTS}
        for i in range(rounds):
            for n in WORKER_COUNTS if i % 2 == 0 else WORKER_COUNTS[::-1]:
                gc.collect()
                run = await run_workers(ctx, many, PARTITIONS, records, n, batch_records)
                by_workers[n].append(run)
                print(
                    f"  {n} worker(s): {run.rate:,.0f} records/s, {run.per_cpu:,.0f} per"
                    f" worker-CPU-s, output {run.output:,} ({run.duplicates} twice)",
                    flush=True,
                )
        print_throughput(by_workers)
        print("\nrebalances:", flush=True)
        pauses = await run_pauses(ctx, rate, cycles)
        print_pauses(pauses)
        print("\ntransactions per task:", flush=True)
        txn = TxnResult()
        for i in range(rounds):
            order = (PARTITIONS, 1) if i % 2 == 0 else (1, PARTITIONS)
            txn.order.append(order[0])
            for parts in order:
                gc.collect()
                if parts == PARTITIONS:
                    run = await run_workers(ctx, many, PARTITIONS, records, 1, batch_records)
                    txn.many.append(run)
                else:
                    run = await run_workers(ctx, one, 1, records, 1, batch_records * PARTITIONS)
                    txn.one.append(run)
                print(
                    f"  {parts} task(s): {run.rate:,.0f} records/s, {run.per_cpu:,.0f} per"
                    f" worker-CPU-s, output {run.output:,} ({run.duplicates} twice)",
                    flush=True,
                )
        print_txn(txn)
    finally:
        await delete_topics(ctx.bootstrap, [many, one])
    return by_workers, pauses, txn


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scale",
        description="Group mode: throughput with 1, 2 and 3 workers, rebalance pauses, and"
        " 12 tasks vs 1 task through one worker.",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke test, noisy figures")
    parser.add_argument(
        "--records",
        type=int,
        help=f"input records (default {RECORDS:,}, or {QUICK_RECORDS:,} with --quick)",
    )
    parser.add_argument(
        "--rounds", type=int, help="rounds of parts 1 and 3 (default 3, or 1 with --quick)"
    )
    parser.add_argument(
        "--cycles",
        type=int,
        help="join, leave, join, kill cycles of part 2 (default 3, or 1 with --quick)",
    )
    parser.add_argument(
        "--batch-records",
        type=int,
        default=BATCH_RECORDS,
        help="most records per batch (one task) on the 12-partition topic",
    )
    parser.add_argument(
        "--rate", type=float, default=PAUSE_RATE, help="records/s fed during part 2"
    )
    parser.add_argument(
        "--dir", help="where the broker and state directories go (default: in the repository)"
    )
    add_output_options(parser, "scale", "(throughput vs workers, pause distribution)")
    args_given = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(args_given)
    quick = args.quick
    records = args.records or (QUICK_RECORDS if quick else RECORDS)
    rounds = args.rounds or (1 if quick else 3)
    cycles = args.cycles or (1 if quick else 3)
    if records < PARTITIONS or rounds < 1 or cycles < 1 or args.batch_records < 1 or args.rate <= 0:
        parser.error("--records, --rounds, --cycles, --batch-records and --rate must be positive")
    plot_path, json_path = output_paths(args, "scale")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    workdir, _ = work_directory(args.dir, "scale")
    with open(os.path.join(workdir, "scale_worker.py"), "w", encoding="utf-8") as out:
        out.write(WORKER_SOURCE)
    broker = EmbeddedKafka(
        work_dir=os.path.join(workdir, "broker"),
        cache_dir=os.environ.get("STREAMLET_KAFKA_CACHE", REPO_ROOT / ".cache" / "kafka"),
    )
    try:
        client_log = logging.getLogger("aiokafka")
        client_log.setLevel(logging.CRITICAL)
        try:
            broker.start()
        finally:
            client_log.setLevel(logging.NOTSET)
        # The benchmark's own clients log a retried fetch or produce when a
        # topic it just made has no leader yet; the workers' logs are checked.
        client_log.setLevel(logging.CRITICAL)
        process = getattr(broker, "_process", None)
        log_dir = os.path.join(tempfile.gettempdir(), "scale-logs")
        shutil.rmtree(log_dir, ignore_errors=True)
        os.makedirs(log_dir)
        ctx = Context(
            broker.bootstrap, workdir, process.pid if process is not None else None, log_dir
        )
        print(
            f"streamlet scale-out benchmark: embedded Kafka {KAFKA_VERSION} at"
            f" {broker.bootstrap}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f},"
            f" Python {platform.python_version()}; {records:,} records x {rounds} round(s),"
            f" {cycles} rebalance cycle(s)\n",
            flush=True,
        )
        by_workers, pauses, txn = anyio.run(
            run_all, ctx, records, rounds, args.batch_records, args.rate, cycles
        )
    finally:
        broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    base = _median(by_workers[1], "rate")
    kinds = problem_kinds(ctx.problems)
    result = {
        "benchmark": "scale",
        "command": " ".join(["python -m benchmarks.scale", *args_given]),
        "quick": quick,
        "cpus": os.cpu_count(),
        "broker": f"embedded Kafka {KAFKA_VERSION}",
        "partitions": PARTITIONS,
        "records": records,
        "record_size": RECORD_SIZE,
        "batch_records": args.batch_records,
        "batch_interval_ms": round(BATCH_INTERVAL * 1e3),
        "session_timeout_s": SESSION_TIMEOUT,
        "throughput": {
            str(n): {
                "records_per_s": round(_median(runs, "rate")),
                "per_core_efficiency": round(_median(runs, "rate") / (n * base), 3),
                "records_per_worker_cpu_s": round(_median(runs, "per_cpu")),
                "exactly_once": all(r.exact for r in runs),
                "rounds": [r.to_json() for r in runs],
            }
            for n, runs in by_workers.items()
        },
        "pauses": {
            "input_rate": args.rate,
            "join": pauses.summary("join"),
            "leave": pauses.summary("leave"),
            "clean": pauses.summary("join", "leave"),
            "kill": pauses.summary("kill"),
            "events": [e.to_json() for e in pauses.events],
            "produced": pauses.produced,
            "output_records": pauses.output,
            "duplicates": pauses.duplicates,
        },
        "transactions": {
            "tasks_12": [r.to_json() for r in txn.many],
            "tasks_1": [r.to_json() for r in txn.one],
            "first_in_round": txn.order,
            "ratio": round(txn.ratio, 3),
            "ratio_per_worker_cpu_s": round(txn.per_cpu_ratio, 3),
        },
        "worker_log_problems": {"count": len(ctx.problems), "kinds": kinds},
        "worker_failures": ctx.exits,
        "targets": {"clean_pause_p99_s": TARGET_PAUSE, "txn_ratio": TARGET_TXN_RATIO},
        "pass": {
            "clean_pause_p99": pauses.clean_p99 <= TARGET_PAUSE,
            "txn_ratio": txn.ratio >= TARGET_TXN_RATIO,
            "exactly_once": all(r.exact for runs in by_workers.values() for r in runs)
            and pauses.exact
            and all(r.exact for r in txn.many + txn.one),
        },
    }
    if kinds:
        print(f"\n{len(ctx.problems)} error/warning line(s) in worker logs, by kind:")
        for kind in kinds:
            print(f"  {kind['count']:>5} x {kind['example'][:220]}")
    for line in ctx.exits:
        print(f"worker failed: {line}")
    print(f"\nthe workers' logs, one file per case: {ctx.log_dir}")
    plot(by_workers, pauses, plot_path)
    write_result(result, json_path, plot_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
