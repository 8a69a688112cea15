"""TcpSource over real loopback sockets, with a fake context whose durability the test drives."""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections import deque

import anyio
import pytest

from streamlet.errors import ConfigError, StreamletError
from streamlet.sources import TcpSource
from streamlet.sources.tcp import _Client
from tests.sources.support import FakeContext, FakeStored, LineConn, running


def offsets(ctx: FakeContext) -> list[int]:
    return [r.offset for r in ctx.records]


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


# -- listening ----------------------------------------------------------------


async def test_default_bind_address_is_loopback_only() -> None:
    source = TcpSource()
    assert source.host == "127.0.0.1"
    async with running(source, FakeContext()) as port:
        assert source.port == port != 0
        assert source.address == ("127.0.0.1", port)
        async with LineConn.open(port, b"@hello c1\n") as conn:
            assert await conn.line() == b"@resume 0"


async def test_listening_beyond_loopback_is_a_logged_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = TcpSource(host="0.0.0.0")  # noqa: S104 - the case under test
    with caplog.at_level(logging.WARNING, logger="streamlet"):
        async with running(source, FakeContext()):
            assert source.address is not None
            assert source.address[0] == "0.0.0.0"  # noqa: S104
    assert "beyond this machine" in caplog.text
    assert "host='127.0.0.1'" in caplog.text


async def test_a_port_in_use_is_a_config_error_naming_the_address() -> None:
    async with running(TcpSource(), FakeContext()) as port:
        second = TcpSource(port=port)
        with pytest.raises(ConfigError, match=rf"127\.0\.0\.1:{port}.*already in use.*port=0"):
            await second.run(FakeContext())


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"port": 70000}, "port"),
        ({"port": -1}, "port"),
        ({"max_line": 0}, "max_line"),
        ({"max_connections": 0}, "max_connections"),
        ({"hello_timeout": 0}, "hello_timeout"),
        ({"drain_timeout": -1}, "drain_timeout"),
        ({"host": ""}, "host"),
    ],
)
def test_bad_settings_are_config_errors(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TcpSource(**settings)  # type: ignore[arg-type]


# -- plain mode ---------------------------------------------------------------


async def test_plain_lines_become_unkeyed_records_and_get_no_answer() -> None:
    ctx = FakeContext()
    async with running(TcpSource(), ctx) as port:
        before = time.time()
        async with LineConn.open(port) as conn:
            await conn.send(b"one\ntwo\r\n\n@not a command after the first line\nunfinished")
            await conn.stream.send_eof()
            assert await conn.rest() == []
        after = time.time()
    assert [r.value for r in ctx.records] == [
        b"one",
        b"two",
        b"",
        b"@not a command after the first line",
    ]
    for record in ctx.records:
        assert record.key is None
        assert record.offset == -1
        assert record.source == "tcp"
        assert before <= record.timestamp <= after


async def test_at_plain_lets_the_first_line_begin_with_at() -> None:
    ctx = FakeContext()
    async with running(TcpSource(), ctx) as port, LineConn.open(port) as conn:
        await conn.send(b"@plain\n@hello is data here\n")
        await conn.stream.send_eof()
        assert await conn.rest() == []
    assert [r.value for r in ctx.records] == [b"@hello is data here"]


async def test_a_slow_plain_first_line_is_not_timed_out() -> None:
    ctx = FakeContext()
    async with running(TcpSource(hello_timeout=0.1), ctx) as port, LineConn.open(port) as conn:
        await conn.send(b"typed slowly")
        await anyio.sleep(0.3)
        await conn.send(b"\n")
        await ctx.wait_for_records(1)
    assert [r.value for r in ctx.records] == [b"typed slowly"]


async def test_a_source_that_allows_plain_clients_warns_at_start_that_they_are_at_most_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="streamlet.sources.tcp"):
        async with running(TcpSource(), FakeContext(name="lines")):
            pass
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "TcpSource 'lines' accepts plain clients" in warnings[0]
    assert "at-most-once" in warnings[0]
    assert "allow_plain=False" in warnings[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="streamlet.sources.tcp"):
        async with running(TcpSource(allow_plain=False), FakeContext(name="lines")):
            pass
    assert "plain" not in caplog.text


async def test_each_plain_connection_is_logged_once_as_at_most_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ctx = FakeContext()
    with caplog.at_level(logging.INFO, logger="streamlet.sources.tcp"):
        async with running(TcpSource(), ctx) as port:
            for data in (b"a\nb\nc\n", b"@plain\nd\ne\n"):
                async with LineConn.open(port, data) as conn:
                    await conn.stream.send_eof()
                    assert await conn.rest() == []
            async with LineConn.open(port, b"@hello c1\n1 numbered\n") as conn:
                assert await conn.line() == b"@resume 0"
                assert await conn.acks_until(1) == [1]
    plain = [r for r in caplog.records if "plain client 127.0.0.1:" in r.getMessage()]
    assert len(plain) == 2
    assert all(r.levelno == logging.INFO for r in plain)
    assert all("at-most-once" in r.getMessage() for r in plain)
    assert [r.value for r in ctx.records] == [b"a", b"b", b"c", b"d", b"e", b"numbered"]


@pytest.mark.parametrize(
    "opening",
    [b"plain line\nmore\n", b"@plain\ndata\n", b"p", b"x" * 100],
    ids=["plain-line", "at-plain", "first-byte", "long-unfinished"],
)
async def test_allow_plain_false_refuses_plain_clients_and_stores_nothing(
    opening: bytes,
) -> None:
    ctx = FakeContext()
    source = TcpSource(allow_plain=False, hello_timeout=None, max_line=50)
    async with running(source, ctx) as port:
        async with LineConn.open(port, opening) as conn:
            lines = await conn.rest()
        async with LineConn.open(port, b"@hello c1\n1 numbered\n") as conn:
            assert await conn.line() == b"@resume 0"
            assert await conn.acks_until(1) == [1]
    assert len(lines) == 1
    assert lines[0].startswith(b"@error plain clients are refused: ")
    assert b"'@hello <client-id>'" in lines[0]
    assert [r.value for r in ctx.records] == [b"numbered"]


async def test_a_refused_plain_client_reads_the_error_while_it_keeps_sending() -> None:
    ctx = FakeContext()
    async with running(TcpSource(allow_plain=False), ctx) as port, LineConn.open(port) as conn:
        for i in range(200):
            await conn.send(b"line %d\n" % i)
        line = await conn.line()
    assert line.startswith(b"@error plain clients are refused")
    assert ctx.records == []


# -- numbered mode --------------------------------------------------------------


async def test_a_client_id_that_stored_nothing_is_forgotten_when_its_connection_ends() -> None:
    ctx = FakeContext(acks={"old": 5})
    source = TcpSource()
    async with running(source, ctx) as port:
        for client_id in ("asked-1", "asked-2", "old"):
            async with LineConn.open(port, b"@hello %s\n" % client_id.encode()) as conn:
                assert await conn.line() == b"@resume %d" % ctx.acks.get(client_id, 0)
        async with LineConn.open(port, b"@hello kept\n1 a\n") as conn:
            assert await conn.line() == b"@resume 0"
            assert await conn.acks_until(1) == [1]
        for _ in range(500):  # the server forgets once it has seen each connection end
            if set(source._clients) == {"kept"}:
                break
            await anyio.sleep(0.01)
        assert set(source._clients) == {"kept"}
        # Asked again, each says the same as before; "kept" still drops duplicates.
        async with LineConn.open(port, b"@hello old\n") as conn:
            assert await conn.line() == b"@resume 5"
        async with LineConn.open(port, b"@hello kept\n1 a\n2 b\n") as conn:
            assert await conn.line() == b"@resume 1"
            assert await conn.acks_until(2) == [2]
    assert [(r.key, r.offset) for r in ctx.records] == [(b"kept", 1), (b"kept", 2)]


async def test_numbered_lines_are_keyed_records_acked_only_once_durable() -> None:
    ctx = FakeContext(delay=None)
    async with running(TcpSource(), ctx) as port, LineConn.open(port, b"@hello c1\n") as conn:
        assert await conn.line() == b"@resume 0"
        await conn.send(b"1 alpha\n2 beta\r\n3\n")
        await ctx.wait_for_records(3)
        assert await conn.nothing_for(0.1)
        ctx.complete()
        assert await conn.acks_until(3) == [3]
    assert [(r.value, r.key, r.offset) for r in ctx.records] == [
        (b"alpha", b"c1", 1),
        (b"beta", b"c1", 2),
        (b"", b"c1", 3),
    ]
    assert ctx.stores[0].acks == {"c1": 3}


async def test_reading_goes_on_while_earlier_lines_wait_and_acks_stay_in_order() -> None:
    ctx = FakeContext(delay=None)
    async with running(TcpSource(), ctx) as port, LineConn.open(port, b"@hello c1\n") as conn:
        assert await conn.line() == b"@resume 0"
        await conn.send(b"1 a\n")
        await ctx.wait_for_stores(1)
        await conn.send(b"2 b\n")
        first, second = await ctx.wait_for_stores(2)  # read while 1 is not durable
        second.complete()
        assert await conn.nothing_for(0.1)  # 2 is durable, 1 is not: no ack yet
        first.complete()
        acks = await conn.acks_until(2)
    assert acks in ([1, 2], [2])
    assert [s.acks for s in ctx.stores] == [{"c1": 1}, {"c1": 2}]


async def test_gaps_are_allowed_but_sequence_numbers_must_increase() -> None:
    ctx = FakeContext()
    async with running(TcpSource(), ctx) as port, LineConn.open(port, b"@hello c1\n") as conn:
        await conn.send(b"5 a\n9 b\n9 c\n10 d\n")
        rest = await conn.rest()
    assert rest[0] == b"@resume 0"
    assert rest[1:-1] == [b"@ack 9"]
    assert rest[-1].startswith(b"@error sequence number 9 after 9")
    assert offsets(ctx) == [5, 9]


async def test_a_resent_line_is_acked_when_durable_but_not_stored_again() -> None:
    ctx = FakeContext(delay=None)
    async with running(TcpSource(), ctx) as port:
        async with LineConn.open(port, b"@hello c1\n") as first:
            assert await first.line() == b"@resume 0"
            await first.send(b"1 a\n2 b\n3 c\n")
            await ctx.wait_for_records(3)
        # The connection died before any ack; the client resends everything.
        async with LineConn.open(port, b"@hello c1\n") as second:
            assert await second.line() == b"@resume 0"
            await second.send(b"1 a\n2 b\n3 c\n4 d\n5 e\n")
            await ctx.wait_for_records(5)
            assert await second.nothing_for(0.1)
            ctx.complete()
            assert (await second.acks_until(5))[-1] == 5
        async with LineConn.open(port, b"@hello c1\n") as third:
            assert await third.line() == b"@resume 5"
    assert offsets(ctx) == [1, 2, 3, 4, 5]


async def test_the_filter_survives_a_restart_through_the_recovered_acks() -> None:
    first_run = FakeContext()
    source = TcpSource()
    async with running(source, first_run), LineConn.open(source.port, b"@hello c1\n") as conn:
        await conn.send(b"1 a\n2 b\n3 c\n4 d\n5 e\n")
        assert await conn.line() == b"@resume 0"
        await conn.acks_until(5)
    port = source.port
    assert first_run.durable_acks() == {"c1": 5}

    second_run = FakeContext(acks=first_run.durable_acks())
    async with running(TcpSource(port=port), second_run) as again:
        assert again == port
        async with LineConn.open(port, b"@hello c1\n") as conn:
            assert await conn.line() == b"@resume 5"
            await conn.send(b"3 c\n4 d\n5 e\n6 f\n7 g\n")
            assert (await conn.acks_until(7))[-1] == 7
        async with LineConn.open(port, b"@hello other\n") as conn:
            assert await conn.line() == b"@resume 0"
    assert offsets(second_run) == [6, 7]
    assert second_run.stores[-1].acks == {"c1": 7}


async def test_a_second_hello_with_the_same_id_takes_the_connection_over() -> None:
    ctx = FakeContext(delay=None)
    async with running(TcpSource(), ctx) as port, LineConn.open(port, b"@hello c1\n") as old:
        assert await old.line() == b"@resume 0"
        await old.send(b"1 a\n")
        await ctx.wait_for_records(1)
        async with LineConn.open(port, b"@hello c1\n") as new:
            assert await new.line() == b"@resume 0"
            assert await old.nothing_for(0.1)  # its ack is still owed
            ctx.complete()
            rest = await old.rest()
            assert rest[0] == b"@ack 1"
            assert rest[1].startswith(b"@error another connection said '@hello c1'")
            await new.send(b"1 a\n2 b\n")
            await ctx.wait_for_records(2)
            ctx.complete()
            assert (await new.acks_until(2))[-1] == 2
    assert offsets(ctx) == [1, 2]


async def test_waiters_sharing_a_block_handle_keep_the_durable_mark_exact() -> None:
    # The block generator returns one handle for every store into the same
    # open block; the old and the new connection of a client may both wait.
    block = FakeStored([], {}, None)
    client = _Client("c1", durable=0, stored=10, pending=deque([(5, block), (10, block)]))
    async with anyio.create_task_group() as tg:
        tg.start_soon(client.wait_durable, 5)
        tg.start_soon(client.wait_durable, 10)
        await anyio.wait_all_tasks_blocked()
        block.complete()
    assert client.durable == 10
    assert not client.pending


# -- refusals -------------------------------------------------------------------


@pytest.mark.parametrize(
    "long_line",
    [b"2 " + b"x" * 40 + b"\n", b"2 " + b"x" * 40, b"2 " + b"x" * 200_000],
    ids=["complete", "unfinished", "endless"],
)
async def test_a_line_too_long_is_refused_and_nothing_of_it_stored(long_line: bytes) -> None:
    ctx = FakeContext()
    async with running(TcpSource(max_line=16), ctx) as port:
        async with LineConn.open(port, b"@hello c1\n1 fits\n") as conn:
            # The server may close before all of it is sent.
            with contextlib.suppress(anyio.BrokenResourceError, OSError):
                await conn.send(long_line + b"3 after\n")
            rest = await conn.rest()
        assert rest[:2] == [b"@resume 0", b"@ack 1"]
        assert rest[2].startswith(b"@error line too long (max 16 bytes)")
        assert len(rest) == 3
        async with LineConn.open(port) as conn:
            await conn.send(b"ok\n" + b"y" * 17 + b"\n")
            assert (await conn.rest())[0].startswith(b"@error line too long")
    assert [r.value for r in ctx.records] == [b"fits", b"ok"]


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"x 1", b"@error malformed line b'x 1'"),
        (b"-1 a", b"@error malformed line"),
        (b"0 a", b"@error malformed line"),
        (b" 1 a", b"@error malformed line"),
        (b"1_0 a", b"@error malformed line"),
        (b"9223372036854775808 a", b"@error malformed line"),
        (b"@ack 1", b"@error malformed line"),
    ],
)
async def test_a_malformed_numbered_line_is_refused_after_acking_the_good_ones(
    line: bytes, error: bytes
) -> None:
    ctx = FakeContext()
    source = TcpSource()
    data = b"@hello c1\n1 good\n" + line + b"\n3 never\n"
    async with running(source, ctx), LineConn.open(source.port, data) as conn:
        rest = await conn.rest()
    assert rest[:2] == [b"@resume 0", b"@ack 1"]
    assert rest[2].startswith(error)
    assert len(rest) == 3
    assert offsets(ctx) == [1]


@pytest.mark.parametrize(
    ("first", "error"),
    [
        (b"@hello \n", b"@error bad hello"),
        (b"@hello a b\n", b"@error bad hello"),
        (b"@hello " + b"i" * 129 + b"\n", b"@error bad hello"),
        (b"@hello caf\xc3\xa9\n", b"@error bad hello"),
        (b"@hello\n", b"@error unknown command"),
        (b"@helo c1\n", b"@error unknown command"),
        (b"@\n", b"@error unknown command"),
    ],
)
async def test_a_bad_first_command_is_refused(first: bytes, error: bytes) -> None:
    ctx = FakeContext()
    async with running(TcpSource(), ctx) as port, LineConn.open(port, first + b"1 x\n") as conn:
        rest = await conn.rest()
    assert len(rest) == 1
    assert rest[0].startswith(error)
    assert b"\n" not in rest[0]
    assert ctx.records == []


@pytest.mark.parametrize("sent", [b"", b"@hel"])
async def test_a_hello_that_never_comes_times_out(sent: bytes) -> None:
    source = TcpSource(hello_timeout=0.2)
    async with running(source, FakeContext()), LineConn.open(source.port) as conn:
        await conn.send(sent)
        started = anyio.current_time()
        rest = await conn.rest(within=3)
        waited = anyio.current_time() - started
    assert len(rest) == 1
    assert rest[0].startswith(b"@error no complete first line within 0.2 s")
    assert 0.1 <= waited < 2


async def test_connections_over_the_limit_are_told_busy() -> None:
    ctx = FakeContext()
    async with running(TcpSource(max_connections=1), ctx) as port:
        async with LineConn.open(port, b"@hello c1\n") as first:
            assert await first.line() == b"@resume 0"
            async with LineConn.open(port, b"@hello c2\n") as second:
                rest = await second.rest()
            assert rest == [b"@busy too many connections (max 1); try again later"]
        with anyio.fail_after(5):
            while True:  # the first connection's slot is freed once the server sees it close
                async with LineConn.open(port, b"@hello c3\n") as third:
                    line = await third.line()
                if line == b"@resume 0":
                    break
                await anyio.sleep(0.01)


# -- failures and stopping ------------------------------------------------------------


async def test_a_store_that_fails_is_never_acked_and_other_clients_go_on() -> None:
    ctx = FakeContext(delay=None)
    async with running(TcpSource(), ctx) as port:
        async with LineConn.open(port, b"@hello c1\n1 a\n") as conn:
            assert await conn.line() == b"@resume 0"
            (stored,) = await ctx.wait_for_stores(1)
            stored.fail(OSError("disk gone"))
            assert await conn.rest() == []
        ctx.delay = 0.0
        async with LineConn.open(port, b"@hello c2\n1 b\n") as conn:
            assert await conn.line() == b"@resume 0"
            assert await conn.acks_until(1) == [1]


async def test_a_store_refused_by_a_stopping_app_closes_the_connection() -> None:
    ctx = FakeContext()
    ctx.refuse = StreamletError("the app is stopping")
    async with running(TcpSource(), ctx) as port:
        async with LineConn.open(port, b"@hello c1\n1 a\n") as conn:
            assert await conn.rest() == [b"@resume 0"]
        async with LineConn.open(port, b"plain\n") as conn:
            assert await conn.rest() == []


async def test_a_graceful_stop_sends_pending_acks_then_closes() -> None:
    ctx = FakeContext(delay=0.2)
    source = TcpSource()
    async with anyio.create_task_group() as tg:
        port = await tg.start(source.run, ctx)
        async with LineConn.open(port, b"@hello c1\n1 a\n2 b\n") as conn:
            assert await conn.line() == b"@resume 0"
            await ctx.wait_for_records(2)
            ctx.stopping.set()
            assert await conn.rest() == [b"@ack 2"]
    assert not listening(port)  # run() returned: nothing listens any more


async def test_a_graceful_stop_gives_up_on_acks_after_the_drain_timeout() -> None:
    ctx = FakeContext(delay=None)
    source = TcpSource(drain_timeout=0.2)
    async with anyio.create_task_group() as tg:
        port = await tg.start(source.run, ctx)
        async with LineConn.open(port, b"@hello c1\n1 a\n") as conn:
            assert await conn.line() == b"@resume 0"
            await ctx.wait_for_records(1)
            ctx.stopping.set()
            assert await conn.rest(within=3) == []


async def test_cancellation_closes_every_connection_at_once() -> None:
    ctx = FakeContext(delay=None)
    source = TcpSource()
    async with anyio.create_task_group() as tg:
        port = await tg.start(source.run, ctx)
        async with (
            LineConn.open(port, b"@hello c1\n1 a\n") as numbered,
            LineConn.open(port, b"plain") as plain,
        ):
            await ctx.wait_for_records(1)
            tg.cancel_scope.cancel()
            with anyio.CancelScope(shield=True):
                assert await numbered.rest() == [b"@resume 0"]
                assert await plain.rest() == []
    assert not listening(port)
