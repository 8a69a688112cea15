"""Arbitrary bytes into TcpSource: never a crash, never a hang, always what the protocol says.

Each example sends bytes over a real socket, in pieces, to a fresh server,
then half-closes. The server must close the connection promptly (no hang),
keep serving a well-behaved client afterwards (no crash), and have stored
and answered exactly what a small reference model of the protocol (the
module docstring of :mod:`streamlet.sources.tcp`) predicts.
"""

from __future__ import annotations

import itertools
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamlet.records import Record
from streamlet.sources import TcpSource
from tests.sources.support import FakeContext

MAX_LINE = 48


@dataclass
class Expected:
    """What the protocol says one connection's bytes lead to."""

    records: list[tuple[bytes, bytes | None, int]] = field(default_factory=list)
    numbered: bool = False
    last_ack: int | None = None
    error: bool = False


def model(data: bytes, max_line: int = MAX_LINE) -> Expected:
    """The reference: a direct reading of the protocol, for one connection to a fresh server."""
    out = Expected()
    complete, _, tail = data.rpartition(b"\n")
    lines = complete.split(b"\n") if b"\n" in data else []
    too_long_at = next((i for i, line in enumerate(lines) if len(line) > max_line), None)
    if too_long_at is not None:
        lines = lines[:too_long_at]
    tail_too_long = too_long_at is None and len(tail) > max_line
    if too_long_at is not None or tail_too_long:
        out.error = True
    if not lines:
        return out
    first = lines[0].removesuffix(b"\r")
    body = [line.removesuffix(b"\r") for line in lines]
    if first.startswith(b"@"):
        body = body[1:]
        if first == b"@plain":
            pass
        elif first.startswith(b"@hello "):
            client_id = first[len(b"@hello ") :]
            if not (1 <= len(client_id) <= 128 and all(0x21 <= b <= 0x7E for b in client_id)):
                out.error = True
                return out
            out.numbered = True
            return _numbered(out, client_id, body)
        else:
            out.error = True
            return out
    out.records = [(line, None, -1) for line in body]
    return out


def _numbered(out: Expected, client_id: bytes, body: list[bytes]) -> Expected:
    last = 0
    for line in body:
        digits, space, payload = line.partition(b" ")
        if not (
            1 <= len(digits) <= 19
            and digits.isdigit()
            and 1 <= int(digits) <= 2**63 - 1
            and int(digits) > last
        ):
            out.error = True
            break
        last = int(digits)
        out.records.append((payload if space else b"", client_id, last))
    out.last_ack = last or None
    return out


@dataclass
class Server:
    portal: BlockingPortal
    source: TcpSource
    context: FakeContext
    port: int


@pytest.fixture(scope="module")
def portal() -> Iterator[BlockingPortal]:
    with start_blocking_portal() as portal:
        yield portal


def start(portal: BlockingPortal) -> tuple[Server, object]:
    context = portal.call(lambda: FakeContext(delay=0.0))
    source = TcpSource(max_line=MAX_LINE, hello_timeout=5)
    future, port = portal.start_task(source.run, context)
    return Server(portal, source, context, port), future


def exchange(port: int, pieces: list[bytes], *, timeout: float = 5.0) -> list[bytes]:
    """Send ``pieces``, half-close, read every line until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            for piece in pieces:
                sock.sendall(piece)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server refused something and closed; its answer is still readable
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise AssertionError(f"the server did not close within {timeout} s") from None
            if not chunk:
                break
            received += chunk
    assert received == b"" or received.endswith(b"\n"), received
    return received.split(b"\n")[:-1]


TOKENS = st.one_of(
    st.binary(max_size=24),
    st.sampled_from(
        [
            b"@hello c1\n",
            b"@hello \n",
            b"@hello a b\n",
            b"@plain\n",
            b"@\n",
            b"\n",
            b"\r\n",
            b"\r",
            b" ",
            b"@",
            b"0 z\n",
            b"3\n",
            b"9223372036854775807 max\n",
            b"9223372036854775808 over\n",
            b"x" * (MAX_LINE + 1),
            b"y" * MAX_LINE + b"\n",
        ]
    ),
    st.integers(1, 40).map(lambda n: b"%d p%d\n" % (n, n)),
    # A run of increasing numbers: valid numbered lines, with gaps.
    st.lists(st.integers(1, 60), max_size=8).map(
        lambda ns: b"".join(b"%d v%d\n" % (n, n) for n in sorted(set(ns)))
    ),
)


@st.composite
def connections(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    opening = draw(st.sampled_from([b"", b"@hello c1\n", b"@hello c1\r\n", b"@plain\n"]))
    data = opening + b"".join(draw(st.lists(TOKENS, max_size=24)))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    bounds = [0, *cuts, len(data)]
    return data, [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=connections())
def test_arbitrary_bytes_get_the_protocols_answer_and_never_crash_or_hang(
    portal: BlockingPortal, case: tuple[bytes, list[bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    data, pieces = case
    expected = model(data)
    server, future = start(portal)
    caplog.clear()
    try:
        with caplog.at_level(logging.WARNING, logger="streamlet"):
            lines = exchange(server.port, pieces)
            # The server still serves a well-behaved client.
            assert exchange(server.port, [b"@hello healthy\n1 ok\n"]) == [
                b"@resume 0",
                b"@ack 1",
            ]
    finally:
        portal.call(server.context.stopping.set)
        future.result(timeout=10)  # type: ignore[attr-defined]
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []

    stored = [
        (r.value, r.key, r.offset)
        for r in server.context.records
        if r.key != b"healthy"  # the health check's own record
    ]
    assert stored == expected.records
    assert all(isinstance(r, Record) and r.source == "tcp" for r in server.context.records)
    if expected.numbered:
        assert lines[0] == b"@resume 0"
        acks = [int(line.split()[1]) for line in lines if line.startswith(b"@ack ")]
        assert acks == sorted(set(acks))
        assert (acks[-1] if acks else None) == expected.last_ack
    errors = [line for line in lines if line.startswith(b"@error ")]
    assert len(errors) == (1 if expected.error else 0), lines
    if errors:
        assert lines[-1] == errors[0]
    for line in lines:
        assert line.split(b" ")[0] in {b"@resume", b"@ack", b"@error"}, line
