"""``streamlet send`` as a user runs it: a subprocess against a TcpSource served by the test."""

from __future__ import annotations

import os
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
    ],
)
async def test_bad_arguments_exit_2(args: list[str], message: str) -> None:
    code, _out, err = await streamlet_send(*args)
    assert code == 2
    assert message in err
