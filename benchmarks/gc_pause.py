"""The cost of Python's garbage collector on a batch, with ``pause_gc`` on and off.

Run from the repository root::

    python -m benchmarks.gc_pause            # about 40 s
    python -m benchmarks.gc_pause --quick    # about 10 s, a smoke test (writes to /tmp)

An app reads ``--records`` JSON records (default 300,000) from the embedded
``SequenceSource``, decodes each with ``orjson.loads`` (``decode=``) and
makes one dict per record in its handler, in batches of 10,000, 50,000 and
300,000 records, the tracker log fsync'd as in production. Each size runs
with ``App(pause_gc=True)`` (the default: the collector is off while a batch
runs) and ``pause_gc=False``, alternating, ``--rounds`` times (default 5);
the figures are medians. Beside them, the floor: a plain loop making the
same values, decoding each and making the same dict, with the collector on
as any program has it, and with no durability (the app logs each batch's
offsets and its end, fsync'd). CPU seconds per record (the process's, all threads)
say more than wall time on a shared machine; both are reported.

Why it matters: a batch's records live until it is done, and the young
collections that run meanwhile (one per 700 allocations) promote them until
full collections walk all of them, again and again.
"""

from __future__ import annotations

import argparse
import gc
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import anyio
import orjson

import streamlet as sl
from benchmarks.common import add_output_options, output_paths, work_directory, write_result

SIZES = (10_000, 50_000, 300_000)


def _value(partition: int, offset: int) -> bytes:
    return b'{"id": %d, "page": "/p/%d", "ms": %d}' % (offset, offset % 97, offset % 1000)


def run_app(records: int, batch: int, pause: bool, directory: str) -> tuple[float, float]:
    """(wall s, CPU s) of an app taking ``records`` through its handler."""
    state = f"{directory}/state-{batch}-{pause}-{time.monotonic_ns()}"
    app = sl.App(
        "gc_pause",
        state_dir=state,
        batch_interval=0.01,
        pause_gc=pause,
        max_batch_records=batch,
        max_batch_bytes=2**30,
    )
    source = app.source(
        sl.SequenceSource(rate=None, limit=records, value=_value), decode=orjson.loads
    )
    seen = 0

    @app.handler(source)
    async def views(b: sl.Batch[dict[str, Any]]) -> list[object]:
        nonlocal seen
        made = [{"page": r.data["page"], "ms": r.data["ms"], "at": r.offset} for r in b]
        seen += len(made)
        if seen >= records:
            app.stop()
        return []

    wall, cpu = time.perf_counter(), time.process_time()
    anyio.run(app.serve)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    shutil.rmtree(state, ignore_errors=True)
    return wall, cpu


def run_loop(records: int) -> tuple[float, float]:
    """(wall s, CPU s) of the plain loop: make, decode and one dict per record."""
    wall, cpu = time.perf_counter(), time.process_time()
    made = []
    for offset in range(records):
        data = orjson.loads(_value(0, offset))
        made.append({"page": data["page"], "ms": data["ms"], "at": offset})
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    del made
    return wall, cpu


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--records", type=int, default=300_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="100,000 records, 2 rounds")
    parser.add_argument("--dir", help="where the state directories go (default: in the repo)")
    add_output_options(parser, "gc_pause", "(CPU per record by batch size)")
    args = parser.parse_args(argv)
    records, rounds = (100_000, 2) if args.quick else (args.records, args.rounds)
    plot_path, json_path = output_paths(args, "gc_pause")
    directory, fs_kind = work_directory(args.dir, "gc_pause")
    assert gc.isenabled()
    samples: dict[str, list[tuple[float, float]]] = {}
    try:
        for _ in range(rounds):
            samples.setdefault("loop", []).append(run_loop(records))
            for size in SIZES:
                batch = min(size, records)
                for pause in (True, False):
                    key = f"{batch}/{'paused' if pause else 'on'}"
                    samples.setdefault(key, []).append(run_app(records, batch, pause, directory))
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    def figures(key: str) -> dict[str, float]:
        walls = [w for w, _ in samples[key]]
        cpus = [c for _, c in samples[key]]
        return {
            "records_per_s": records / statistics.median(walls),
            "cpu_us_per_record": statistics.median(cpus) / records * 1e6,
        }

    floor = figures("loop")
    rows: dict[str, dict[str, float]] = {"loop": floor}
    print(f"{records:,} records, {rounds} rounds, medians; floor: a plain decode-and-dict loop")
    print(f"{'case':<16}{'records/s':>12}{'CPU us/rec':>12}{'x floor CPU':>13}")
    print(f"{'loop':<16}{floor['records_per_s']:>12,.0f}{floor['cpu_us_per_record']:>12.2f}")
    for key in samples:
        if key == "loop":
            continue
        row = rows[key] = figures(key)
        row["floor_cpu_ratio"] = floor["cpu_us_per_record"] / row["cpu_us_per_record"]
        print(
            f"{key:<16}{row['records_per_s']:>12,.0f}{row['cpu_us_per_record']:>12.2f}"
            f"{row['floor_cpu_ratio']:>13.2f}"
        )
    result: dict[str, Any] = {
        "benchmark": "gc_pause",
        "records": records,
        "rounds": rounds,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "fs": fs_kind,
        "cases": rows,
    }
    _plot(rows, plot_path)
    write_result(result, json_path, plot_path)
    return 0


def _plot(rows: dict[str, dict[str, float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({int(k.split("/")[0]) for k in rows if k != "loop"})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for index, (mode, label) in enumerate((("paused", "pause_gc=True"), ("on", "pause_gc=False"))):
        ax.bar(
            [i + (index - 0.5) * width for i in range(len(sizes))],
            [rows[f"{s}/{mode}"]["cpu_us_per_record"] for s in sizes],
            width,
            label=label,
        )
    ax.axhline(rows["loop"]["cpu_us_per_record"], color="k", linestyle="--", label="plain loop")
    ax.set_xticks(range(len(sizes)), [f"{s:,}" for s in sizes])
    ax.set_xlabel("records per batch")
    ax.set_ylabel("CPU µs per record")
    ax.set_title("A batch's cost with the garbage collector paused or on")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
