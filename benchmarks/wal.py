"""Write-ahead log throughput, side by side with a plain write + fdatasync loop.

Run from the repository root::

    python -m benchmarks.wal            # about a minute
    python -m benchmarks.wal --quick    # a few seconds, a smoke test

What is measured
----------------
* **Appenders.** ``C`` tasks (1, 8, 64) each append ``S``-byte records
  (100 B, 1 KiB, 64 KiB), one ``append`` at a time, to a log with durability
  ``always``: every append returns after the fsync that holds it.
* **Baseline.** The same I/O with no framework: the WAL round's writes to its
  segment files and its syncs are recorded (the size of every write, every
  fdatasync) and replayed in one thread as a plain loop of ``os.write`` and
  ``os.fdatasync`` on a fresh file. Same durability, same group sizes, same
  bytes on disk (frame headers included); the difference is everything the
  WAL adds: framing, CRCs, futures, the hand-off to its writer thread and
  back, segment creation. ``WAL/base`` is the ratio of the two record rates.
* **Floor.** What any design of this shape pays, without the WAL: ``C``
  tasks, one future per append, one persistent writer thread that takes
  everything queued as a group, writes it with one ``os.write`` (the bytes of
  as many frames, copied once into one buffer, as the WAL joins its pieces)
  and ``os.fdatasync``, and completes the futures through
  ``call_soon_threadsafe``; no framing, CRCs, positions or segments. Its gap
  to the baseline is the hand-off from the event loop to a thread and back
  and the waking of the tasks, which every design that keeps blocking I/O off
  the event loop pays; ``WAL/floor`` is what is left: the WAL's own cost.
  Groups form the same way on both sides (every appender waits for the group
  in flight), so they are as large (``records_per_sync`` in the JSON).
* **Blocks.** One ``append_many`` per 200 ms block of 100-byte records, as a
  block generator cutting every 200 ms would call it: blocks of 200,000
  records (1,000,000 records/s) back to back. The rate reported is the payload
  records/s the log sustains; each block has to be durable within its 200 ms.

Noise: each case is split into short rounds (0.1 s of WAL time); rounds of
all cases are run round robin, and every WAL round is followed at once by its
baseline replay, and by a floor round just before or after the two (in turn,
so neither side always runs first), so a busy neighbour slows all three
sides of a round alike. The rates are totals over all rounds; ``WAL/base``
is the median over rounds of each round's ratio (baseline time over WAL time
for the same records), ``IQR`` the middle half of those ratios, and
``floor/base`` and ``WAL/floor`` are the medians of the rounds' ratios of
record rates.

The last line printed is one JSON object with the ratios, the three sides'
record rates and the records per fsync of the WAL and the floor.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

from benchmarks.common import work_directory
from streamlet.fs import File, OsFileSystem
from streamlet.wal import WriteAheadLog
from streamlet.wal.format import FRAME_HEADER_SIZE

SIZES = (100, 1024, 64 * 1024)
CONCURRENCY = (1, 8, 64)
TARGET_RATIO = 0.8
BLOCK_INTERVAL = 0.2  # seconds: the block generator's default block interval
BLOCK_RECORD_SIZE = 100
TARGET_BLOCK_RATE = 1_000_000  # payload records/s
ROUND_SECONDS = 0.1  # WAL seconds per round


# ---- recording the WAL's I/O, to replay it as the baseline ------------------


class _RecordingFile:
    """A segment file that notes the size of every write and every sync (as 0)."""

    __slots__ = ("_inner", "_ops")

    def __init__(self, inner: File, ops: list[int]) -> None:
        self._inner = inner
        self._ops = ops

    @property
    def path(self) -> str:
        return self._inner.path

    def append(self, data: bytes) -> None:
        self._inner.append(data)
        self._ops.append(len(data))

    def read(self, offset: int, size: int) -> bytes:
        return self._inner.read(offset, size)

    def size(self) -> int:
        return self._inner.size()

    def sync(self) -> None:
        self._inner.sync()
        self._ops.append(0)

    def truncate(self, size: int) -> None:
        self._inner.truncate(size)

    def close(self) -> None:
        self._inner.close()


class _RecordingFs(OsFileSystem):
    """The real file system; writes and syncs of segments opened for appending are noted."""

    def __init__(self) -> None:
        self.ops: list[int] = []

    def open(self, path: str, *, writable: bool = False) -> File:
        file = super().open(path, writable=writable)
        return _RecordingFile(file, self.ops) if writable else file


class _Filler:
    """Random bytes to write in the baseline, grown on demand."""

    def __init__(self) -> None:
        self.data = b""

    def view(self, size: int) -> memoryview:
        if len(self.data) < size:
            self.data = os.urandom(size)
        return memoryview(self.data)


def replay_io(path: str, ops: Sequence[int], filler: _Filler) -> float:
    """The baseline: ``ops`` as plain os.write / os.fdatasync calls in this thread; seconds."""
    view = filler.view(max(ops, default=0))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
    write, sync = os.write, os.fdatasync
    try:
        started = time.perf_counter()
        for op in ops:
            if op:
                chunk = view[:op]
                while chunk:
                    chunk = chunk[write(fd, chunk) :]
            else:
                sync(fd)
        return time.perf_counter() - started
    finally:
        os.close(fd)
        os.unlink(path)


# ---- the WAL side ---------------------------------------------------------------


@dataclasses.dataclass
class Round:
    """One timed WAL run, its baseline replay, and (appender cases) a floor run."""

    records: int
    wal_seconds: float
    base_seconds: float
    syncs: int
    block_seconds: list[float] = dataclasses.field(default_factory=list)
    floor_records: int = 0
    floor_seconds: float = 0.0
    floor_syncs: int = 0

    @property
    def ratio(self) -> float:
        """WAL/base: the WAL's record rate over the baseline's (same records)."""
        return self.base_seconds / self.wal_seconds

    @property
    def floor_rate(self) -> float:
        return self.floor_records / self.floor_seconds

    @property
    def floor_ratio(self) -> float:
        """floor/base: the floor's record rate over the baseline's."""
        return self.floor_rate * self.base_seconds / self.records

    @property
    def wal_floor_ratio(self) -> float:
        """WAL/floor: the WAL's record rate over the floor's."""
        return self.records / self.wal_seconds / self.floor_rate


async def appenders_round(
    directory: str, size: int, concurrency: int, seconds: float
) -> tuple[int, float, list[int]]:
    """``concurrency`` tasks appending ``size``-byte records for ``seconds``."""
    fs = _RecordingFs()
    log = await WriteAheadLog.open(directory, durability="always", fs=fs)
    counts = [0] * concurrency
    try:
        record = os.urandom(size)
        fs.ops.clear()  # count only the appends' I/O, not the log's creation

        async def appender(index: int, deadline: float) -> None:
            append, clock = log.append, time.perf_counter
            done = 0
            while clock() < deadline:
                await append(record)
                done += 1
            counts[index] = done

        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(appender(i, deadline) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
        ops = list(fs.ops)
    finally:
        await log.aclose()
    return sum(counts), elapsed, ops


async def blocks_round(
    directory: str, blocks: Sequence[Sequence[bytes]], seconds: float
) -> tuple[int, float, list[int], list[float]]:
    """One append_many per block, back to back, for at least ``seconds`` (two blocks or more)."""
    fs = _RecordingFs()
    log = await WriteAheadLog.open(directory, durability="always", fs=fs)
    latencies: list[float] = []
    records = 0
    try:
        fs.ops.clear()
        clock = time.perf_counter
        started = clock()
        while len(latencies) < 2 or clock() - started < seconds:
            block = blocks[len(latencies) % len(blocks)]
            begun = clock()
            await log.append_many(block)
            latencies.append(clock() - begun)
            records += len(block)
        elapsed = clock() - started
        ops = list(fs.ops)
    finally:
        await log.aclose()
    return records, elapsed, ops, latencies


# ---- the floor: the same shape with nothing of the WAL in it ---------------------


async def floor_round(
    path: str, size: int, concurrency: int, seconds: float
) -> tuple[int, float, list[int]]:
    """``concurrency`` tasks appending ``size``-byte records to the floor for ``seconds``.

    The floor is the least any log can do with blocking I/O off the event
    loop and one future per append: queue the future, wake one persistent
    writer thread, which takes everything queued as a group, writes as many
    frames' bytes with one ``os.write``, ``os.fdatasync``s them, and completes
    the group's futures on the loop with one ``call_soon_threadsafe``. The
    hand-off is the WAL's (a bare lock as the wake-up, a deque as the queue).
    Returns ``(records, seconds, groups)``: ``groups`` holds the records of
    each fdatasync, for a baseline to replay (see ``benchmarks.wal_uring``).
    """
    loop = asyncio.get_running_loop()
    frame = os.urandom(size + FRAME_HEADER_SIZE)  # as many bytes as a WAL frame
    queue: collections.deque[asyncio.Future[None]] = collections.deque()
    work = threading.Lock()  # held = nothing new to write; released to wake the writer
    work.acquire()
    stopping = False
    groups: list[int] = []

    def acknowledge(futures: list[asyncio.Future[None]]) -> None:
        for future in futures:
            future.set_result(None)

    def writer(fd: int) -> None:
        while not stopping:
            work.acquire()
            while queue:
                futures = [queue.popleft() for _ in range(len(queue))]
                view = memoryview(frame * len(futures))
                while view:
                    view = view[os.write(fd, view) :]
                os.fdatasync(fd)
                groups.append(len(futures))
                loop.call_soon_threadsafe(acknowledge, futures)

    def wake() -> None:
        if work.locked():
            with contextlib.suppress(RuntimeError):  # released meanwhile: as good
                work.release()

    counts = [0] * concurrency

    async def appender(index: int, deadline: float) -> None:
        clock, create_future = time.perf_counter, loop.create_future
        done = 0
        while clock() < deadline:
            future = create_future()
            queue.append(future)
            if work.locked():  # inline, not wake(): the floor is to cost the least it can
                wake()
            await future
            done += 1
        counts[index] = done

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
    thread = threading.Thread(target=writer, args=(fd,), name="floor-writer", daemon=True)
    thread.start()
    try:
        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(appender(i, deadline) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    finally:
        stopping = True
        wake()
        await asyncio.to_thread(thread.join)
        os.close(fd)
        os.unlink(path)
    return sum(counts), elapsed, groups


# ---- running and reporting ------------------------------------------------------


@dataclasses.dataclass
class Case:
    """One row of the table: a record size and a number of appenders (0: blocks)."""

    size: int
    concurrency: int
    rounds: list[Round] = dataclasses.field(default_factory=list)

    @property
    def key(self) -> str:
        if self.concurrency == 0:
            return f"block{self.size}B"
        return f"{_size_label(self.size).replace(' ', '')}x{self.concurrency}"

    def totals(self) -> tuple[int, float, float, int]:
        return (
            sum(r.records for r in self.rounds),
            sum(r.wal_seconds for r in self.rounds),
            sum(r.base_seconds for r in self.rounds),
            sum(r.syncs for r in self.rounds),
        )

    def floor_totals(self) -> tuple[int, float, int]:
        return (
            sum(r.floor_records for r in self.rounds),
            sum(r.floor_seconds for r in self.rounds),
            sum(r.floor_syncs for r in self.rounds),
        )

    @property
    def ratio(self) -> float:
        """The median of the rounds' paired ratios."""
        return statistics.median(r.ratio for r in self.rounds)

    @property
    def floor_ratio(self) -> float:
        """floor/base: the median over rounds."""
        return statistics.median(r.floor_ratio for r in self.rounds)

    @property
    def wal_floor_ratio(self) -> float:
        """WAL/floor: the median over rounds."""
        return statistics.median(r.wal_floor_ratio for r in self.rounds)

    def spread(self) -> tuple[float, float]:
        """The quartiles of the rounds' paired ratios."""
        ratios = sorted(r.ratio for r in self.rounds)
        if len(ratios) < 4:
            return ratios[0], ratios[-1]
        low, _, high = statistics.quantiles(ratios, n=4)
        return low, high


def _size_label(size: int) -> str:
    return f"{size // 1024} KiB" if size >= 1024 and size % 1024 == 0 else f"{size} B"


def run_round(
    case: Case, workdir: str, seconds: float, filler: _Filler, blocks: list[list[bytes]]
) -> None:
    """One WAL round of ``case`` in a fresh log, then its baseline replay at once.

    For appender cases, a floor round of the same length runs right before
    the pair in every other round and right after it in the others.
    """
    floor_first = len(case.rounds) % 2 == 1
    floor: tuple[int, float, int] = (0, 0.0, 0)
    floor_path = os.path.join(workdir, "floor")
    if case.concurrency and floor_first:
        floor = _floor(floor_path, case, seconds)
    directory = tempfile.mkdtemp(prefix="wal-", dir=workdir)
    try:
        if case.concurrency == 0:
            records, wal_seconds, ops, latencies = asyncio.run(
                blocks_round(os.path.join(directory, "wal"), blocks, seconds)
            )
        else:
            records, wal_seconds, ops = asyncio.run(
                appenders_round(
                    os.path.join(directory, "wal"), case.size, case.concurrency, seconds
                )
            )
            latencies = []
        shutil.rmtree(directory)  # free the space before the baseline writes as much
        base_seconds = replay_io(os.path.join(workdir, "baseline"), ops, filler)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if case.concurrency and not floor_first:
        floor = _floor(floor_path, case, seconds)
    case.rounds.append(Round(records, wal_seconds, base_seconds, ops.count(0), latencies, *floor))


def _floor(path: str, case: Case, seconds: float) -> tuple[int, float, int]:
    """One floor round of ``case``: (records, seconds, syncs)."""
    records, took, groups = asyncio.run(floor_round(path, case.size, case.concurrency, seconds))
    return records, took, len(groups)


def make_blocks(count: int) -> list[list[bytes]]:
    per_block = int(TARGET_BLOCK_RATE * BLOCK_INTERVAL)
    return [[os.urandom(BLOCK_RECORD_SIZE) for _ in range(per_block)] for _ in range(count)]


def print_table(cases: list[Case], blocks: Case | None) -> None:
    header = (
        f"{'record':>7} {'appenders':>9} {'WAL rec/s':>11} {'WAL MB/s':>9} "
        f"{'base rec/s':>11} {'base MB/s':>9} {'floor rec/s':>11} {'WAL/base':>8} {'IQR':>11} "
        f"{'floor/base':>10} {'WAL/floor':>9} {'rec/sync':>8}"
    )
    print(header)
    print("-" * len(header))
    for case in cases:
        records, wal, base, syncs = case.totals()
        floor_records, floor_seconds, _ = case.floor_totals()
        low, high = case.spread()
        mb = case.size / 1e6
        print(
            f"{_size_label(case.size):>7} {case.concurrency:>9} {records / wal:>11,.0f} "
            f"{records / wal * mb:>9.2f} {records / base:>11,.0f} {records / base * mb:>9.2f} "
            f"{floor_records / floor_seconds:>11,.0f} "
            f"{case.ratio:>8.2f} {low:>5.2f}-{high:<5.2f} "
            f"{case.floor_ratio:>10.2f} {case.wal_floor_ratio:>9.2f} "
            f"{records / max(syncs, 1):>8.1f}"
        )
    if blocks is not None:
        records, wal, base, syncs = blocks.totals()
        latencies = sorted(s for r in blocks.rounds for s in r.block_seconds)
        per_block = records // len(latencies)
        rate = records / wal
        print()
        print(
            f"blocks: one append_many per {BLOCK_INTERVAL * 1000:.0f} ms block of "
            f"{per_block:,} {BLOCK_RECORD_SIZE}-byte records, back to back"
        )
        print(
            f"  WAL      {rate:>12,.0f} payload records/s ({rate * BLOCK_RECORD_SIZE / 1e6:.0f} "
            f"MB/s); per block: median {statistics.median(latencies) * 1e3:.0f} ms, "
            f"max {latencies[-1] * 1e3:.0f} ms (budget {BLOCK_INTERVAL * 1e3:.0f} ms)"
        )
        print(
            f"  baseline {records / base:>12,.0f} records/s (the same bytes written and "
            f"fdatasync'd); WAL/base {blocks.ratio:.2f}"
        )
        print(
            f"  target   {TARGET_BLOCK_RATE:>12,} records/s: "
            f"{'met' if rate >= TARGET_BLOCK_RATE else 'NOT met'}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.wal",
        description="Write-ahead log throughput (durability always) beside a plain "
        "os.write + os.fdatasync loop doing the same I/O.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a few seconds in all: a smoke test, noisy figures"
    )
    parser.add_argument(
        "--dir",
        help="where to write (default: a temporary directory in the repository, so on "
        "its file system and not on a tmpfs); removed afterwards",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        help="WAL seconds per case, in rounds of 0.1 s (default 2, or 0.2 with --quick)",
    )
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (0.2 if args.quick else 2.0)
    if not seconds > 0:
        parser.error("--seconds must be positive")
    rounds = max(1, round(seconds / ROUND_SECONDS))
    workdir, kind = work_directory(args.dir, "wal")
    try:
        print(
            f"streamlet WAL benchmark: durability=always (fdatasync), {workdir} ({kind}), "
            f"{os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"{rounds} round(s) x {seconds / rounds:.2f} s per case"
        )
        print(
            "MB/s counts payload bytes (10^6; frames add 12 bytes a record). WAL/base: median\n"
            "of the paired rounds' ratios, IQR their middle half; floor: asyncio tasks and a\n"
            "writer thread doing the same I/O with nothing of the WAL (see the module doc);\n"
            "floor/base and WAL/floor: medians over rounds; rec/sync: WAL records per fsync.\n"
        )
        sys.stdout.flush()
        cases = [Case(size, c) for size in SIZES for c in CONCURRENCY]
        blocks_case = Case(BLOCK_RECORD_SIZE, 0)
        blocks = make_blocks(2)
        filler = _Filler()
        # Warm-up, not counted: the heaviest cases once, so that the page cache
        # and the heap have their memory before anything is timed (a VM's first
        # touch of a page is slow, and would fall on whichever side runs first).
        for case in (Case(SIZES[-1], CONCURRENCY[-1]), Case(BLOCK_RECORD_SIZE, 0)):
            run_round(case, workdir, seconds / rounds, filler, blocks)
        for _ in range(rounds):
            for case in [*cases, blocks_case]:
                run_round(case, workdir, seconds / rounds, filler, blocks)
        print_table(cases, blocks_case)
        block_records, block_wal, _, _ = blocks_case.totals()
        block_latencies = [s for r in blocks_case.rounds for s in r.block_seconds]
        ratios = {case.key: round(case.ratio, 3) for case in cases}
        wal_floor = {case.key: round(case.wal_floor_ratio, 3) for case in cases}
        result = {
            "benchmark": "wal",
            "durability": "always",
            "quick": args.quick,
            "seconds_per_case": seconds,
            "ratios": ratios,
            "min_ratio": min(ratios.values()),
            "target_ratio": TARGET_RATIO,
            "floor_ratios": {case.key: round(case.floor_ratio, 3) for case in cases},
            "wal_floor_ratios": wal_floor,
            "min_wal_floor_ratio": min(wal_floor.values()),
            "records_per_s": {
                case.key: {
                    "wal": round(case.totals()[0] / case.totals()[1]),
                    "base": round(case.totals()[0] / case.totals()[2]),
                    "floor": round(case.floor_totals()[0] / case.floor_totals()[1]),
                }
                for case in cases
            },
            "records_per_sync": {
                case.key: {
                    "wal": round(case.totals()[0] / max(case.totals()[3], 1), 1),
                    "floor": round(case.floor_totals()[0] / max(case.floor_totals()[2], 1), 1),
                }
                for case in cases
            },
            "block_records_per_s": round(block_records / block_wal),
            "block_ms_max": round(max(block_latencies) * 1e3, 1),
            "block_ratio": round(blocks_case.ratio, 3),
            "target_block_records_per_s": TARGET_BLOCK_RATE,
        }
        print()
        print(json.dumps(result, separators=(",", ":")))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
