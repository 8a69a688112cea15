"""Arbitrary bytes into TcpSource: never a crash, never a hang, always what the protocol says.

A small reference model of the protocol (the module docstring of
:mod:`streamlet.sources.tcp`) says what one connection's bytes lead to. It
is checked twice:

* against the protocol's state machine itself
  (:mod:`streamlet.sources._tcp_protocol`), driven directly: thousands of
  examples, split at arbitrary byte boundaries, with and without plain
  clients; and, for reconnects, resends and restarts, a numbered client's
  :class:`Outbox` and the server's machine joined by a lossy simulated link,
  where every line must end up durable exactly once and no ack may run ahead
  of durability;
* over a real socket, in pieces, to a fresh server, then a half-close: the
  server must close the connection promptly (no hang), keep serving a
  well-behaved client afterwards (no crash), and have stored and answered
  what the model predicts.
"""

from __future__ import annotations

import itertools
import logging
import socket
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamlet.records import Record
from streamlet.sources import TcpSource
from streamlet.sources._tcp_protocol import (
    AckWhenDurable,
    ClientState,
    End,
    Event,
    Hello,
    NumberedLines,
    Outbox,
    PlainLines,
    PlainMode,
    Refuse,
    ServerConnection,
    ack_line,
    parse_server_line,
    resume_line,
)
from tests.sources.support import FakeContext

MAX_LINE = 48


@dataclass
class Expected:
    """What the protocol says one connection's bytes lead to."""

    records: list[tuple[bytes, bytes | None, int]] = field(default_factory=list)
    numbered: bool = False
    last_ack: int | None = None
    error: bool = False


def model(data: bytes, max_line: int = MAX_LINE, *, allow_plain: bool = True) -> Expected:
    """The reference: a direct reading of the protocol, for one connection to a fresh server."""
    out = Expected()
    if not allow_plain and data[:1] not in (b"", b"@"):
        out.error = True  # refused at the first byte
        return out
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
            if not allow_plain:
                out.error = True
                return out
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
            b"z" * (MAX_LINE + 1) + b"\n",
            b"1 " + b"w" * (MAX_LINE - 2) + b"\n",
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


# -- the state machine itself, without sockets ---------------------------------------


def run_machine(pieces: list[bytes], *, allow_plain: bool = True) -> Expected:
    """Feed ``pieces`` then the end to a :class:`ServerConnection`; read what it asks for.

    Stores go through a fresh :class:`ClientState` (a fresh server), as
    TcpSource does.
    """
    conn = ServerConnection(max_line=MAX_LINE, allow_plain=allow_plain, hello_timeout=5)
    events: list[Event] = [e for piece in pieces for e in conn.receive_data(piece)]
    events += conn.receive_eof()
    out = Expected()
    client: ClientState[None] | None = None
    acks: list[int] = []
    for i, event in enumerate(events):
        if isinstance(event, PlainMode | Hello):
            assert i == 0, events  # the mode is chosen once, first
        if isinstance(event, Refuse | End):
            assert i == len(events) - 1, events  # nothing after a refusal or the end
        if isinstance(event, Hello):
            out.numbered = True
            client = ClientState(event.client_id, 0, 0)
        elif isinstance(event, PlainLines):
            out.records += [(line, None, -1) for line in event.lines]
        elif isinstance(event, NumberedLines):
            assert client is not None
            key = client.id.encode("ascii")
            fresh = client.fresh(event.lines)
            out.records += [(payload, key, seq) for seq, payload in fresh]
            if fresh:
                client.stored_through(fresh[-1][0], None)
        elif isinstance(event, AckWhenDurable):
            acks.append(event.seq)
        elif isinstance(event, Refuse):
            out.error = True
    assert acks == sorted(set(acks))
    out.last_ack = acks[-1] if acks else None
    assert conn.mode == "closed"
    return out


@st.composite
def split_anywhere(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """A connection's bytes and the reads they arrive in: any split, down to single bytes."""
    data, _ = draw(connections())
    if data and draw(st.booleans()):
        cuts = sorted(set(draw(st.lists(st.integers(1, len(data)), max_size=len(data)))))
    else:
        cuts = list(range(1, len(data))) if draw(st.booleans()) else []
    bounds = [0, *cuts, len(data)]
    return data, [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@settings(max_examples=2000, deadline=None)
@given(case=split_anywhere(), allow_plain=st.booleans())
def test_the_state_machine_answers_what_the_model_says_for_any_split(
    case: tuple[bytes, list[bytes]], allow_plain: bool
) -> None:
    data, pieces = case
    got = run_machine(pieces, allow_plain=allow_plain)
    expected = model(data, allow_plain=allow_plain)
    assert got.records == expected.records
    assert got.numbered == expected.numbered
    assert got.last_ack == expected.last_ack
    assert got.error == expected.error
    # The same bytes in one read: splitting never changes the outcome.
    assert run_machine([data], allow_plain=allow_plain) == got


@dataclass(eq=False)
class Block:
    """A store's durability, as a data-WAL block would have it."""

    durable: bool = False
    lost: bool = False


class Link:
    """A numbered client's :class:`Outbox` and the server's machine, joined by a lossy link.

    The server side does what TcpSource's driver does with the events; the
    link loses what is in flight when the connection drops, and a crash
    loses the stores not yet durable and restarts the server from what is
    (the recovered acks).
    """

    def __init__(self) -> None:
        self.outbox = Outbox()
        self.stores: list[tuple[int, bytes, Block]] = []
        self.recovered = 0
        self.client: ClientState[Block] | None = None
        self.wire = bytearray()
        self.owed: deque[int] = deque()
        self.added = 0
        self.connect(first=True)

    def connect(self, *, first: bool = False) -> None:
        """Connect and hello; the client goes on from the ``@resume``, writing the rest again."""
        if self.client is None:
            self.client = ClientState("c1", self.recovered, self.recovered)
        self.conn = ServerConnection(max_line=MAX_LINE, allow_plain=False, hello_timeout=5)
        assert self.conn.receive_data(b"@hello c1\n") == [Hello("c1")]
        said = parse_server_line(resume_line(self.client.durable))
        assert said.kind == "resume"
        assert said.number >= self.outbox.acked  # durable lines are never forgotten
        if first:
            self.outbox.resumed(said.number)
        else:
            self.outbox.ack(said.number)
        self.outbox.rewind()
        self.wire = bytearray()
        self.owed = deque()

    def add(self, count: int) -> None:
        for _ in range(count):
            self.added += 1
            seq, kept = self.outbox.add(b"line-%d" % self.added)
            assert (seq, kept) == (self.added, True)

    def deliver(self, size: int) -> None:
        self.wire += self.outbox.take(1 << 16)
        chunk, self.wire = bytes(self.wire[:size]), self.wire[size:]
        if not chunk:
            return
        assert self.client is not None
        for event in self.conn.receive_data(chunk):
            assert not isinstance(event, Refuse), event
            if isinstance(event, NumberedLines):
                fresh = self.client.fresh(event.lines)
                if fresh:
                    block = Block()
                    self.stores += [(seq, payload, block) for seq, payload in fresh]
                    self.client.stored_through(fresh[-1][0], block)
            elif isinstance(event, AckWhenDurable):
                self.owed.append(event.seq)

    def make_durable(self, count: int) -> None:
        """The oldest ``count`` blocks not yet durable become durable (blocks are in order)."""
        for block in dict.fromkeys(b for _, _, b in self.stores if not (b.durable or b.lost)):
            if count <= 0:
                return
            block.durable = True
            count -= 1

    def send_acks(self) -> None:
        """The acker: acks in order, each once what it covers is durable."""
        client = self.client
        assert client is not None
        while self.owed:
            seq = self.owed[0]
            while (entry := client.blocking(seq)) is not None and entry[1].durable:
                client.settle(entry)
            if client.blocking(seq) is not None:
                return  # still waiting on a store
            self.owed.popleft()
            # Never ahead of durability: every stored line up to seq is durable.
            assert all(b.durable for s, _, b in self.stores if s <= seq and not b.lost)
            said = parse_server_line(ack_line(seq))
            self.outbox.ack(said.number)

    def drop(self) -> None:
        """The connection breaks: what is in flight is lost; the client reconnects."""
        self.conn.receive_eof()
        self.connect()

    def crash(self) -> None:
        """The server dies: stores not durable are lost; it restarts from the durable acks."""
        for _, _, block in self.stores:
            block.lost = block.lost or not block.durable
        durable = [s for s, _, b in self.stores if b.durable]
        self.recovered = max([self.recovered, *durable])
        self.client = None
        self.connect()

    def durable_lines(self) -> list[tuple[int, bytes]]:
        return [(s, p) for s, p, b in self.stores if b.durable]


STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 8)),
        st.tuples(st.just("deliver"), st.integers(1, 90)),
        st.tuples(st.just("durable"), st.integers(1, 3)),
        st.tuples(st.just("acks"), st.just(0)),
        st.tuples(st.just("drop"), st.just(0)),
        st.tuples(st.just("crash"), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=500, deadline=None)
@given(steps=STEPS)
def test_reconnects_resends_and_restarts_store_every_line_once_and_ack_only_durable_lines(
    steps: list[tuple[str, int]],
) -> None:
    link = Link()
    for step, n in steps:
        if step == "add":
            link.add(n)
        elif step == "deliver":
            link.deliver(n)
        elif step == "durable":
            link.make_durable(n)
        elif step == "acks":
            link.send_acks()
        elif step == "drop":
            link.drop()
        else:
            link.crash()
        durable = [s for s, _ in link.durable_lines()]
        assert durable == sorted(set(durable)), "a line durable twice"
    # Then the network heals: the client resends until everything is acked.
    for _ in range(3):
        link.drop()
        link.deliver(1 << 30)
        link.make_durable(1 << 30)
        link.send_acks()
        if not link.outbox.unacked:
            break
    assert not link.outbox.unacked
    assert link.outbox.acked == link.added
    assert link.durable_lines() == [(i, b"line-%d" % i) for i in range(1, link.added + 1)]
