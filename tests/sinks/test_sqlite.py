"""SQLiteSink: a batch's rows and its bookkeeping commit together, at most once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sqlite3
import stat
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import orjson
import pytest

from streamlet.errors import ConfigError, SinkError
from streamlet.fs import connect_sqlite
from streamlet.records import Batch, OffsetRange
from streamlet.sinks import SinkContext, SQLiteSink
from streamlet.sinks.sqlite import ApplyFunction, split_script
from streamlet.testing.faultfs import CutMode, FaultFS, run_until_cut
from streamlet.testing.sqlite_vfs import FaultVFS
from tests.sinks import crash_worker

CONTEXT = SinkContext("app", "handler", "state")
DDL = "CREATE TABLE IF NOT EXISTS words (batch_id INTEGER, word TEXT, n INTEGER)"


def batch(batch_id: int, *ranges: OffsetRange) -> Batch:
    return Batch(batch_id, 1000.0 + batch_id, [], ranges)


def insert_words(conn: sqlite3.Connection, batch: Batch, outputs: Sequence[object]) -> None:
    rows = []
    for output in outputs:
        assert isinstance(output, tuple)
        rows.append((batch.id, *output))
    conn.executemany("INSERT INTO words VALUES (?, ?, ?)", rows)


def query(path: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class MakeSink(Protocol):
    async def __call__(
        self,
        apply: ApplyFunction = ...,
        *,
        path: Path | None = None,
        context: SinkContext = ...,
        lock_timeout: float = ...,
    ) -> SQLiteSink: ...


@pytest.fixture
async def make_sink(tmp_path: Path) -> AsyncIterator[MakeSink]:
    """``await make_sink(apply=..., **kwargs)``: an open sink, closed after the test."""
    sinks: list[SQLiteSink] = []

    async def make(
        apply: ApplyFunction = insert_words,
        *,
        path: Path | None = None,
        context: SinkContext = CONTEXT,
        lock_timeout: float = 30.0,
    ) -> SQLiteSink:
        sink = SQLiteSink(path or tmp_path / "out.db", apply, table_ddl=DDL, timeout=lock_timeout)
        await sink.open(context)
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        await sink.aclose()


@pytest.fixture
def open_umask() -> Iterator[None]:
    """Umask 0, so that only the sink's own modes can keep files private."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


async def test_round_trip_rows_and_bookkeeping(tmp_path: Path, make_sink: MakeSink) -> None:
    sink = await make_sink()
    r0 = OffsetRange("clicks", 0, 0, 10)
    r1 = OffsetRange("clicks", 1, 5, 7)
    assert await sink.commit(batch(1, r0, r1), [("a", 2), ("b", 1)]) is True
    assert await sink.commit(batch(2), []) is True
    db = tmp_path / "out.db"
    assert query(db, "SELECT * FROM words ORDER BY word") == [(1, "a", 2), (1, "b", 1)]
    rows = query(
        db, "SELECT app, handler, batch_id, ranges_json FROM streamlet_batches ORDER BY batch_id"
    )
    assert [row[:3] for row in rows] == [("app", "handler", 1), ("app", "handler", 2)]
    assert orjson.loads(str(rows[0][3])) == [
        {"source": "clicks", "partition": 0, "start": 0, "until": 10},
        {"source": "clicks", "partition": 1, "start": 5, "until": 7},
    ]
    assert orjson.loads(str(rows[1][3])) == []
    assert await sink.committed_batches() == [1, 2]
    assert await sink.committed_ranges() == {("clicks", 0): r0, ("clicks", 1): r1}
    assert query(db, "PRAGMA journal_mode") == [("wal",)]


async def test_second_commit_of_a_batch_returns_false_and_changes_nothing(
    tmp_path: Path, make_sink: MakeSink
) -> None:
    calls: list[int] = []

    def apply(conn: sqlite3.Connection, batch: Batch, outputs: Sequence[object]) -> None:
        calls.append(batch.id)
        insert_words(conn, batch, outputs)

    sink = await make_sink(apply)
    assert await sink.commit(batch(4, OffsetRange("s", 0, 0, 3)), [("x", 1)]) is True
    before = query(tmp_path / "out.db", "SELECT * FROM streamlet_batches")
    assert await sink.commit(batch(4, OffsetRange("s", 0, 0, 9)), [("y", 5)]) is False
    restarted = await make_sink(apply)
    assert await restarted.commit(batch(4), [("z", 1)]) is False
    assert calls == [4]
    assert query(tmp_path / "out.db", "SELECT * FROM words") == [(4, "x", 1)]
    assert query(tmp_path / "out.db", "SELECT * FROM streamlet_batches") == before
    assert await restarted.committed_ranges() == {("s", 0): OffsetRange("s", 0, 0, 3)}


async def test_failing_apply_rolls_back_rows_and_bookkeeping(
    tmp_path: Path, make_sink: MakeSink
) -> None:
    fail = True

    def apply(conn: sqlite3.Connection, batch: Batch, outputs: Sequence[object]) -> None:
        insert_words(conn, batch, outputs)
        if fail:
            raise ValueError("bad row")

    sink = await make_sink(apply)
    with pytest.raises(SinkError) as info:
        await sink.commit(batch(3, OffsetRange("s", 0, 0, 5)), [("a", 1), ("b", 2)])
    assert "batch 3 of handler 'handler'" in str(info.value)
    assert "rolled back" in str(info.value)
    assert isinstance(info.value.__cause__, ValueError)
    db = tmp_path / "out.db"
    assert query(db, "SELECT count(*) FROM words") == [(0,)]
    assert query(db, "SELECT count(*) FROM streamlet_batches") == [(0,)]
    assert query(db, "SELECT count(*) FROM streamlet_offsets") == [(0,)]
    # The sink is usable afterwards and the batch can be committed once fixed.
    fail = False
    assert await sink.commit(batch(3, OffsetRange("s", 0, 0, 5)), [("a", 1)]) is True
    assert query(db, "SELECT * FROM words") == [(3, "a", 1)]
    assert await sink.committed_batches() == [3]


@pytest.mark.parametrize("end", ["commit", "execute COMMIT", "execute ROLLBACK"])
async def test_apply_cannot_end_the_transaction(
    tmp_path: Path, make_sink: MakeSink, end: str
) -> None:
    def apply(conn: sqlite3.Connection, batch: Batch, outputs: Sequence[object]) -> None:
        insert_words(conn, batch, outputs)
        if end == "commit":
            conn.commit()
        else:
            conn.execute(end.split()[1])

    sink = await make_sink(apply)
    with pytest.raises(SinkError, match="must not commit or roll back"):
        await sink.commit(batch(1), [("a", 1)])
    assert query(tmp_path / "out.db", "SELECT count(*) FROM words") == [(0,)]
    assert await sink.committed_batches() == []


async def test_committed_ranges_keep_the_newest_batch_per_partition(make_sink: MakeSink) -> None:
    sink = await make_sink()
    await sink.commit(batch(1, OffsetRange("a", 0, 0, 10), OffsetRange("a", 1, 0, 4)), [])
    await sink.commit(batch(2, OffsetRange("a", 0, 10, 20)), [])
    await sink.commit(batch(3, OffsetRange("b", 0, 7, 8)), [])
    # An older batch committed late never moves a partition back.
    await sink.commit(batch(0, OffsetRange("a", 0, 0, 0)), [])
    assert await sink.committed_ranges() == {
        ("a", 0): OffsetRange("a", 0, 10, 20),
        ("a", 1): OffsetRange("a", 1, 0, 4),
        ("b", 0): OffsetRange("b", 0, 7, 8),
    }
    assert await sink.committed_batches() == [0, 1, 2, 3]


async def test_handlers_sharing_a_database_are_kept_apart(make_sink: MakeSink) -> None:
    one = await make_sink()
    two = await make_sink(context=SinkContext("app", "other", "state"))
    assert await one.commit(batch(1, OffsetRange("s", 0, 0, 1)), []) is True
    assert await two.commit(batch(1, OffsetRange("s", 0, 5, 6)), []) is True
    assert await one.committed_batches() == [1]
    assert await two.committed_ranges() == {("s", 0): OffsetRange("s", 0, 5, 6)}


@pytest.mark.usefixtures("open_umask")
async def test_database_is_created_0600_in_a_0700_directory(
    tmp_path: Path, make_sink: MakeSink
) -> None:
    db = tmp_path / "new" / "out.db"
    sink = await make_sink(path=db)
    await sink.commit(batch(1), [("a", 1)])
    assert mode(tmp_path / "new") == 0o700
    assert mode(db) == 0o600
    wal = db.with_name("out.db-wal")
    assert wal.exists()  # WAL mode, while the sink is open
    assert mode(wal) == 0o600


async def test_table_ddl_runs_in_open_as_scripts(tmp_path: Path) -> None:
    ddl = [
        "CREATE TABLE IF NOT EXISTS t (v TEXT DEFAULT 'a;b');"
        " CREATE TABLE IF NOT EXISTS log (v TEXT)",
        """CREATE TRIGGER IF NOT EXISTS copy AFTER INSERT ON t BEGIN
             INSERT INTO log VALUES (new.v); END;""",
    ]

    def apply(conn: sqlite3.Connection, batch: Batch, outputs: Sequence[object]) -> None:
        conn.executemany("INSERT INTO t VALUES (?)", [(str(o),) for o in outputs])

    sink = SQLiteSink(tmp_path / "x.db", apply, table_ddl=ddl)
    await sink.open(CONTEXT)
    try:
        await sink.commit(batch(1), ["p", "q"])
    finally:
        await sink.aclose()
    assert query(tmp_path / "x.db", "SELECT v FROM log ORDER BY v") == [("p",), ("q",)]
    assert query(tmp_path / "x.db", "SELECT dflt_value FROM pragma_table_info('t')") == [("'a;b'",)]


def test_split_script_respects_quotes_comments_and_triggers() -> None:
    script = """
        CREATE TABLE a (v TEXT DEFAULT ';');  -- a comment; with a semicolon
        CREATE TRIGGER t AFTER INSERT ON a BEGIN SELECT 1; SELECT 2; END;
        CREATE TABLE b (v)
    """
    statements = [s.strip() for s in split_script(script)]
    assert len(statements) == 3, statements
    assert statements[0].startswith("CREATE TABLE a")
    assert statements[1].startswith("-- a comment")
    assert statements[1].endswith("END;")
    assert statements[2].startswith("CREATE TABLE b")
    assert split_script("  ;\n ") == []


async def test_failing_ddl_is_a_config_error_and_creates_nothing(tmp_path: Path) -> None:
    sink = SQLiteSink(
        tmp_path / "x.db",
        insert_words,
        table_ddl="CREATE TABLE good (v); CREATE TABLE bad (v,, w)",
    )
    with pytest.raises(ConfigError, match=r"table_ddl statement 2 failed"):
        await sink.open(CONTEXT)
    tables = query(tmp_path / "x.db", "SELECT name FROM sqlite_master")
    assert tables == []  # DDL and bookkeeping are one transaction
    with pytest.raises(SinkError, match="not open"):
        await sink.commit(batch(1), [])


async def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(b"these are my notes, not a database" * 10)
    sink = SQLiteSink(path, insert_words)
    with pytest.raises(ConfigError, match=r"notes.db.*not a database"):
        await sink.open(CONTEXT)


def test_apply_must_be_a_plain_function(tmp_path: Path) -> None:
    async def apply(conn: sqlite3.Connection, batch: Batch, outputs: Sequence[object]) -> None:
        pass

    with pytest.raises(ConfigError, match="not async"):
        SQLiteSink(tmp_path / "x.db", apply)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="must be a function"):
        SQLiteSink(tmp_path / "x.db", "INSERT")  # type: ignore[arg-type]


async def test_every_call_runs_on_one_thread_that_is_not_the_event_loop(
    make_sink: MakeSink,
) -> None:
    threads: set[int] = set()

    def apply(conn: sqlite3.Connection, batch: Batch, outputs: Sequence[object]) -> None:
        threads.add(threading.get_ident())

    sink = await make_sink(apply)
    await asyncio.gather(*(sink.commit(batch(i), []) for i in range(20)))
    assert await sink.committed_batches() == list(range(20))
    assert len(threads) == 1
    assert threads != {threading.get_ident()}


async def test_a_locked_database_is_a_retriable_sink_error(
    tmp_path: Path, make_sink: MakeSink
) -> None:
    sink = await make_sink(lock_timeout=0.05)
    other = sqlite3.connect(tmp_path / "out.db", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(SinkError, match="write lock") as info:
            await sink.commit(batch(1), [("a", 1)])
        assert info.value.retriable
        other.execute("ROLLBACK")
    finally:
        other.close()
    assert await sink.commit(batch(1), [("a", 1)]) is True


def test_sigkill_during_commits_leaves_every_reported_batch_exactly_once(tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    db = tmp_path / "out.db"
    start = 0
    for kill in range(5):
        context = f"kill {kill} (seed {seed})"
        done = crash_worker.run_until_killed("sqlite", str(db), start, rng)
        start = crash_worker.check_run(done, start, context)
        committed = [int(str(r[0])) for r in query(db, "SELECT batch_id FROM streamlet_batches")]
        assert sorted(committed) in (list(range(start)), list(range(start + 1))), context
        rows: dict[int, list[tuple[int, str]]] = {}
        for batch_id, n, payload in query(db, "SELECT batch_id, n, payload FROM out"):
            rows.setdefault(int(str(batch_id)), []).append((int(str(n)), str(payload)))
        for batch_id in committed:
            expected = [(o["n"], o["pad"]) for o in crash_worker.outputs_of(batch_id)]
            assert sorted(rows.pop(batch_id, [])) == expected, f"{context}: batch {batch_id}"
        assert not rows, f"{context}: rows of uncommitted batches {sorted(rows)}"
        # The offsets stored with the outputs are those of the newest batch per partition.
        newest: dict[int, int] = {}
        for batch_id in committed:
            partition = batch_id % crash_worker.PARTITIONS
            newest[partition] = max(newest.get(partition, -1), batch_id)
        offsets = query(db, "SELECT partition, batch_id, start, until FROM streamlet_offsets")
        assert sorted(offsets) == sorted((p, b, b * 10, b * 10 + 10) for p, b in newest.items()), (
            context
        )


@pytest.mark.parametrize(
    ("raised", "output_error", "retriable"),
    [
        (ValueError("bad row"), True, False),
        (sqlite3.IntegrityError("UNIQUE constraint failed"), True, False),
        (ConnectionError("lookup service down"), False, True),
    ],
)
async def test_an_apply_failure_is_the_outputs_fault_only_when_the_data_is(
    make_sink: MakeSink, raised: Exception, output_error: bool, retriable: bool
) -> None:
    """Data errors are not retried (OutputError); anything else may pass and is."""
    from streamlet.errors import OutputError

    def apply(conn: sqlite3.Connection, batch: Batch, outputs: Sequence[object]) -> None:
        raise raised

    sink = await make_sink(apply)
    with pytest.raises(SinkError) as info:
        await sink.commit(batch(1, OffsetRange("s", 0, 0, 1)), [("a", 1)])
    assert isinstance(info.value, OutputError) is output_error
    assert info.value.retriable is retriable


# ---- power cuts, SQLite on FaultFS -----------------------------------------------

DB = "/db/out.sqlite"


def _words(batch_id: int) -> list[tuple[str, int]]:
    """A batch's outputs: enough rows that a commit writes several pages."""
    return [(f"w{batch_id}-{i}-" + "x" * 200, i) for i in range(20)]


async def _sink_workload(fs: FaultFS, returned: list[int]) -> None:
    """Three batches, a close (its checkpoint), a reopen and one more batch."""
    for batch_ids in ((1, 2, 3), (4,)):
        sink = SQLiteSink(DB, insert_words, table_ddl=DDL, fs=fs)
        await sink.open(CONTEXT)
        try:
            for batch_id in batch_ids:
                assert await sink.commit(batch(batch_id), _words(batch_id))
                returned.append(batch_id)
        finally:
            with contextlib.suppress(Exception):
                await sink.aclose()


async def _sink_until_the_cut(fs: FaultFS, returned: list[int]) -> None:
    try:
        await _sink_workload(fs, returned)
    except (SinkError, ConfigError):
        if not fs.is_cut:
            raise


async def test_a_file_system_sqlite_cannot_reach_is_refused() -> None:
    sink = SQLiteSink(DB, insert_words, fs=FaultFS())  # no SQLite VFS over it
    with pytest.raises(ConfigError, match="SQLite cannot reach the file system FaultFS"):
        await sink.open(CONTEXT)


@pytest.mark.parametrize(("mode", "when"), [("drop", "at"), ("sectors", "after"), ("garble", "at")])
async def test_a_power_cut_at_any_operation_keeps_every_returned_batch_whole_and_once(
    mode: CutMode, when: str
) -> None:
    """SQLite itself on FaultFS: its page writes, syncs and deletes are the operations cut at."""
    counting = FaultFS()
    with FaultVFS(counting) as vfs:
        await _sink_workload(counting, [])
        assert sum(op.path == DB + "-wal" and op.name == "sync" for op in counting.ops) >= 4
        total = len(counting.ops)
        for index in range(total):
            fs = FaultFS()
            vfs.attach(fs)
            (fs.cut_at if when == "at" else fs.cut_after)(index)
            returned: list[int] = []
            assert await run_until_cut(fs, _sink_until_the_cut(fs, returned)), index
            await vfs.settle()
            op = fs.ops[index]
            where = f"power cut {when} operation {index} of {total} ({op.name} {op.path})"
            disk = fs.power_cut(mode, rng=random.Random(index))
            vfs.attach(disk)
            if not disk.exists(DB):
                assert returned == [], where
                continue
            conn = connect_sqlite(DB, vfs.name)
            try:
                rows = conn.execute("SELECT batch_id, word, n FROM words").fetchall()
            except sqlite3.OperationalError:  # the cut came before the table was made
                rows = []
            finally:
                conn.close()
            held = {b for b, _, _ in rows}
            assert set(returned) <= held, f"{where}: returned {returned}, held {sorted(held)}"
            for batch_id in held:
                mine = sorted((w, n) for b, w, n in rows if b == batch_id)
                assert mine == sorted(_words(batch_id)), f"{where}: batch {batch_id} not whole"
            # The sink on the recovered disk agrees: held batches are skipped.
            sink = SQLiteSink(DB, insert_words, table_ddl=DDL, fs=disk)
            await sink.open(CONTEXT)
            try:
                for batch_id in sorted(held):
                    assert await sink.commit(batch(batch_id), _words(batch_id)) is False, where
            finally:
                await sink.aclose()
