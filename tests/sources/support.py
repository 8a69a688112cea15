"""Test support for receivers: a fake ReceiverContext, a running server, a line client.

:class:`FakeContext` is a ReceiverContext whose stores become durable when
the test says so.

``FakeContext(delay=0)`` makes every store durable at once, ``delay=0.05``
after 50 ms, and ``delay=None`` only when the test calls :meth:`complete`.
It records every store (records and acks), so a test can check what a
receiver stored and which of it was durable when acknowledged. A "restart"
is a new context built from :meth:`durable_acks` of the old one, the way the
app recovers acks from its tracker log; :meth:`FakeContext.crash` first
makes the stores that are not durable yet never durable, as a crash would.

:func:`running` serves a TcpSource for the body of an ``async with``;
:class:`LineConn` is a raw protocol client that reads the server's lines.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager

import anyio
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from streamlet.errors import StreamletError
from streamlet.records import Record
from streamlet.sources.tcp import TcpSource


class FakeStored:
    """One store: its records, its acks and when it becomes durable."""

    def __init__(self, records: list[Record], acks: dict[str, int], due: float | None) -> None:
        self.records = records
        self.acks = acks
        self._due = due
        self._event = anyio.Event()
        self._error: BaseException | None = None

    def done(self) -> bool:
        if self._due is not None and time.monotonic() >= self._due:
            self._event.set()
        return self._event.is_set()

    @property
    def durable(self) -> bool:
        return self.done() and self._error is None

    async def wait(self) -> None:
        if self._due is not None and not self._event.is_set():
            await anyio.sleep(max(0.0, self._due - time.monotonic()))
            self._event.set()
        await self._event.wait()
        if self._error is not None:
            raise StreamletError(f"store failed: {self._error}") from self._error

    def complete(self) -> None:
        self._event.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._event.set()


class FakeContext:
    """Implements :class:`streamlet.sources.receiver.ReceiverContext` for tests."""

    def __init__(
        self,
        *,
        acks: Mapping[str, int] | None = None,
        delay: float | None = 0.0,
        name: str = "tcp",
    ) -> None:
        self._name = name
        self._acks = dict(acks or {})
        self._stopping = anyio.Event()
        self.delay = delay
        self.stores: list[FakeStored] = []
        self._changed = anyio.Event()
        self.refuse: StreamletError | None = None

    @property
    def name(self) -> str:
        return self._name

    @property
    def acks(self) -> Mapping[str, int]:
        return self._acks

    @property
    def stopping(self) -> anyio.Event:
        return self._stopping

    async def store(
        self, records: Sequence[Record], *, acks: Mapping[str, int] | None = None
    ) -> FakeStored:
        if self.refuse is not None:
            raise self.refuse
        due = None if self.delay is None else time.monotonic() + self.delay
        stored = FakeStored([r._replace(source=self._name) for r in records], dict(acks or {}), due)
        self.stores.append(stored)
        self._changed.set()
        self._changed = anyio.Event()
        await anyio.lowlevel.checkpoint()
        return stored

    # What the test looks at.

    @property
    def records(self) -> list[Record]:
        """Every record stored, durable or not, in store order."""
        return [r for s in self.stores for r in s.records]

    def durable_records(self) -> list[Record]:
        """The records of the stores that are durable (what survives a crash)."""
        return [r for s in self.stores if s.durable for r in s.records]

    def durable_acks(self) -> dict[str, int]:
        """Per key, the highest ack of a durable store merged over the recovered ones."""
        merged = dict(self._acks)
        for stored in self.stores:
            if stored.durable:
                for key, value in stored.acks.items():
                    merged[key] = max(merged.get(key, 0), value)
        return merged

    def crash(self) -> None:
        """Stores not durable by now never will be (their blocks were not written)."""
        for stored in self.stores:
            if not stored.done():
                stored.fail(RuntimeError("lost in a crash"))

    def complete(self, count: int | None = None) -> None:
        """Make the first ``count`` stores not yet done durable (all with None)."""
        for stored in self.stores:
            if count is not None and count <= 0:
                return
            if not stored.done():
                stored.complete()
                if count is not None:
                    count -= 1

    async def wait_for_records(self, count: int, *, within: float = 5.0) -> list[Record]:
        """Wait until at least ``count`` records were stored; return them all."""
        with anyio.fail_after(within):
            while len(self.records) < count:
                await self._changed.wait()
        return self.records

    async def wait_for_stores(self, count: int, *, within: float = 5.0) -> list[FakeStored]:
        """Wait until at least ``count`` stores were made; return them."""
        with anyio.fail_after(within):
            while len(self.stores) < count:
                await self._changed.wait()
        return self.stores


@asynccontextmanager
async def running(source: TcpSource, context: FakeContext) -> AsyncIterator[int]:
    """Serve ``source`` for the body; yield its port; stop gracefully after."""
    async with anyio.create_task_group() as tg:
        port: int = await tg.start(source.run, context)
        try:
            yield port
        finally:
            context.stopping.set()


class LineConn:
    """A raw client: send bytes, read the server's lines one at a time."""

    def __init__(self, stream: SocketStream) -> None:
        self.stream = stream
        self._reader = BufferedByteReceiveStream(stream)

    @classmethod
    @asynccontextmanager
    async def open(cls, port: int, hello: bytes | None = None) -> AsyncIterator[LineConn]:
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            conn = cls(stream)
            if hello is not None:
                await conn.send(hello)
            yield conn

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)

    async def line(self, *, within: float = 5.0) -> bytes:
        """The server's next line, without its newline."""
        with anyio.fail_after(within):
            return await self._reader.receive_until(b"\n", 1 << 16)

    async def nothing_for(self, seconds: float) -> bool:
        """True if the server sends no line for ``seconds``."""
        with anyio.move_on_after(seconds):
            line = await self._reader.receive_until(b"\n", 1 << 16)
            raise AssertionError(f"unexpected line from the server: {line!r}")
        return True

    async def rest(self, *, within: float = 5.0) -> list[bytes]:
        """Every line until the server closes the connection."""
        lines: list[bytes] = []
        with anyio.fail_after(within):
            while True:
                try:
                    lines.append(await self._reader.receive_until(b"\n", 1 << 16))
                except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
                    return lines

    async def acks_until(self, seq: int, *, within: float = 5.0) -> list[int]:
        """Read ``@ack`` lines until one reaches ``seq``; return their numbers."""
        acks: list[int] = []
        with anyio.fail_after(within):
            while not acks or acks[-1] < seq:
                line = await self.line(within=math.inf)
                assert line.startswith(b"@ack "), line
                acks.append(int(line.split()[1]))
        return acks
