"""The block generator on its own: a real data WAL and tracker in a temporary directory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from streamlet._blocks import BlockGenerator, throttle
from streamlet._tracker import Tracker
from streamlet.errors import StreamletError
from streamlet.records import Record
from streamlet.wal import WriteAheadLog


@pytest.fixture
async def generator(tmp_path: Path) -> AsyncIterator[BlockGenerator]:
    wal = await WriteAheadLog.open(str(tmp_path / "data"))
    tracker = await Tracker.open(str(tmp_path / "tracker"), base=None, after=None)
    made = BlockGenerator(
        wal=wal, tracker=tracker, interval=0.05, max_block_bytes=1024, max_buffered_bytes=4096
    )
    try:
        yield made
    finally:
        await wal.aclose()
        await tracker.aclose()


async def test_a_store_completes_once_its_block_is_in_both_logs(
    generator: BlockGenerator,
) -> None:
    context = generator.context("r")
    stored = await context.store([Record(b"one"), Record(b"two")], acks={"client": 2})
    assert not stored.done()  # nothing is durable before a cut
    assert generator.tracker.state.blocks == {}
    await generator.cut()
    assert stored.done()
    await stored.wait()
    (ref,) = generator.tracker.state.blocks["r"]
    assert ref.records == 2
    assert generator.tracker.state.acks == {"r": {"client": 2}}
    records = await generator.read([ref])
    assert [(r.value, r.source) for r in records] == [(b"one", "r"), (b"two", "r")]


async def test_a_full_block_is_sealed_and_each_receiver_has_its_own(
    generator: BlockGenerator,
) -> None:
    big = [Record(b"x" * 600)]
    await generator.context("a").store(big)
    await generator.context("a").store(big)  # over max_block_bytes: a second block
    await generator.context("b").store([Record(b"small")])
    assert await generator.cut() == 3
    blocks = generator.tracker.state.blocks
    assert [ref.records for ref in blocks["a"]] == [1, 1]
    assert [ref.records for ref in blocks["b"]] == [1]


async def test_nothing_is_stored_once_the_generator_is_closed(generator: BlockGenerator) -> None:
    context = generator.context("r")
    stored = await context.store([Record(b"last")])
    await generator.close()
    await stored.wait()  # the close cut it
    with pytest.raises(StreamletError, match="the app is stopping"):
        await context.store([Record(b"too late")])


def test_throttle_spaces_stores_at_the_rate_after_one_burst() -> None:
    # 100 records/s with a burst of 0.5 s: an idle receiver may store 50 at
    # once, then each further 10 records waits 0.1 s more.
    start, free = throttle(10.0, 0.0, 50, 100.0, burst=0.5)
    assert (start, free) == (9.5, 10.0)  # idle: no wait, and the burst is spent
    start, free = throttle(10.0, free, 10, 100.0, burst=0.5)
    assert (start, free) == pytest.approx((10.0, 10.1))
    start, free = throttle(10.0, free, 10, 100.0, burst=0.5)
    assert (start, free) == pytest.approx((10.1, 10.2))  # waits until 10.1
    # Idle for long: saving up stops at the burst.
    assert throttle(100.0, free, 10, 100.0, burst=0.5) == pytest.approx((99.5, 99.6))
