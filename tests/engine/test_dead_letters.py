"""Per-record dead letters: only the records a handler fails on are set aside."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from streamlet._checkpoint import Checkpointer
from streamlet._handlers import HandlerSpec
from streamlet._retry import RetryPolicy
from streamlet._scheduler import BatchPolicy, BatchScheduler, FailurePolicy
from streamlet._tracker import Tracker
from streamlet.fs import OsFileSystem
from streamlet.records import Batch
from streamlet.sources.sequence import SequenceSource
from tests.engine.test_app import ListSink


@pytest.fixture
async def tracker(tmp_path: Path) -> AsyncIterator[Tracker]:
    opened = await Tracker.open(str(tmp_path / "tracker"), base=None, after=None)
    try:
        yield opened
    finally:
        await opened.aclose()


async def _run_one_batch(
    tmp_path: Path, tracker: Tracker, handler: Any, on_failure: FailurePolicy, records: int = 50
) -> tuple[ListSink, ListSink]:
    source = SequenceSource(rate=None, limit=records, value=lambda p, o: b"%d" % o)
    source.name = "seq"
    good, dead = ListSink(), ListSink()
    scheduler = BatchScheduler(
        app="d",
        tracker=tracker,
        sources={"seq": source},
        handlers=[HandlerSpec("h", handler, ("seq",), good)],
        policy=BatchPolicy(
            interval=0.01,
            on_failure=on_failure,
            retry=RetryPolicy(max_retries=1, backoff=0),
        ),
        checkpointer=Checkpointer(
            OsFileSystem(), str(tmp_path / "cp"), "d", interval=0, loaded=None, last_done=0
        ),
        dead_letter=dead,
    )
    alloc = await scheduler.allocate(0.0)
    assert alloc is not None
    await scheduler._run_batch(alloc, scheduled=None, recovered=False)
    return good, dead


def _bad(n: int) -> bool:
    return n % 7 == 3


async def test_only_the_records_a_handler_fails_on_are_dead_lettered(
    tmp_path: Path, tracker: Tracker
) -> None:
    calls: list[int] = []

    async def square(batch: Batch) -> list[int]:
        calls.append(len(batch))
        numbers = [int(r.value) for r in batch]
        for n in numbers:
            if _bad(n):
                raise ValueError(f"cannot take {n}")
        return [n * n for n in numbers]

    good, dead = await _run_one_batch(tmp_path, tracker, square, "dead_letter")
    assert good.values() == [n * n for n in range(50) if not _bad(n)]  # in record order
    letters: list[dict[str, Any]] = dead.values()  # type: ignore[assignment]
    assert [letter["offset"] for letter in letters] == [n for n in range(50) if _bad(n)]
    for letter in letters:
        assert letter["handler"] == "h"
        assert letter["error"] == f"ValueError: cannot take {letter['offset']}"
        assert letter["attempts"] == 3  # two on the whole batch, one on the record alone
    assert calls[:2] == [50, 50]  # the batch and its retry, then the bisection
    assert len(calls) <= 2 + 2 * 7 * (50).bit_length()  # about 2 k log2(n) for k bad


async def test_dead_letter_batch_sets_the_whole_batch_aside(
    tmp_path: Path, tracker: Tracker
) -> None:
    async def square(batch: Batch) -> list[int]:
        if any(_bad(int(r.value)) for r in batch):
            raise ValueError("one bad record")
        return [int(r.value) ** 2 for r in batch]

    good, dead = await _run_one_batch(tmp_path, tracker, square, "dead_letter_batch")
    assert good.batches == {}
    assert len(dead.values()) == 50


async def test_a_failure_of_every_record_is_bounded_and_sets_all_aside(
    tmp_path: Path, tracker: Tracker
) -> None:
    calls: list[int] = []

    async def down(batch: Batch) -> list[int]:
        calls.append(len(batch))
        raise ConnectionError("the service is down")

    good, dead = await _run_one_batch(tmp_path, tracker, down, "dead_letter", records=1000)
    assert good.batches == {}
    assert sorted(letter["offset"] for letter in dead.values()) == list(range(1000))  # type: ignore[index]
    assert len(calls) <= 2 + 2 * (1000).bit_length() + 16  # not one call per record


async def test_a_handler_that_times_out_is_not_bisected(tmp_path: Path, tracker: Tracker) -> None:
    calls: list[int] = []

    async def slow(batch: Batch) -> list[int]:
        calls.append(len(batch))
        raise TimeoutError("took too long")

    good, dead = await _run_one_batch(tmp_path, tracker, slow, "dead_letter")
    assert calls == [50, 50]
    assert len(dead.values()) == 50
    assert good.batches == {}


async def test_a_bisected_batch_commits_its_dead_letters_before_its_outputs(
    tmp_path: Path, tracker: Tracker
) -> None:
    # Were the outputs first, a crash between the two commits and a re-run on
    # which the handler passes would leave the bad record in neither sink.
    order: list[str] = []

    class Logged(ListSink):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        async def commit(self, batch: Batch, outputs: Any) -> bool:
            order.append(self.name)
            return await super().commit(batch, outputs)

    async def square(batch: Batch) -> list[int]:
        if any(_bad(int(r.value)) for r in batch):
            raise ValueError("bad record")
        return [int(r.value) ** 2 for r in batch]

    source = SequenceSource(rate=None, limit=20, value=lambda p, o: b"%d" % o)
    source.name = "seq"
    good, dead = Logged("outputs"), Logged("dead letters")
    scheduler = BatchScheduler(
        app="d",
        tracker=tracker,
        sources={"seq": source},
        handlers=[HandlerSpec("h", square, ("seq",), good)],
        policy=BatchPolicy(interval=0.01, on_failure="dead_letter", retry=RetryPolicy(0)),
        checkpointer=Checkpointer(
            OsFileSystem(), str(tmp_path / "cp"), "d", interval=0, loaded=None, last_done=0
        ),
        dead_letter=dead,
    )
    alloc = await scheduler.allocate(0.0)
    assert alloc is not None
    await scheduler._run_batch(alloc, scheduled=None, recovered=False)
    assert order == ["dead letters", "outputs"]
    assert len(dead.values()) == 3  # 3, 10, 17


async def test_bisection_stops_when_everything_fails_after_a_part_passed(
    tmp_path: Path, tracker: Tracker
) -> None:
    calls: list[int] = []

    async def flaky(batch: Batch) -> list[int]:
        calls.append(len(batch))
        if len(calls) == 3:  # the first half passes, then the service goes down
            return [0] * len(batch)
        raise ConnectionError("the service is down")

    _, dead = await _run_one_batch(tmp_path, tracker, flaky, "dead_letter", records=1000)
    assert len(dead.values()) == 500
    assert len(calls) <= 3 + 2 * (1000).bit_length() + 16
