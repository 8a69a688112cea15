"""PostgresSink in group mode: offsets per task, and an acquire fences every earlier owner.

Each test builds its sinks directly, as two workers of a group would (each
with its own state directory, so batch ids repeat between them), against
one real database.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from streamlet._group import check_group_mode
from streamlet.errors import FencedError, SinkError
from streamlet.records import Batch, OffsetRange
from streamlet.sinks import PostgresSink, SinkContext
from streamlet.sinks.sqlite import SQLiteSink
from streamlet.sources import KafkaSource
from tests.postgres.test_postgres_sink import DDL, insert_words, query


def _context(state_id: str) -> SinkContext:
    return SinkContext(
        "grouped",
        "words",
        f"/state/{state_id}",
        state_id,
        None,
        group="g",
        source_topics={"orders": "orders-topic", "refunds": "refunds-topic"},
    )


def _batch(batch_id: int, task: int, start: int, until: int) -> Batch:
    return Batch(batch_id, 0.0, [], (OffsetRange("orders", task, start, until),))


async def _open(dsn: str, state_id: str, apply: Any = insert_words) -> PostgresSink:
    sink = PostgresSink(dsn, apply, table_ddl=DDL, retry_timeout=10)
    await sink.open(_context(state_id))
    return sink


async def _words(dsn: str) -> list[str]:
    return [r["word"] for r in await query(dsn, "SELECT word FROM words ORDER BY word")]


async def test_a_task_resumes_where_its_last_owner_committed_and_the_old_owner_is_fenced(
    pg_database: str,
) -> None:
    a = await _open(pg_database, "state-a")
    b = await _open(pg_database, "state-b")
    try:
        assert await a.acquire(0) == {}
        assert await a.acquire(1) == {}
        assert await a.commit(_batch(1, 0, 0, 10), [("a0", 1)]) is True
        assert await a.commit(_batch(2, 1, 0, 5), [("a1", 1)]) is True
        assert await a.commit(_batch(3, 0, 10, 20), [("a0-2", 1)]) is True
        assert await a.last_committed() == 3
        # b takes task 0 over (a rebalance); a is a zombie that still runs.
        assert await b.acquire(0) == {"orders": 20}
        with pytest.raises(FencedError, match="taken over by another worker"):
            await a.commit(_batch(4, 0, 20, 30), [("zombie", 1)])
        # Task 1 is still a's.
        assert await a.commit(_batch(5, 1, 5, 9), [("a1-2", 1)]) is True
        # b's batch ids start at 1 too: keyed by offsets, they do not collide.
        assert await b.commit(_batch(1, 0, 20, 30), [("b0", 1)]) is True
        # A re-run of input b committed is skipped; a gap or an overlap is refused.
        assert await b.commit(_batch(2, 0, 20, 30), [("b0", 1)]) is False
        with pytest.raises(SinkError, match="starts past them"):
            await b.commit(_batch(3, 0, 40, 50), [("gap", 1)])
        with pytest.raises(SinkError, match="overlaps"):
            await b.commit(_batch(3, 0, 25, 35), [("overlap", 1)])
        # A task not acquired is refused.
        with pytest.raises(SinkError, match="has not acquired"):
            await b.commit(_batch(4, 1, 9, 12), [("b1", 1)])
    finally:
        await a.aclose()
        await b.aclose()
    assert await _words(pg_database) == ["a0", "a0-2", "a1", "a1-2", "b0"]
    offsets = await query(
        pg_database,
        "SELECT source, partition, next_offset FROM streamlet_offsets ORDER BY 1, 2",
    )
    assert [tuple(r) for r in offsets] == [
        ("orders", 0, 30),
        ("orders", 1, 9),
        ("refunds", 0, None),
        ("refunds", 1, None),
    ]


async def test_an_acquire_waits_for_the_old_owners_transaction_then_fences_it(
    pg_database: str,
) -> None:
    """The zombie's transaction holds the task's rows: the acquire reads its outcome."""
    in_apply = anyio.Event()
    go_on = anyio.Event()

    async def slow(conn: Any, batch: Batch, outputs: Any) -> None:
        in_apply.set()
        await go_on.wait()
        await insert_words(conn, batch, outputs)

    a = await _open(pg_database, "state-a", slow)
    b = await _open(pg_database, "state-b")
    acquired: dict[str, int] = {}
    try:
        await a.acquire(0)
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.commit, _batch(1, 0, 0, 10), [("zombie-last", 1)])
            await in_apply.wait()

            async def take_over() -> None:
                acquired.update(await b.acquire(0) or {})

            tg.start_soon(take_over)
            await anyio.sleep(0.5)
            assert acquired == {}, "the acquire did not wait for the old owner's transaction"
            go_on.set()
        # a's batch committed first, so b resumes after it; a is fenced now.
        assert acquired == {"orders": 10}
        with pytest.raises(FencedError):
            await a.commit(_batch(2, 0, 10, 20), [("zombie", 1)])
        assert await b.commit(_batch(1, 0, 10, 20), [("b", 1)]) is True
    finally:
        await a.aclose()
        await b.aclose()
    assert await _words(pg_database) == ["b", "zombie-last"]


def test_group_mode_takes_a_postgres_sink_but_not_a_sqlite_sink(tmp_path: Any) -> None:
    sources = {"orders": KafkaSource("orders", bootstrap_servers="127.0.0.1:9")}
    pg = PostgresSink("postgresql://u@127.0.0.1/db", insert_words)
    assert check_group_mode(sources, [("words", pg)]) == []
    sqlite = SQLiteSink(tmp_path / "x.db", lambda c, b, o: None)
    assert any(
        "exactly-once only on one worker" in p for p in check_group_mode(sources, [("w", sqlite)])
    )


async def test_more_tasks_committing_at_once_than_the_pool_has_connections(
    pg_database: str,
) -> None:
    # A worker's tasks commit side by side; the sink must give connections
    # back to the pool, or the fifth commit (and every acquire after) waits.
    sink = PostgresSink(
        pg_database, insert_words, table_ddl=DDL, retry_timeout=10, max_connections=2
    )
    await sink.open(_context("state-a"))
    try:
        for task in range(5):
            await sink.acquire(task)
        with anyio.fail_after(30):
            for tick in range(3):
                async with anyio.create_task_group() as tg:
                    for task in range(5):
                        batch = _batch(tick * 5 + task + 1, task, tick * 10, tick * 10 + 10)
                        tg.start_soon(sink.commit, batch, [(f"t{task}-{tick}", 1)])
            assert await sink.acquire(0) == {"orders": 30}
        assert len(await _words(pg_database)) == 15
    finally:
        await sink.aclose()
