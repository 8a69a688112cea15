"""Window-close latency: from a processing-time window's end to its result being durable.

Run from the repository root::

    python -m benchmarks.windows            # about 70 s
    python -m benchmarks.windows --quick    # about 15 s, a smoke test (writes to /tmp)

An app counts the records of 10 keys per 1 s tumbling window
(``streamlet.windows.windowed``) over the embedded ``SequenceSource`` at
2,000 records/s, with a FileSink, keyed state in SQLite and the tracker log
fsync'd as in production. For each window that closes, the latency is the
wall-clock time at which the batch that emitted it was done (its sink and
its state committed, ``done`` logged: what a reader can rely on) minus the
window's end. It is measured at batch intervals of 100 ms and 1 s, in one
run. A processing-time window closes in the first batch whose time is at
or after its end, so the latency is at most about one interval plus that
batch's processing and commit; the ticks are not aligned to whole seconds,
so it spreads over the interval.

Each interval runs ``--seconds`` (default 30; windows closed in the first
two seconds are left out, as the app starts). The table and one JSON line
go to stdout; ``--json`` and ``--plot`` name the outputs (defaults under
benchmarks/results/).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import anyio

import streamlet as sl
from benchmarks.common import (
    add_output_options,
    ms,
    output_paths,
    percentiles,
    write_result,
)
from streamlet.windows import count, tumbling, windowed

INTERVALS = (0.1, 1.0)
WINDOW = 1.0
RATE = 2000.0
KEYS = 10
WARMUP = 2.0


async def measure(interval: float, seconds: float, workdir: str) -> list[float]:
    """Latencies (s) of the windows one app run closed, one per window."""
    app = sl.App(
        "windows",
        state_dir=os.path.join(workdir, f"state-{interval}"),
        batch_interval=interval,
        checkpoint_interval=1.0,
    )
    numbers = app.source(
        sl.SequenceSource(rate=RATE, key=lambda p, o: b"k%d" % (o % KEYS)), name="numbers"
    )
    spec = tumbling(WINDOW)
    closed: dict[int, float] = {}  # batch id -> the end of the windows it closed

    @app.handler(
        numbers, sink=sl.FileSink(os.path.join(workdir, f"out-{interval}")), state=sl.State()
    )
    async def per_window(batch: sl.Batch, state: sl.KeyedState) -> list[Any]:
        done = windowed(state, batch, spec, count())
        if done.results:
            closed[batch.id] = max(r.end for r in done.results)
        return [[str(r.key), r.start, r.value] for r in done.results]

    started: list[float] = []
    latencies: list[float] = []

    def on_batch(info: sl.BatchInfo) -> None:
        end = closed.pop(info.batch_id, None)
        if end is None:
            return
        durable = info.batch_time + info.total_delay  # wall clock when done was logged
        if end - started[0] >= WARMUP:
            latencies.append(durable - end)

    app.add_listener(on_batch)
    started.append(time.time())
    await app.serve(duration=seconds)
    return latencies


def plot(results: dict[str, dict[str, Any]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, result in results.items():
        values = sorted(result["latencies_ms"])
        ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=name)
    ax.set_xlabel("window end → result durable (ms)")
    ax.set_ylabel("fraction of windows")
    ax.set_title("Processing-time window close latency (1 s tumbling windows)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.windows",
        description="Window-close latency at batch intervals of 100 ms and 1 s.",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke test, noisy figures")
    parser.add_argument("--seconds", type=float, help="seconds per interval (default 30)")
    add_output_options(parser, "windows", "(latency distribution per interval)")
    args_given = list(argv if argv is not None else sys.argv[1:])
    args = parser.parse_args(args_given)
    seconds = args.seconds or (6.0 if args.quick else 30.0)
    plot_path, json_path = output_paths(args, "windows")
    workdir = tempfile.mkdtemp(prefix="windows-bench-", dir=os.getcwd())
    results: dict[str, dict[str, Any]] = {}
    try:
        for interval in INTERVALS:
            latencies = anyio.run(measure, interval, seconds, workdir)
            name = f"{interval * 1000:g} ms"
            if not latencies:
                print(f"batch interval {interval:g} s: no window closed; run longer", flush=True)
                continue
            figures = percentiles([ms(v) for v in latencies])
            results[name] = {"windows": len(latencies), **figures}
            results[name]["latencies_ms"] = [round(ms(v), 1) for v in latencies]
            print(
                f"batch interval {name:>7}: {len(latencies):3d} windows, latency p50"
                f" {figures['p50']:.0f} ms, p99 {figures['p99']:.0f} ms, max"
                f" {figures['max']:.0f} ms",
                flush=True,
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result = {
        "benchmark": "windows",
        "command": " ".join(["python -m benchmarks.windows", *args_given]),
        "quick": args.quick,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "window_s": WINDOW,
        "rate": RATE,
        "keys": KEYS,
        "seconds_per_interval": seconds,
        "intervals": results,
    }
    plot(results, plot_path)
    write_result(result, json_path, plot_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
