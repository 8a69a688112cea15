"""A COMMIT whose answer never comes back: resolved from streamlet_batches, never guessed.

A TCP proxy between the sink and the real server cuts the connection at the
sink's ``COMMIT``, in three ways: after the server got it (it commits and its
answer is lost), before (the server rolls back), and while the server has
not yet received it (it arrives a second later, while the sink is already
looking the batch up on a new connection). Each time the batch must end up
in the table exactly once, and the sink must say how the outcome was settled.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import anyio
import anyio.abc
import asyncpg
import pytest

from streamlet.records import Batch, OffsetRange
from streamlet.sinks import PostgresSink
from tests.postgres.test_postgres_sink import CONTEXT, DDL, insert_words, query

# The simple-query message asyncpg sends for conn.execute("COMMIT").
COMMIT = b"Q\x00\x00\x00\x0bCOMMIT\x00"

Cut = Literal["after_commit", "before_commit", "commit_late"]


class CommitCutter:
    """Forwards connections to the server; cuts the first one that sends COMMIT once armed."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.cut: Cut | None = None
        self.cuts = 0

    async def serve(self, *, task_status: anyio.abc.TaskStatus[int]) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        async with listener:
            task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))  # noqa: S610
            await listener.serve(self._relay)

    async def _relay(self, client: anyio.abc.SocketStream) -> None:
        server = await anyio.connect_tcp(self.host, self.port)
        muted = False  # once cut, nothing more reaches the client
        async with client, server, anyio.create_task_group() as tg:

            async def down() -> None:
                with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                    async for data in server:
                        if muted:
                            break
                        await client.send(data)
                tg.cancel_scope.cancel()

            async def up() -> None:
                nonlocal muted
                with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                    async for data in client:
                        cut = self.cut
                        if cut is not None and COMMIT in data:
                            self.cut = None
                            self.cuts += 1
                            muted = True
                            await self._cut(cut, data, client, server)
                            break
                        await server.send(data)
                tg.cancel_scope.cancel()

            tg.start_soon(down)
            tg.start_soon(up)

    async def _cut(
        self,
        cut: Cut,
        data: bytes,
        client: anyio.abc.SocketStream,
        server: anyio.abc.SocketStream,
    ) -> None:
        if cut == "before_commit":
            return  # both ends close: the server never sees COMMIT
        if cut == "after_commit":
            await server.send(data)
            await anyio.sleep(0.5)  # the server commits; its answer is dropped
            return
        # commit_late: the sink loses the connection at once, but the
        # server gets the COMMIT only a second later, from a backend that
        # still holds the batch's uncommitted row.
        await client.aclose()
        await anyio.sleep(1.0)
        await server.send(data)
        await anyio.sleep(0.5)


@contextlib.asynccontextmanager
async def cutter(pg_database: str) -> AsyncIterator[tuple[CommitCutter, str]]:
    """The proxy and the URL of the test's database through it (a context manager:
    the proxy's task group must be entered and left by the test's own task)."""
    parts = urlsplit(pg_database)
    proxy = CommitCutter(parts.hostname or "127.0.0.1", parts.port or 5432)
    async with anyio.create_task_group() as tg:
        port = await tg.start(proxy.serve)
        user = parts.netloc.rpartition("@")[0]
        netloc = f"{user}@127.0.0.1:{port}" if user else f"127.0.0.1:{port}"
        yield proxy, urlunsplit(parts._replace(netloc=netloc))
        tg.cancel_scope.cancel()


def _batch(batch_id: int) -> Batch:
    return Batch(batch_id, 0.0, [], (OffsetRange("orders", 0, batch_id * 10, batch_id * 10 + 10),))


@pytest.mark.parametrize(
    ("cut", "settled"),
    [
        ("after_commit", "had been committed; nothing was written again"),
        ("before_commit", "had not been committed; it is committed now"),
        ("commit_late", "had been committed; nothing was written again"),
    ],
)
async def test_an_unknown_commit_outcome_is_resolved_from_streamlets_table(
    pg_database: str,
    caplog: pytest.LogCaptureFixture,
    cut: Cut,
    settled: str,
) -> None:
    async with cutter(pg_database) as (proxy, through_proxy):
        await _commit_through(proxy, through_proxy, caplog, cut, settled)
    words = await query(pg_database, "SELECT word FROM words ORDER BY batch_id")
    assert [r["word"] for r in words] == ["before", "cut", "after"]
    batches = await query(pg_database, "SELECT batch_id FROM streamlet_batches ORDER BY 1")
    assert [r["batch_id"] for r in batches] == [1, 2, 3]
    conn = await asyncpg.connect(pg_database)
    try:
        offsets = await conn.fetchval("SELECT next_offset FROM streamlet_offsets")
    finally:
        await conn.close()
    assert offsets == 40


async def _commit_through(
    proxy: CommitCutter,
    through_proxy: str,
    caplog: pytest.LogCaptureFixture,
    cut: Cut,
    settled: str,
) -> None:
    sink = PostgresSink(
        through_proxy, insert_words, table_ddl=DDL, retry_timeout=20, connect_options={"ssl": False}
    )
    await sink.open(CONTEXT)
    try:
        assert await sink.commit(_batch(1), [("before", 1)]) is True
        proxy.cut = cut
        caplog.set_level(logging.WARNING, logger="streamlet.sinks.postgres")
        with anyio.fail_after(30):
            assert await sink.commit(_batch(2), [("cut", 2)]) is True
        assert proxy.cuts == 1
        assert "the outcome is unknown" in caplog.text
        assert settled in caplog.text
        # Later batches go on as usual.
        assert await sink.commit(_batch(3), [("after", 3)]) is True
        assert await sink.commit(_batch(2), [("cut", 2)]) is False
    finally:
        await sink.aclose()
