"""End-to-end latency of a receiver pipeline, and its throughput with WAL fsync on and off.

Run from the repository root::

    python -m benchmarks.latency            # about 75 s
    python -m benchmarks.latency --quick    # about 12 s, a smoke test (writes to /tmp)

What is measured
----------------
* **Latency.** A receiver stores 100-byte records at a steady rate (default
  20,000 records/s): every millisecond it stores the records the clock says
  are due, stamped with ``time.monotonic()`` taken just before
  ``context.store`` and carried in the record's value. The handler returns
  one output per batch, ``[stamp, count]`` for each distinct stamp (records
  stored together share one), so every record's stamp reaches the sink while
  the sink writes one line per batch, not one per record. A real
  :class:`~streamlet.sinks.FileSink` commits it (temp file, fsync, rename,
  directory fsync), and a thin sink around it reads ``time.monotonic()``
  once the inner ``commit`` has returned and records ``now - stamp`` for
  every record. A latency thus covers: store → block cut → data WAL fsync →
  tracker ``block`` event fsync → batch tick → ``alloc`` fsync → read back
  from the WAL → handler → part file and directory fsync. Durability is
  ``always``. Batch intervals are 20, 100 and 500 ms with a block interval
  of ``min(20 ms, batch interval)``: a record waits at most 20 ms for its
  block to be cut, as a latency-minded deployment would set it. Only records
  stored in the measured window count: it opens after a warm-up
  (``--warmup``) and lasts ``--seconds``; the app runs on past it until
  every record of the window is committed, and the number of latencies must
  equal the number of records stored in the window. Percentiles are
  nearest-rank over every record. Block cuts and batch ticks run on separate
  timers whose phase is set when the app starts: a block whose cut ends just
  after a tick waits a whole batch interval more, so the figures move by up
  to one block interval from one run to the next.
* **Throughput, WAL fsync on/off.** A receiver stores chunks of 1,000
  records as fast as it may, a handler returns one count per batch, and a
  ``FileSink`` commits it; batch interval 100 ms, block interval 20 ms. The
  block generator's bounded buffer only holds back a receiver that outruns
  the disk; one that outruns the handlers would pile blocks up in the
  tracker and grow every batch without end. So the receiver keeps at most
  200,000 records stored but not yet committed (a closed loop, like a load
  generator with a window), which keeps the pipeline saturated with batches
  of bounded size. The rate is the records of the batches done in the
  measured window over the time between the first and the last of them.
  Streamlet always writes receivers' blocks to the data WAL, so this
  compares the app's ``durability="always"`` (every data WAL append and
  tracker event is fsync'd before it counts) with ``durability="none"``
  (the same writes, no fsync of records; for benchmarks only): "WAL fsync
  on/off", not WAL on/off. The sink fsyncs in both. The two are run
  alternately, round by round (the order flips each round), so a busy
  neighbour slows both alike; the figures are the medians of the rounds and
  the ratio is the ratio of the medians. The pipeline is CPU-bound (one
  event loop, one GIL), so the rate follows the CPU share the process gets;
  records per CPU-second (all threads) are printed beside it as a check
  that is less sensitive to neighbours.

Targets (issue 4): p99 latency ≤ batch interval + 30 ms at 20,000 records/s
with durability ``always``; throughput with WAL fsync on ≥ 0.8 of off.

Everything runs in one process, one event loop per case, in a temporary
directory in the repository (on its file system, not a tmpfs), removed
afterwards. The table goes to stdout, followed by one JSON line with every
figure, the targets and pass/fail per target; the same JSON is written to
``--json`` and a plot of the percentiles per interval to ``--plot``.
"""

from __future__ import annotations

import argparse
import collections
import functools
import itertools
import logging
import math
import os
import platform
import shutil
import statistics
import struct
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from benchmarks.common import (
    PERCENTILES,
    add_output_options,
    ms,
    output_paths,
    percentiles,
    work_directory,
    write_result,
)
from streamlet import App, Batch, Record
from streamlet.metrics import BatchInfo
from streamlet.sinks.base import Sink, SinkContext
from streamlet.sinks.file import FileSink
from streamlet.sources.receiver import Receiver, ReceiverContext

INTERVALS = (0.02, 0.1, 0.5)  # batch intervals of the latency runs, seconds
MAX_BLOCK_INTERVAL = 0.02  # block interval = min(this, batch interval)
INPUT_RATE = 20_000  # records/s of the latency runs
RECORD_SIZE = 100  # bytes of each record's value
PACE = 0.001  # seconds between stores of the steady receiver
TARGET_SLACK = 0.030  # p99 target: batch interval + this
TARGET_RATIO = 0.8  # throughput target: fsync on / fsync off
FLOOD_CHUNK = 1_000  # records per store of the flooding receiver
FLOOD_BATCH_INTERVAL = 0.1
FLOOD_BLOCK_INTERVAL = 0.02
FLOOD_WINDOW = 200_000  # records stored but not yet committed, at most

_STAMP = struct.Struct("<d")
_PAD = b"x" * (RECORD_SIZE - _STAMP.size)


# ---- the latency pipeline -------------------------------------------------


@dataclass
class _Window:
    """The measured window, in ``time.monotonic()`` seconds, and what fell in it."""

    warmup: float
    seconds: float
    start: float = math.inf
    end: float = math.inf
    stored: int = 0
    """Records stored with a stamp in the window (counted by the receiver)."""
    latencies: array[float] = field(default_factory=lambda: array("d"))
    """Seconds from store to durable output, one per record of the window."""

    def open_at(self, now: float) -> None:
        self.start = now + self.warmup
        self.end = self.start + self.seconds


class _SteadyReceiver(Receiver):
    """Stores ``rate`` records/s, paced by the clock, each stamped at its store."""

    def __init__(self, rate: float, window: _Window) -> None:
        super().__init__(name="steady")
        self._rate = rate
        self._window = window

    async def run(self, context: ReceiverContext) -> None:
        window = self._window
        began = time.monotonic()
        window.open_at(began)
        sent = 0
        while not context.stopping.is_set():
            due = int((time.monotonic() - began) * self._rate) - sent
            if due > 0:
                stamp = time.monotonic()
                record = Record(_STAMP.pack(stamp) + _PAD)
                await context.store([record] * due)
                sent += due
                if window.start <= stamp < window.end:
                    window.stored += due
            await anyio.sleep(PACE)


class _LatencySink(Sink):
    """A :class:`FileSink` that notes every record's age once the commit returned.

    Its handler's output is one list of ``[stamp, count]`` pairs per batch.
    """

    def __init__(self, inner: FileSink, window: _Window) -> None:
        self._inner = inner
        self._window = window

    async def open(self, context: SinkContext) -> None:
        await self._inner.open(context)

    async def commit(self, batch: Batch, outputs: Sequence[object]) -> bool:
        wrote = await self._inner.commit(batch, outputs)
        now = time.monotonic()
        start, end = self._window.start, self._window.end
        latencies = self._window.latencies
        for output in outputs:
            assert isinstance(output, list)
            for stamp, count in output:
                if start <= stamp < end:
                    latencies.extend(itertools.repeat(now - stamp, count))
        return wrote

    async def aclose(self) -> None:
        await self._inner.aclose()

    def describe(self) -> str:
        return f"LatencySink({self._inner.describe()})"


async def _stamps(batch: Batch) -> list[list[list[float]]]:
    """The handler of the latency runs: one output, ``[stamp, count]`` per distinct stamp.

    Records stored together share a stamp, so this is every record's stamp,
    in a form the sink writes as one line rather than one line per record.
    """
    counts = collections.Counter(record.value for record in batch.records)
    unpack = _STAMP.unpack_from
    return [[[unpack(value)[0], count] for value, count in counts.items()]]


async def _serve_for(
    app: App, seconds: float, started: Callable[[App], Callable[[], object]] | None = None
) -> float:
    """Serve ``app`` for ``seconds``; return when serving began (after ``started``, if given).

    ``started`` runs once the app serves (it may start something that
    watches it) and returns what undoes it, called when the app stopped.
    """
    undo: Callable[[], object] | None = None
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(app.serve)
            if started is not None:
                undo = started(app)
            began = time.monotonic()
            await anyio.sleep(seconds)
            app.stop()
    finally:
        if undo is not None:
            undo()
    return began


@dataclass
class LatencyResult:
    """One latency run: a batch interval and what its records saw."""

    batch_interval: float
    block_interval: float
    seconds: float
    stored: int
    measured: int
    percentiles: dict[str, float]
    """p50/p95/p99/max in seconds."""
    batches: list[BatchInfo]

    @property
    def target(self) -> float:
        return self.batch_interval + TARGET_SLACK

    @property
    def passed(self) -> bool:
        return self.measured == self.stored and self.percentiles["p99"] <= self.target

    def to_json(self) -> dict[str, Any]:
        commit = [b.commit_time for b in self.batches]
        processing = [b.processing_time for b in self.batches]
        delay = [b.scheduling_delay for b in self.batches]
        return {
            "batch_interval_ms": round(self.batch_interval * 1e3),
            "block_interval_ms": round(self.block_interval * 1e3),
            "input_records_per_s": round(self.stored / self.seconds),
            "records": self.measured,
            "records_stored": self.stored,
            **{f"{k}_ms": round(v * 1e3, 1) for k, v in self.percentiles.items()},
            "batches": len(self.batches),
            "median_processing_ms": ms(statistics.median(processing)) if processing else None,
            "median_commit_ms": ms(statistics.median(commit)) if commit else None,
            "max_scheduling_delay_ms": ms(max(delay)) if delay else None,
            "target_p99_ms": round(self.target * 1e3, 1),
            "pass": self.passed,
        }


async def run_latency(
    workdir: str, interval: float, rate: float, seconds: float, warmup: float
) -> LatencyResult:
    """One latency run at batch ``interval``; see the module docstring."""
    block = min(MAX_BLOCK_INTERVAL, interval)
    window = _Window(warmup, seconds)
    state = os.path.join(workdir, f"latency-{round(interval * 1e3)}ms")
    app = App(
        "latency",
        state_dir=state,
        batch_interval=interval,
        block_interval=block,
        durability="always",
    )
    receiver = app.source(_SteadyReceiver(rate, window))
    sink = _LatencySink(FileSink(os.path.join(state, "out")), window)
    app.handler(receiver, sink=sink, name="stamps")(_stamps)
    batches: list[BatchInfo] = []
    app.add_listener(batches.append)
    # Past the window: one batch interval for its last records to be taken,
    # and time for that batch to commit; a graceful stop drains the rest.
    await _serve_for(app, warmup + seconds + interval + 0.25)
    if not window.latencies:
        raise RuntimeError(
            f"no record stored in the window was committed at batch interval {interval} s"
        )
    in_window = [b for b in batches if not b.recovered and b.records]
    return LatencyResult(
        batch_interval=interval,
        block_interval=block,
        seconds=seconds,
        stored=window.stored,
        measured=len(window.latencies),
        percentiles=percentiles(window.latencies),
        batches=in_window,
    )


# ---- the throughput pipeline ----------------------------------------------


class _Progress:
    """Records committed so far, and an event that fires when the count grows."""

    def __init__(self) -> None:
        self.committed = 0
        self.changed = anyio.Event()

    def batch_done(self, info: BatchInfo) -> None:
        self.committed += info.records
        self.changed.set()
        self.changed = anyio.Event()


class _FloodReceiver(Receiver):
    """Stores chunks as fast as it may, with at most ``window`` records not yet committed."""

    def __init__(self, window: int, progress: _Progress) -> None:
        super().__init__(name="flood")
        self._window = window
        self._progress = progress

    async def run(self, context: ReceiverContext) -> None:
        chunk = [Record(b"y" * RECORD_SIZE)] * FLOOD_CHUNK
        stored = 0
        while not context.stopping.is_set():
            if stored - self._progress.committed >= self._window:
                # Polls stopping too: no batch runs between the stop and the drain.
                with anyio.move_on_after(0.05):
                    await self._progress.changed.wait()
                continue
            await context.store(chunk)
            stored += len(chunk)


async def _count(batch: Batch) -> list[int]:
    """The handler of the throughput runs: one output, the batch's record count."""
    return [len(batch)]


@dataclass
class FloodRound:
    """One throughput case of one round."""

    durability: str
    rate: float
    """Records/s committed in the measured window."""
    batches: int
    """Batches done in the window."""
    cpu: float
    """Process CPU seconds (all threads) per second in the window; 1.0 is one core busy."""

    @property
    def per_cpu(self) -> float:
        """Records per CPU-second."""
        return self.rate / self.cpu if self.cpu else 0.0


async def run_throughput(
    workdir: str,
    durability: str,
    seconds: float,
    warmup: float,
    *,
    http: str | None = None,
    started: Callable[[App], Callable[[], object]] | None = None,
) -> FloodRound:
    """Records/s of the batches done in the measured window, with ``durability``.

    ``http`` serves the app's status page and metrics there; ``started`` runs
    once the app serves (see :func:`_serve_for`), before the window opens.
    """
    state = tempfile.mkdtemp(prefix=f"flood-{durability}-", dir=workdir)
    try:
        app = App(
            "flood",
            state_dir=state,
            batch_interval=FLOOD_BATCH_INTERVAL,
            block_interval=FLOOD_BLOCK_INTERVAL,
            durability=durability,
            http=http,
        )
        progress = _Progress()
        receiver = app.source(_FloodReceiver(FLOOD_WINDOW, progress))
        app.handler(receiver, sink=FileSink(os.path.join(state, "out")), name="count")(_count)
        done: list[tuple[float, float, BatchInfo]] = []
        app.add_listener(lambda info: done.append((time.monotonic(), time.process_time(), info)))
        app.add_listener(progress.batch_done)
        began = await _serve_for(app, warmup + seconds, started)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    start, end = began + warmup, began + warmup + seconds
    measured = [entry for entry in done if start <= entry[0] <= end]
    if len(measured) < 2:
        return FloodRound(durability, 0.0, len(measured), 0.0)
    # The first batch done in the window marks its start: its records came before.
    (first, first_cpu, _), (last, last_cpu, _) = measured[0], measured[-1]
    records = sum(info.records for _, _, info in measured[1:])
    span = last - first
    return FloodRound(durability, records / span, len(measured) - 1, (last_cpu - first_cpu) / span)


@dataclass
class ThroughputResult:
    """Rounds of WAL fsync on (durability always) and off (durability none)."""

    on: list[FloodRound] = field(default_factory=list)
    off: list[FloodRound] = field(default_factory=list)

    @property
    def on_median(self) -> float:
        return statistics.median(r.rate for r in self.on)

    @property
    def off_median(self) -> float:
        return statistics.median(r.rate for r in self.off)

    @property
    def ratio(self) -> float:
        return self.on_median / self.off_median if self.off_median else 0.0

    @property
    def per_cpu_ratio(self) -> float:
        on = statistics.median(r.per_cpu for r in self.on)
        off = statistics.median(r.per_cpu for r in self.off)
        return on / off if off else 0.0

    @property
    def passed(self) -> bool:
        return self.ratio >= TARGET_RATIO

    def to_json(self) -> dict[str, Any]:
        return {
            "batch_interval_ms": round(FLOOD_BATCH_INTERVAL * 1e3),
            "block_interval_ms": round(FLOOD_BLOCK_INTERVAL * 1e3),
            "window_records": FLOOD_WINDOW,
            "fsync_on_records_per_s": round(self.on_median),
            "fsync_off_records_per_s": round(self.off_median),
            "fsync_on_rounds": [round(r.rate) for r in self.on],
            "fsync_off_rounds": [round(r.rate) for r in self.off],
            "fsync_on_cpu": [round(r.cpu, 2) for r in self.on],
            "fsync_off_cpu": [round(r.cpu, 2) for r in self.off],
            "ratio": round(self.ratio, 3),
            "ratio_per_cpu_second": round(self.per_cpu_ratio, 3),
            "target_ratio": TARGET_RATIO,
            "pass": self.passed,
        }


# ---- output -----------------------------------------------------------------


def print_latency(results: Sequence[LatencyResult], rate: float) -> None:
    print(f"End-to-end latency, store → output durable; durability always, {rate:,.0f} records/s")
    header = (
        f"{'batch':>7} {'block':>6} {'in rec/s':>9} {'records':>9} {'p50 ms':>8} {'p95 ms':>8}"
        f" {'p99 ms':>8} {'max ms':>8} {'proc ms':>8} {'commit ms':>9} {'p99 target':>11}  result"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        j = r.to_json()
        verdict = "met" if r.passed else "NOT met"
        if r.measured != r.stored:
            verdict += f" ({r.stored - r.measured} records unmeasured)"
        print(
            f"{j['batch_interval_ms']:>4} ms {j['block_interval_ms']:>3} ms"
            f" {j['input_records_per_s']:>9,} {r.measured:>9,} {j['p50_ms']:>8.1f}"
            f" {j['p95_ms']:>8.1f} {j['p99_ms']:>8.1f} {j['max_ms']:>8.1f}"
            f" {j['median_processing_ms']:>8.1f} {j['median_commit_ms']:>9.1f}"
            f" {'≤ ' + format(j['target_p99_ms'], '.0f') + ' ms':>11}  {verdict}"
        )
    print("proc/commit ms: medians per batch of handler time and of sink + done commit time")


def print_throughput(result: ThroughputResult) -> None:
    print(
        f"\nMaximum throughput, WAL fsync on (durability always) vs off (none);"
        f" batch {FLOOD_BATCH_INTERVAL * 1e3:.0f} ms, block {FLOOD_BLOCK_INTERVAL * 1e3:.0f} ms,"
        f" at most {FLOOD_WINDOW:,} records in flight"
    )
    header = (
        f"{'round':>7} {'on rec/s':>9} {'cpu':>5} {'rec/cpu-s':>10}"
        f" {'off rec/s':>10} {'cpu':>5} {'rec/cpu-s':>10} {'on/off':>7}"
    )
    print(header)
    print("-" * len(header))
    for i, (on, off) in enumerate(zip(result.on, result.off, strict=True), 1):
        print(
            f"{i:>7} {on.rate:>9,.0f} {on.cpu:>5.2f} {on.per_cpu:>10,.0f}"
            f" {off.rate:>10,.0f} {off.cpu:>5.2f} {off.per_cpu:>10,.0f}"
            f" {on.rate / off.rate if off.rate else 0:>7.3f}"
        )
    verdict = "met" if result.passed else "NOT met"
    print(
        f"{'median':>7} {result.on_median:>9,.0f} {'':>16} {result.off_median:>10,.0f}"
        f" {'':>16} {result.ratio:>7.3f}  target ≥ {TARGET_RATIO}: {verdict}"
    )
    print(
        f"cpu: process CPU seconds per second (all threads), 1.00 = one core;"
        f" on/off in records per CPU-second: {result.per_cpu_ratio:.3f}"
    )


def plot(
    results: Sequence[LatencyResult], throughput: ThroughputResult, rate: float, path: str
) -> None:
    """Bars of p50/p95/p99/max per batch interval, with the p99 target marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=100)
    width = 0.2
    for i, (name, _) in enumerate(PERCENTILES):
        xs = [k + (i - 1.5) * width for k in range(len(results))]
        ys = [r.percentiles[name] * 1e3 for r in results]
        bars = ax.bar(xs, ys, width, label=name)
        if name == "p99":
            ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
    for k, r in enumerate(results):
        ax.hlines(
            r.target * 1e3,
            k - 2 * width,
            k + 2 * width,
            colors="black",
            linestyles="dashed",
            label="p99 target" if k == 0 else "_nolegend_",
        )
    ax.set_xticks(range(len(results)))
    ax.set_xticklabels(
        [
            f"batch {r.batch_interval * 1e3:.0f} ms\n(block {r.block_interval * 1e3:.0f} ms)"
            for r in results
        ]
    )
    ax.set_yscale("log")
    top = max(r.percentiles["max"] for r in results) * 1e3
    ax.set_ylim(5, top * 3)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.set_ylabel("latency, store → output durable (ms)")
    verdict = "met" if throughput.passed else "not met"
    ax.set_title(
        f"streamlet end-to-end latency at {rate:,.0f} records/s, durability always\n"
        f"max throughput WAL fsync on/off: {throughput.ratio:.2f} (target ≥ {TARGET_RATIO}:"
        f" {verdict})",
        fontsize=10,
    )
    ax.legend(fontsize=8, ncols=5, loc="upper left")
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ---- main -------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.latency",
        description="End-to-end latency at batch intervals of 20, 100 and 500 ms, and "
        "throughput with WAL fsync on vs off, side by side.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="about 10 s in all: a smoke test, noisy figures"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        help="measured seconds per latency run (default 10, or 1 with --quick)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        help="seconds before each measured window (default 1, or 0.5 with --quick)",
    )
    parser.add_argument(
        "--rate", type=float, default=INPUT_RATE, help="records/s of the latency runs"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help="throughput rounds, each fsync on and off (default 5, or 1 with --quick)",
    )
    parser.add_argument(
        "--round-seconds",
        type=float,
        help="measured seconds per throughput case and round (default 2, or 1 with --quick)",
    )
    parser.add_argument(
        "--dir",
        help="where the state directories go (default: a temporary directory in the "
        "repository, on its file system and not on a tmpfs); removed afterwards",
    )
    add_output_options(parser, "latency", "of the latency percentiles")
    args_given = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(args_given)
    quick = args.quick
    plot_path, json_path = output_paths(args, "latency")
    seconds = args.seconds if args.seconds is not None else (1.0 if quick else 10.0)
    warmup = args.warmup if args.warmup is not None else (0.5 if quick else 1.0)
    rounds = args.rounds if args.rounds is not None else (1 if quick else 5)
    round_seconds = (
        args.round_seconds if args.round_seconds is not None else (1.0 if quick else 2.0)
    )
    if not (seconds > 0 and warmup >= 0 and args.rate > 0 and rounds > 0 and round_seconds > 0):
        parser.error("--seconds, --rate, --rounds and --round-seconds must be positive")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    workdir, kind = work_directory(args.dir, "latency")
    try:
        print(
            f"streamlet latency benchmark: {workdir} ({kind}), {os.cpu_count()} CPUs,"
            f" load {os.getloadavg()[0]:.2f}, Python {platform.python_version()};"
            f" latency {warmup:g} s warm-up + {seconds:g} s per interval,"
            f" throughput {rounds} round(s) x {round_seconds:g} s per case\n"
        )
        sys.stdout.flush()
        latency = [
            anyio.run(run_latency, workdir, interval, args.rate, seconds, warmup)
            for interval in INTERVALS
        ]
        print_latency(latency, args.rate)
        sys.stdout.flush()
        throughput = ThroughputResult()
        for i in range(rounds):
            order = ("always", "none") if i % 2 == 0 else ("none", "always")
            for durability in order:
                flood = anyio.run(
                    functools.partial(
                        run_throughput, workdir, durability, round_seconds, min(warmup, 1.0)
                    )
                )
                (throughput.on if durability == "always" else throughput.off).append(flood)
        print_throughput(throughput)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    result = {
        "benchmark": "latency",
        "command": " ".join(["python -m benchmarks.latency", *args_given]),
        "quick": quick,
        "cpus": os.cpu_count(),
        "fs": kind,
        "input_rate": args.rate,
        "seconds": seconds,
        "warmup": warmup,
        "latency": [r.to_json() for r in latency],
        "throughput": throughput.to_json(),
        "targets": {
            "p99_ms_over_batch_interval": TARGET_SLACK * 1e3,
            "fsync_on_off_ratio": TARGET_RATIO,
        },
        "pass": {
            **{f"p99_{round(r.batch_interval * 1e3)}ms": r.passed for r in latency},
            "throughput_ratio": throughput.passed,
        },
    }
    plot(latency, throughput, args.rate, plot_path)
    write_result(result, json_path, plot_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
