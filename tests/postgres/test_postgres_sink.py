"""PostgresSink against a real server: rows and streamlet's row commit together, at most once."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit

import anyio
import asyncpg
import orjson
import pytest

from streamlet.errors import ConfigError, OutputError, SinkError, SinkUnavailableError
from streamlet.records import Batch, OffsetRange, Record
from streamlet.sinks import PostgresSink, SinkContext
from streamlet.sinks.postgres import PostgresApply, failure_kind

DDL = "CREATE TABLE IF NOT EXISTS words (batch_id bigint, word text NOT NULL, n integer)"
CONTEXT = SinkContext("app", "words", "/state", "state-a", None)


def batch(batch_id: int, *ranges: OffsetRange, records: int = 0) -> Batch:
    return Batch(batch_id, 1000.0 + batch_id, [Record(b"x")] * records, ranges)


async def insert_words(conn: Any, batch: Batch, outputs: Sequence[object]) -> None:
    await conn.executemany(
        "INSERT INTO words VALUES ($1, $2, $3)",
        [(batch.id, *o) for o in outputs],  # type: ignore[misc]
    )


async def query(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


class MakeSink(Protocol):
    async def __call__(
        self,
        apply: PostgresApply = ...,
        *,
        context: SinkContext = ...,
        dsn: str | None = None,
        **options: Any,
    ) -> PostgresSink: ...


@pytest.fixture
async def make_sink(pg_database: str) -> AsyncIterator[MakeSink]:
    """``await make_sink(apply=..., **options)``: an open sink, closed after the test."""
    sinks: list[PostgresSink] = []

    async def make(
        apply: PostgresApply = insert_words,
        *,
        context: SinkContext = CONTEXT,
        dsn: str | None = None,
        **options: Any,
    ) -> PostgresSink:
        options.setdefault("table_ddl", DDL)
        options.setdefault("retry_timeout", 10.0)
        sink = PostgresSink(dsn or pg_database, apply, **options)
        await sink.open(context)
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        await sink.aclose()


async def test_a_batch_is_written_with_its_row_and_offsets(
    make_sink: MakeSink, pg_database: str
) -> None:
    sink = await make_sink()
    ranges = (OffsetRange("orders", 0, 0, 10), OffsetRange("orders", 1, 5, 7))
    assert await sink.commit(batch(1, *ranges), [("a", 1), ("b", 2)]) is True
    rows = await query(pg_database, "SELECT batch_id, word, n FROM words ORDER BY word")
    assert [tuple(r) for r in rows] == [(1, "a", 1), (1, "b", 2)]
    (row,) = await query(pg_database, "SELECT * FROM streamlet_batches")
    assert (row["app"], row["handler"], row["state_id"], row["batch_id"]) == (
        "app",
        "words",
        "state-a",
        1,
    )
    assert orjson.loads(row["ranges"]) == [
        {"source": "orders", "partition": 0, "start": 0, "until": 10},
        {"source": "orders", "partition": 1, "start": 5, "until": 7},
    ]
    assert await sink.committed_offsets() == {("orders", 0): 10, ("orders", 1): 7}
    assert await sink.last_committed() == 1
    await sink.commit(batch(2, OffsetRange("orders", 0, 10, 12)), [("c", 3)])
    assert await sink.committed_offsets() == {("orders", 0): 12, ("orders", 1): 7}
    assert await sink.committed_batches() == [1, 2]


async def test_second_commit_of_a_batch_returns_false_and_changes_nothing(
    make_sink: MakeSink, pg_database: str
) -> None:
    sink = await make_sink()
    assert await sink.commit(batch(1), [("a", 1)]) is True
    assert await sink.commit(batch(1), [("a", 1), ("other", 2)]) is False
    rows = await query(pg_database, "SELECT word FROM words")
    assert [r["word"] for r in rows] == ["a"]
    # A second sink (a restarted worker) skips it too.
    again = await make_sink()
    assert await again.commit(batch(1), [("a", 1)]) is False
    assert len(await query(pg_database, "SELECT word FROM words")) == 1


async def test_a_database_written_under_another_state_directory_is_refused(
    make_sink: MakeSink, pg_database: str
) -> None:
    sink = await make_sink()
    await sink.commit(batch(1), [("a", 1)])
    other = CONTEXT._replace(state_id="state-b", state_dir="/elsewhere")
    with pytest.raises(ConfigError, match="another state directory"):
        await make_sink(context=other)
    # The refused sink wrote nothing, and other handlers are not concerned.
    assert [r["state_id"] for r in await query(pg_database, "SELECT * FROM streamlet_state")] == [
        "state-a"
    ]
    await make_sink(context=other._replace(handler="another"))


async def test_outputs_the_table_refuses_are_an_output_error_and_nothing_is_written(
    make_sink: MakeSink, pg_database: str
) -> None:
    sink = await make_sink()
    with pytest.raises(OutputError, match="do not fit"):
        await sink.commit(batch(1), [("a", 1), (None, 2)])  # word is NOT NULL
    with pytest.raises(OutputError):
        await sink.commit(batch(1), [("a", "not a number")])  # the driver cannot encode it
    assert await query(pg_database, "SELECT * FROM words") == []
    assert await query(pg_database, "SELECT * FROM streamlet_batches") == []
    assert await sink.commit(batch(1), [("a", 1)]) is True


async def test_an_sql_error_in_apply_is_a_sink_error_and_a_flaky_apply_may_pass(
    make_sink: MakeSink, pg_database: str
) -> None:
    async def bad_sql(conn: Any, batch: Batch, outputs: Sequence[object]) -> None:
        await conn.execute("INSERT INTO no_such_table VALUES (1)")

    sink = await make_sink(bad_sql)
    with pytest.raises(SinkError, match="no_such_table") as raised:
        await sink.commit(batch(1), [])
    assert not raised.value.retriable

    async def flaky(conn: Any, batch: Batch, outputs: Sequence[object]) -> None:
        raise RuntimeError("the lookup service is down")

    sink = await make_sink(flaky)
    with pytest.raises(SinkUnavailableError, match="lookup service"):
        await sink.commit(batch(1), [])
    assert await query(pg_database, "SELECT * FROM streamlet_batches") == []


async def test_an_apply_that_commits_is_stopped(make_sink: MakeSink) -> None:
    async def commits(conn: Any, batch: Batch, outputs: Sequence[object]) -> None:
        await conn.execute("COMMIT")

    sink = await make_sink(commits)
    with pytest.raises(SinkError, match="must not commit"):
        await sink.commit(batch(1), [])


async def test_a_deadlock_is_rolled_back_and_tried_again(
    make_sink: MakeSink, pg_database: str
) -> None:
    """The server picks the sink's transaction as the deadlock victim; the retry writes once."""
    setup = await asyncpg.connect(pg_database)
    await setup.execute(
        "CREATE TABLE pair (id int PRIMARY KEY, v int); INSERT INTO pair VALUES (1, 0), (2, 0)"
    )
    other = await asyncpg.connect(pg_database)
    calls = 0
    locked = anyio.Event()
    sink_waits = anyio.Event()

    async def crossing(conn: Any, batch: Batch, outputs: Sequence[object]) -> None:
        nonlocal calls
        calls += 1
        await conn.execute("UPDATE pair SET v = v + 1 WHERE id = 1")
        if calls == 1:
            await locked.wait()
            sink_waits.set()
        await conn.execute("UPDATE pair SET v = v + 1 WHERE id = 2")
        await insert_words(conn, batch, outputs)

    sink = await make_sink(crossing)

    async def rival() -> None:
        async with other.transaction():
            await other.execute("UPDATE pair SET v = v + 10 WHERE id = 2")
            locked.set()
            await sink_waits.wait()
            await anyio.sleep(0.05)  # the sink now waits on row 2
            await other.execute("UPDATE pair SET v = v + 10 WHERE id = 1")

    async with anyio.create_task_group() as tg:
        tg.start_soon(rival)
        with anyio.fail_after(30):
            # The sink waited first, so its backend runs the deadlock check
            # first (deadlock_timeout after it began waiting) and is the victim.
            assert await sink.commit(batch(1), [("a", 1)]) is True
    await other.close()
    assert calls == 2
    rows = await query(pg_database, "SELECT word FROM words")
    assert [r["word"] for r in rows] == ["a"]
    await setup.close()


def test_failures_are_told_apart() -> None:
    from asyncpg import exceptions as e

    assert failure_kind(e.SerializationError("x")) == "retry"
    assert failure_kind(e.DeadlockDetectedError("x")) == "retry"
    assert failure_kind(e.SerializationError("x"), committing=True) == "retry"
    assert failure_kind(e.AdminShutdownError("x")) == "retry"
    assert failure_kind(e.AdminShutdownError("x"), committing=True) == "unknown"
    assert failure_kind(e.CannotConnectNowError("x")) == "retry"
    assert failure_kind(e.ReadOnlySQLTransactionError("x")) == "retry"
    assert failure_kind(e.ConnectionDoesNotExistError("x"), committing=True) == "unknown"
    assert failure_kind(ConnectionResetError(), committing=True) == "unknown"
    assert failure_kind(ConnectionRefusedError()) == "retry"
    assert failure_kind(e.UniqueViolationError("x")) == "output"
    assert failure_kind(e.NotNullViolationError("x")) == "output"
    assert failure_kind(e.InvalidPasswordError("x")) == "config"
    assert failure_kind(e.InvalidCatalogNameError("x")) == "config"
    assert failure_kind(e.UndefinedTableError("x")) == "error"
    assert failure_kind(e.InterfaceError("x")) == "error"
    assert failure_kind(e.InterfaceError("x"), closed=True) == "retry"


async def test_the_password_is_never_shown(
    postgres_dsn: str, pg_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    parts = urlsplit(pg_database)
    user = parts.username or "streamlet"
    # Nothing listens on port 1: the sink waits, logs each try, gives up.
    secret = "s3cret-never-logged"  # noqa: S105 - a test value, the point of the test
    down = f"postgresql://{user}:{secret}@{parts.hostname}:1{parts.path}"
    sink = PostgresSink(down, insert_words, retry_timeout=0.5)
    assert secret not in sink.describe()
    with pytest.raises(SinkUnavailableError) as unavailable:
        await sink.open(CONTEXT)
    assert secret not in str(unavailable.value)
    assert caplog.records
    assert secret not in caplog.text
    # A wrong password, on a server that asks for one, is refused at once.
    password = urlsplit(postgres_dsn).password
    if password:
        wrong = pg_database.replace(f":{password}@", f":{secret}@")
        with pytest.raises(ConfigError, match="refused") as refused:
            await PostgresSink(wrong, insert_words).open(CONTEXT)
        assert secret not in str(refused.value)
        assert password not in caplog.text
    assert secret not in caplog.text


async def test_a_serialization_failure_is_rolled_back_and_tried_again(
    make_sink: MakeSink, pg_database: str
) -> None:
    """Repeatable read: a row another transaction changed fails the batch; the retry passes."""
    setup = await asyncpg.connect(pg_database)
    await setup.execute("CREATE TABLE stock (sku text PRIMARY KEY, qty int)")
    await setup.execute("INSERT INTO stock VALUES ('a', 10)")
    calls = 0

    async def take(conn: Any, batch: Batch, outputs: Sequence[object]) -> None:
        nonlocal calls
        calls += 1
        await conn.fetchval("SELECT qty FROM stock WHERE sku = 'a'")  # the snapshot is taken
        if calls == 1:
            await setup.execute("UPDATE stock SET qty = qty - 1 WHERE sku = 'a'")
        await conn.execute("UPDATE stock SET qty = qty - 2 WHERE sku = 'a'")
        await insert_words(conn, batch, outputs)

    sink = await make_sink(take, isolation="repeatable_read")
    assert await sink.commit(batch(1), [("a", 1)]) is True
    assert calls == 2
    assert await setup.fetchval("SELECT qty FROM stock") == 7
    await setup.close()
    assert [r["word"] for r in await query(pg_database, "SELECT word FROM words")] == ["a"]


async def test_a_failover_to_a_server_that_refuses_writes_is_waited_out(
    make_sink: MakeSink, pg_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The sink's connections drop and the database answers read-only for a while, as
    while a standby is promoted; the commit waits and then writes the batch once."""
    name = urlsplit(pg_database).path.lstrip("/")
    sink = await make_sink()
    assert await sink.commit(batch(1), [("before", 1)]) is True
    admin = await asyncpg.connect(pg_database)
    await admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    await admin.fetch(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name LIKE 'streamlet/%' AND datname = $1",
        name,
    )
    caplog.set_level(logging.WARNING, logger="streamlet.sinks.postgres")

    async def promote() -> None:
        await anyio.sleep(1.0)
        await admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = off')

    async with anyio.create_task_group() as tg:
        tg.start_soon(promote)
        with anyio.fail_after(20):
            assert await sink.commit(batch(2), [("after", 2)]) is True
    await admin.close()
    assert "retrying in" in caplog.text
    words = await query(pg_database, "SELECT word FROM words ORDER BY batch_id")
    assert [r["word"] for r in words] == ["before", "after"]
