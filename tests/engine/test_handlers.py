"""Handlers as users get them wrong: plain defs, blocking code, outputs a sink cannot write."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from streamlet.app import App
from streamlet.errors import ConfigError, HandlerError, OutputError, SinkError
from streamlet.records import Batch
from streamlet.sinks.base import Sink
from streamlet.sinks.file import FileSink
from streamlet.sources.sequence import SequenceSource
from tests.engine.test_app import ListSink, _serve_until


def _app(tmp_path: Path, **kwargs: object) -> tuple[App, SequenceSource]:
    app = App("h", state_dir=tmp_path / "state", batch_interval=0.02, **kwargs)  # type: ignore[arg-type]
    source = app.source(SequenceSource(rate=None, limit=20, max_rate=500), name="seq")
    return app, source


def test_a_plain_def_is_refused_when_registered_and_never_called(tmp_path: Path) -> None:
    app, source = _app(tmp_path)
    calls: list[int] = []

    def plain(batch: Batch) -> list[int]:
        calls.append(batch.id)
        return []

    with pytest.raises(ConfigError, match=r"'plain' is a plain def.*thread=True"):
        app.handler(source)(plain)
    assert calls == []

    async def asynchronous(batch: Batch) -> None:
        return None

    with pytest.raises(ConfigError, match="drop thread=True"):
        app.handler(source, thread=True)(asynchronous)


async def test_blocking_code_runs_in_a_thread_with_thread_true(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app, source = _app(tmp_path, blocked_loop_warning=0.2)
    sink = ListSink()

    @app.handler(source, sink=sink, thread=True)
    def blocking(batch: Batch) -> list[int]:
        time.sleep(0.3)  # a synchronous client, say
        return [int(r.value) for r in batch]

    done = anyio.Event()
    app.add_listener(lambda info: done.set() if len(sink.values()) >= 20 else None)
    with caplog.at_level(logging.WARNING, logger="streamlet._watchdog"):
        await _serve_until(app, done)
    assert sink.values() == list(range(20))
    assert "blocked" not in caplog.text


async def test_a_handler_blocking_the_loop_is_named_in_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app, source = _app(tmp_path, blocked_loop_warning=0.2)
    sink = ListSink()

    @app.handler(source, sink=sink)
    async def sleepy(batch: Batch) -> list[int]:
        time.sleep(0.8)  # noqa: ASYNC251 - the mistake under test
        return [int(r.value) for r in batch]

    done = anyio.Event()
    app.add_listener(lambda info: done.set())
    with caplog.at_level(logging.WARNING, logger="streamlet._watchdog"):
        await _serve_until(app, done)
    warnings = [r.getMessage() for r in caplog.records if r.name == "streamlet._watchdog"]
    assert any("has been blocked" in w and "handler 'sleepy' (batch 1)" in w for w in warnings)
    assert any("was blocked for" in w and "'sleepy'" in w for w in warnings)


async def test_an_output_the_sink_cannot_encode_is_dead_lettered_like_a_failure(
    tmp_path: Path,
) -> None:
    """The batch's other handlers commit; the failing handler's input is set aside."""
    dead_dir = tmp_path / "dead"
    app, source = _app(
        tmp_path, on_failure="dead_letter", dead_letter=FileSink(dead_dir), max_retries=2
    )
    good = ListSink()
    files = tmp_path / "out"

    @app.handler(source, sink=good)
    async def fine(batch: Batch) -> list[int]:
        return [int(r.value) for r in batch]

    @app.handler(source, sink=FileSink(files))
    async def odd(batch: Batch) -> list[object]:
        # A set is not JSON: record 7's batch cannot be written.
        return [{7} if int(r.value) == 7 else int(r.value) for r in batch]

    done = anyio.Event()
    app.add_listener(lambda info: done.set() if len(good.values()) >= 20 else None)
    await _serve_until(app, done)
    assert good.values() == list(range(20))
    written = FileSink.read_committed(files)
    letters = [
        orjson.loads(line) for lines in FileSink.read_committed(dead_dir).values() for line in lines
    ]
    assert letters, "the refused batch must be dead-lettered"
    assert {entry["handler"] for entry in letters} == {"odd"}
    assert all("OutputError" in entry["error"] for entry in letters)
    assert all(entry["attempts"] == 1 for entry in letters)  # never retried
    dead_offsets = sorted(entry["offset"] for entry in letters)
    assert 7 in dead_offsets
    kept = sorted(orjson.loads(line) for lines in written.values() for line in lines)
    assert sorted(kept + dead_offsets) == list(range(20))
    # The refused batches have no part file in the handler's directory.
    assert {entry["batch_id"] for entry in letters}.isdisjoint(written)


class _CountingSink(Sink):
    def __init__(self, error: SinkError) -> None:
        self.error = error
        self.calls = 0

    async def commit(self, batch: Batch, outputs: Sequence[object]) -> bool:
        self.calls += 1
        raise self.error


@pytest.mark.parametrize(("retriable", "calls"), [(False, 1), (True, 3)])
async def test_only_retriable_errors_are_tried_again(
    tmp_path: Path, retriable: bool, calls: int
) -> None:
    error = SinkError("the sink said no")
    error.retriable = retriable
    sink = _CountingSink(error)
    app, source = _app(tmp_path, max_retries=2, retry_backoff=0.01)
    app.handler(source, sink=sink)(_echo)
    with anyio.fail_after(20), pytest.raises(SinkError, match="after"):
        await app.serve()
    assert sink.calls == calls


async def test_an_output_error_stops_the_app_by_default_without_retries(tmp_path: Path) -> None:
    sink = _CountingSink(OutputError("output 0 cannot be encoded"))
    app, source = _app(tmp_path, max_retries=3, retry_backoff=0.01)
    app.handler(source, sink=sink)(_echo)
    with anyio.fail_after(20), pytest.raises(OutputError, match="cannot be encoded"):
        await app.serve()
    assert sink.calls == 1


async def _echo(batch: Batch) -> list[int]:
    return [int(r.value) for r in batch]


def test_batch_size_budgets_are_bounded_first_and_follow_record_size() -> None:
    from streamlet._scheduler import FIRST_BATCH_RECORDS, size_budget

    assert size_budget(max_records=100_000, max_bytes=2**26, record_bytes=None) == (
        FIRST_BATCH_RECORDS
    )
    assert size_budget(max_records=100_000, max_bytes=2**26, record_bytes=100.0) == 100_000
    assert size_budget(max_records=100_000, max_bytes=2**26, record_bytes=2**20) == 64
    # At least one: a record larger than the budget still runs.
    assert size_budget(max_records=100_000, max_bytes=2**20, record_bytes=2**24) == 1


def test_a_budget_goes_to_the_partitions_that_have_input() -> None:
    from streamlet._tracker import share_budget

    assert share_budget({0: 10, 1: 20}, 100) == {0: 10, 1: 20}
    # One hot partition among idle ones takes what they leave.
    hot = share_budget({p: (90_000 if p == 7 else 0) for p in range(50)}, 100_000)
    assert hot[7] == 90_000
    split = share_budget({0: 5, 1: 1_000, 2: 1_000}, 1_005)
    assert split == {0: 5, 1: 500, 2: 500}
    assert sum(share_budget({0: 7, 1: 7, 2: 7}, 10).values()) <= 10


async def test_a_backlog_drains_over_bounded_batches(tmp_path: Path) -> None:
    app = App("h", state_dir=tmp_path / "state", batch_interval=0.02, max_batch_records=2_000)
    source = app.source(SequenceSource(rate=None, limit=9_000), name="seq")
    sink = ListSink()
    app.handler(source, sink=sink)(_echo)
    sizes: list[int] = []
    done = anyio.Event()

    def seen(info: object) -> None:
        sizes.append(info.records)  # type: ignore[attr-defined]
        if sum(sizes) >= 9_000:
            done.set()

    app.add_listener(seen)
    await _serve_until(app, done)
    assert sink.values() == list(range(9_000))
    assert sizes[0] <= 1_000  # the first batch, before record sizes are known
    assert max(sizes) <= 2_000
    assert len(sizes) >= 5


async def test_a_bounded_batch_is_followed_at_once_not_at_the_next_tick(tmp_path: Path) -> None:
    """The size bound limits a batch, not the throughput: the backlog goes in quick batches."""
    app = App("h", state_dir=tmp_path / "state", batch_interval=5.0, max_batch_records=1_000)
    source = app.source(SequenceSource(rate=None, limit=20_000), name="seq")
    sink = ListSink()
    app.handler(source, sink=sink)(_echo)
    done = anyio.Event()
    app.add_listener(lambda info: done.set() if len(sink.values()) >= 20_000 else None)
    # Twenty batches at one per 5 s tick would take 100 s.
    with anyio.fail_after(15):
        await _serve_until(app, done)
    assert sink.values() == list(range(20_000))
    assert max(len(outs) for outs in sink.batches.values()) <= 1_000


async def test_a_graceful_stop_takes_every_stored_block_however_many_batches(
    tmp_path: Path,
) -> None:
    from streamlet.records import Record
    from streamlet.sources.receiver import Receiver, ReceiverContext

    class Backlog(Receiver):
        def __init__(self) -> None:
            super().__init__()
            self.durable = anyio.Event()

        async def run(self, context: ReceiverContext) -> None:
            for i in range(0, 10_000, 500):
                stored = await context.store([Record(b"%d" % n) for n in range(i, i + 500)])
                await stored.wait()  # one block per store (a batch takes whole blocks)
            self.durable.set()
            await context.stopping.wait()

    app = App(
        "h",
        state_dir=tmp_path / "state",
        batch_interval=30.0,
        block_interval=0.01,
        max_batch_records=1_000,
    )
    receiver = app.source(Backlog(), name="r")
    sink = ListSink()
    app.handler(receiver, sink=sink)(_echo)
    async with anyio.create_task_group() as tg:
        tg.start_soon(app.serve)
        with anyio.fail_after(20):
            await receiver.durable.wait()
        app.stop()  # before the first 30 s tick: everything is left to the drain
    assert sorted(sink.values()) == list(range(10_000))  # type: ignore[type-var]
    assert max(len(outs) for outs in sink.batches.values()) <= 1_000


async def test_a_thread_handler_that_yields_runs_its_body_in_the_thread(tmp_path: Path) -> None:
    import threading

    app, source = _app(tmp_path)
    sink = ListSink()
    threads: set[int] = set()

    @app.handler(source, sink=sink, thread=True)
    def each(batch: Batch) -> Iterator[int]:
        for record in batch:
            threads.add(threading.get_ident())
            yield int(record.value)

    done = anyio.Event()
    app.add_listener(lambda info: done.set() if len(sink.values()) >= 20 else None)
    await _serve_until(app, done)
    assert sink.values() == list(range(20))
    assert threading.get_ident() not in threads


async def test_a_thread_handler_over_its_timeout_counts_as_failed(tmp_path: Path) -> None:
    app, source = _app(tmp_path, handler_timeout=0.1, max_retries=1, retry_backoff=0.01)
    calls: list[int] = []

    @app.handler(source, sink=ListSink(), thread=True)
    def slow(batch: Batch) -> list[int]:
        calls.append(batch.id)
        time.sleep(0.3)
        return []

    with anyio.fail_after(20), pytest.raises(HandlerError, match="over handler_timeout"):
        await app.serve()
    assert calls == [1, 1]


async def test_the_warning_names_the_handler_that_blocks_not_its_neighbours(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app, source = _app(tmp_path, blocked_loop_warning=0.2)

    # Registered first, so both are under way when the culprit blocks.
    @app.handler(source)
    async def patient(batch: Batch) -> None:
        await anyio.sleep(2)

    @app.handler(source, thread=True)
    def threaded(batch: Batch) -> None:
        time.sleep(1)

    @app.handler(source)
    async def culprit(batch: Batch) -> None:
        await anyio.wait_all_tasks_blocked()  # the others have started by now
        time.sleep(0.8)  # noqa: ASYNC251 - the mistake under test

    done = anyio.Event()
    app.add_listener(lambda info: done.set())
    with caplog.at_level(logging.WARNING, logger="streamlet._watchdog"):
        await _serve_until(app, done)
    warnings = [r.getMessage() for r in caplog.records if "has been blocked" in r.getMessage()]
    assert warnings
    assert all("'culprit'" in w for w in warnings)
    assert not any("'patient'" in w or "'threaded'" in w for w in warnings)


def test_a_decorated_async_handler_is_accepted(tmp_path: Path) -> None:
    import functools

    def logged(fn: Callable[[Batch], Awaitable[list[int]]]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(batch: Batch) -> Awaitable[list[int]]:
            return fn(batch)

        return wrapper

    app, source = _app(tmp_path)
    app.handler(source)(logged(_echo))


async def test_a_batch_that_outlasts_stop_timeout_is_cancelled_and_runs_again(
    tmp_path: Path,
) -> None:
    """A graceful stop is bounded: the stuck batch stays uncommitted and is redone once."""
    stuck = {"on": True}
    sink = ListSink()

    def build() -> App:
        app, source = _app(tmp_path, stop_timeout=0.5)

        @app.handler(source, sink=sink)
        async def waits(batch: Batch) -> list[int]:
            if stuck["on"]:
                await anyio.sleep(3600)  # a broker that does not answer, say
            return [int(r.value) for r in batch]

        return app

    app = build()
    # serve returns by itself, the grace after the stop: nothing cancels it here.
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(app.serve)
            await anyio.sleep(0.3)
            app.stop()
    assert sink.values() == []
    stuck["on"] = False
    again = build()
    done = anyio.Event()
    again.add_listener(lambda info: done.set() if len(sink.values()) >= 20 else None)
    await _serve_until(again, done)
    assert sink.values() == list(range(20))
