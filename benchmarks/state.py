"""Keyed state: updates per second of the state store, beside two floors and Quix Streams.

Run from the repository root::

    pip install -e '.[bench,state-bench]'   # matplotlib, and quixstreams for its column
    python -m benchmarks.state              # about 6 minutes
    python -m benchmarks.state --quick      # about 30 s, a smoke test (writes to /tmp)

What is measured
----------------
One workload, the same list for every contender: ``--updates`` updates
(default 1,000,000) over ``--keys`` keys (default 100,000), keys drawn
uniformly at random with a fixed seed (text keys ``key-000042``), cut into
batches of ``--batch`` updates (default 10,000 and 100,000: 100 and 10
batches). Each update is a read-modify-write: read the key's value (a dict
``{"n": count, "pad": "xx…"}`` of about 100 bytes as JSON), add one to
``n``, write it back. Each batch is persisted before the next begins, and
every run starts from an empty store in a fresh directory. The contenders:

* **dict**: a plain ``dict`` and the same loop, persisting nothing. The
  floor of the loop itself: what any store adds is measured against it.
* **sqlite**: the same dict, plus what a hand-written loop would do for the
  same guarantee as streamlet: the batch's dirty keys, encoded with orjson,
  written with one ``INSERT OR REPLACE … executemany`` in one transaction
  per batch to a SQLite file in WAL mode with ``synchronous=FULL``, on the
  calling thread. The durable floor: a batch is on disk when it returns.
* **streamlet**: :class:`~streamlet.state._store.StateStore` with its
  defaults (``cache_keys`` 100,000), and per batch a fresh
  :class:`~streamlet.state.KeyedState` that the loop reads and writes as a
  dict, then ``await store.commit(view.changes())``: what the scheduler does
  for a stateful handler, without the rest of the app. Durable per batch
  (one SQLite transaction, WAL, ``synchronous=FULL``, in a worker thread).
* **quix**: Quix Streams' RocksDB state (``RocksDBStorePartition`` with its
  default ``RocksDBOptions``, no changelog producer), used outside an
  ``Application`` as its checkpoint uses it: per batch one transaction,
  ``tx.get``/``tx.set`` per update, then ``prepare()`` and ``flush()`` (one
  RocksDB ``WriteBatch``). As Quix ships it, that write is **not** synced:
  RocksDB's WAL reaches the page cache, and Quix's durability comes from
  the Kafka changelog topic, which this benchmark leaves out. So this
  column has less to do than the others, and is a bound on Quix's local cost.
* **quix-sync**: the same, with the partition's RocksDB write options set to
  ``sync=True``: one fsync of RocksDB's WAL per batch, the guarantee the
  ``sqlite`` and ``streamlet`` columns give.

The Quix columns need ``quixstreams`` (the optional ``state-bench`` extra);
without it they are skipped and said to be.

Each contender runs once per batch size per round, in an order rotated each
round so a busy neighbour slows all alike (default 3 rounds). Figures are
the medians of the rounds: updates per second of wall-clock time, from the
first update to the last batch's persist returning (the store's open and
close are outside), and process CPU microseconds per update (all threads:
SQLite's and RocksDB's included), which a neighbour on a shared machine
disturbs less. Ratios are of the medians, against both floors.

Window-close latency is measured by ``benchmarks/windows.py``.

Everything runs in one process, in a temporary directory in the repository
(on its file system, not a tmpfs), removed afterwards. The table goes to
stdout, followed by one JSON line with every figure; the same JSON is
written to ``--json`` and a bar chart to ``--plot``.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson

from benchmarks.common import add_output_options, output_paths, work_directory, write_result
from streamlet.state import KeyedState
from streamlet.state._store import StateStore

UPDATES = 1_000_000
QUICK_UPDATES = 200_000
KEYS = 100_000
BATCHES = (10_000, 100_000)  # updates per batch
ROUNDS = 3
SEED = 14  # the number: any fixed seed will do
VALUE_SIZE = 100  # bytes of a value as JSON, about
# {"n":123,"pad":"x…"}: 15 bytes of JSON around the pad, and n's digits.
PAD = "x" * (VALUE_SIZE - 15 - 3)

CONTENDERS = ("dict", "sqlite", "streamlet", "quix", "quix-sync")
FLOORS = ("dict", "sqlite")


@dataclass(frozen=True)
class Workload:
    """The updates of one run: key per update, cut into batches."""

    keys: list[str]
    """The key of each update, in order."""
    batch: int
    """Updates per batch."""

    def batches(self) -> list[list[str]]:
        keys, size = self.keys, self.batch
        return [keys[i : i + size] for i in range(0, len(keys), size)]


def make_keys(updates: int, keys: int, seed: int = SEED) -> list[str]:
    """The key of each update: uniform over ``keys`` keys, from a fixed seed."""
    names = [f"key-{i:06d}" for i in range(keys)]
    return random.Random(seed).choices(names, k=updates)


def new_value() -> dict[str, Any]:
    return {"n": 0, "pad": PAD}


# ---- the contenders -------------------------------------------------------------
# Each takes the batches and a fresh directory, and returns the seconds from the
# first update to the last batch persisted; what it opens and closes is outside.


def run_dict(batches: list[list[str]], workdir: str) -> float:
    state: dict[str, dict[str, Any]] = {}
    began = time.perf_counter()
    for batch in batches:
        for key in batch:
            value = state.get(key)
            if value is None:
                value = new_value()
            value["n"] += 1
            state[key] = value
    return time.perf_counter() - began


def run_sqlite(batches: list[list[str]], workdir: str) -> float:
    conn = sqlite3.connect(os.path.join(workdir, "floor.sqlite"), isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE kv(k TEXT PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID")
        state: dict[str, dict[str, Any]] = {}
        dumps = orjson.dumps
        began = time.perf_counter()
        for batch in batches:
            dirty: set[str] = set()
            for key in batch:
                value = state.get(key)
                if value is None:
                    value = new_value()
                value["n"] += 1
                state[key] = value
                dirty.add(key)
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT OR REPLACE INTO kv(k, v) VALUES (?, ?)",
                [(key, dumps(state[key])) for key in dirty],
            )
            conn.execute("COMMIT")
        return time.perf_counter() - began
    finally:
        conn.close()


def run_streamlet(batches: list[list[str]], workdir: str) -> float:
    async def go() -> float:
        store = await StateStore.open(
            os.path.join(workdir, "state", "h.sqlite"), app="bench", handler="h", state_id="b"
        )
        try:
            began = time.perf_counter()
            for batch_id, batch in enumerate(batches, 1):
                state = KeyedState(store, batch_id, float(batch_id))
                for key in batch:
                    value = state.get(key)
                    if value is None:
                        value = new_value()
                    value["n"] += 1
                    state[key] = value
                await store.commit(state.changes())
            return time.perf_counter() - began
        finally:
            await store.aclose()

    return anyio.run(go)


def _quix_partition(workdir: str, sync: bool) -> Any:
    with warnings.catch_warnings(record=True):
        # quixstreams imports its optional integrations, some of which warn on import
        # (and set their own filters, so ignoring them is not enough: they are recorded).
        from quixstreams.state.rocksdb import RocksDBOptions, RocksDBStorePartition
        from rocksdict import WriteOptions
    partition = RocksDBStorePartition(os.path.join(workdir, "rocksdb"), options=RocksDBOptions())
    if sync:
        options = WriteOptions()
        options.sync = True
        # Private: the only way to make Quix's flush fsync RocksDB's WAL.
        partition._db.set_write_options(options)
    return partition


def _run_quix(batches: list[list[str]], workdir: str, sync: bool) -> float:
    partition = _quix_partition(workdir, sync)
    try:
        began = time.perf_counter()
        for batch in batches:
            tx = partition.begin()
            for key in batch:
                value = tx.get(key, prefix=b"")
                if value is None:
                    value = new_value()
                value["n"] += 1
                tx.set(key, value, prefix=b"")
            tx.prepare()
            tx.flush()
        return time.perf_counter() - began
    finally:
        partition.close()


def run_quix(batches: list[list[str]], workdir: str) -> float:
    return _run_quix(batches, workdir, sync=False)


def run_quix_sync(batches: list[list[str]], workdir: str) -> float:
    return _run_quix(batches, workdir, sync=True)


RUNNERS: dict[str, Callable[[list[list[str]], str], float]] = {
    "dict": run_dict,
    "sqlite": run_sqlite,
    "streamlet": run_streamlet,
    "quix": run_quix,
    "quix-sync": run_quix_sync,
}


def quix_available() -> str | None:
    """None if quixstreams imports, else why not."""
    try:
        with warnings.catch_warnings(record=True):
            import quixstreams.state.rocksdb  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


# ---- measuring ------------------------------------------------------------------


@dataclass
class Run:
    """One contender, one batch size, one round."""

    seconds: float
    cpu: float
    """Process CPU seconds, all threads."""
    updates: int

    @property
    def rate(self) -> float:
        return self.updates / self.seconds

    @property
    def cpu_us(self) -> float:
        return self.cpu / self.updates * 1e6


def measure(name: str, workload: Workload, parent: str) -> Run:
    batches = workload.batches()
    workdir = tempfile.mkdtemp(prefix=f"{name}-", dir=parent)
    try:
        cpu = time.process_time()
        seconds = RUNNERS[name](batches, workdir)
        cpu = time.process_time() - cpu
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return Run(seconds, cpu, len(workload.keys))


@dataclass
class Case:
    """Every round of every contender at one batch size."""

    batch: int
    runs: dict[str, list[Run]] = field(default_factory=dict)

    def rate(self, name: str) -> float:
        return statistics.median(r.rate for r in self.runs[name])

    def cpu_us(self, name: str) -> float:
        return statistics.median(r.cpu_us for r in self.runs[name])

    def to_json(self) -> dict[str, Any]:
        contenders: dict[str, Any] = {}
        for name, runs in self.runs.items():
            entry: dict[str, Any] = {
                "updates_per_s": round(self.rate(name)),
                "cpu_us_per_update": round(self.cpu_us(name), 2),
                "rounds_updates_per_s": [round(r.rate) for r in runs],
                "rounds_cpu_us_per_update": [round(r.cpu_us, 2) for r in runs],
            }
            for floor in FLOORS:
                if floor in self.runs and name != floor:
                    entry[f"vs_{floor}"] = round(self.rate(name) / self.rate(floor), 3)
                    entry[f"cpu_vs_{floor}"] = round(self.cpu_us(name) / self.cpu_us(floor), 2)
            contenders[name] = entry
        return {"batch_updates": self.batch, "contenders": contenders}


# ---- output -----------------------------------------------------------------------


def print_case(case: Case, updates: int, keys: int) -> None:
    print(
        f"\n{updates:,} read-modify-write updates over {keys:,} keys, batches of"
        f" {case.batch:,} ({-(-updates // case.batch)} batches), each persisted before the next"
    )
    header = (
        f"{'contender':<10} {'updates/s':>10} {'cpu µs/upd':>11} {'vs dict':>8}"
        f" {'vs sqlite':>10} {'cpu vs sqlite':>14}  rounds (updates/s)"
    )
    print(header)
    print("-" * len(header))
    for name, runs in case.runs.items():
        vs = {
            floor: f"{case.rate(name) / case.rate(floor):.3f}" if floor in case.runs else "-"
            for floor in FLOORS
        }
        cpu_vs = (
            f"{case.cpu_us(name) / case.cpu_us('sqlite'):.2f}" if "sqlite" in case.runs else "-"
        )
        print(
            f"{name:<10} {case.rate(name):>10,.0f} {case.cpu_us(name):>11.2f} {vs['dict']:>8}"
            f" {vs['sqlite']:>10} {cpu_vs:>14}  " + " ".join(f"{r.rate:,.0f}" for r in runs)
        )


def plot(cases: Sequence[Case], updates: int, keys: int, path: str) -> None:
    """Bars of updates/s per contender, one group per batch size; CPU µs/update on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    names = [n for n in CONTENDERS if any(n in c.runs for c in cases)]
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=100)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [k + (i - (len(names) - 1) / 2) * width for k in range(len(cases))]
        ys = [c.rate(name) if name in c.runs else 0 for c in cases]
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(
            bars,
            labels=[f"{c.cpu_us(name):.1f} µs" if name in c.runs else "" for c in cases],
            fontsize=7,
            padding=2,
        )
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([f"batches of {c.batch:,} updates" for c in cases])
    ax.set_yscale("log")
    top = max(c.rate(n) for c in cases for n in names if n in c.runs)
    ax.set_ylim(top / 300, top * 3)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:,.0f}"))
    ax.set_ylabel("updates/s (wall clock; labels: CPU µs per update)")
    ax.set_title(
        f"keyed state: {updates:,} read-modify-write updates over {keys:,} keys, ~100 B values;\n"
        "each batch persisted before the next (dict: not persisted;\n"
        "quix: RocksDB's WAL not fsync'd, as Quix ships it; quix-sync: fsync'd per batch)",
        fontsize=9,
    )
    ax.legend(fontsize=8, ncols=len(names), loc="upper left")
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ---- main -------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.state",
        description="Keyed state updates/s: a dict, a dict + SQLite, streamlet's store and "
        "Quix Streams' RocksDB state, side by side.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"one round of {QUICK_UPDATES:,} updates: a smoke test, noisy figures",
    )
    parser.add_argument(
        "--updates",
        type=int,
        help=f"updates per run (default {UPDATES:,}; --quick {QUICK_UPDATES:,})",
    )
    parser.add_argument("--keys", type=int, default=KEYS, help=f"distinct keys (default {KEYS:,})")
    parser.add_argument(
        "--batch",
        type=int,
        action="append",
        help="updates per batch; repeat for several (default 10,000 and 100,000)",
    )
    parser.add_argument("--rounds", type=int, help=f"rounds (default {ROUNDS}, or 1 with --quick)")
    parser.add_argument(
        "--only",
        action="append",
        choices=CONTENDERS,
        help="run only this contender; repeat for several (default all)",
    )
    parser.add_argument(
        "--dir",
        help="where the stores go (default: a temporary directory in the repository, on its"
        " file system and not on a tmpfs); removed afterwards",
    )
    add_output_options(parser, "state", "of updates/s per contender")
    args_given = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(args_given)
    quick = args.quick
    plot_path, json_path = output_paths(args, "state")
    updates = args.updates or (QUICK_UPDATES if quick else UPDATES)
    rounds = args.rounds or (1 if quick else ROUNDS)
    batch_sizes = args.batch or list(BATCHES)
    if not (updates > 0 and args.keys > 0 and rounds > 0 and min(batch_sizes) > 0):
        parser.error("--updates, --keys, --rounds and --batch must be positive")
    names = [n for n in CONTENDERS if not args.only or n in args.only]
    missing = quix_available() if any(n.startswith("quix") for n in names) else None
    if missing is not None:
        print(
            f"quixstreams is not importable ({missing}): the quix columns are skipped;"
            " pip install -e '.[state-bench]' to include them"
        )
        names = [n for n in names if not n.startswith("quix")]

    keys = make_keys(updates, args.keys)
    load_before = os.getloadavg()[0]
    workdir, kind = work_directory(args.dir, "state")
    cases = [Case(batch) for batch in batch_sizes]
    try:
        print(
            f"streamlet state benchmark: {workdir} ({kind}), {os.cpu_count()} CPUs,"
            f" load {load_before:.2f}, Python {platform.python_version()};"
            f" {updates:,} updates over {args.keys:,} keys, {rounds} round(s),"
            f" contenders {', '.join(names)}"
        )
        sys.stdout.flush()
        for i in range(rounds):
            order = names[i % len(names) :] + names[: i % len(names)]
            for case in cases:
                workload = Workload(keys, case.batch)
                for name in order:
                    run = measure(name, workload, workdir)
                    case.runs.setdefault(name, []).append(run)
                    print(
                        f"  round {i + 1}, batch {case.batch:,}, {name}: {run.rate:,.0f} updates/s,"
                        f" {run.cpu_us:.2f} cpu µs/update"
                    )
                    sys.stdout.flush()
        for case in cases:
            # Print in the contenders' order, whatever order the last round ran them in.
            case.runs = {n: case.runs[n] for n in names}
            print_case(case, updates, args.keys)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    result = {
        "benchmark": "state",
        "command": " ".join(["python -m benchmarks.state", *args_given]),
        "quick": quick,
        "cpus": os.cpu_count(),
        "fs": kind,
        # 1-minute load average when the run began and ended: on a shared machine,
        # what else was running (figures of a run are comparable with each other only).
        "load": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "updates": updates,
        "keys": args.keys,
        "value_bytes": len(orjson.dumps({"n": 100, "pad": PAD})),
        "rounds": rounds,
        "quix_skipped": missing,
        "cases": [c.to_json() for c in cases],
    }
    plot(cases, updates, args.keys, plot_path)
    write_result(result, json_path, plot_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
