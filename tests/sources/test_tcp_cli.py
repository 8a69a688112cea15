"""``streamlet send`` as a user runs it: a subprocess against a TcpSource served by the test."""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

import anyio
import pytest

from streamlet.sources import TcpSource
from tests.sources.support import FakeContext, running


async def streamlet_send(*args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    result = await anyio.run_process(
        [sys.executable, "-m", "streamlet", "send", *args],
        input=stdin,
        check=False,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_send_delivers_each_line_once_and_a_resend_skips_what_is_durable(
    tmp_path: Path,
) -> None:
    path = tmp_path / "lines.txt"
    lines = [f"line {i}" for i in range(1, 41)]
    lines[9] = ""  # an empty line is a record too
    path.write_bytes(("\n".join(lines[:20]) + "\r\n" + "\n".join(lines[20:]) + "\n").encode())
    ctx = FakeContext(delay=0.01)
    async with running(TcpSource(), ctx) as port:
        code, out, err = await streamlet_send("--port", str(port), "--client-id", "f1", str(path))
        assert code == 0, err
        assert "40 lines: 40 sent, 0 skipped as already durable" in out
        assert "acknowledged through seq 40" in out

        code, out, err = await streamlet_send("--port", str(port), "--client-id", "f1", str(path))
        assert code == 0, err
        assert "40 lines: 0 sent, 40 skipped as already durable" in out

        with path.open("ab") as more:
            more.write(b"line 41\nline 42")  # the last line needs no newline
        code, out, err = await streamlet_send("--port", str(port), "--client-id", "f1", str(path))
        assert code == 0, err
        assert "42 lines: 2 sent, 40 skipped as already durable" in out
    assert [(r.offset, r.value.decode(), r.key) for r in ctx.durable_records()] == [
        (i, text, b"f1") for i, text in enumerate([*lines, "line 41", "line 42"], start=1)
    ]


async def test_without_a_client_id_the_same_file_is_not_sent_twice(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("a\nb\nc\n")
    ctx = FakeContext()
    async with running(TcpSource(), ctx) as port:
        code, first, err = await streamlet_send("--port", str(port), str(path))
        assert code == 0, err
        code, second, err = await streamlet_send("--port", str(port), str(path))
        assert code == 0, err
    assert "3 sent, 0 skipped" in first
    assert "0 sent, 3 skipped" in second
    assert [r.value for r in ctx.records] == [b"a", b"b", b"c"]


async def test_send_reads_stdin() -> None:
    ctx = FakeContext()
    async with running(TcpSource(), ctx) as port:
        code, out, err = await streamlet_send("--port", str(port), "-", stdin=b"x\ny\n")
    assert code == 0, err
    assert "2 lines: 2 sent" in out
    assert [r.value for r in ctx.records] == [b"x", b"y"]


async def test_stdin_is_sent_in_full_each_time_unless_a_client_id_is_given() -> None:
    ctx = FakeContext()
    async with running(TcpSource(), ctx) as port:
        for _ in range(2):
            code, out, err = await streamlet_send("--port", str(port), stdin=b"x\ny\n")
            assert code == 0, err
            assert "2 lines: 2 sent, 0 skipped" in out
        for _ in range(2):
            code, out, err = await streamlet_send(
                "--port", str(port), "--client-id", "in1", stdin=b"x\ny\n"
            )
            assert code == 0, err
    assert "2 lines: 0 sent, 2 skipped" in out
    assert (
        "2 line(s) skipped: the server already holds lines 1 to 2 durably for client id in1"
        " (sent before under this id); to send them again, give another --client-id" in out
    )
    assert [r.value for r in ctx.records] == [b"x", b"y"] * 3


async def test_a_named_pipe_is_sent_in_full_each_time(tmp_path: Path) -> None:
    fifo = tmp_path / "lines.fifo"
    os.mkfifo(fifo)
    ctx = FakeContext()
    async with running(TcpSource(), ctx) as port:
        for batch in (b"a\nb\n", b"c\nd\n"):
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.to_thread.run_sync, fifo.write_bytes, batch)
                code, out, err = await streamlet_send("--port", str(port), str(fifo))
            assert code == 0, err
            assert "2 lines: 2 sent, 0 skipped" in out
    assert [r.value for r in ctx.records] == [b"a", b"b", b"c", b"d"]


async def test_a_file_that_grows_from_one_line_resumes_at_every_size(tmp_path: Path) -> None:
    path = tmp_path / "grows.txt"
    ctx = FakeContext()
    lines: list[bytes] = []
    client_ids = set()
    async with running(TcpSource(), ctx) as port:
        for size in (1, 2, 3, 5, 9, 30, 100, 400):
            while len(lines) < size:
                lines.append(b"line %d " % (len(lines) + 1) + b"." * (len(lines) % 40))
            path.write_bytes(b"\n".join(lines) + b"\n")
            code, out, err = await streamlet_send("--port", str(port), str(path))
            assert code == 0, err
            client_ids.add(out.rsplit("(client id ", 1)[1].split(")")[0])
    assert len(client_ids) == 1
    assert [(r.offset, r.value) for r in ctx.records] == list(enumerate(lines, start=1))


async def test_a_file_whose_first_4_kib_hold_no_newline_resumes_when_it_grows(
    tmp_path: Path,
) -> None:
    path = tmp_path / "wide.txt"
    path.write_bytes(b"w" * 5000 + b"\nsecond\n")
    ctx = FakeContext()
    async with running(TcpSource(), ctx) as port:
        code, out, err = await streamlet_send("--port", str(port), str(path))
        assert code == 0, err
        with path.open("ab") as more:
            more.write(b"third\n")
        code, out, err = await streamlet_send("--port", str(port), str(path))
    assert code == 0, err
    assert "3 lines: 1 sent, 2 skipped" in out
    assert "same path, inode and first 4096 bytes" in out
    assert [r.value for r in ctx.records] == [b"w" * 5000, b"second", b"third"]


async def test_an_input_shorter_than_what_its_client_id_holds_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("only\n")
    ctx = FakeContext()
    async with running(TcpSource(), ctx) as port:
        code, _out, err = await streamlet_send(
            "--port", str(port), "--client-id", "c9", stdin=b"1\n2\n3\n"
        )
        assert code == 0, err
        code, out, err = await streamlet_send("--port", str(port), "--client-id", "c9", str(path))
    assert code == 1
    assert "1 lines: 0 sent, 1 skipped" in out
    assert (
        "error: the server already holds 3 lines durably for client id c9, more than the 1 of"
        in err
    )
    assert "none of its lines were sent" in err
    assert [r.value for r in ctx.records] == [b"1", b"2", b"3"]


async def test_an_unreachable_server_exits_1_with_what_to_check(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        path = tmp_path / "x.txt"
        path.write_text("x\n")
        started = anyio.current_time()
        code, _out, err = await streamlet_send("--port", str(port), "--timeout", "0.5", str(path))
    assert code == 1
    assert f"cannot reach the streamlet TcpSource at 127.0.0.1:{port} within 0.5 s" in err
    assert "check that the app is running" in err
    assert anyio.current_time() - started < 10


async def test_a_line_the_server_refuses_exits_1_with_its_reason(tmp_path: Path) -> None:
    path = tmp_path / "long.txt"
    path.write_text("ok\n" + "z" * 100 + "\n")
    ctx = FakeContext()
    async with running(TcpSource(max_line=50), ctx) as port:
        code, _out, err = await streamlet_send("--port", str(port), str(path))
    assert code == 1
    assert "refused: line too long (max 50 bytes)" in err
    assert [r.value for r in ctx.records] == [b"ok"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--client-id", "has space", "--port", "1"], "client id"),
        (["--port", "0"], "--port"),
        (["--port", "1", "/no/such/file"], "does not exist"),
        (["--port", "1", "--client-id", "c1", "--no-resume"], "--no-resume"),
    ],
)
async def test_bad_arguments_exit_2(args: list[str], message: str) -> None:
    code, _out, err = await streamlet_send(*args)
    assert code == 2
    assert message in err


async def test_an_interrupted_send_names_the_client_id_that_resumes_it(tmp_path: Path) -> None:
    path = tmp_path / "slow.txt"
    path.write_text("a\nb\n")
    ctx = FakeContext(delay=None)  # nothing becomes durable: the send waits for acks
    async with running(TcpSource(), ctx) as port:
        async with await anyio.open_process(
            [sys.executable, "-m", "streamlet", "send", "--port", str(port), "--no-resume", path]
        ) as process:
            await ctx.wait_for_records(2, within=20)
            process.send_signal(signal.SIGINT)
            with anyio.fail_after(10):
                code = await process.wait()
            assert process.stderr is not None
            err = b"".join([chunk async for chunk in process.stderr]).decode()
        ctx.complete()
    assert code == 130
    client_id = ctx.records[0].key.decode()  # type: ignore[union-attr]
    assert client_id.startswith("new-")
    assert f"run streamlet send again with --client-id {client_id} (and without --no-resume)" in err
