"""Receivers through the block generator and data WAL, in process."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest
from anyio.abc import TaskStatus

from streamlet._state import read_state
from streamlet.app import App
from streamlet.errors import ConfigError
from streamlet.records import Batch, Record
from streamlet.sinks.base import Sink
from streamlet.sources.receiver import Receiver, ReceiverContext, Stored
from streamlet.wal.tools import verify


class ListSink(Sink):
    def __init__(self) -> None:
        self.batches: dict[int, list[object]] = {}

    async def commit(self, batch: Batch, outputs: Sequence[object]) -> bool:
        if batch.id in self.batches:
            return False
        self.batches[batch.id] = list(outputs)
        return True

    def values(self) -> list[object]:
        return [v for _, outs in sorted(self.batches.items()) for v in outs]


class Counter(Receiver):
    """Stores numbers ``start+1 .. limit``, acking each under key "n"."""

    def __init__(self, limit: int, *, pace: float = 0.0, per_store: int = 1) -> None:
        super().__init__()
        self.limit = limit
        self.pace = pace
        self.per_store = per_store
        self.durable = 0
        self.resumed_from = -1
        self.all_durable = anyio.Event()

    async def run(self, context: ReceiverContext) -> None:
        start = context.acks.get("n", 0)
        self.resumed_from = start
        pending: list[tuple[int, Stored]] = []
        n = start
        while n < self.limit and not context.stopping.is_set():
            until = min(self.limit, n + self.per_store)
            chunk = [Record(str(i).encode()) for i in range(n + 1, until + 1)]
            n += len(chunk)
            pending.append((n, await context.store(chunk, acks={"n": n})))
            if self.pace:
                await anyio.sleep(self.pace)
        for number, stored in pending:
            await stored.wait()
            self.durable = number
        if self.durable == self.limit:
            self.all_durable.set()
        await context.stopping.wait()


def _app(state_dir: Path, receiver: Receiver, sink: Sink, **settings: object) -> App:
    app = App(
        "recv",
        state_dir=state_dir,
        batch_interval=0.05,
        block_interval=0.01,
        **settings,  # type: ignore[arg-type]
    )
    source = app.source(receiver, name="counter")

    @app.handler(source, sink=sink)
    async def echo(batch: Batch) -> list[int]:
        return [int(r.value.split(b" ")[0]) for r in batch]

    return app


async def _run_until_durable(app: App, receiver: Counter, *, then: float = 0.0) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(app.serve)
        with anyio.fail_after(30):
            await receiver.all_durable.wait()
        await anyio.sleep(then)
        app.stop()


async def test_every_stored_record_reaches_the_sink_once_and_a_stop_drains(
    tmp_path: Path,
) -> None:
    sink = ListSink()
    receiver = Counter(2000, per_store=7)
    app = _app(tmp_path / "state", receiver, sink)
    # Stop as soon as all is durable: the graceful stop's last batch must take the rest.
    await _run_until_durable(app, receiver)
    assert sink.values() == list(range(1, 2001))
    view = read_state(tmp_path / "state")
    assert view.state.pending == []
    assert view.state.blocks.get("counter", []) == []
    assert view.state.acks["counter"] == {"n": 2000}
    assert verify(tmp_path / "state" / "data").problem is None


async def test_a_restart_resumes_from_the_logged_acks(tmp_path: Path) -> None:
    first = Counter(300, per_store=3)
    sink = ListSink()
    await _run_until_durable(_app(tmp_path / "state", first, sink), first)
    assert first.resumed_from == 0

    second = Counter(500, per_store=3)
    sink2 = ListSink()
    await _run_until_durable(_app(tmp_path / "state", second, sink2), second)
    assert second.resumed_from == 300
    assert sink2.values() == list(range(301, 501))
    assert min(sink2.batches) > max(sink.batches)


async def test_a_full_buffer_slows_the_receiver_instead_of_growing(tmp_path: Path) -> None:
    class Fast(Counter):
        async def run(self, context: ReceiverContext) -> None:
            self.most_waiting = 0
            waiting: list[Stored] = []
            for i in range(1, self.limit + 1):
                waiting.append(
                    await context.store([Record(b"%d " % i + b"x" * 1000)], acks={"n": i})
                )
                waiting = [s for s in waiting if not s.done()]
                self.most_waiting = max(self.most_waiting, len(waiting))
            for stored in waiting:
                await stored.wait()
            self.all_durable.set()
            await context.stopping.wait()

    receiver = Fast(3000)
    sink = ListSink()
    app = _app(
        tmp_path / "state", receiver, sink, max_block_bytes=8 * 1024, max_buffered_bytes=16 * 1024
    )
    await _run_until_durable(app, receiver)
    assert len(sink.values()) == 3000
    # 16 KiB of ~1 KiB records: never more than about 16 stores outstanding.
    assert 0 < receiver.most_waiting <= 17


async def test_data_wal_segments_are_deleted_once_their_batches_are_done(tmp_path: Path) -> None:
    class Big(Counter):
        async def run(self, context: ReceiverContext) -> None:
            for i in range(1, self.limit + 1):
                value = b"%d " % i + os.urandom(256 * 1024)
                stored = await context.store([Record(value)], acks={"n": i})
                await stored.wait()
                await anyio.sleep(0.005)
            self.all_durable.set()
            await context.stopping.wait()

    receiver = Big(400)  # 100 MiB through 64 MiB segments
    app = _app(tmp_path / "state", receiver, ListSink(), checkpoint_interval=0)
    await _run_until_durable(app, receiver, then=0.2)
    segments = [n for n in os.listdir(tmp_path / "state" / "data") if n.endswith(".wal")]
    assert len(segments) == 1, segments


async def test_a_failing_receiver_stops_the_app_with_its_error(tmp_path: Path) -> None:
    class Broken(Receiver):
        async def run(self, context: ReceiverContext) -> None:
            await context.store([Record(b"1")])
            raise RuntimeError("socket exploded")

    app = _app(tmp_path / "state", Broken(), ListSink())
    with anyio.fail_after(10), pytest.raises(Exception, match="socket exploded"):
        await app.serve()


def test_block_interval_must_fit_in_the_batch_interval(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="block_interval"):
        App("x", state_dir=tmp_path, batch_interval=0.1, block_interval=0.5)
    with pytest.raises(ConfigError, match="max_buffered_bytes"):
        App("x", state_dir=tmp_path, max_block_bytes=1000, max_buffered_bytes=10)


async def test_blocks_stay_within_max_block_bytes_however_far_cuts_lag(tmp_path: Path) -> None:
    from streamlet.wal.tools import dump

    class Burst(Counter):
        async def run(self, context: ReceiverContext) -> None:
            waiting = [
                await context.store([Record(b"%d " % i + b"y" * 100)], acks={"n": i})
                for i in range(1, self.limit + 1)
            ]
            for stored in waiting:
                await stored.wait()
            self.all_durable.set()
            await context.stopping.wait()

    receiver = Burst(5000)
    sink = ListSink()
    app = _app(
        tmp_path / "state",
        receiver,
        sink,
        max_block_bytes=4096,
        max_buffered_bytes=10 * 2**20,
    )
    await _run_until_durable(app, receiver)
    assert sorted(sink.values()) == list(range(1, 5001))
    lengths = [int(entry["length"]) for entry in dump(tmp_path / "state" / "data")]  # type: ignore[call-overload]
    assert len(lengths) > 100  # 5000 stores of ~140 encoded bytes: many blocks
    assert max(lengths) <= 4096 + 200


async def test_a_failing_data_wal_close_still_closes_the_tracker(tmp_path: Path) -> None:
    """Closing the data WAL raised, and the tracker's lock was left held until exit."""
    from streamlet._faults import FaultyFileSystem, FsFault
    from streamlet._tracker import Tracker
    from streamlet.errors import StreamletError

    fs = FaultyFileSystem([])
    state = tmp_path / "state"
    receiver = Counter(200, per_store=10)
    app = _app(state, receiver, ListSink(), durability="none", fs=fs)
    failures: list[StreamletError] = []

    async def serve(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            await app.serve(task_status=task_status)
        except StreamletError as exc:
            failures.append(exc)

    async with anyio.create_task_group() as tg:
        await tg.start(serve)
        with anyio.fail_after(30):
            await receiver.all_durable.wait()
        # With durability "none", the data WAL's one fsync is at close: it fails.
        fs.faults.append(FsFault("fsync_eio", str(state / "data" / "*"), 0))
        app.stop()
    assert "Input/output error" in str(failures[0])
    # Had the tracker been left open, its lock would refuse this.
    tracker = await Tracker.open(str(state / "tracker"), base=None, after=None)
    await tracker.aclose()
