"""Durability steps of the sinks that the broader sink tests do not pin down.

- FileSink.open fsyncs the directory: a part file renamed by a worker killed
  before its directory fsync sits in the page cache only; the restarted
  worker's re-run of that batch skips it (the file exists) and the batch is
  then logged done, so the entry must be durable by then.
- SQLiteSink writes the batch row in the transaction of the user's rows: when
  the bookkeeping insert fails after ``apply`` wrote its rows, none of them
  may stay behind (a re-run would add them again).
- SQLiteSink commits with ``synchronous=FULL`` (in WAL mode): SQLite's file
  I/O bypasses streamlet's file layer, so no FaultFS power cut can reach it,
  and the setting belongs to a connection, so it is read on the connection
  the sink commits with.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest

from streamlet.errors import SinkError
from streamlet.records import Batch
from streamlet.sinks import FileSink, SinkContext, SQLiteSink, encode_output
from streamlet.testing.faultfs import FaultFS

CONTEXT = SinkContext("app", "handler", "state")
DDL = "CREATE TABLE IF NOT EXISTS words (batch_id INTEGER, word TEXT)"


def batch(batch_id: int) -> Batch:
    return Batch(batch_id, 1000.0 + batch_id, [])


def insert_words(conn: sqlite3.Connection, batch: Batch, outputs: Sequence[object]) -> None:
    conn.executemany("INSERT INTO words VALUES (?, ?)", [(batch.id, o) for o in outputs])


def query(path: Path, sql: str) -> list[tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql).fetchall()


def execute(path: Path, sql: str) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(sql)
        conn.commit()


async def test_file_sink_open_makes_a_part_renamed_before_a_kill_durable() -> None:
    fs = FaultFS()
    await FileSink("/out", fs=fs).open(CONTEXT)
    # What a worker killed between the rename of batch 1's part file and the
    # directory fsync leaves: the steps of FileSink's commit up to the rename.
    # The page cache survives the kill, the entry is not on disk yet.
    lines = encode_output("one") + b"\n"
    temp = fs.create("/out/.part-000000000001.jsonl.tmp")
    temp.append(lines)
    temp.sync()
    temp.close()
    part = "/out/part-000000000001.jsonl"
    fs.rename("/out/.part-000000000001.jsonl.tmp", part)
    assert part not in fs.walk(durable=True)

    # The restarted worker re-runs batch 1, finds it committed, and would log
    # it done next: a power cut from here on must keep the batch.
    restarted = FileSink("/out", fs=fs)
    await restarted.open(CONTEXT)
    assert await restarted.commit(batch(1), ["one"]) is False
    assert FileSink.read_committed("/out", fs=fs.power_cut("drop")) == {1: [encode_output("one")]}


async def test_sqlite_rows_and_batch_row_commit_together(tmp_path: Path) -> None:
    db = tmp_path / "out.db"
    sink = SQLiteSink(db, insert_words, table_ddl=DDL)
    await sink.open(CONTEXT)
    try:
        # The bookkeeping insert fails after apply wrote the rows, as a full
        # disk or an I/O error could make it fail.
        execute(
            db,
            "CREATE TRIGGER refuse_batch BEFORE INSERT ON streamlet_batches"
            " BEGIN SELECT RAISE(ABORT, 'bookkeeping refused'); END",
        )
        with pytest.raises(SinkError, match="bookkeeping refused"):
            await sink.commit(batch(1), ["a", "b"])
        assert query(db, "SELECT * FROM words") == []
        assert query(db, "SELECT batch_id FROM streamlet_batches") == []
        # The batch runs again once the fault is gone, and lands once.
        execute(db, "DROP TRIGGER refuse_batch")
        assert await sink.commit(batch(1), ["a", "b"]) is True
        assert await sink.commit(batch(1), ["a", "b"]) is False
    finally:
        await sink.aclose()
    assert query(db, "SELECT * FROM words") == [(1, "a"), (1, "b")]
    assert query(db, "SELECT batch_id FROM streamlet_batches") == [(1,)]


async def test_sqlite_commits_are_synced_by_the_sinks_connection(tmp_path: Path) -> None:
    seen: list[tuple[object, object]] = []

    def apply(conn: sqlite3.Connection, batch: Batch, outputs: Sequence[object]) -> None:
        synchronous = conn.execute("PRAGMA synchronous").fetchone()[0]
        journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
        seen.append((synchronous, journal))

    sink = SQLiteSink(tmp_path / "out.db", apply)
    await sink.open(CONTEXT)
    try:
        assert await sink.commit(batch(1), [])
    finally:
        await sink.aclose()
    # 2 is FULL: in WAL mode the log is fsynced at every COMMIT, so a batch
    # is durable before the scheduler logs it done. NORMAL (1) would sync
    # only at checkpoints, and a power cut could take back done batches.
    assert seen == [(2, "wal")]
