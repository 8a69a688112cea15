"""TcpClient against a real TcpSource: numbering, bounds, reconnects and resends."""

from __future__ import annotations

import socket
from collections import Counter

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

from streamlet.errors import ConfigError
from streamlet.sources import TcpSource
from streamlet.tcp import RejectedError, TcpClient, UnreachableError
from tests.sources.support import FakeContext, running


def free_port() -> int:
    """A port nothing listens on (bound and released at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_lines_are_numbered_from_one_and_flush_waits_for_every_ack() -> None:
    ctx = FakeContext(delay=0.02)
    source = TcpSource()
    async with running(source, ctx), TcpClient("127.0.0.1", source.port, "c1") as client:
        assert client.resumed_at == 0
        numbers = [await client.send(b"line %d" % i) for i in range(1, 301)]
        assert client.acked < 300  # nothing is durable for 20 ms
        await client.flush(timeout=5)
        assert client.acked == 300
        assert client.unacked == 0
    assert numbers == list(range(1, 301))
    assert [(r.offset, r.value, r.key) for r in ctx.durable_records()] == [
        (i, b"line %d" % i, b"c1") for i in range(1, 301)
    ]


async def test_leaving_the_context_waits_for_the_acks() -> None:
    ctx = FakeContext(delay=0.05)
    async with running(TcpSource(), ctx) as port:
        async with TcpClient("127.0.0.1", port, "c1") as client:
            for i in range(10):
                await client.send(b"%d" % i)
        assert client.acked == 10
    assert len(ctx.durable_records()) == 10


@pytest.mark.parametrize("payload", [b"two\nlines", b"\n", b"ends in cr\r"])
async def test_a_payload_the_server_would_read_differently_is_a_value_error(
    payload: bytes,
) -> None:
    source = TcpSource()
    async with running(source, FakeContext()), TcpClient("127.0.0.1", source.port, "c1") as client:
        with pytest.raises(ValueError, match=r"must not contain \\n"):
            await client.send(payload)
        assert client.next_seq == 1
        await client.send(b"cr\rinside is fine")


async def test_send_waits_while_max_unacked_lines_are_outstanding() -> None:
    ctx = FakeContext(delay=None)
    source = TcpSource()
    async with (
        running(source, ctx),
        TcpClient("127.0.0.1", source.port, "c1", max_unacked=3) as client,
    ):
        for i in range(3):
            await client.send(b"%d" % i)
        with anyio.move_on_after(0.2) as waited:
            await client.send(b"fourth")
        assert waited.cancelled_caught
        assert client.next_seq == 4  # the cancelled send took no number
        await ctx.wait_for_records(3)
        ctx.complete()
        with anyio.fail_after(5):
            assert await client.send(b"fourth") == 4
        await ctx.wait_for_records(4)
        ctx.complete()
        await client.flush(timeout=5)
    assert [r.offset for r in ctx.records] == [1, 2, 3, 4]


async def test_a_new_client_continues_after_what_the_server_has() -> None:
    ctx = FakeContext(acks={"c1": 7})
    source = TcpSource()
    async with running(source, ctx), TcpClient("127.0.0.1", source.port, "c1") as client:
        assert client.resumed_at == 7
        assert await client.send(b"next") == 8
    assert [r.offset for r in ctx.records] == [8]


async def test_a_given_start_seq_skips_lines_the_server_has_as_durable() -> None:
    ctx = FakeContext(acks={"c1": 5})
    async with running(TcpSource(), ctx) as port:
        async with TcpClient("127.0.0.1", port, "c1", start_seq=1) as client:
            for i in range(1, 9):
                assert await client.send(b"%d" % i) == i
        assert (client.sent, client.skipped, client.acked) == (3, 5, 8)
    assert [r.offset for r in ctx.records] == [6, 7, 8]


async def test_an_unreachable_server_fails_within_the_connect_timeout() -> None:
    port = free_port()
    started = anyio.current_time()
    with pytest.raises(UnreachableError, match=rf"127\.0\.0\.1:{port} within 0\.3 s"):
        async with TcpClient("127.0.0.1", port, "c1", connect_timeout=0.3):
            pass
    assert anyio.current_time() - started < 3


async def test_a_refused_line_fails_the_client_with_the_servers_reason() -> None:
    ctx = FakeContext()
    async with running(TcpSource(max_line=10), ctx) as port:
        client = TcpClient("127.0.0.1", port, "c1")

        async def send_both() -> None:
            async with client:
                await client.send(b"short")
                await client.send(b"much too long for the server")

        with pytest.raises(RejectedError, match=r"line too long \(max 10 bytes\)"):
            await send_both()
        with pytest.raises(RejectedError):
            await client.send(b"more")
        assert client.acked == 1
    assert [r.value for r in ctx.records] == [b"short"]


async def test_a_closed_client_refuses_to_send() -> None:
    ctx = FakeContext(delay=None)
    async with running(TcpSource(), ctx) as port:
        async with TcpClient("127.0.0.1", port, "c1") as client:
            await client.send(b"never acked")
            await client.aclose()
            with pytest.raises(anyio.ClosedResourceError, match="1 lines unacknowledged"):
                await client.send(b"more")
        with pytest.raises(anyio.ClosedResourceError):
            await client.flush()


def test_bad_client_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="client id"):
        TcpClient("127.0.0.1", 1, "has space")
    with pytest.raises(ConfigError, match="max_unacked"):
        TcpClient("127.0.0.1", 1, "c1", max_unacked=0)
    with pytest.raises(ConfigError, match="start_seq"):
        TcpClient("127.0.0.1", 1, "c1", start_seq=0)


async def _serve(
    source: TcpSource,
    ctx: FakeContext,
    scope: anyio.CancelScope,
    stopped: anyio.Event,
    *,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    try:
        with scope:
            await source.run(ctx, task_status=task_status)
    finally:
        stopped.set()


def payload(i: int) -> bytes:
    return b"payload %-190d" % i


@pytest.mark.parametrize("stop", ["crash", "graceful"])
async def test_after_a_server_restart_the_client_resends_and_every_line_is_stored_once(
    stop: str,
) -> None:
    total = 3000
    # In a crash, the first stores are durable but not yet acknowledged and
    # the rest are lost; in a graceful stop, everything stored is made durable.
    first_run = FakeContext(delay=None if stop == "crash" else 0.005)
    client_done = anyio.Event()
    async with anyio.create_task_group() as tg:
        first_scope, first_stopped = anyio.CancelScope(), anyio.Event()
        port = await tg.start(_serve, TcpSource(), first_run, first_scope, first_stopped)
        client = TcpClient(
            "127.0.0.1",
            port,
            "c1",
            reconnect_backoff=0.02,
            max_backoff=0.1,
            connect_timeout=10,
            max_unacked=500,
        )

        async def produce() -> None:
            async with client:
                for i in range(1, total + 1):
                    await client.send(payload(i))
                    if i % 50 == 0:
                        await anyio.lowlevel.checkpoint()  # lines go out in several writes
                await client.flush(timeout=20)
            client_done.set()

        tg.start_soon(produce)
        # 400 lines of 200 bytes need two reads of 64 KiB or more: two stores.
        await first_run.wait_for_records(400, within=10)
        if stop == "crash":
            assert len(first_run.stores) >= 2
            first_run.complete(len(first_run.stores) // 2)
            first_run.crash()  # what is not durable now never will be
            first_scope.cancel()
            assert client.acked == 0
        else:
            first_run.stopping.set()
        with anyio.fail_after(5):
            await first_stopped.wait()
        assert not client_done.is_set()
        recovered = first_run.durable_acks()

        second_run = FakeContext(acks=recovered, delay=0.005)
        second = TcpSource(port=port)
        await tg.start(_serve, second, second_run, anyio.CancelScope(), anyio.Event())
        assert second.port == port
        with anyio.fail_after(20):
            await client_done.wait()
        second_run.stopping.set()

    durable = first_run.durable_records() + second_run.durable_records()
    assert Counter(r.offset for r in durable) == Counter(range(1, total + 1))
    assert all(r.value == payload(r.offset) for r in durable)
    # The client resumed after what the server had recovered as durable.
    assert 0 < recovered["c1"] < total
    assert min(r.offset for r in second_run.records) == recovered["c1"] + 1
    assert client.acked == total


async def test_a_server_that_closes_before_answering_the_hello_is_tried_again() -> None:
    """A worker killed (or stopping) right after accepting must not end the client."""
    port = free_port()
    hangups = 0
    hung_up_enough = anyio.Event()
    client_done = anyio.Event()
    ctx = FakeContext()

    async def hanging_up_server(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        nonlocal hangups
        async with await anyio.create_tcp_listener(
            local_host="127.0.0.1", local_port=port
        ) as listener:
            task_status.started()
            while hangups < 3:
                async with await listener.listeners[0].accept() as stream:
                    await stream.receive()  # the hello
                    await stream.send(b"@res")  # half an answer, then gone
                hangups += 1
        hung_up_enough.set()

    async def real_server() -> None:
        await hung_up_enough.wait()
        async with running(TcpSource(port=port), ctx):
            await client_done.wait()

    async with anyio.create_task_group() as tg:
        await tg.start(hanging_up_server)
        tg.start_soon(real_server)
        with anyio.fail_after(20):
            async with TcpClient(
                "127.0.0.1", port, "c1", reconnect_backoff=0.01, max_backoff=0.05
            ) as client:
                for i in range(1, 6):
                    await client.send(b"line %d" % i)
                await client.flush()
                assert client.acked == 5
        client_done.set()
    assert hangups == 3
    assert [r.offset for r in ctx.durable_records()] == [1, 2, 3, 4, 5]
