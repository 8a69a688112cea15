"""Data WAL cleaning after a checkpoint keeps every segment a batch still needs.

After each checkpoint the scheduler hands the block generator the oldest
block a batch still needs (``BatchScheduler._oldest_needed_block``: blocks
of pending batches and blocks not yet allocated), and the data WAL deletes
only the segments before it. Here the data WAL (64 MiB segments) holds more
than one segment while some of its older blocks are still needed:

- blocks stored but not yet allocated: the first batch waits until every
  record is durable and later batches take one block each, so the
  checkpoint after the first batch runs while segment 1 holds blocks no
  batch has taken yet;
- blocks of a pending batch: a stop whose batch does not finish within
  ``stop_timeout`` leaves the batch allocated, not done, and writes a last
  checkpoint; the restart re-runs the batch and must still find its blocks.

Deleting either kind of segment makes a batch read a cleaned segment, and
the app stops with that error instead of delivering every record.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import anyio

from streamlet._state import read_state
from streamlet.app import App
from streamlet.records import Batch, Record
from streamlet.sinks.base import Sink
from streamlet.sources.receiver import Receiver, ReceiverContext

RECORD_BYTES = 2**20
RECORDS = 70  # 70 MiB: the data WAL starts a second 64 MiB segment


class ListSink(Sink):
    def __init__(self) -> None:
        self.batches: dict[int, list[object]] = {}
        self.complete = anyio.Event()  # every record is in

    async def commit(self, batch: Batch, outputs: Sequence[object]) -> bool:
        if batch.id in self.batches:
            return False
        self.batches[batch.id] = list(outputs)
        if len(self.values()) >= RECORDS:
            self.complete.set()
        return True

    def values(self) -> list[object]:
        return [v for _, outs in sorted(self.batches.items()) for v in outs]


class Bulk(Receiver):
    """Stores records 1..RECORDS of 1 MiB each, one block each, acking each under "n"."""

    def __init__(self) -> None:
        super().__init__()
        self.all_durable = anyio.Event()

    async def run(self, context: ReceiverContext) -> None:
        for n in range(context.acks.get("n", 0) + 1, RECORDS + 1):
            stored = await context.store([Record(b"%d " % n + bytes(RECORD_BYTES))], acks={"n": n})
            await stored.wait()
        self.all_durable.set()
        await context.stopping.wait()


def _number(record: Record) -> int:
    return int(record.value.split(b" ", 1)[0])


def _segments(state_dir: Path) -> list[str]:
    return sorted(p.name for p in (state_dir / "data").iterdir() if p.name.endswith(".wal"))


async def _run_until_delivered(app: App, sink: ListSink) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(app.serve)
        with anyio.fail_after(30):
            await sink.complete.wait()
        app.stop()


async def test_segments_holding_blocks_not_yet_allocated_survive_a_checkpoint(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    receiver = Bulk()
    sink = ListSink()
    # One block per batch (max_batch_bytes=1), and a checkpoint after every batch.
    app = App(
        "release",
        state_dir=state_dir,
        batch_interval=0.05,
        block_interval=0.01,
        checkpoint_interval=0,
        max_batch_bytes=1,
    )
    source = app.source(receiver, name="bulk")

    @app.handler(source, sink=sink)
    async def numbers(batch: Batch) -> list[int]:
        # The first batch holds the first block; the others are stored, over
        # two segments, before it is done and its checkpoint cleans the log.
        await receiver.all_durable.wait()
        return [_number(r) for r in batch]

    await _run_until_delivered(app, sink)
    assert sink.values() == list(range(1, RECORDS + 1))
    assert len(sink.batches) == RECORDS
    # The log did start a second segment, and the first went once it was read.
    assert _segments(state_dir) == ["0000000000000002.wal"]


async def test_segments_of_a_batch_left_pending_at_stop_survive_the_last_checkpoint(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    receiver = Bulk()
    # No tick before the stop: the stop's drain takes every block in batch 1,
    # whose handler never returns; stop_timeout cancels it, and the stop's
    # checkpoint is written with batch 1 pending and no block unallocated.
    first = App(
        "release",
        state_dir=state_dir,
        batch_interval=3600,
        block_interval=0.01,
        max_batch_bytes=2**30,
        stop_timeout=1.0,
    )
    source = first.source(receiver, name="bulk")

    @first.handler(source, sink=ListSink(), name="numbers")
    async def hang(batch: Batch) -> list[int]:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async with anyio.create_task_group() as tg:
        await tg.start(first.serve)
        with anyio.fail_after(30):
            await receiver.all_durable.wait()
        first.stop()
    view = read_state(state_dir)
    assert view.checkpoint is not None
    assert [a.id for a in view.state.pending] == [1]
    assert not any(view.state.blocks.values())
    assert len(view.state.pending[0].blocks) == RECORDS
    assert _segments(state_dir) == ["0000000000000001.wal", "0000000000000002.wal"]

    sink = ListSink()
    second = App("release", state_dir=state_dir, batch_interval=0.05, block_interval=0.01)
    source = second.source(Bulk(), name="bulk")

    @second.handler(source, sink=sink, name="numbers")
    async def numbers(batch: Batch) -> list[int]:
        return [_number(r) for r in batch]

    await _run_until_delivered(second, sink)
    assert sink.values() == list(range(1, RECORDS + 1))
    assert list(sink.batches) == [1]
