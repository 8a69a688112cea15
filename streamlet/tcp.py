"""The client side of :class:`~streamlet.sources.tcp.TcpSource`'s numbered protocol.

:class:`TcpClient` numbers the lines it is given, keeps each one until the
server acknowledges it as durable, and after a lost connection reconnects
with backoff and sends again, in order, every line the server does not
report as durable in its ``@resume``. With the server's duplicate filter this
delivers every line once, across restarts of either side, as long as the
client keeps its client id (and, when restarted, its numbering: see
``start_seq``). The protocol is written down in :mod:`streamlet.sources.tcp`;
the numbering, the lines kept until acknowledged and what to write again
after a reconnect are its pure :class:`~streamlet.sources._tcp_protocol.Outbox`,
which :class:`TcpClient` drives over a socket, with backoff and timeouts.

:func:`send_stream` is ``streamlet send``: line ``i`` of its input is sent
with sequence number ``i``, so sending the same lines twice under the same
client id sends nothing new the second time. That makes the client id the
whole of what a re-send trusts: lines the server has as durable for it are
skipped unseen. :func:`file_client_ids` therefore names a file by where it
is (host, real path, device and inode) and by the content of its first
lines, and :func:`choose_client_id` asks the server which of a file's ids a
previous send used: a file sent again unchanged, or after lines were
appended to it, resumes where it left off, while a file rewritten with other
first lines, or replaced by another file, at the same path gets a new id and
is sent in full.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import TracebackType

import anyio
from anyio.abc import SocketStream, TaskGroup
from anyio.streams.buffered import BufferedByteReceiveStream

from streamlet._retry import OutOfTime, Patience, retrying_until
from streamlet.errors import (
    ClientError,
    ConfigError,
    RejectedError,
    UnreachableError,
)
from streamlet.sources._tcp_protocol import Outbox, ServerLine, parse_server_line
from streamlet.sources.tcp import check_client_id

__all__ = [
    "FILE_PREFIX_BYTES",
    "ClientError",
    "FileClientId",
    "RejectedError",
    "SendSummary",
    "TcpClient",
    "UnreachableError",
    "choose_client_id",
    "durable_through",
    "file_client_ids",
    "send_stream",
]

log = logging.getLogger(__name__)

_MAX_SERVER_LINE = 4096
_WRITE_BATCH = 256 * 1024
"""Bytes of lines joined into one socket write."""
_ATTEMPT_TIMEOUT = 10.0
"""Longest one connection attempt (connect, hello, resume) may take."""


class _Signal:
    """Wakes every task waiting for "something changed"; they re-check their condition."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = anyio.Event()

    async def wait(self) -> None:
        await self._event.wait()


class TcpClient:
    """Send numbered lines to a TcpSource; each is kept until acknowledged as durable.

    Use it as an async context manager: entering connects (retrying for up
    to ``connect_timeout``) and learns from ``@resume`` what is durable;
    leaving without an exception waits for every line to be acknowledged
    (:meth:`flush`), then closes.

    Args:
        host: the server's address.
        port: the server's port.
        client_id: names this sender for the server's duplicate filter;
            1 to 128 printable ASCII characters without spaces. One client
            id must be used by one client at a time.
        start_seq: the sequence number of the first line sent. None (the
            default) continues after the highest number the server has as
            durable; give it to number lines by something stable, e.g. line
            ``i`` of a file as ``i``, so that a restarted client skips the
            lines the server already has.
        max_unacked: lines kept while waiting for acks; :meth:`send` waits
            while this many are outstanding.
        reconnect_backoff: seconds before the first reconnect attempt;
            doubled per failed attempt up to ``max_backoff``.
        max_backoff: longest pause between reconnect attempts.
        connect_timeout: seconds to keep trying to reach the server, at the
            start and after each lost connection, before giving up with
            :class:`UnreachableError`; None: forever.

    Raises:
        ConfigError: a setting is out of range.
        ValueError: ``client_id`` is not a valid client id.
    """

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        *,
        start_seq: int | None = None,
        max_unacked: int = 10_000,
        reconnect_backoff: float = 0.1,
        max_backoff: float = 5.0,
        connect_timeout: float | None = 30.0,
    ) -> None:
        check_client_id(client_id)
        if start_seq is not None and start_seq < 1:
            raise ConfigError(f"TcpClient start_seq must be >= 1, not {start_seq!r}")
        if max_unacked < 1:
            raise ConfigError(f"TcpClient max_unacked must be >= 1, not {max_unacked!r}")
        if not reconnect_backoff > 0 or not max_backoff >= reconnect_backoff:
            raise ConfigError(
                "TcpClient needs reconnect_backoff > 0 and max_backoff >= reconnect_backoff,"
                f" not {reconnect_backoff!r} and {max_backoff!r}"
            )
        if connect_timeout is not None and not connect_timeout > 0:
            raise ConfigError(
                f"TcpClient connect_timeout must be > 0 seconds or None, not {connect_timeout!r}"
            )
        self.host = host
        self.port = port
        self.client_id = client_id
        self.max_unacked = max_unacked
        self.reconnect_backoff = reconnect_backoff
        self.max_backoff = max_backoff
        self.connect_timeout = connect_timeout
        # Numbering, the lines kept until acknowledged and what to write
        # (again) on the current connection: the protocol's pure part.
        self._outbox = Outbox(start_seq)
        self._error: ClientError | None = None
        self._closed = False
        self._entered = False
        self._changed: _Signal | None = None
        self._writable: _Signal | None = None
        self._stack: AsyncExitStack | None = None
        self._tasks: TaskGroup | None = None

    # -- what a caller reads ------------------------------------------------

    @property
    def acked(self) -> int:
        """The highest sequence number the server has acknowledged as durable (0: none)."""
        return self._outbox.acked

    @property
    def resumed_at(self) -> int:
        """The server's ``@resume`` on the first connection: what it had as durable then."""
        return self._outbox.resumed_at

    @property
    def next_seq(self) -> int:
        """The sequence number the next :meth:`send` gets."""
        return self._outbox.next_seq

    @property
    def sent(self) -> int:
        """Lines handed to :meth:`send` and kept for the server (not skipped)."""
        return self._outbox.sent

    @property
    def skipped(self) -> int:
        """Lines handed to :meth:`send` that the server already had as durable."""
        return self._outbox.skipped

    @property
    def unacked(self) -> int:
        """Lines sent and not yet acknowledged."""
        return len(self._outbox.unacked)

    # -- lifecycle ----------------------------------------------------------

    async def __aenter__(self) -> TcpClient:
        if self._entered:
            raise RuntimeError("a TcpClient can be entered only once")
        self._entered = True
        self._changed = _Signal()
        self._writable = _Signal()
        stream, reader, resume = await self._connect()
        self._outbox.resumed(resume)
        stack = AsyncExitStack()
        # The task group stays open until __aexit__/aclose: the connection
        # is kept (and re-made) in the background while the caller sends.
        self._tasks = await stack.enter_async_context(anyio.create_task_group())
        self._stack = stack
        self._tasks.start_soon(self._maintain, stream, reader)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None and not self._closed:
                await self.flush()
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Close the connection now; lines not yet acknowledged are abandoned.

        They can be sent again later under the same client id and sequence
        numbers (``start_seq``); the server skips those it already has.
        """
        self._closed = True
        if self._changed is not None:
            self._changed.notify()
        if self._tasks is not None:
            self._tasks.cancel_scope.cancel()
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await stack.aclose()

    # -- sending ------------------------------------------------------------

    async def send(self, payload: bytes) -> int:
        """Queue ``payload`` as the next line; return its sequence number.

        Returns at once unless ``max_unacked`` lines are outstanding, then
        waits for acks. A line whose number the server already has as
        durable is skipped (counted in :attr:`skipped`).

        Raises:
            ValueError: ``payload`` holds ``\\n`` or ends with ``\\r``
                (the server would read a different line).
            ClientError: the client has failed (the error says why).
            anyio.ClosedResourceError: the client was closed.
        """
        if b"\n" in payload or payload.endswith(b"\r"):
            raise ValueError(
                "a TcpClient payload must not contain \\n or end with \\r: lines are"
                " newline-delimited; encode such payloads (e.g. base64 or JSON)"
            )
        if self._changed is None or self._writable is None:
            raise RuntimeError("use TcpClient as an async context manager before sending")
        while len(self._outbox.unacked) >= self.max_unacked:
            self._check()
            await self._changed.wait()
        self._check()
        seq, kept = self._outbox.add(payload)
        if kept:
            self._writable.notify()
        return seq

    async def flush(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until every line sent so far is acknowledged as durable.

        ``timeout`` is here for callers outside anyio's cancel scopes; inside
        them ``anyio.fail_after`` around the call does the same.

        Raises:
            TimeoutError: ``timeout`` seconds passed first.
            ClientError: the client failed with lines unacknowledged.
            anyio.ClosedResourceError: the client was closed with lines unacknowledged.
        """
        if self._changed is None:
            raise RuntimeError("use TcpClient as an async context manager before flushing")
        with anyio.fail_after(timeout):
            while self._outbox.unacked:
                self._check()
                await self._changed.wait()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise anyio.ClosedResourceError(
                f"the TcpClient for {self.host}:{self.port} is closed"
                f" ({len(self._outbox.unacked)} lines unacknowledged)"
            )

    def _on_ack(self, seq: int) -> None:
        if self._outbox.ack(seq):
            assert self._changed is not None
            self._changed.notify()

    def _fail(self, error: ClientError) -> None:
        self._error = error
        assert self._changed is not None
        self._changed.notify()

    # -- the connection -----------------------------------------------------

    async def _connect(self) -> tuple[SocketStream, BufferedByteReceiveStream, int]:
        """Connect and say hello, retrying with backoff until ``connect_timeout``.

        Raises:
            UnreachableError: no attempt succeeded in time.
            RejectedError: the server refused the hello.
        """
        where = f"{self.host}:{self.port}"
        patience = Patience(
            self.connect_timeout,
            backoff=self.reconnect_backoff,
            max_backoff=self.max_backoff,
            attempt_timeout=_ATTEMPT_TIMEOUT,
        )
        try:
            # Debug: waiting for a server that is still starting is expected.
            return await retrying_until(
                patience,
                f"connecting to {where}",
                self._hello,
                transient=_not_reached_yet,
                log_level=logging.DEBUG,
            )
        except OutOfTime as gave_up:
            error = gave_up.error
            reason = str(error) if isinstance(error, _Busy) else _describe(error)
            raise UnreachableError(
                f"cannot reach the streamlet TcpSource at {where} within"
                f" {self.connect_timeout} s (last attempt: {reason}); check that the app"
                " is running and listening there"
            ) from error

    async def _hello(self) -> tuple[SocketStream, BufferedByteReceiveStream, int]:
        stream = await anyio.connect_tcp(self.host, self.port)
        try:
            await stream.send(b"@hello %s\n" % self.client_id.encode("ascii"))
            reader = BufferedByteReceiveStream(stream)
            resume = _resume_of(await _read_line(reader), f"{self.host}:{self.port}")
        except BaseException:
            await anyio.aclose_forcefully(stream)
            raise
        return stream, reader, resume

    async def _maintain(self, stream: SocketStream, reader: BufferedByteReceiveStream) -> None:
        """Serve connections one after another until a fatal error or cancellation."""
        where = f"{self.host}:{self.port}"
        while True:
            reason = await self._session(stream, reader)
            if self._error is not None:
                return
            log.warning(
                "connection to %s lost (%s); reconnecting, %d lines unacknowledged",
                where,
                reason,
                len(self._outbox.unacked),
            )
            try:
                stream, reader, resume = await self._connect()
            except ClientError as exc:
                self._fail(exc)
                return
            if resume < self._outbox.acked:
                log.warning(
                    "%s resumes client %s at %d, below the %d it acknowledged: its state was"
                    " reset; those lines are not sent again",
                    where,
                    self.client_id,
                    resume,
                    self._outbox.acked,
                )
            self._on_ack(resume)
            log.info(
                "reconnected to %s; it has client %s durable up to %d; resending %d lines",
                where,
                self.client_id,
                resume,
                len(self._outbox.unacked),
            )

    async def _session(self, stream: SocketStream, reader: BufferedByteReceiveStream) -> str:
        """Write and read on one connection until it ends; say why it ended."""
        self._outbox.rewind()
        ended = ""
        async with stream, anyio.create_task_group() as tg:

            async def write() -> None:
                nonlocal ended
                try:
                    await self._write_loop(stream)
                except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                    ended = ended or _describe(exc)
                tg.cancel_scope.cancel()

            tg.start_soon(write)
            try:
                await self._read_loop(reader)
                ended = ended or "the server closed the connection"
            except (
                OSError,
                anyio.EndOfStream,
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
                anyio.IncompleteRead,
                anyio.DelimiterNotFound,
            ) as exc:
                ended = ended or _describe(exc)
            except _Busy as exc:
                ended = ended or str(exc)
            except RejectedError as exc:
                self._fail(exc)
            tg.cancel_scope.cancel()
        return ended

    async def _write_loop(self, stream: SocketStream) -> None:
        assert self._writable is not None
        while True:
            data = self._outbox.take(_WRITE_BATCH)
            if not data:
                await self._writable.wait()
                continue
            await stream.send(data)

    async def _read_loop(self, reader: BufferedByteReceiveStream) -> None:
        """Apply the server's acks until the connection ends.

        Raises:
            RejectedError: the server sent ``@error``.
            _Busy: the server sent ``@busy``.
        """
        where = f"{self.host}:{self.port}"
        while True:
            line = await _read_line(reader)
            said = parse_server_line(line)
            if said.kind == "ack":
                self._on_ack(said.number)
            elif said.kind == "malformed-ack":
                raise anyio.BrokenResourceError(f"malformed ack {line[:80]!r}")
            else:
                _raise_for(said, where)
                # Other lines beginning with @ are left for later protocol versions.
                if said.kind == "unexpected":
                    raise anyio.BrokenResourceError(f"unexpected line {line[:80]!r}")


class _Busy(Exception):
    """The server has too many connections; try again later."""


def _not_reached_yet(exc: Exception) -> bool:
    """Whether a failed connection attempt is tried again.

    A server that stops (or is killed) between accepting the connection and
    answering the hello is not reached yet; a refused hello is an answer.
    """
    return isinstance(
        exc,
        (
            OSError,
            TimeoutError,
            anyio.EndOfStream,
            anyio.IncompleteRead,
            anyio.DelimiterNotFound,
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
            _Busy,
        ),
    )


async def _read_line(reader: BufferedByteReceiveStream) -> bytes:
    line = await reader.receive_until(b"\n", _MAX_SERVER_LINE)
    return line[:-1] if line.endswith(b"\r") else line


def _resume_of(line: bytes, where: str) -> int:
    """The number in the server's answer to ``@hello``.

    Raises:
        RejectedError: the answer is ``@error``.
        _Busy: the answer is ``@busy``.
        anyio.BrokenResourceError: the answer is not part of the protocol.
    """
    said = parse_server_line(line)
    if said.kind == "resume":
        return said.number
    _raise_for(said, where)
    raise anyio.BrokenResourceError(f"unexpected answer to @hello: {line[:80]!r}")


def _raise_for(said: ServerLine, where: str) -> None:
    """Raise for ``@error`` and ``@busy``; return for anything else."""
    if said.kind == "error":
        raise RejectedError(f"the TcpSource at {where} refused: {said.text}")
    if said.kind == "busy":
        raise _Busy(f"the server is busy: {said.text}")


def _describe(exc: BaseException) -> str:
    """Why a connection attempt failed or a connection ended, for a log line or an error."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, (anyio.EndOfStream, anyio.IncompleteRead)):
        return "the server closed the connection"
    if str(exc):
        return str(exc)
    if exc.__cause__ is not None and str(exc.__cause__):
        return str(exc.__cause__)
    if isinstance(exc, anyio.BrokenResourceError):
        return "the connection broke"
    return type(exc).__name__


# -- streamlet send ---------------------------------------------------------

FILE_PREFIX_BYTES = 4096
"""The bytes at the start of a file whose complete lines its client ids name."""
_PROBES_AT_ONCE = 4
"""Client ids :func:`choose_client_id` asks the server about at the same time."""


@dataclass(frozen=True, slots=True)
class FileClientId:
    """A client id :func:`file_client_ids` offers for a file.

    Attributes:
        client_id: the id.
        lines: how many of the file's first lines it names by their content;
            0 when the file's first :data:`FILE_PREFIX_BYTES` bytes hold no
            complete line (the id then names those bytes).
    """

    client_id: str
    lines: int


def file_client_ids(
    prefix: bytes, *, host: str, path: str, device: int, inode: int
) -> list[FileClientId]:
    """The client ids ``streamlet send`` may use for a file, the most specific first.

    Each id names the file's host, real ``path``, ``device`` and ``inode``
    and the content of its first ``2**j`` complete lines, for each ``j``
    from the largest whose lines all end within ``prefix`` down to 0.
    ``prefix`` is the file's first :data:`FILE_PREFIX_BYTES` bytes (the
    whole file if it is shorter).

    A send uses the first id unless the server has lines of another
    (:func:`choose_client_id`). Lines appended to the file leave its first
    lines as they were, so the id of an earlier send is among those of the
    longer file, and the send resumes. A file rewritten in place whose first
    lines differ from the earlier version's, or replaced by another file (a
    new inode), has none of the earlier ids and is sent in full. What an id
    does not vouch for: the lines after those it names. An id names at least
    half of the complete lines the first 4 KiB of the file held when it was
    chosen, so a rewrite that keeps all of those but changes lines after
    them is taken for the same file.
    """
    place = hashlib.sha256()
    for part in (host, path, str(device), str(inode)):
        place.update(part.encode("utf-8", "surrogateescape") + b"\0")

    def named(lines: int, content: bytes) -> FileClientId:
        digest = place.copy()
        digest.update(b"%d\0" % lines)
        digest.update(content)
        return FileClientId("file-" + digest.hexdigest()[:16], lines)

    prefix = prefix[:FILE_PREFIX_BYTES]
    ends: list[int] = []
    end = prefix.find(b"\n")
    while end >= 0:
        ends.append(end)
        end = prefix.find(b"\n", end + 1)
    if not ends:
        return [named(0, prefix)]
    return [
        named(2**j, prefix[: ends[2**j - 1] + 1]) for j in range(len(ends).bit_length() - 1, -1, -1)
    ]


async def durable_through(
    host: str, port: int, client_id: str, *, connect_timeout: float | None = 10.0
) -> int:
    """What the server has as durable for ``client_id`` (its ``@resume``; 0: nothing).

    Connects, says hello and closes without sending a line.

    Raises:
        UnreachableError: the server could not be reached within ``connect_timeout``.
        RejectedError: the server refused the hello.
    """
    async with TcpClient(host, port, client_id, connect_timeout=connect_timeout) as client:
        return client.resumed_at


async def choose_client_id(
    candidates: Sequence[FileClientId],
    host: str,
    port: int,
    *,
    connect_timeout: float | None = 10.0,
) -> FileClientId:
    """The first of ``candidates`` the server has lines of; the first of all if none.

    With the ids of :func:`file_client_ids`, that is the id an earlier send
    of the file (or of its first lines, before more were appended) used.

    Raises:
        ValueError: ``candidates`` is empty.
        UnreachableError: the server could not be reached within ``connect_timeout``.
        RejectedError: the server refused a hello.
    """
    if not candidates:
        raise ValueError("choose_client_id needs at least one candidate")
    durable = [0] * len(candidates)
    failures: list[ClientError] = []
    limiter = anyio.CapacityLimiter(_PROBES_AT_ONCE)
    async with anyio.create_task_group() as tg:

        async def ask(index: int, client_id: str) -> None:
            try:
                async with limiter:
                    durable[index] = await durable_through(
                        host, port, client_id, connect_timeout=connect_timeout
                    )
            except ClientError as exc:
                failures.append(exc)
                tg.cancel_scope.cancel()

        for index, candidate in enumerate(candidates):
            tg.start_soon(ask, index, candidate.client_id)
    if failures:
        raise failures[0]
    return next((c for c, n in zip(candidates, durable, strict=True) if n > 0), candidates[0])


@dataclass(frozen=True, slots=True)
class SendSummary:
    """What :func:`send_stream` did.

    Attributes:
        lines: lines read from the input.
        sent: lines sent (the server did not have them as durable).
        skipped: lines skipped: the server already had them as durable.
        acked: the highest sequence number acknowledged at the end.
        resumed_at: what the server had as durable for the client id when
            the send began (its ``@resume``): the lines up to it were skipped.
    """

    lines: int
    sent: int
    skipped: int
    acked: int
    resumed_at: int = 0


async def _read_chunks(source: io.BufferedIOBase) -> AsyncIterator[bytes]:
    """Chunks of ``source`` as they arrive, read in a worker thread (never blocking the loop)."""
    while True:
        chunk = await anyio.to_thread.run_sync(source.read1, _WRITE_BATCH)
        if not chunk:
            return
        yield chunk


async def send_stream(
    source: io.BufferedIOBase,
    host: str,
    port: int,
    client_id: str,
    *,
    connect_timeout: float | None = 10.0,
) -> SendSummary:
    """Send each line of ``source`` (line ``i`` as seq ``i``) and wait for every ack.

    A last line without ``\\n`` is sent too; ``\\r\\n`` line ends are
    accepted. Lines the server already has as durable for ``client_id`` are
    skipped without being sent (and without being compared with what was
    sent before: the client id must name this input, see
    :func:`file_client_ids`); :attr:`SendSummary.resumed_at` says how many.

    Raises:
        UnreachableError: the server could not be reached within ``connect_timeout``.
        RejectedError: the server refused a line (too long, for example).
    """
    lines = 0
    async with TcpClient(
        host, port, client_id, start_seq=1, connect_timeout=connect_timeout
    ) as client:
        rest = b""
        async for chunk in _read_chunks(source):
            parts = (rest + chunk).split(b"\n")
            rest = parts.pop()
            for line in parts:
                lines += 1
                await client.send(line[:-1] if line.endswith(b"\r") else line)
        if rest:
            lines += 1
            await client.send(rest[:-1] if rest.endswith(b"\r") else rest)
        await client.flush()
    return SendSummary(
        lines=lines,
        sent=client.sent,
        skipped=client.skipped,
        acked=client.acked,
        resumed_at=client.resumed_at,
    )
