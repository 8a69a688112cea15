"""TcpSource: newline-delimited records over TCP, acknowledged once durable.

A :class:`TcpSource` listens on ``host:port`` (127.0.0.1 unless told
otherwise) and stores each line a client sends as one
:class:`~streamlet.records.Record`. A client that numbers its lines has each
one acknowledged only once the block holding it is durable in the data WAL,
and may send again whatever was not acknowledged, after a reconnect or a
restart of either side: a duplicate filter keyed by (client id, sequence
number), whose state is logged with every block as the receiver's acks, keeps
a line sent twice from being stored twice. :class:`streamlet.tcp.TcpClient`
and ``streamlet send`` are the client side.

A plain client (``nc``, or anything that sends lines without ``@hello``)
gets no acknowledgement: its lines are at-most-once. The source says so in a
warning when it starts and in a log line per plain connection;
``TcpSource(allow_plain=False)`` refuses plain clients.

What the protocol below makes of a connection's bytes is decided by the pure
state machines of :mod:`streamlet.sources._tcp_protocol`, so that it can be
tested without sockets; this module is their driver: it reads and writes
sockets, keeps the clocks (``hello_timeout``, ``drain_timeout``), stores
lines, waits for durability and serves a client id's connections one at a
time.

Protocol, version 1
===================

Framing
    Both directions are lines: bytes ending in ``\\n`` (0x0A). One ``\\r``
    right before the ``\\n`` is removed (so ``\\r\\n`` works). A line from a
    client holds at most ``max_line`` bytes before its ``\\n`` (a ``\\r``
    counts). Bytes after the last ``\\n`` when a connection ends are an
    unfinished line and are discarded. Lines from the server are ASCII and
    begin with ``@``.

Mode
    The first line of a connection chooses its mode:

    - ``@hello <client-id>``: numbered mode (below). A client id is 1 to 128
      printable ASCII characters other than space (bytes 0x21 to 0x7E).
    - ``@plain``: plain mode; this line is not a record.
    - any other line beginning with ``@``: refused with ``@error`` (on the
      first line ``@`` introduces a command; send ``@plain`` first to send
      data that begins with ``@``).
    - any other line: plain mode, and this line is the first record.

    A source made with ``allow_plain=False`` takes numbered clients only: to
    ``@plain``, and as soon as the first byte of a connection is something
    other than ``@``, it answers ``@error plain clients are refused: ...``
    and closes the connection; nothing the connection sent is stored.

    Unless its first byte is something other than ``@`` and plain clients
    are allowed, the first line must be complete within ``hello_timeout``
    seconds of the connection opening (a person typing plain lines into
    ``nc`` may be slow; a numbered client that never says hello holds a
    connection for nothing).

Plain mode
    Every line is one record: value = the line, key = None, offset = -1,
    timestamp = when it was read. The server sends nothing back, except
    ``@error`` before it closes the connection. Delivery is at-most-once:
    lines read but not yet durable when the app crashes are lost, and the
    sender cannot tell which.

Numbered mode
    1. The server answers ``@resume <n>``: the highest sequence number of
       this client id that is already durable, 0 if none. A client sends its
       lines after ``n`` and may drop those up to ``n``.
    2. The client sends lines ``<seq> <payload>``: ``seq`` is 1 to 19 ASCII
       digits with a value from 1 to 2**63-1, then one space, then the
       payload (any bytes but ``\\n``, possibly empty; a line of just
       ``<seq>`` has an empty payload). Sequence numbers must increase
       within a connection; they need not be contiguous.
    3. The server answers ``@ack <seq>``: every line of this client id up to
       and including ``seq`` is durable. Acks are cumulative and increase;
       one ack may cover many lines. The server keeps reading while earlier
       lines are made durable, so a client should keep sending (up to a bound
       of its own) rather than wait for each ack.
    4. A line whose ``seq`` is at or below the highest this client id has
       stored (durable, or stored by this process and not yet durable) is a
       duplicate: it is not stored again, and it is acknowledged like any
       other line once the original is durable.

    Records: value = payload, key = the client id (ASCII bytes), offset =
    ``seq``, timestamp = when the line was read. Each store carries the ack
    ``{client id: highest seq stored}``; the app logs it with the block, and
    after a restart :attr:`ReceiverContext.acks` gives ``@resume`` its value
    and the duplicate filter its starting point. In between, the filter
    keeps per client id seen two numbers and the stores not yet durable.

    One client id is one sender: a second ``@hello`` with an id that has a
    connection takes it over. The older connection stops being read, gets
    the acks of what it stored, then ``@error`` and is closed. A client that
    reconnects after a network failure is thus served even if the server
    has not yet noticed that the old connection died.

Server messages
    ``@resume <n>`` and ``@ack <n>`` as above. ``@error <text>``: the
    request was refused, the text says why and what to do, and the server
    closes the connection; sending the same bytes again is refused again.
    In numbered mode the acks of lines before the refused one come first.
    ``@busy <text>``: the server has ``max_connections`` connections; it
    closes this one; try again later.

    Errors: a line longer than ``max_line`` (``@error line too long (max N
    bytes)``; nothing of that line is stored); a malformed numbered line or
    sequence numbers that do not increase; a bad or missing hello; an
    unknown command; a connection taken over by another with the same id;
    a plain client when plain clients are not allowed (``@error plain
    clients are refused: ...``).

Stopping
    On a graceful stop (:attr:`ReceiverContext.stopping`) the server stops
    accepting and reading, sends the acks of what it stored as it becomes
    durable (for at most ``drain_timeout`` seconds), then closes every
    connection; clients reconnect to the restarted app and send the rest.
    On cancellation every socket is closed at once.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import math
import time
from dataclasses import dataclass, field

import anyio
from anyio.abc import SocketAttribute, SocketListener, SocketStream, TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from anyio.streams.stapled import MultiListener

from streamlet.errors import ConfigError, StreamletError
from streamlet.records import Record
from streamlet.sources._tcp_protocol import (
    MAX_CLIENT_ID,
    MAX_SEQ,
    AckWhenDurable,
    ClientState,
    End,
    Event,
    Hello,
    NumberedLines,
    PlainLines,
    PlainMode,
    Refuse,
    ServerConnection,
    ack_line,
    busy_line,
    check_client_id,
    error_line,
    resume_line,
)
from streamlet.sources.receiver import Receiver, ReceiverContext, Stored

__all__ = [
    "MAX_CLIENT_ID",
    "MAX_SEQ",
    "TcpSource",
    "check_client_id",
]

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024
"""Bytes read from a socket at a time; the lines in one read are stored together."""
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 4 * 2**20
"""How long, and how much, a refused client may go on sending before its socket is closed."""
_ACK_QUEUE = 256
"""Reads whose acks may wait on durability before a connection stops reading (backpressure)."""


@dataclass(eq=False)
class _Client(ClientState[Stored]):
    """A client id's duplicate filter and acks, and what its connections share besides.

    ``lock`` orders the filter and the store between an old and a new
    connection of the id; ``owner`` is the connection that serves it.
    """

    lock: anyio.Lock = field(default_factory=anyio.Lock)
    owner: _Connection | None = None

    async def wait_durable(self, seq: int) -> None:
        """Return once every stored line of this client up to ``seq`` is durable."""
        while (entry := self.blocking(seq)) is not None:
            await entry[1].wait()
            self.settle(entry)


class _Connection:
    """One accepted socket and the means to stop reading from it."""

    def __init__(self, stream: SocketStream, peer: str, *, closing: bool) -> None:
        self.stream = stream
        self.peer = peer
        self.closing = closing
        self.taken_over = False
        self._receive_scope: anyio.CancelScope | None = None

    def stop_reading(self) -> None:
        """End the connection's reading at its next (or current) wait for bytes.

        Only the wait for bytes is cancelled, never a store in progress: a
        store cut short could leave the duplicate filter unsure whether its
        lines were queued.
        """
        self.closing = True
        if self._receive_scope is not None:
            self._receive_scope.cancel()

    async def receive(self, deadline: float = math.inf) -> bytes | None:
        """The next bytes, or None at end of stream, on a broken socket or once stopped.

        Raises:
            TimeoutError: ``deadline`` (anyio clock) passed first.
        """
        if self.closing:
            return None
        with anyio.CancelScope(deadline=deadline) as scope:
            self._receive_scope = scope
            try:
                return await self.stream.receive(_CHUNK)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return None
            finally:
                self._receive_scope = None
        if not self.closing:
            raise TimeoutError
        return None

    async def close_after(self, line: bytes) -> None:
        """Send a last line, then read and drop what the client still sends, briefly.

        Closing a socket with unread bytes in it makes the kernel send a
        reset, which can destroy the last line before the client reads it;
        half-closing and draining first lets ``@error`` arrive.
        """
        if not await self.reply(line):
            return
        with anyio.move_on_after(_LINGER_SECONDS):
            try:
                await self.stream.send_eof()
                dropped = 0
                while dropped < _LINGER_BYTES:
                    dropped += len(await self.stream.receive(_CHUNK))
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass

    async def reply(self, line: bytes) -> bool:
        """Send one server line; False if the client is gone."""
        try:
            await self.stream.send(line + b"\n")
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return False
        return True


class TcpSource(Receiver):
    """Receive newline-delimited records over TCP; see the module docstring for the protocol.

    Args:
        host: address to listen on. The default, 127.0.0.1, accepts only
            local clients; give ``"0.0.0.0"`` or an interface address to
            accept others (anyone who can connect can add records).
        port: TCP port; 0 picks a free one (read it from :attr:`port` or
            :meth:`wait_listening`).
        name: the receiver's name in the app.
        max_line: the most bytes a line may hold; a longer line is refused
            and its connection closed. Keep it below the data WAL's
            ``max_record_size``.
        max_connections: connections served at once; more are told ``@busy``
            and closed.
        hello_timeout: seconds a connection has to complete its first line
            (unless that line does not begin with ``@``); None: no limit.
        drain_timeout: on a graceful stop, seconds to wait for the acks of
            lines already stored before closing connections anyway.
        allow_plain: accept plain clients (no ``@hello``; ``nc`` is one),
            whose lines are at-most-once: not acknowledged, and lost if the
            worker dies before they are durable. False refuses them with
            ``@error``, so that every line stored was sent by a numbered
            client (``streamlet send``, :class:`streamlet.tcp.TcpClient`).

    Raises:
        ConfigError: a setting is out of range.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        name: str | None = None,
        max_line: int = 2**20,
        max_connections: int = 64,
        hello_timeout: float | None = 10.0,
        drain_timeout: float = 5.0,
        allow_plain: bool = True,
    ) -> None:
        super().__init__(name=name)
        if not host:
            raise ConfigError("TcpSource host must not be empty; 127.0.0.1 listens locally only")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConfigError(f"TcpSource port must be an integer from 0 to 65535, not {port!r}")
        if max_line < 1:
            raise ConfigError(f"TcpSource max_line must be >= 1 byte, not {max_line!r}")
        if max_connections < 1:
            raise ConfigError(f"TcpSource max_connections must be >= 1, not {max_connections!r}")
        if hello_timeout is not None and not hello_timeout > 0:
            raise ConfigError(
                f"TcpSource hello_timeout must be > 0 seconds or None, not {hello_timeout!r}"
            )
        if not drain_timeout >= 0:
            raise ConfigError(
                f"TcpSource drain_timeout must be >= 0 seconds, not {drain_timeout!r}"
            )
        self.host = host
        self.max_line = max_line
        self.max_connections = max_connections
        self.hello_timeout = hello_timeout
        self.drain_timeout = drain_timeout
        self.allow_plain = allow_plain
        self._port = port
        self._address: tuple[str, int] | None = None
        self._clients: dict[str, _Client] = {}
        self._connections: set[_Connection] = set()
        self._stopping = False
        self._listening = anyio.Event()

    @property
    def port(self) -> int:
        """The port listened on once :meth:`run` has bound it (0 before, for an ephemeral port)."""
        return self._port

    @property
    def address(self) -> tuple[str, int] | None:
        """The ``(ip, port)`` the listening socket is bound to; None before :meth:`run` binds."""
        return self._address

    async def wait_listening(self) -> int:
        """Wait until :meth:`run` accepts connections; return the port.

        For an app that serves a ``TcpSource(port=0)``: clients need the
        port the system chose.
        """
        await self._listening.wait()
        return self._port

    async def run(
        self,
        context: ReceiverContext,
        *,
        task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen and serve until ``context.stopping`` is set, then drain and return.

        With ``await task_group.start(source.run, context)`` the bound port
        is returned once the server accepts connections.

        Raises:
            ConfigError: the address cannot be listened on (in use, not
                local, not permitted).
        """
        self._clients = {}
        self._connections = set()
        self._stopping = False
        listener = await self._listen()
        try:
            async with listener:
                await self._serve_all(listener, context, task_status)
        finally:
            self._listening = anyio.Event()  # for a later run
        log.info("TcpSource %r stopped", context.name)

    async def _serve_all(
        self,
        listener: MultiListener[SocketStream],
        context: ReceiverContext,
        task_status: TaskStatus[int],
    ) -> None:
        ip, port = _address_of(listener.listeners[0], SocketAttribute.local_address)
        self._port = port
        self._address = (ip, port)
        log.info("TcpSource %r listening on %s:%d", context.name, self.host, self._port)
        if self.allow_plain:
            log.warning(
                "TcpSource %r accepts plain clients (no '@hello' line, e.g. nc): their lines"
                " are at-most-once, not acknowledged and lost if the worker dies before they"
                " are durable; numbered clients (streamlet send, TcpClient) are exactly-once;"
                " TcpSource(allow_plain=False) refuses plain clients",
                context.name,
            )
        if not all(_is_loopback(sub) for sub in listener.listeners):
            log.warning(
                "TcpSource %r listens on %s, beyond this machine: whoever can connect can add"
                " records (there is no authentication); give host='127.0.0.1' to listen locally",
                context.name,
                self.host,
            )
        async with anyio.create_task_group() as connections:
            async with anyio.create_task_group() as accepting:
                for sub in listener.listeners:
                    assert isinstance(sub, SocketListener)
                    accepting.start_soon(self._accept, sub, connections, context)
                accepting.start_soon(_cancel_when_set, context.stopping, accepting)
                task_status.started(self._port)
                self._listening.set()
            # Graceful stop: refuse new connections, stop reading, let acks drain.
            self._stopping = True
            await listener.aclose()
            for conn in list(self._connections):
                conn.stop_reading()
            connections.cancel_scope.deadline = anyio.current_time() + self.drain_timeout
        if connections.cancel_scope.cancelled_caught:
            log.warning(
                "TcpSource %r: acks still pending after %.1f s; closed the connections"
                " (clients resend what was not acknowledged)",
                context.name,
                self.drain_timeout,
            )

    async def _listen(self) -> MultiListener[SocketStream]:
        try:
            return await anyio.create_tcp_listener(local_host=self.host, local_port=self._port)
        except OSError as exc:
            where = f"{self.host}:{self._port}"
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"TcpSource cannot listen on {where}: the address is already in use;"
                    f" stop the process listening there (see `ss -ltnp 'sport = :{self._port}'`)"
                    " or give TcpSource another port (port=0 picks a free one)"
                ) from exc
            raise ConfigError(
                f"TcpSource cannot listen on {where}: {exc.strerror or exc};"
                " check the host is an address of this machine and the port is allowed"
            ) from exc

    async def _accept(
        self, listener: SocketListener, connections: TaskGroup, context: ReceiverContext
    ) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                # Out of file descriptors or a connection reset before accept:
                # the listener itself is fine, so pause rather than fail.
                log.warning("TcpSource %r: accept failed: %s; retrying", context.name, exc)
                await anyio.sleep(0.1)
                continue
            connections.start_soon(self._serve, stream, context)

    async def _serve(self, stream: SocketStream, context: ReceiverContext) -> None:
        try:
            ip, port = _address_of(stream, SocketAttribute.remote_address)
            peer = f"{ip}:{port}"
        except (OSError, TypeError, ValueError, anyio.TypedAttributeLookupError):
            peer = "?"
        conn = _Connection(stream, peer, closing=self._stopping)
        self._connections.add(conn)
        try:
            async with stream:
                if len(self._connections) > self.max_connections:
                    log.warning(
                        "TcpSource %r: refused %s: %d connections already",
                        context.name,
                        peer,
                        self.max_connections,
                    )
                    await conn.close_after(busy_line(self.max_connections))
                    return
                log.debug("TcpSource %r: connection from %s", context.name, peer)
                await self._converse(conn, context)
        except StreamletError as exc:
            # The app is stopping or its WAL failed: stores are refused and
            # nothing more can be acknowledged; the app itself reports why.
            log.info("TcpSource %r: closed %s: %s", context.name, peer, exc)
        except Exception:
            # A bug must not take the other connections down with this one.
            log.exception("TcpSource %r: connection from %s failed; closed it", context.name, peer)
        finally:
            self._connections.discard(conn)
            log.debug("TcpSource %r: closed connection from %s", context.name, peer)

    async def _converse(self, conn: _Connection, context: ReceiverContext) -> None:
        """Read until the first line chose the mode, then serve the connection in it."""
        proto = ServerConnection(
            max_line=self.max_line, allow_plain=self.allow_plain, hello_timeout=self.hello_timeout
        )
        deadline = (
            math.inf if self.hello_timeout is None else anyio.current_time() + self.hello_timeout
        )
        events: list[Event] = []
        while proto.mode == "first":
            try:
                chunk = await conn.receive(deadline if proto.awaiting_hello else math.inf)
            except TimeoutError:
                await self._refuse(conn, context, proto.hello_timed_out().message)
                return
            events = proto.receive_eof() if chunk is None else proto.receive_data(chunk)
        chosen, rest = events[0], events[1:]
        if isinstance(chosen, Refuse):
            await self._refuse(conn, context, chosen.message)
        elif isinstance(chosen, PlainMode):
            await self._plain(conn, proto, rest, context)
        elif isinstance(chosen, Hello):
            await self._numbered(conn, proto, chosen.client_id, rest, context)

    async def _refuse(self, conn: _Connection, context: ReceiverContext, message: str) -> None:
        log.info("TcpSource %r: refused %s: %s", context.name, conn.peer, message)
        await conn.close_after(error_line(message))

    async def _plain(
        self,
        conn: _Connection,
        proto: ServerConnection,
        events: list[Event],
        context: ReceiverContext,
    ) -> None:
        """Store every line; acknowledge nothing (at-most-once)."""
        name = context.name
        log.info(
            "TcpSource %r: plain client %s (no '@hello'): its lines are at-most-once, not"
            " acknowledged and lost if the worker dies before they are durable",
            name,
            conn.peer,
        )
        while True:
            for event in events:
                if isinstance(event, PlainLines):
                    now = time.time()
                    await context.store(
                        [Record(line, None, now, name, 0, -1) for line in event.lines]
                    )
                elif isinstance(event, Refuse):
                    await self._refuse(conn, context, event.message)
                    return
                elif isinstance(event, End):
                    if event.unfinished:
                        log.debug("TcpSource %r: dropped an unfinished last line", name)
                    return
            chunk = await conn.receive()
            events = proto.receive_eof() if chunk is None else proto.receive_data(chunk)

    async def _numbered(
        self,
        conn: _Connection,
        proto: ServerConnection,
        client_id: str,
        events: list[Event],
        context: ReceiverContext,
    ) -> None:
        """Serve a numbered client: store new lines, drop duplicates, ack once durable."""
        client = self._clients.get(client_id)
        if client is None:
            recovered = context.acks.get(client_id, 0)
            client = self._clients[client_id] = _Client(client_id, recovered, recovered)
        previous = client.owner
        client.owner = conn
        if previous is not None:
            log.info(
                "TcpSource %r: client %s reconnected from %s; closing its connection from %s",
                context.name,
                client_id,
                conn.peer,
                previous.peer,
            )
            previous.taken_over = True
            previous.stop_reading()
        try:
            if not await conn.reply(resume_line(client.durable)):
                return
            send_acks, receive_acks = anyio.create_memory_object_stream[int](_ACK_QUEUE)
            refusal: str | None = None
            failure: StreamletError | None = None
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._acker, conn, client, receive_acks, context)
                async with send_acks:
                    # Caught here so that it leaves the task group as itself.
                    try:
                        refusal = await self._read_numbered(
                            conn, proto, client, events, send_acks, context
                        )
                    except StreamletError as exc:
                        failure = exc
            # The acker has sent the acks of everything read before the end.
            if failure is not None:
                raise failure
            if conn.taken_over:
                refusal = proto.taken_over().message
            if refusal is not None:
                await self._refuse(conn, context, refusal)
        finally:
            if client.owner is conn:
                client.owner = None
                if (
                    client.stored == context.acks.get(client_id, 0)
                    and not client.pending
                    and self._clients.get(client_id) is client
                ):
                    # Nothing stored since the start: a new entry would be the
                    # same. Ids that only asked where to resume (streamlet send
                    # asks about several per file) do not pile up.
                    del self._clients[client_id]

    async def _read_numbered(
        self,
        conn: _Connection,
        proto: ServerConnection,
        client: _Client,
        events: list[Event],
        acks: MemoryObjectSendStream[int],
        context: ReceiverContext,
    ) -> str | None:
        """Read numbered lines and store the new ones; queue one ack per read.

        Returns the refusal to send once the acks of the lines before it
        are out, or None when the connection ended or was taken over.
        """
        key = client.id.encode("ascii")
        name = context.name
        while True:
            for event in events:
                if isinstance(event, NumberedLines):
                    async with client.lock:
                        if conn.taken_over:
                            return None
                        # Invariant: a seq is stored at most once per client id.
                        fresh = client.fresh(event.lines)
                        if fresh:
                            now = time.time()
                            high = fresh[-1][0]
                            records = [Record(p, key, now, name, 0, s) for s, p in fresh]
                            handle = await context.store(records, acks={client.id: high})
                            client.stored_through(high, handle)
                elif isinstance(event, AckWhenDurable):
                    try:
                        await acks.send(event.seq)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        return None  # the acker stopped: the connection is broken
                elif isinstance(event, Refuse):
                    return event.message
                elif isinstance(event, End):
                    return None
            chunk = await conn.receive()
            events = proto.receive_eof() if chunk is None else proto.receive_data(chunk)

    async def _acker(
        self,
        conn: _Connection,
        client: _Client,
        acks: MemoryObjectReceiveStream[int],
        context: ReceiverContext,
    ) -> None:
        """Send ``@ack`` for each read, in order, once its lines are durable."""
        async with acks:
            async for seq in acks:
                try:
                    await client.wait_durable(seq)
                except StreamletError as exc:
                    log.warning(
                        "TcpSource %r: lines of client %s are not durable (%s);"
                        " closing its connection without acknowledging them",
                        context.name,
                        client.id,
                        exc,
                    )
                    conn.stop_reading()
                    return
                if not await conn.reply(ack_line(seq)):
                    conn.stop_reading()
                    return


def _address_of(
    socket: anyio.TypedAttributeProvider, attribute: tuple[str, int] | str
) -> tuple[str, int]:
    """``(ip, port)`` of a socket's local or remote address."""
    address = socket.extra(attribute)  # noqa: S610 - anyio typed attributes, not Django
    if not isinstance(address, tuple):
        raise TypeError(f"not an IP socket address: {address!r}")
    return str(address[0]), int(address[1])


def _is_loopback(listener: anyio.TypedAttributeProvider) -> bool:
    ip, _ = _address_of(listener, SocketAttribute.local_address)
    return ipaddress.ip_address(ip.partition("%")[0]).is_loopback


async def _cancel_when_set(event: anyio.Event, group: TaskGroup) -> None:
    await event.wait()
    group.cancel_scope.cancel()
