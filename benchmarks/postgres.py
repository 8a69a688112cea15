"""PostgresSink against a plain asyncpg loop: rows per second and CPU per row.

Run from the repository root::

    python -m benchmarks.postgres            # about a minute
    python -m benchmarks.postgres --quick    # a smoke test (writes to /tmp)

What is measured
----------------
Rows of 100 bytes (a ``bigint`` and a 92-character ``text``) go into a
table in batches of 1,000 and of 100,000, two ways, each with
``copy_records_to_table`` (binary COPY) and with ``executemany``:

* **plain**: the loop a careful user writes without streamlet: per batch,
  one transaction on one connection (``BEGIN``, the copy or executemany,
  ``COMMIT``);
* **sink**: :meth:`PostgresSink.commit` per batch, whose apply function
  makes the same copy or executemany call. The sink adds its own statements
  to the transaction: the batch's row in ``streamlet_batches`` (which is
  also the check that the batch is not committed yet) and its offsets in
  ``streamlet_offsets``, one statement for both.

Batches and their rows are built before the clock starts, and are the same
objects for both. Each measurement starts on empty tables (``TRUNCATE``,
outside the clock). The two are run alternately, round by round (the order
flips each round), so a busy neighbour slows both alike; figures are the
medians of the rounds and the ratio is the ratio of the medians. CPU per
row is given for the benchmark's own process (the client: asyncpg's
encoding, the sink's work) and for the server's processes (read from
``/proc``, so only for the embedded server).

The server is :class:`~streamlet.testing.postgres.EmbeddedPostgres`, started
for the run with ``fsync=on`` and ``synchronous_commit=on`` (commits reach
the disk, as in production; its data directory is in the system's temporary
directory), or the server at ``--dsn`` (server CPU is then not measured).

Target (issue 15): the sink's rows per second ≥ 0.8 x the plain loop's.

The table goes to stdout, followed by one JSON line with every figure; the
same JSON is written to ``--json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from benchmarks.common import RESULTS
from streamlet.records import Batch, OffsetRange
from streamlet.sinks.base import SinkContext
from streamlet.sinks.postgres import PostgresSink
from streamlet.testing.postgres import EmbeddedPostgres

TARGET = 0.8
ROW_BYTES = 100
DDL = "CREATE TABLE IF NOT EXISTS rows (n bigint, payload text) WITH (autovacuum_enabled = false)"
COLUMNS = ["n", "payload"]
INSERT = "INSERT INTO rows (n, payload) VALUES ($1, $2)"

Rows = list[tuple[int, str]]


def make_batches(total: int, size: int) -> list[tuple[Batch, Rows]]:
    """``total`` rows of 100 bytes (8 + 92) in batches of ``size``, with their offset ranges."""
    batches = []
    for index, start in enumerate(range(0, total, size)):
        end = min(start + size, total)
        rows = [(n, f"{n:092d}") for n in range(start, end)]
        batch = Batch(index + 1, 0.0, (), (OffsetRange("input", 0, start, end),))
        batches.append((batch, rows))
    return batches


async def _copy(conn: Any, rows: Rows) -> None:
    await conn.copy_records_to_table("rows", records=rows, columns=COLUMNS)


async def _executemany(conn: Any, rows: Rows) -> None:
    await conn.executemany(INSERT, rows)


WRITERS: dict[str, Callable[[Any, Rows], Awaitable[None]]] = {
    "copy": _copy,
    "executemany": _executemany,
}


def server_cpu(pid: int | None) -> float:
    """CPU seconds of the postmaster and its children (ended ones included)."""
    if pid is None:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        # fields[1] is the parent; [11], [12] utime, stime; [13], [14] of reaped children.
        # Each child of the postmaster is a session of its own (setsid).
        if int(entry) != pid and int(fields[1]) != pid:
            continue
        total += int(fields[11]) + int(fields[12])
        if int(entry) == pid:
            total += int(fields[13]) + int(fields[14])
    return total / ticks


@dataclass
class Measure:
    rows_per_s: float
    client_us_per_row: float
    server_us_per_row: float


@dataclass
class Case:
    method: str
    size: int
    plain: list[Measure] = field(default_factory=list)
    sink: list[Measure] = field(default_factory=list)

    def median(self, side: str, what: str) -> float:
        return statistics.median(getattr(m, what) for m in getattr(self, side))

    @property
    def ratio(self) -> float:
        plain = self.median("plain", "rows_per_s")
        return self.median("sink", "rows_per_s") / plain if plain else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "batch_rows": self.size,
            "plain_rows_per_s": round(self.median("plain", "rows_per_s")),
            "sink_rows_per_s": round(self.median("sink", "rows_per_s")),
            "ratio": round(self.ratio, 3),
            "plain_client_cpu_us_per_row": round(self.median("plain", "client_us_per_row"), 3),
            "sink_client_cpu_us_per_row": round(self.median("sink", "client_us_per_row"), 3),
            "plain_server_cpu_us_per_row": round(self.median("plain", "server_us_per_row"), 3),
            "sink_server_cpu_us_per_row": round(self.median("sink", "server_us_per_row"), 3),
            "rounds": len(self.plain),
            "passed": self.ratio >= TARGET,
        }


async def _reset(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(DDL)
        await conn.execute(
            "DO $$ BEGIN IF to_regclass('streamlet_batches') IS NOT NULL THEN"
            " TRUNCATE streamlet_batches, streamlet_offsets, streamlet_state; END IF; END $$"
        )
        await conn.execute("TRUNCATE rows")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


async def _timed(run: Callable[[], Awaitable[None]], rows: int, pid: int | None) -> Measure:
    cpu0, server0, t0 = time.process_time(), server_cpu(pid), time.perf_counter()
    await run()
    elapsed = time.perf_counter() - t0
    cpu, server = time.process_time() - cpu0, server_cpu(pid) - server0
    return Measure(rows / elapsed, cpu / rows * 1e6, server / rows * 1e6)


async def run_plain(
    dsn: str, method: str, batches: Sequence[tuple[Batch, Rows]], pid: int | None
) -> Measure:
    await _reset(dsn)
    write = WRITERS[method]
    conn = await asyncpg.connect(dsn)
    try:

        async def run() -> None:
            for _, rows in batches:
                async with conn.transaction():
                    await write(conn, rows)

        return await _timed(run, sum(len(r) for _, r in batches), pid)
    finally:
        await conn.close()


async def run_sink(
    dsn: str, method: str, batches: Sequence[tuple[Batch, Rows]], pid: int | None
) -> Measure:
    await _reset(dsn)
    write = WRITERS[method]

    async def apply(conn: Any, batch: Batch, outputs: Sequence[object]) -> None:
        await write(conn, outputs)  # type: ignore[arg-type]

    sink = PostgresSink(dsn, apply, table_ddl=DDL, max_connections=1)
    await sink.open(SinkContext("bench", "rows", "/bench", uuid.uuid4().hex))
    try:

        async def run() -> None:
            for batch, rows in batches:
                await sink.commit(batch, rows)

        return await _timed(run, sum(len(r) for _, r in batches), pid)
    finally:
        await sink.aclose()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    server: EmbeddedPostgres | None = None
    dsn = args.dsn
    if dsn is None:
        server = EmbeddedPostgres(
            settings={"fsync": "on", "full_page_writes": "on", "shared_buffers": "128MB"}
        )
        server.start()
        dsn = server.dsn
    pid = server.pid if server is not None else None
    try:
        cases = [Case(m, s) for m in args.methods for s in args.sizes]
        data = {}
        for case in cases:
            total = args.rows if case.method == "copy" else args.rows_executemany
            data[(case.method, case.size)] = make_batches(max(total, case.size), case.size)
        for round_ in range(args.rounds):
            for case in cases:
                batches = data[(case.method, case.size)]
                order = ("plain", "sink") if round_ % 2 == 0 else ("sink", "plain")
                for side in order:
                    runner = run_plain if side == "plain" else run_sink
                    measure = await runner(dsn, case.method, batches, pid)
                    getattr(case, side).append(measure)
                print(
                    f"round {round_ + 1}/{args.rounds} {case.method:<11} {case.size:>7,}:"
                    f" plain {case.plain[-1].rows_per_s:>9,.0f} rows/s,"
                    f" sink {case.sink[-1].rows_per_s:>9,.0f} rows/s",
                    flush=True,
                )
    finally:
        if server is not None:
            server.cleanup()
    return {
        "benchmark": "postgres",
        "row_bytes": ROW_BYTES,
        "server": "embedded, fsync=on" if server is not None else "external (--dsn)",
        "target_ratio": TARGET,
        "cases": [case.to_json() for case in cases],
        "passed": all(case.ratio >= TARGET for case in cases),
    }


def print_table(result: dict[str, Any]) -> None:
    print()
    print(
        f"{'method':<12}{'batch':>8}{'plain rows/s':>14}{'sink rows/s':>13}{'ratio':>7}"
        f"{'client µs/row':>16}{'server µs/row':>16}"
    )
    for c in result["cases"]:
        client = f"{c['plain_client_cpu_us_per_row']:.2f}/{c['sink_client_cpu_us_per_row']:.2f}"
        server = f"{c['plain_server_cpu_us_per_row']:.2f}/{c['sink_server_cpu_us_per_row']:.2f}"
        print(
            f"{c['method']:<12}{c['batch_rows']:>8,}{c['plain_rows_per_s']:>14,}"
            f"{c['sink_rows_per_s']:>13,}{c['ratio']:>7.2f}{client:>16}{server:>16}"
        )
    print("(CPU per row: plain/sink)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", help="a server of your own (default: an embedded one)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows per copy measurement")
    parser.add_argument(
        "--rows-executemany", type=int, default=300_000, help="rows per executemany measurement"
    )
    parser.add_argument("--quick", action="store_true", help="small and fast, to /tmp")
    parser.add_argument(
        "--json", help="where the JSON goes (default benchmarks/results/postgres.json)"
    )
    args = parser.parse_args()
    args.sizes = [1_000, 100_000]
    args.methods = ["copy", "executemany"]
    if args.quick:
        args.rounds, args.rows, args.rows_executemany = 1, 100_000, 100_000
    out = args.json or str(
        (Path(tempfile.gettempdir()) / "postgres-quick.json")
        if args.quick
        else RESULTS / "postgres.json"
    )
    result = asyncio.run(main_async(args))
    result["command"] = "python -m benchmarks.postgres" + (" --quick" if args.quick else "")
    print_table(result)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"\njson: {out}\n")
    print(json.dumps(result, separators=(",", ":"), ensure_ascii=False))


if __name__ == "__main__":
    main()
