"""TcpSource's line protocol as pure state machines: bytes in, what to do out.

The protocol is specified in the docstring of :mod:`streamlet.sources.tcp`.
This module is that specification as code, apart from all I/O: no sockets,
no asyncio, no clock (in the manner of h11). What a connection's bytes mean
-- framing, the choice of mode, numbered lines, refusals and their messages
-- is decided here, where a test can feed it any bytes split at any point
and read the answer at once (``tests/sources/test_tcp_protocol.py``, and
``tests/sources/test_tcp_fuzz.py`` against a reference model). The socket
code (:class:`~streamlet.sources.tcp.TcpSource`,
:class:`~streamlet.tcp.TcpClient`) only moves bytes, waits for stores and
clocks, and does what the events say.

Server side:

* :class:`ServerConnection`: one connection. :meth:`~ServerConnection.receive_data`
  and :meth:`~ServerConnection.receive_eof` return events: :class:`PlainMode`,
  :class:`Hello`, :class:`PlainLines`, :class:`NumberedLines`,
  :class:`AckWhenDurable`, :class:`Refuse`, :class:`End`.
* :class:`ClientState`: the duplicate filter and ack bookkeeping of one
  client id, shared by its connections (a reconnect may overlap the old
  connection), generic in the driver's handle on a store.

Client side:

* :class:`Outbox`: a numbered client's lines: numbering, what is kept until
  acknowledged, what to write (again) on the current connection.
* :func:`parse_server_line`: what a server line says.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

__all__ = [
    "MAX_CLIENT_ID",
    "MAX_SEQ",
    "PLAIN_REFUSED",
    "AckWhenDurable",
    "ClientState",
    "End",
    "Event",
    "Hello",
    "NumberedLines",
    "Outbox",
    "PlainLines",
    "PlainMode",
    "Refuse",
    "ServerConnection",
    "ServerLine",
    "ack_line",
    "busy_line",
    "check_client_id",
    "error_line",
    "parse_numbered",
    "parse_server_line",
    "resume_line",
    "take_lines",
]

MAX_CLIENT_ID = 128
"""Longest client id, in bytes."""
MAX_SEQ = 2**63 - 1
"""Largest sequence number: the largest record offset."""
_MAX_SEQ_DIGITS = 19
_AT = ord("@")
PLAIN_REFUSED = (
    "plain clients are refused: this TcpSource takes numbered clients only, whose lines are"
    " acknowledged once durable; send '@hello <client-id>' first and number the lines"
    " (streamlet send, streamlet.tcp.TcpClient)"
)


def check_client_id(client_id: str) -> str:
    """Return ``client_id`` if the protocol allows it.

    Raises:
        ValueError: it is empty, longer than :data:`MAX_CLIENT_ID`, or holds
            a character outside printable ASCII without space.
    """
    if not 1 <= len(client_id) <= MAX_CLIENT_ID or not all("!" <= ch <= "~" for ch in client_id):
        raise ValueError(
            f"client id {client_id!r} is not 1 to {MAX_CLIENT_ID} printable ASCII characters"
            " without spaces (for example host-7.orders)"
        )
    return client_id


def _preview(line: bytes) -> str:
    """A short, escaped rendering of client bytes, safe to put in a one-line message."""
    shown = ascii(line[:40])
    return shown + ("..." if len(line) > 40 else "")


# -- server lines -------------------------------------------------------------


def resume_line(durable: int) -> bytes:
    """``@resume <n>``: the answer to a hello (without the newline)."""
    return b"@resume %d" % durable


def ack_line(seq: int) -> bytes:
    """``@ack <n>``: every line of the client up to ``seq`` is durable."""
    return b"@ack %d" % seq


def error_line(message: str) -> bytes:
    """``@error <text>``: the last line before the server closes a connection it refused."""
    return b"@error " + message.encode("ascii", "backslashreplace")


def busy_line(max_connections: int) -> bytes:
    """``@busy <text>``: the server has ``max_connections`` connections already."""
    return b"@busy too many connections (max %d); try again later" % max_connections


# -- framing and numbered lines -----------------------------------------------


def take_lines(buf: bytearray, scan_from: int, max_line: int) -> tuple[list[bytes], bool]:
    """Remove the complete lines from ``buf``; also say whether a line is too long.

    ``scan_from`` is where new bytes begin (the bytes before it hold no
    ``\\n``). Lines are returned without their ``\\n`` and ``\\r``, up to
    (not including) the first one over ``max_line``; a partial line over
    ``max_line`` is too long too, so the buffer never holds much more than
    ``max_line`` bytes.
    """
    end = buf.rfind(b"\n", scan_from)
    if end < 0:
        return [], len(buf) > max_line
    raw = bytes(buf[:end]).split(b"\n")
    del buf[: end + 1]
    lines: list[bytes] = []
    for line in raw:
        if len(line) > max_line:
            return lines, True
        lines.append(line[:-1] if line.endswith(b"\r") else line)
    return lines, len(buf) > max_line


def parse_numbered(line: bytes) -> tuple[int, bytes] | None:
    """Split ``<seq> <payload>``; None if the line does not start with a valid sequence number."""
    space = line.find(b" ")
    digits = line if space < 0 else line[:space]
    if 1 <= len(digits) <= _MAX_SEQ_DIGITS and digits.isdigit():
        seq = int(digits)
        if 1 <= seq <= MAX_SEQ:
            return seq, b"" if space < 0 else line[space + 1 :]
    return None


def _malformed(line: bytes) -> str:
    return (
        f"malformed line {_preview(line)}: expected '<seq> <payload>' with seq a decimal"
        f" number from 1 to {MAX_SEQ}; fix the client's line format"
    )


# -- server connection events -------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlainMode:
    """The connection is plain: its lines are at-most-once and get no answer."""


@dataclass(frozen=True, slots=True)
class Hello:
    """The connection is numbered, for ``client_id``; answer with :func:`resume_line`.

    The driver looks up (or creates) the client's :class:`ClientState`, takes
    the id over from an older connection, and sends ``@resume`` before it
    handles the events that follow.
    """

    client_id: str


@dataclass(frozen=True, slots=True)
class PlainLines:
    """Lines of a plain connection, read together: store them as unkeyed records (offset -1)."""

    lines: list[bytes]


@dataclass(frozen=True, slots=True)
class NumberedLines:
    """Lines ``(seq, payload)`` of a numbered connection, read together, seq increasing.

    Duplicates are still among them: the driver passes them through the
    client's :meth:`ClientState.fresh` (under its lock, since two connections
    of one id may overlap), stores the fresh ones and notes the store with
    :meth:`ClientState.stored_through`.
    """

    lines: list[tuple[int, bytes]]


@dataclass(frozen=True, slots=True)
class AckWhenDurable:
    """Send :func:`ack_line` ``(seq)`` once every line of the client up to ``seq`` is durable.

    One per read that held numbered lines; acks go out in this order.
    """

    seq: int


@dataclass(frozen=True, slots=True)
class Refuse:
    """Send :func:`error_line` ``(message)`` (after the acks owed) and close the connection.

    The connection reads nothing more: later bytes are ignored.
    """

    message: str


@dataclass(frozen=True, slots=True)
class End:
    """The client ended the connection; ``unfinished`` bytes of a last line were dropped."""

    unfinished: int


Event = PlainMode | Hello | PlainLines | NumberedLines | AckWhenDurable | Refuse | End

Mode = Literal["first", "plain", "numbered", "closed"]


class ServerConnection:
    """The server's side of one connection: bytes in, :data:`Event` lists out.

    Feed every chunk read to :meth:`receive_data` and the end of the stream
    to :meth:`receive_eof`; handle the events returned in order. Chunks may
    split lines anywhere. The lines of one chunk come out as one
    :class:`PlainLines` or :class:`NumberedLines` (one store per read).

    Args:
        max_line: the most bytes a line may hold before its ``\\n``.
        allow_plain: whether plain clients are served.
        hello_timeout: the driver's limit for the first line, in seconds;
            only quoted in the refusal of :meth:`hello_timed_out`.
    """

    def __init__(self, *, max_line: int, allow_plain: bool, hello_timeout: float | None) -> None:
        self.max_line = max_line
        self.allow_plain = allow_plain
        self.hello_timeout = hello_timeout
        self.client_id: str | None = None
        """The id said in ``@hello``, once numbered."""
        self._mode: Mode = "first"
        self._buf = bytearray()
        self._scan_from = 0
        self._last = 0  # highest seq of this connection: seqs must increase within it

    @property
    def mode(self) -> Mode:
        """``first`` until the first line chose the mode, ``closed`` after a refusal or the end."""
        return self._mode

    @property
    def awaiting_hello(self) -> bool:
        """Whether the first line must still complete within ``hello_timeout``.

        It need not once the connection is plain by its first byte (not
        ``@``): a person typing into ``nc`` may be slow.
        """
        return self._mode == "first" and not (self._buf and self._buf[0] != _AT)

    def receive_data(self, data: bytes) -> list[Event]:
        """What the bytes ``data``, read after those before, mean."""
        if self._mode == "closed":
            return []
        self._buf += data
        if self._mode == "first":
            return self._first()
        if self._mode == "plain":
            return self._plain()
        return self._numbered()

    def receive_eof(self) -> list[Event]:
        """The connection ended (or broke): bytes after the last ``\\n`` are dropped."""
        if self._mode == "closed":
            return []
        self._mode = "closed"
        unfinished = len(self._buf)
        self._buf = bytearray()
        return [End(unfinished)]

    def hello_timed_out(self) -> Refuse:
        """The first line did not complete within ``hello_timeout``: the refusal to send."""
        return self._refuse(
            f"no complete first line within {self.hello_timeout} s; a numbered"
            " client sends '@hello <client-id>' at once"
        )

    def taken_over(self) -> Refuse:
        """Another connection said ``@hello`` with this id: the refusal to send after the acks."""
        return self._refuse(
            f"another connection said '@hello {self.client_id}'; it is served instead of"
            " this one (a client id must be used by one client at a time)"
        )

    def _refuse(self, message: str) -> Refuse:
        self._mode = "closed"
        self._buf = bytearray()
        return Refuse(message)

    def _too_long(self) -> Refuse:
        return self._refuse(
            f"line too long (max {self.max_line} bytes); split the record or raise"
            " TcpSource(max_line=...)"
        )

    def _first(self) -> list[Event]:
        """The first line chooses the mode; a refused plain client learns it at its first byte."""
        buf = self._buf
        if buf and buf[0] != _AT and not self.allow_plain:
            # Refused at the first byte: a person typing into nc learns it
            # before typing a whole line.
            return [self._refuse(PLAIN_REFUSED)]
        newline = buf.find(b"\n", self._scan_from)
        if newline < 0:
            if len(buf) > self.max_line:
                return [self._too_long()]
            self._scan_from = len(buf)
            return []
        if newline > self.max_line:
            return [self._too_long()]
        first = bytes(buf[:newline])
        first = first[:-1] if first.endswith(b"\r") else first
        self._scan_from = 0
        if not first.startswith(b"@"):
            # The first line is the first record: it stays in the buffer.
            self._mode = "plain"
            return [PlainMode(), *self._plain()]
        del buf[: newline + 1]
        if first == b"@plain":
            if not self.allow_plain:
                return [self._refuse(PLAIN_REFUSED)]
            self._mode = "plain"
            return [PlainMode(), *self._plain()]
        if first.startswith(b"@hello "):
            try:
                client_id = check_client_id(first[len(b"@hello ") :].decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                return [
                    self._refuse(
                        f"bad hello {_preview(first)}: expected '@hello <client-id>' with an id"
                        f" of 1 to {MAX_CLIENT_ID} printable ASCII characters without spaces"
                    )
                ]
            self._mode = "numbered"
            self.client_id = client_id
            return [Hello(client_id), *self._numbered()]
        return [
            self._refuse(
                f"unknown command {_preview(first)}: a first line beginning with '@' must be"
                " '@hello <client-id>' or '@plain' (send '@plain' first to send such data)"
            )
        ]

    def _plain(self) -> list[Event]:
        lines, too_long = take_lines(self._buf, self._scan_from, self.max_line)
        events: list[Event] = [PlainLines(lines)] if lines else []
        if too_long:
            events.append(self._too_long())
        else:
            self._scan_from = len(self._buf)
        return events

    def _numbered(self) -> list[Event]:
        lines, too_long = take_lines(self._buf, self._scan_from, self.max_line)
        parsed: list[tuple[int, bytes]] = []
        refusal: str | None = None
        last = self._last
        parse = parse_numbered  # a local: this loop runs once per line
        for line in lines:
            item = parse(line)
            if item is None:
                refusal = _malformed(line)
                break
            seq = item[0]
            if seq <= last:
                refusal = (
                    f"sequence number {seq} after {last}: sequence numbers must increase"
                    " within a connection; resend unacknowledged lines in order"
                )
                break
            last = seq
            parsed.append(item)
        self._last = last
        events: list[Event] = []
        if parsed:
            events += [NumberedLines(parsed), AckWhenDurable(last)]
        if refusal is not None:
            events.append(self._refuse(refusal))
        elif too_long:
            events.append(self._too_long())
        else:
            self._scan_from = len(self._buf)
        return events


# -- one client id's duplicate filter and acks --------------------------------

H = TypeVar("H")


@dataclass(eq=False)
class ClientState(Generic[H]):
    """Duplicate-filter and ack state of one client id, shared by its connections.

    ``H`` is the driver's handle on a store (what it waits on for
    durability). Invariant: ``durable <= stored``; every seq in ``(durable,
    stored]`` that was stored belongs to a store in ``pending``, oldest
    first.
    """

    id: str
    durable: int
    stored: int
    pending: deque[tuple[int, H]] = field(default_factory=deque)

    def fresh(self, lines: Iterable[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        """The lines not stored yet; those at or below :attr:`stored` are duplicates."""
        stored = self.stored
        return [(s, p) for s, p in lines if s > stored]

    def stored_through(self, seq: int, handle: H) -> None:
        """The fresh lines up to ``seq`` were stored; ``handle`` says when they are durable."""
        self.pending.append((seq, handle))
        self.stored = seq

    def blocking(self, seq: int) -> tuple[int, H] | None:
        """The oldest store to wait for before acking ``seq``; None: ``seq`` may be acked.

        Stores are waited for in the order they were made, so that an ack
        for ``seq`` never runs ahead of an older store still in flight.
        """
        if self.durable < seq and self.pending:
            return self.pending[0]
        return None

    def settle(self, entry: tuple[int, H]) -> None:
        """The store ``entry`` (from :meth:`blocking`) is durable."""
        # Two connections (old and new owner) may wait on the same entry,
        # and one handle may cover several entries (stores into one block).
        if self.pending and self.pending[0] is entry:
            self.pending.popleft()
        self.durable = max(self.durable, entry[0])


# -- client side ----------------------------------------------------------------


class Outbox:
    """A numbered client's lines: their numbers, which are kept, which to write.

    Lines are kept from :meth:`add` until acknowledged (:meth:`ack`); after a
    reconnect :meth:`rewind` makes every kept line due again, in order, and
    the server's duplicate filter drops those it already stored.

    Args:
        start_seq: the number of the first line; None continues after the
            first ``@resume`` (:meth:`resumed`).
    """

    def __init__(self, start_seq: int | None = None) -> None:
        self._start_seq = start_seq
        self.next_seq = start_seq or 1
        """The sequence number the next :meth:`add` gets."""
        self.acked = 0
        """The highest sequence number acknowledged (or resumed at)."""
        self.resumed_at = 0
        """The ``@resume`` of the first connection."""
        self.sent = 0
        """Lines added and kept for the server."""
        self.skipped = 0
        """Lines added that the server already had as durable."""
        # Invariant: unacked holds the lines after acked, oldest first, with
        # increasing sequence numbers; _due is the part of it not yet
        # written on the current connection.
        self.unacked: deque[tuple[int, bytes]] = deque()
        self._due: deque[tuple[int, bytes]] = deque()

    def resumed(self, resume: int) -> None:
        """The first connection's ``@resume``: where numbering continues unless ``start_seq``."""
        self.resumed_at = resume
        if self._start_seq is None:
            self.next_seq = resume + 1
        self.ack(resume)

    def add(self, payload: bytes) -> tuple[int, bool]:
        """Number ``payload``; return its seq and whether it is kept (not already durable)."""
        seq = self.next_seq
        self.next_seq += 1
        if seq <= self.acked:
            self.skipped += 1
            return seq, False
        self.sent += 1
        line = (seq, payload)
        self.unacked.append(line)
        self._due.append(line)
        return seq, True

    def ack(self, seq: int) -> bool:
        """Lines up to ``seq`` are durable; True if that acknowledged something new."""
        if seq <= self.acked:
            return False
        self.acked = seq
        unacked = self.unacked
        while unacked and unacked[0][0] <= seq:
            unacked.popleft()
        due = self._due
        while due and due[0][0] <= seq:
            due.popleft()
        return True

    def rewind(self) -> None:
        """A new connection: every line not acknowledged is to be written again."""
        self._due = deque(self.unacked)

    def take(self, max_bytes: int) -> bytes:
        """The next lines to write, about ``max_bytes`` of them (at least one); b"" if none."""
        due = self._due
        parts: list[bytes] = []
        size = 0
        while due and size < max_bytes:
            seq, payload = due.popleft()
            part = b"%d %s\n" % (seq, payload)
            parts.append(part)
            size += len(part)
        return b"".join(parts)


@dataclass(frozen=True, slots=True)
class ServerLine:
    """What a line from the server says (its ``\\n`` and ``\\r`` removed).

    ``kind``: ``resume`` and ``ack`` (with ``number``), ``error`` and
    ``busy`` (with ``text``), ``malformed-ack`` (``@ack`` without a valid
    number), ``command`` (another line beginning with ``@``: left for later
    protocol versions), ``unexpected`` (anything else).
    """

    kind: Literal["resume", "ack", "error", "busy", "malformed-ack", "command", "unexpected"]
    number: int = 0
    text: str = ""


def _number(line: bytes, prefix: bytes) -> int | None:
    digits = line[len(prefix) :]
    if digits.isdigit() and len(digits) <= _MAX_SEQ_DIGITS:
        return int(digits)
    return None


def _text(line: bytes, prefix: bytes) -> str:
    return line[len(prefix) :].strip().decode("ascii", "backslashreplace")


def parse_server_line(line: bytes) -> ServerLine:
    """Classify a server line for a client."""
    if line.startswith(b"@ack "):
        seq = _number(line, b"@ack ")
        return ServerLine("malformed-ack") if seq is None else ServerLine("ack", seq)
    if line.startswith(b"@resume "):
        resume = _number(line, b"@resume ")
        if resume is not None:
            return ServerLine("resume", resume)
    if line.startswith(b"@error"):
        return ServerLine("error", text=_text(line, b"@error"))
    if line.startswith(b"@busy"):
        return ServerLine("busy", text=_text(line, b"@busy"))
    return ServerLine("command" if line.startswith(b"@") else "unexpected")
