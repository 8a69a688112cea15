"""The cost of watching: maximum throughput with the status page and metrics on vs off.

Run from the repository root::

    python -m benchmarks.observe            # about 45 s
    python -m benchmarks.observe --quick    # about 10 s, a smoke test

The pipeline is the throughput pipeline of :mod:`benchmarks.latency` (a
receiver flooding 100-byte records with at most 200,000 in flight, 100 ms
batches, 20 ms blocks, ``durability="always"``, a FileSink). "On" serves
``App(http="127.0.0.1:0")`` while a separate process watches it the way
people do: it scrapes ``/metrics`` every second (Prometheus' default is 15
s), reads ``/api/status`` every two seconds, and holds ``/api/events`` open,
reading every batch, as an open page does. "Off" serves nothing. The two run
alternately, round by round (the order flips each round), so a busy
neighbour slows both alike; the figures are medians of the rounds, beside
records per CPU-second of the worker process (all its threads; the watcher's
CPU is its own). Target: on at least 0.95 of off.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from benchmarks.common import work_directory

# The throughput pipeline is the one benchmarks.latency measures, not a copy.
from benchmarks.latency import FloodRound, run_throughput
from streamlet import App

TARGET_RATIO = 0.95


def watch(url: str) -> None:
    """The watcher process: scrape, poll status and read the event stream until killed."""
    events = urllib.request.urlopen(url + "api/events", timeout=30)  # noqa: S310 - loopback
    os.set_blocking(events.fileno(), False)
    next_scrape = next_status = time.monotonic()
    while True:
        now = time.monotonic()
        if now >= next_scrape:
            with urllib.request.urlopen(url + "metrics", timeout=30) as r:  # noqa: S310
                r.read()
            next_scrape = now + 1.0
        if now >= next_status:
            with urllib.request.urlopen(url + "api/status", timeout=30) as r:  # noqa: S310
                r.read()
            next_status = now + 2.0
        with contextlib.suppress(BlockingIOError, TypeError):  # nothing to read yet
            events.read1(1 << 16)
        time.sleep(0.02)


def _watch(app: App) -> Callable[[], object]:
    """Start the watcher process on ``app``'s page; return what stops it."""
    assert app.http_url is not None
    watcher = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.observe", "--watch", app.http_url]
    )

    def stop() -> None:
        watcher.kill()
        watcher.wait()

    return stop


async def run_round(workdir: str, watched: bool, seconds: float, warmup: float) -> FloodRound:
    """One round of the throughput pipeline, served and watched or not served."""
    if not watched:
        return await run_throughput(workdir, "always", seconds, warmup)
    return await run_throughput(
        workdir, "always", seconds, warmup, http="127.0.0.1:0", started=_watch
    )


@dataclass
class Result:
    on: list[FloodRound] = field(default_factory=list)
    off: list[FloodRound] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        on = statistics.median(r.rate for r in self.on)
        off = statistics.median(r.rate for r in self.off)
        on_cpu = statistics.median(r.per_cpu for r in self.on)
        off_cpu = statistics.median(r.per_cpu for r in self.off)
        ratio = on / off if off else 0.0
        return {
            "watched_records_per_s": round(on),
            "unwatched_records_per_s": round(off),
            "watched_rounds": [round(r.rate) for r in self.on],
            "unwatched_rounds": [round(r.rate) for r in self.off],
            "watched_records_per_cpu_s": round(on_cpu),
            "unwatched_records_per_cpu_s": round(off_cpu),
            "ratio": round(ratio, 3),
            "ratio_per_cpu_second": round(on_cpu / off_cpu, 3) if off_cpu else 0.0,
            "target_ratio": TARGET_RATIO,
            "pass": ratio >= TARGET_RATIO,
        }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.observe",
        description="Throughput with the status page and metrics watched vs not served.",
    )
    parser.add_argument("--quick", action="store_true", help="one short round: a smoke test")
    parser.add_argument("--rounds", type=int, help="rounds, each watched and not (default 5)")
    parser.add_argument("--seconds", type=float, help="measured seconds per case (default 3)")
    parser.add_argument("--dir", help="where the state directories go (default: in the repo)")
    parser.add_argument("--watch", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.watch:
        watch(args.watch)
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    rounds = args.rounds or (1 if args.quick else 5)
    seconds = args.seconds or (1.0 if args.quick else 3.0)
    workdir, kind = work_directory(args.dir, "observe")
    result = Result()
    try:
        for n in range(rounds):
            order = (False, True) if n % 2 == 0 else (True, False)
            for watched in order:
                got = anyio.run(run_round, workdir, watched, seconds, 1.0)
                (result.on if watched else result.off).append(got)
                print(
                    f"round {n + 1} {'watched' if watched else 'not served':>10}:"
                    f" {got.rate:>9,.0f} records/s, {got.cpu:.2f} CPU,"
                    f" {got.per_cpu:>9,.0f} records/CPU-s",
                    flush=True,
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = result.to_json()
    print(
        f"\nmedian: watched {summary['watched_records_per_s']:,} vs not served"
        f" {summary['unwatched_records_per_s']:,} records/s: {summary['ratio']:.3f}"
        f" (per CPU-second {summary['ratio_per_cpu_second']:.3f});"
        f" target ≥ {TARGET_RATIO}: {'met' if summary['pass'] else 'NOT met'}"
        f" (state on {kind})"
    )
    import orjson

    print(orjson.dumps(summary).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
