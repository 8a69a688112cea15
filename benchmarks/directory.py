"""DirectorySource read throughput against a plain aiofiles read loop, side by side.

Run from the repository root::

    python -m benchmarks.directory            # about 1 minute
    python -m benchmarks.directory --quick    # about 10 s, a smoke test (writes to /tmp)

What is measured
----------------
Two data sets, written once into a temporary directory in the repository
(on its file system, not a tmpfs) and read many times:

* **large**: 4 files of 64 MiB (``--large-mib``), lines of 100 bytes;
* **small**: 4,000 files of 50 lines (``--small-files``), lines of 100 bytes.

Each round reads each data set two ways, in an order that flips every round:

* **plain**: the loop one would write by hand: for each file in name order,
  ``aiofiles.open``, 1 MiB reads, ``split(b"\\n")``, and a
  :class:`~streamlet.records.Record` per line with its file as key, its
  number as offset and the file's modification time (made as cheaply as the
  source makes them, with ``tuple.__new__``), one file after the other,
  handed on in lists of about 100,000 records (as the source's batches are);
* **source**: what the scheduler does with a :class:`DirectorySource` over
  the same files: ``start()``, ``latest()`` (which lists the directory, counts
  every new file's lines and writes the manifest with an fsync), then
  ``read()`` of consecutive ranges of 100,000 lines (the default
  ``max_batch_records``), from a fresh manifest every round.

Both read from the page cache (one untimed pass reads every file first):
this compares the work each does per line, not the disk. Per case the
table shows records per second of wall-clock time and CPU microseconds per
record (``time.process_time``: every thread of the process, so the worker
threads that aiofiles reads in count too). The figures are medians over the
rounds (``--rounds``, default 5), and the ratios are source / plain: for
throughput above 1 is better, for CPU per record below 1 is.

Target (issue 15): the source's read throughput at least 0.9 of the plain loop's.

The table goes to stdout, followed by one JSON line with every figure, the
target and pass/fail; the same JSON is written to ``--json``.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os
import anyio

from benchmarks.common import add_output_options, output_paths, work_directory, write_result
from streamlet.records import OffsetRange, Record
from streamlet.sources.directory import DirectorySource

LINE = 100  # bytes per line, newline included
BATCH = 100_000  # lines per read() of the source: the default max_batch_records
CHUNK = 1 << 20
TARGET = 0.9

_new = tuple.__new__


def write_large(directory: Path, files: int, mib: int) -> int:
    """``files`` files of ``mib`` MiB of 100-byte lines; how many lines in all."""
    directory.mkdir()
    lines = (mib << 20) // LINE
    pad = b"x" * (LINE - 13) + b"\n"
    for n in range(files):
        with (directory / f"large-{n:02d}.txt").open("wb") as f:
            for start in range(0, lines, 10_000):
                stop = min(lines, start + 10_000)
                f.write(b"".join(b"%012d" % i + pad for i in range(start, stop)))
    return files * lines


def write_small(directory: Path, files: int, lines: int) -> int:
    """``files`` files of ``lines`` 100-byte lines each; how many lines in all."""
    directory.mkdir()
    pad = b"y" * (LINE - 13) + b"\n"
    body = b"".join(b"%012d" % i + pad for i in range(lines))
    for n in range(files):
        (directory / f"small-{n:05d}.txt").write_bytes(body)
    return files * lines


async def plain(directory: Path) -> int:
    """The hand-written loop: every file in name order, its lines as records.

    Records are handed on in lists of about :data:`BATCH`, as the source's
    batches are, so neither holds more of them at a time than the other.
    """
    count = 0
    records: list[Record] = []
    names = sorted(n for n in await aiofiles.os.listdir(directory) if not n.startswith("."))
    for name in names:
        key = name.encode()
        offset = 0
        carry = b""
        async with aiofiles.open(directory / name, "rb") as f:
            ts = os.fstat(f.fileno()).st_mtime_ns / 1e9
            while data := await f.read(CHUNK):
                lines = (carry + data if carry else data).split(b"\n")
                carry = lines.pop()
                records.extend(
                    [
                        _new(Record, (v, key, ts, "plain", 0, offset + i, None, ()))
                        for i, v in enumerate(lines)
                    ]
                )
                offset += len(lines)
                if len(records) >= BATCH:
                    count += len(records)
                    records = []
        if carry:
            records.append(_new(Record, (carry, key, ts, "plain", 0, offset, None, ())))
    return count + len(records)


async def source(directory: Path, manifest: Path) -> int:
    """DirectorySource as the scheduler drives it: latest(), then reads of 100,000 lines."""
    src = DirectorySource(directory, name="bench", manifest=manifest)
    await src.start()
    end = (await src.latest())[0]
    count = 0
    for start in range(0, end, BATCH):
        count += len(await src.read([OffsetRange("bench", 0, start, min(end, start + BATCH))]))
    await src.aclose()
    return count


@dataclass
class Sample:
    """One timed read of a data set."""

    records: int
    wall: float
    cpu: float

    @property
    def rate(self) -> float:
        return self.records / self.wall

    @property
    def cpu_us(self) -> float:
        return self.cpu / self.records * 1e6


def timed(fn: Any, *args: Any) -> Sample:
    wall, cpu = time.perf_counter(), time.process_time()
    records = anyio.run(fn, *args)
    return Sample(records, time.perf_counter() - wall, time.process_time() - cpu)


def run(workdir: Path, sets: dict[str, int], rounds: int) -> dict[str, Any]:
    manifest = workdir / "manifest.json"
    samples: dict[str, dict[str, list[Sample]]] = {
        name: {"plain": [], "source": []} for name in sets
    }
    for name in sets:  # warm the page cache, untimed
        anyio.run(plain, workdir / name)
    for r in range(rounds):
        for name, lines in sets.items():
            order = ("plain", "source") if r % 2 == 0 else ("source", "plain")
            for case in order:
                if case == "plain":
                    sample = timed(plain, workdir / name)
                else:
                    manifest.unlink(missing_ok=True)  # a first start: every file is new
                    sample = timed(source, workdir / name, manifest)
                if sample.records != lines:
                    raise SystemExit(f"{case} read {sample.records} lines of {name}, not {lines}")
                samples[name][case].append(sample)
    result: dict[str, Any] = {}
    for name, cases in samples.items():
        plain_rate = statistics.median(s.rate for s in cases["plain"])
        source_rate = statistics.median(s.rate for s in cases["source"])
        plain_cpu = statistics.median(s.cpu_us for s in cases["plain"])
        source_cpu = statistics.median(s.cpu_us for s in cases["source"])
        result[name] = {
            "records": sets[name],
            "plain_records_per_s": round(plain_rate),
            "source_records_per_s": round(source_rate),
            "plain_cpu_us_per_record": round(plain_cpu, 3),
            "source_cpu_us_per_record": round(source_cpu, 3),
            "throughput_ratio": round(source_rate / plain_rate, 3),
            "cpu_per_record_ratio": round(source_cpu / plain_cpu, 3),
            "plain_rounds": [round(s.rate) for s in cases["plain"]],
            "source_rounds": [round(s.rate) for s in cases["source"]],
        }
    return result


def print_table(result: dict[str, Any]) -> None:
    print(
        f"{'data set':>9} {'records':>10} {'plain rec/s':>12} {'source rec/s':>13}"
        f" {'ratio':>6} {'plain us/rec':>13} {'source us/rec':>14} {'ratio':>6}"
    )
    for name, r in result.items():
        print(
            f"{name:>9} {r['records']:>10,} {r['plain_records_per_s']:>12,}"
            f" {r['source_records_per_s']:>13,} {r['throughput_ratio']:>6.3f}"
            f" {r['plain_cpu_us_per_record']:>13.3f} {r['source_cpu_us_per_record']:>14.3f}"
            f" {r['cpu_per_record_ratio']:>6.3f}"
        )
    print(
        "medians over the rounds; ratios are source / plain (throughput: higher is"
        " better; CPU per record: lower is better); CPU counts every thread"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.directory",
        description="DirectorySource read throughput and CPU per record against a plain "
        "aiofiles read loop, side by side.",
    )
    parser.add_argument("--quick", action="store_true", help="about 10 s: a smoke test")
    parser.add_argument("--rounds", type=int, help="rounds (default 5, or 1 with --quick)")
    parser.add_argument(
        "--large-mib", type=int, help="MiB per large file (default 64, or 8 with --quick)"
    )
    parser.add_argument(
        "--small-files", type=int, help="small files (default 4,000, or 500 with --quick)"
    )
    parser.add_argument(
        "--dir",
        help="where the files go (default: a temporary directory in the repository);"
        " removed afterwards",
    )
    add_output_options(parser, "directory", "(none is drawn)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    quick = args.quick
    _, json_path = output_paths(args, "directory")
    rounds = args.rounds if args.rounds is not None else (1 if quick else 5)
    large_mib = args.large_mib if args.large_mib is not None else (8 if quick else 64)
    small_files = args.small_files if args.small_files is not None else (500 if quick else 4000)
    if not (rounds > 0 and large_mib > 0 and small_files > 0):
        parser.error("--rounds, --large-mib and --small-files must be positive")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    workdir, kind = work_directory(args.dir, "directory")
    try:
        work = Path(workdir)
        sets = {
            "large": write_large(work / "large", 4, large_mib),
            "small": write_small(work / "small", small_files, 50),
        }
        print(
            f"streamlet directory benchmark: {workdir} ({kind}), {os.cpu_count()} CPUs,"
            f" load {os.getloadavg()[0]:.2f}, Python {platform.python_version()};"
            f" {rounds} round(s); large: 4 x {large_mib} MiB, small: {small_files:,} x 50"
            f" lines; lines of {LINE} bytes\n"
        )
        sys.stdout.flush()
        result = run(work, sets, rounds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(result)
    worst = min(r["throughput_ratio"] for r in result.values())
    document = {
        "benchmark": "directory",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "file_system": kind,
        "rounds": rounds,
        "quick": quick,
        "line_bytes": LINE,
        "sets": result,
        "target": {"throughput_ratio_at_least": TARGET, "worst": worst, "pass": worst >= TARGET},
    }
    write_result(document, json_path, "(none)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
