"""streamlet beside the tools its users would otherwise pick: Quix Streams, Faust,
and a hand-written aiokafka loop (the floor), on one broker.

Run from the repository root, with the peers installed::

    pip install -e '.[peers,bench]'
    python -m benchmarks.peers              # about 15 minutes
    python -m benchmarks.peers --quick      # a few minutes, a smoke test
    python -m benchmarks.peers --systems floor,streamlet --guarantees exactly-once

Every system runs the same pipeline (:mod:`benchmarks.peer_pipelines`): read a
4-partition topic of 100-byte values, copy each value to a 4-partition output
topic, commit; at exactly-once (outputs and input offsets in one
transaction) and at at-least-once. Each system is a process of its own,
started with ``python -m benchmarks.peer_pipelines`` and watched from here
with a ``read_committed`` consumer of its output topic: no system is
instrumented, so all are measured the same way. Without ``--bootstrap`` the
embedded Apache Kafka of :mod:`streamlet.testing.kafka` runs on loopback.

What is measured
----------------
* **Throughput** (``--records``, default 300,000; one commit per
  ``--commit-records``, default 50,000). One input topic is filled once.
  Each round runs every system on it into a fresh output topic with a fresh
  consumer group, in an order rotated each round, so that a busy neighbour
  slows all alike (``--rounds``, default 5; medians reported). The clock
  starts when the watcher has seen one commit's worth of records and stops
  when the last input record's output is visible; the records seen when it
  starts are not counted. Start-up, connecting, the group join and the
  first commit are left out alike for every system (a start at the first
  output would count the rest of a first commit whose work was done
  before the clock started). ``--records`` must be a multiple of
  ``--commit-records``. CPU is the process's user + system time over the
  same span, read from ``/proc`` (all its threads, librdkafka's too),
  reported as µs per record. A round that has not finished after
  ``--round-timeout`` seconds counts what came until then, and the table
  says how many rounds were cut so. A latency run whose window's records
  did not all arrive says how many did.
* **Latency** at a fixed input rate (``--rate``, default 2,000 records/s).
  Each system, once it has copied a first record, gets the paced producer
  and checking consumer of :mod:`benchmarks.kafka` (a process of their
  own): every value carries its ``time.monotonic()`` at produce, and the
  latency is produce → visible to ``read_committed``. Commits every
  ``--latency-interval`` seconds (default 0.1) for every system.
* **A crash.** A fresh topic of ``--crash-records`` records (default
  50,000); the system runs until a third of them are visible in the output,
  is killed with SIGKILL, and is started again with the same group and
  directory. Reported: seconds from the restart to its first new output,
  and a count of every output: duplicates (more than one copy of an input
  record) and missing ones. At exactly-once both must be 0; at
  at-least-once duplicates are allowed and none may be missing.

How each system commits, and what it joins, is in the docstrings of
:mod:`benchmarks.peer_pipelines`. The table goes to stdout, followed by one
JSON line with every figure; the JSON is also written to ``--json`` and a
plot (throughput and CPU per record, latency) to ``--plot``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from benchmarks.common import (
    REPO_ROOT,
    add_output_options,
    ms,
    output_paths,
    percentiles,
    work_directory,
    write_result,
)
from benchmarks.kafka import (
    _STAMPED,
    _STAMPED_PAD,
    LoadSpec,
    Verdict,
    _partitions,
    create_topics,
    delete_topics,
    fill,
    run_load,
)
from benchmarks.peer_pipelines import GUARANTEES, SYSTEMS, Pipeline, command
from streamlet.testing.kafka import KAFKA_VERSION, EmbeddedKafka, wait_for_broker

PARTITIONS = 4
RECORDS = 300_000
QUICK_RECORDS = 100_000
COMMIT_RECORDS = 50_000
CRASH_RECORDS = 50_000
RATE = 2_000.0
LATENCY_INTERVAL = 0.1
THROUGHPUT_INTERVAL = 10.0
"""Commit interval of the throughput runs: long, so that every system commits by count."""
POLL_MS = 200
READY_TIMEOUT = 120.0
"""Seconds a system may take to copy its first record (start-up and group join)."""
SETTLE = 3.0
"""Seconds without new output after which a crash run's count is final."""
TARGET_RATIO = 0.9
TARGET_CPU_RATIO = 0.8
LABELS = {
    "floor": "hand-written aiokafka",
    "streamlet": "streamlet",
    "quix": "Quix Streams",
    "faust": "Faust",
}

log = logging.getLogger("benchmarks.peers")
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), from ``/proc``."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


# ---- a system's process ---------------------------------------------------------


class Running:
    """One system's process; its output goes to a log file, shown if it fails."""

    def __init__(self, pipeline: Pipeline, log_path: str) -> None:
        self.pipeline = pipeline
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                command(self.pipeline), stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def check_alive(self) -> None:
        """Raise with the tail of its log if the process has exited."""
        if self.process is not None and self.process.poll() is not None:
            with open(self.log_path, encoding="utf-8", errors="replace") as out:
                tail = out.read()[-3000:]
            raise RuntimeError(
                f"{self.pipeline.system} ({self.pipeline.guarantee}) exited with code"
                f" {self.process.returncode}; the end of its log:\n{tail}"
            )

    def kill(self) -> None:
        """SIGKILL: a crash, and how every run ends (the output is checked by then)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()


class Watch:
    """A ``read_committed`` reader of an output topic, counting every copy of every record.

    Each value starts with its input record's sequence number. Notes when
    output first became visible, when the last of ``expected`` distinct
    records did, and when anything was last seen; with ``running`` set, the
    process's CPU time at the first and the last of these.
    """

    def __init__(self, bootstrap: str, topic: str, expected: int, start_after: int = 1) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.expected = expected
        self.start_after = start_after
        self.running: Running | None = None
        self.verdict = Verdict(expected)
        self.first: tuple[float, int, float] | None = None
        """(time, distinct records, process CPU) when ``start_after`` records were visible."""
        self.complete: tuple[float, float] | None = None
        """(time, process CPU) when every record had been seen."""
        self.last_seen = 0.0
        self.changed = anyio.Event()

    @property
    def records(self) -> int:
        """Records read, every copy counted."""
        return self.verdict.records

    @property
    def distinct(self) -> int:
        """Distinct input records among them."""
        return self.verdict.distinct

    def _cpu(self) -> float:
        return self.running.cpu() if self.running is not None else 0.0

    async def run(self) -> None:
        """Read until cancelled."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            isolation_level="read_committed",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        try:
            tps = _partitions(self.topic)
            consumer.assign(tps)
            while True:
                fetched = await consumer.getmany(*tps, timeout_ms=POLL_MS)
                if not fetched:
                    continue
                now = time.monotonic()
                self.verdict.count(fetched)
                self.last_seen = now
                if self.first is None and self.distinct >= self.start_after:
                    self.first = (now, self.distinct, self._cpu())
                if self.complete is None and self.distinct == self.expected:
                    self.complete = (now, self._cpu())
                self.changed.set()
                self.changed = anyio.Event()
        finally:
            with anyio.CancelScope(shield=True):
                await consumer.stop()

    async def until(self, done: Any, seconds: float, running: Running) -> bool:
        """Wait until ``done()`` holds (True) or ``seconds`` pass (False).

        Raises if the system's process exits meanwhile.
        """
        deadline = time.monotonic() + seconds
        while not done():
            running.check_alive()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with anyio.move_on_after(min(left, 1.0)):
                await self.changed.wait()
        return True


@dataclass
class Context:
    """Where the runs happen, and their settings."""

    bootstrap: str
    workdir: str
    records: int
    rounds: int
    commit_records: int
    round_timeout: float
    rate: float
    warmup: float
    seconds: float
    crash_records: int
    crash_timeout: float
    runs: int = 0

    def pipeline(
        self, system: str, guarantee: str, source: str, output: str, interval: float
    ) -> Pipeline:
        """A fresh group and directory for one run of ``system``."""
        self.runs += 1
        tag = f"{system}-{self.runs}-{uuid.uuid4().hex[:6]}"
        state = os.path.join(self.workdir, tag)
        os.makedirs(state)
        return Pipeline(
            system,
            guarantee,
            self.bootstrap,
            source,
            output,
            f"bench-peer-{tag}",
            state,
            PARTITIONS,
            self.commit_records,
            interval,
        )

    def running(self, pipeline: Pipeline) -> Running:
        return Running(pipeline, os.path.join(pipeline.state, "..", f"{pipeline.group}.log"))


def _topic(kind: str) -> str:
    return f"bench-peer-{kind}-{uuid.uuid4().hex[:8]}"


# ---- throughput -------------------------------------------------------------------


@dataclass
class Round:
    """One system's pass over the input."""

    system: str
    guarantee: str
    records: int
    """Records counted: those that became visible after the clock started."""
    seconds: float
    cpu_seconds: float
    finished: bool
    duplicates: int

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds else 0.0

    @property
    def cpu_us(self) -> float:
        """CPU µs per record."""
        return self.cpu_seconds / self.records * 1e6 if self.records else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "records_per_s": round(self.rate),
            "cpu_us_per_record": round(self.cpu_us, 2),
            "records": self.records,
            "seconds": round(self.seconds, 3),
            "finished": self.finished,
            "duplicates": self.duplicates,
        }


async def throughput_round(ctx: Context, system: str, guarantee: str, source: str) -> Round:
    output = _topic("out")
    await create_topics(ctx.bootstrap, [output], PARTITIONS)
    pipeline = ctx.pipeline(system, guarantee, source, output, THROUGHPUT_INTERVAL)
    running = ctx.running(pipeline)
    # The clock starts once a whole commit's worth is visible: before, a
    # system's first commit (and a read of it cut by the fetch size) would
    # count records whose work was done before the clock started.
    watch = Watch(ctx.bootstrap, output, ctx.records, start_after=ctx.commit_records)
    watch.running = running
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch.run)
            running.start()
            if not await watch.until(
                lambda: watch.first is not None, READY_TIMEOUT + ctx.round_timeout, running
            ):
                raise RuntimeError(
                    f"{system} copied {watch.distinct:,} records, not one commit's"
                    f" {ctx.commit_records:,}, in {READY_TIMEOUT + ctx.round_timeout:g} s"
                )
            finished = await watch.until(
                lambda: watch.complete is not None, ctx.round_timeout, running
            )
            end = watch.complete or (time.monotonic(), running.cpu())
            tg.cancel_scope.cancel()
    finally:
        running.kill()
        await delete_topics(ctx.bootstrap, [output])
    assert watch.first is not None
    began, counted, cpu_began = watch.first
    return Round(
        system,
        guarantee,
        watch.distinct - counted,
        end[0] - began,
        end[1] - cpu_began,
        finished,
        watch.records - watch.distinct,
    )


# ---- latency -----------------------------------------------------------------------


@dataclass
class Latency:
    system: str
    guarantee: str
    in_window: int
    measured: int
    duplicates: int
    percentiles: dict[str, float]

    @property
    def complete(self) -> bool:
        """Every record of the window arrived (the percentiles cover them all)."""
        return self.measured == self.in_window

    def to_json(self) -> dict[str, Any]:
        return {
            "records_in_window": self.in_window,
            "records": self.measured,
            "complete": self.complete,
            "duplicates": self.duplicates,
            **{f"{k}_ms": ms(v) for k, v in self.percentiles.items()},
        }


async def latency_run(ctx: Context, system: str, guarantee: str) -> Latency:
    source, output = _topic("lat-in"), _topic("lat-out")
    await create_topics(ctx.bootstrap, [source, output], PARTITIONS)
    pipeline = ctx.pipeline(system, guarantee, source, output, LATENCY_INTERVAL)
    running = ctx.running(pipeline)
    watch = Watch(ctx.bootstrap, output, 0)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch.run)
            running.start()
            # One record first, sequence number -1 (outside every window),
            # until it is copied: the window opens on a system that is ready.
            producer = AIOKafkaProducer(bootstrap_servers=ctx.bootstrap, acks="all")
            await producer.start()
            try:
                await producer.send_and_wait(source, _STAMPED.pack(-1, 0.0) + _STAMPED_PAD)
            finally:
                await producer.stop()
            if not await watch.until(lambda: watch.records > 0, READY_TIMEOUT, running):
                raise RuntimeError(f"{system} copied nothing in {READY_TIMEOUT:g} s")
            tg.cancel_scope.cancel()
        spec = LoadSpec(ctx.bootstrap, source, output, ctx.rate, ctx.warmup, ctx.seconds, 60.0)
        result = await run_load(spec)
        running.check_alive()
    finally:
        running.kill()
        await delete_topics(ctx.bootstrap, [source, output])
    latencies = result["latencies"]
    if not latencies:
        raise RuntimeError(f"{system}: no record of the latency window became visible")
    return Latency(
        system,
        guarantee,
        result["in_window"],
        len(latencies),
        result["duplicates"],
        percentiles(latencies),
    )


# ---- a crash ------------------------------------------------------------------------


@dataclass
class Crash:
    system: str
    guarantee: str
    records: int
    killed_at: int
    """Distinct records visible when the process was killed."""
    resumed_seconds: float | None
    """From the restart to the first new output (None: none came)."""
    outputs: int
    duplicates: int
    missing: int

    @property
    def passed(self) -> bool:
        if self.guarantee == "exactly-once":
            return self.duplicates == 0 and self.missing == 0
        return self.missing == 0

    def to_json(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "killed_after": self.killed_at,
            "resumed_s": None if self.resumed_seconds is None else round(self.resumed_seconds, 2),
            "outputs": self.outputs,
            "duplicates": self.duplicates,
            "missing": self.missing,
            "pass": self.passed,
        }


async def crash_run(ctx: Context, system: str, guarantee: str) -> Crash:
    source, output = _topic("crash-in"), _topic("crash-out")
    await create_topics(ctx.bootstrap, [source, output], PARTITIONS)
    await fill(ctx.bootstrap, source, ctx.crash_records, PARTITIONS)
    # Commits every 2,000 records or 0.5 s: a few dozen commits before the kill.
    pipeline = ctx.pipeline(system, guarantee, source, output, 0.5)
    pipeline = dataclasses.replace(pipeline, commit_records=2_000)
    first, second = ctx.running(pipeline), ctx.running(pipeline)
    watch = Watch(ctx.bootstrap, output, ctx.crash_records)
    resumed: float | None = None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch.run)
            first.start()
            third = ctx.crash_records // 3
            if not await watch.until(lambda: watch.distinct >= third, READY_TIMEOUT, first):
                raise RuntimeError(
                    f"{system} copied {watch.distinct} records in {READY_TIMEOUT:g} s"
                )
            first.kill()
            killed_at = watch.distinct
            await anyio.sleep(1.0)  # what the dead process committed becomes visible
            before = watch.records
            second.start()
            restarted = time.monotonic()
            if await watch.until(lambda: watch.records > before, ctx.crash_timeout, second):
                resumed = watch.last_seen - restarted
                deadline = restarted + ctx.crash_timeout
                while time.monotonic() < deadline:
                    second.check_alive()
                    if watch.distinct == ctx.crash_records and (
                        time.monotonic() - watch.last_seen > SETTLE
                    ):
                        break
                    await anyio.sleep(0.2)
            tg.cancel_scope.cancel()
    finally:
        first.kill()
        second.kill()
        await delete_topics(ctx.bootstrap, [source, output])
    return Crash(
        system,
        guarantee,
        ctx.crash_records,
        killed_at,
        resumed,
        watch.records,
        watch.records - watch.distinct,
        ctx.crash_records - watch.distinct,
    )


# ---- all runs ------------------------------------------------------------------------


@dataclass
class Results:
    """Every run, by (system, guarantee)."""

    cases: list[tuple[str, str]]
    rounds: dict[tuple[str, str], list[Round]] = field(default_factory=dict)
    latency: dict[tuple[str, str], Latency] = field(default_factory=dict)
    crash: dict[tuple[str, str], Crash] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    """What could not be measured, and why (a run that raised)."""

    def median_rate(self, case: tuple[str, str]) -> float:
        return statistics.median(r.rate for r in self.rounds[case])

    def median_cpu_us(self, case: tuple[str, str]) -> float:
        return statistics.median(r.cpu_us for r in self.rounds[case])

    def ratios(self, case: tuple[str, str]) -> tuple[float, float] | None:
        """(throughput, records per CPU-second) over the floor's at the same guarantee."""
        floor = ("floor", case[1])
        if not self.rounds.get(case) or not self.rounds.get(floor):
            return None
        return (
            self.median_rate(case) / self.median_rate(floor),
            self.median_cpu_us(floor) / self.median_cpu_us(case),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for case in self.cases:
            system, guarantee = case
            entry: dict[str, Any] = {}
            if self.rounds.get(case):
                entry["throughput"] = {
                    "records_per_s": round(self.median_rate(case)),
                    "cpu_us_per_record": round(self.median_cpu_us(case), 2),
                    "rounds": [r.to_json() for r in self.rounds[case]],
                }
                ratios = self.ratios(case)
                if ratios is not None:
                    entry["throughput"]["ratio"] = round(ratios[0], 3)
                    entry["throughput"]["cpu_ratio"] = round(ratios[1], 3)
            if case in self.latency:
                entry["latency"] = self.latency[case].to_json()
            if case in self.crash:
                entry["crash"] = self.crash[case].to_json()
            out.setdefault(system, {})[guarantee] = entry
        return out


async def run_all(ctx: Context, results: Results, report: Any) -> None:
    """Throughput rounds (rotated order), then a latency run and a crash run per case."""

    async def attempt(what: str, run: Any) -> Any:
        try:
            return await run()
        except Exception as exc:
            log.warning("%s failed: %s", what, exc)
            results.failed[what] = str(exc)[:2000]
            return None

    source = _topic("in")
    await create_topics(ctx.bootstrap, [source], PARTITIONS)
    try:
        seconds = await fill(ctx.bootstrap, source, ctx.records, PARTITIONS)
        report(f"filled {ctx.records:,} records in {seconds:.1f} s")
        cases = results.cases
        for n in range(ctx.rounds):
            order = cases[n % len(cases) :] + cases[: n % len(cases)]
            for system, guarantee in order:
                what = f"throughput {system} {guarantee} round {n + 1}"
                result = await attempt(
                    what, lambda s=system, g=guarantee: throughput_round(ctx, s, g, source)
                )
                if result is not None:
                    results.rounds.setdefault((system, guarantee), []).append(result)
                    report(
                        f"round {n + 1}: {LABELS[system]:>21} {guarantee:>13}"
                        f" {result.rate:>9,.0f} records/s {result.cpu_us:>6.2f} µs CPU/record"
                        + ("" if result.finished else " (timed out)")
                    )
    finally:
        await delete_topics(ctx.bootstrap, [source])
    for system, guarantee in results.cases:
        lat = await attempt(
            f"latency {system} {guarantee}", lambda s=system, g=guarantee: latency_run(ctx, s, g)
        )
        if lat is not None:
            results.latency[(system, guarantee)] = lat
            report(
                f"latency: {LABELS[system]:>21} {guarantee:>13}"
                f" p50 {ms(lat.percentiles['p50']):>7.1f} ms"
                f" p99 {ms(lat.percentiles['p99']):>7.1f} ms"
            )
    for system, guarantee in results.cases:
        crash = await attempt(
            f"crash {system} {guarantee}", lambda s=system, g=guarantee: crash_run(ctx, s, g)
        )
        if crash is not None:
            results.crash[(system, guarantee)] = crash
            resumed = "never" if crash.resumed_seconds is None else f"{crash.resumed_seconds:.1f} s"
            report(
                f"crash: {LABELS[system]:>21} {guarantee:>13} resumed {resumed},"
                f" {crash.duplicates} duplicates, {crash.missing} missing of {crash.records:,}"
            )


# ---- output ---------------------------------------------------------------------------


def table(results: Results) -> str:
    """The summary, one line per system and guarantee."""
    lines = [
        "| system | guarantee | records/s | CPU µs/record | ratio to floor | per CPU-second"
        " | latency p50 / p99 | after a SIGKILL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in results.cases:
        system, guarantee = case
        cells = [LABELS[system], guarantee]
        rounds = results.rounds.get(case)
        if rounds:
            late = sum(not r.finished for r in rounds)
            note = f" ({late} of {len(rounds)} rounds cut at the timeout)" if late else ""
            cells += [
                f"{results.median_rate(case):,.0f}{note}",
                f"{results.median_cpu_us(case):.2f}",
            ]
            ratios = results.ratios(case)
            cells += [f"{ratios[0]:.2f}", f"{ratios[1]:.2f}"] if ratios else ["", ""]
        else:
            cells += ["failed", "", "", ""]
        lat = results.latency.get(case)
        cells.append(
            "failed"
            if lat is None
            else f"{ms(lat.percentiles['p50']):.0f} / {ms(lat.percentiles['p99']):.0f} ms"
            + ("" if lat.complete else f" ({lat.measured:,} of {lat.in_window:,} arrived)")
        )
        crash = results.crash.get(case)
        if crash is None:
            cells.append("failed")
        else:
            resumed = (
                "no output after restart"
                if crash.resumed_seconds is None
                else f"resumed in {crash.resumed_seconds:.1f} s"
            )
            cells.append(
                f"{resumed}; {crash.duplicates:,} duplicates, {crash.missing:,} missing"
                + ("" if crash.passed else " **fails its guarantee**")
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: Results, rate: float, path: str) -> None:
    """Throughput, CPU per record and latency p50/p99 per system, by guarantee."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.4), dpi=100)
    guarantees = [g for g in GUARANTEES if any(c[1] == g for c in results.cases)]
    systems = [s for s in SYSTEMS if any(c[0] == s for c in results.cases)]
    width = 0.8 / max(1, len(guarantees))
    for i, guarantee in enumerate(guarantees):
        xs = [k + (i - (len(guarantees) - 1) / 2) * width for k in range(len(systems))]
        cases = [(s, guarantee) for s in systems]
        rates = [results.median_rate(c) / 1e3 if results.rounds.get(c) else 0 for c in cases]
        cpus = [results.median_cpu_us(c) if results.rounds.get(c) else 0 for c in cases]
        bars = axes[0].bar(xs, rates, width, label=guarantee)
        axes[0].bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
        bars = axes[1].bar(xs, cpus, width, label=guarantee)
        axes[1].bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
        p50 = [
            ms(results.latency[c].percentiles["p50"]) if c in results.latency else 0 for c in cases
        ]
        p99 = [
            ms(results.latency[c].percentiles["p99"]) if c in results.latency else 0 for c in cases
        ]
        axes[2].bar(xs, p99, width, label=f"{guarantee} p99", alpha=0.45, color=f"C{i}")
        bars = axes[2].bar(xs, p50, width, label=f"{guarantee} p50", color=f"C{i}")
        axes[2].bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
    names = [LABELS[s].replace(" ", "\n", 1) for s in systems]
    titles = (
        "throughput (thousand records/s)",
        "CPU µs per record (all threads)",
        f"latency at {rate:,.0f} records/s (ms)",
    )
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xticks(range(len(systems)))
        ax.set_xticklabels(names, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.peers",
        description="streamlet, Quix Streams, Faust and a hand-written aiokafka loop on one"
        " consume → copy → produce pipeline: throughput, latency, and a crash.",
    )
    parser.add_argument("--bootstrap", help="host:port of a running broker (default: embedded)")
    parser.add_argument("--quick", action="store_true", help="a smoke test: noisy figures")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated")
    parser.add_argument("--guarantees", default=",".join(GUARANTEES), help="comma-separated")
    parser.add_argument("--records", type=int, help=f"throughput input (default {RECORDS:,})")
    parser.add_argument("--rounds", type=int, help="throughput rounds (default 5, 1 with --quick)")
    parser.add_argument("--commit-records", type=int, default=COMMIT_RECORDS)
    parser.add_argument("--round-timeout", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=RATE, help="records/s of the latency runs")
    parser.add_argument("--seconds", type=float, help="latency window (default 10, 3 with --quick)")
    parser.add_argument("--crash-records", type=int, default=CRASH_RECORDS)
    parser.add_argument("--crash-timeout", type=float, default=180.0)
    parser.add_argument("--dir", help="where state directories go (default: in the repository)")
    add_output_options(parser, "peers", "(throughput, CPU per record, latency)")
    given = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(given)
    systems = [s for s in args.systems.split(",") if s]
    guarantees = [g for g in args.guarantees.split(",") if g]
    unknown = sorted(set(systems) - set(SYSTEMS)) + sorted(set(guarantees) - set(GUARANTEES))
    if unknown:
        parser.error(f"unknown: {', '.join(unknown)}; systems: {SYSTEMS}, guarantees: {GUARANTEES}")
    records = args.records or (QUICK_RECORDS if args.quick else RECORDS)
    if records % args.commit_records or records < 2 * args.commit_records:
        # A last, partial commit would wait for the commit interval (10 s).
        parser.error(
            f"--records ({records:,}) must be a multiple of --commit-records"
            f" ({args.commit_records:,}), and at least two of them"
        )
    plot_path, json_path = output_paths(args, "peers")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # The client logs each refused connection while the broker starts, and a
    # fresh topic's first lookups: noise here, as a failure raises anyway.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    workdir, _ = work_directory(args.dir, "peers")
    ctx = Context(
        bootstrap="",
        workdir=workdir,
        records=records,
        rounds=args.rounds or (1 if args.quick else 5),
        commit_records=args.commit_records,
        round_timeout=args.round_timeout,
        rate=args.rate,
        warmup=2.0,
        seconds=args.seconds or (3.0 if args.quick else 10.0),
        crash_records=args.crash_records,
        crash_timeout=args.crash_timeout,
    )
    results = Results([(s, g) for g in guarantees for s in systems])
    broker: EmbeddedKafka | None = None
    try:
        if args.bootstrap:
            ctx.bootstrap = args.bootstrap
            wait_for_broker(ctx.bootstrap, timeout=30)
        else:
            broker = EmbeddedKafka(
                work_dir=os.path.join(workdir, "broker"),
                cache_dir=os.environ.get("STREAMLET_KAFKA_CACHE", REPO_ROOT / ".cache" / "kafka"),
            )
            broker.start()
            ctx.bootstrap = broker.bootstrap
        print(
            f"peers benchmark: {'embedded Kafka ' + KAFKA_VERSION if broker else ctx.bootstrap};"
            f" {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, Python"
            f" {platform.python_version()}; {ctx.records:,} records x {ctx.rounds} round(s),"
            f" a commit per {ctx.commit_records:,} records\n",
            flush=True,
        )
        anyio.run(run_all, ctx, results, lambda line: print(line, flush=True))
    finally:
        if broker is not None:
            broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print("\n" + table(results))
    result = {
        "benchmark": "peers",
        "command": " ".join(["python -m benchmarks.peers", *given]),
        "quick": args.quick,
        "cpus": os.cpu_count(),
        "broker": f"embedded Kafka {KAFKA_VERSION}" if broker is not None else "external",
        "partitions": PARTITIONS,
        "records": ctx.records,
        "record_size": 100,
        "commit_records": ctx.commit_records,
        "latency_rate": ctx.rate,
        "latency_commit_interval_s": LATENCY_INTERVAL,
        "crash_records": ctx.crash_records,
        "versions": _versions(),
        "systems": results.to_json(),
        "failed": results.failed,
        "targets": {"ratio": TARGET_RATIO, "cpu_ratio": TARGET_CPU_RATIO},
    }
    plot(results, ctx.rate, plot_path)
    write_result(result, json_path, plot_path)
    return 1 if results.failed else 0


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("aiokafka", "quixstreams", "faust-streaming", "confluent-kafka"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


if __name__ == "__main__":
    sys.exit(main())
