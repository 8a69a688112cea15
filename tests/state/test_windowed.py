"""Windows kept in keyed state: the store-backed version against the pure model, and in an app."""

from __future__ import annotations

import collections
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import streamlet as sl
from streamlet.records import Record
from streamlet.state import KeyedState
from streamlet.state._store import StateStore
from streamlet.state._windows import Book, Event, apply_batch
from streamlet.windows import WindowResult, count, sliding, sum_, tumbling, windowed
from tests.engine.test_app import ListSink


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[StateStore]:
    opened = await StateStore.open(str(tmp_path / "h.sqlite"), app="a", handler="h", state_id="")
    try:
        yield opened
    finally:
        await opened.aclose()


def _record(key: bytes, t: float, n: int) -> Record:
    return Record(b"%d" % n, key=key, timestamp=t, offset=n)


async def test_a_sliding_count_closes_each_window_once_on_the_batch_clock(
    store: StateStore,
) -> None:
    spec = sliding(4.0, 2.0)
    emitted: list[WindowResult] = []
    batches = {1: [b"a", b"b"], 2: [b"a"], 3: [], 4: [b"a"], 5: [], 6: [], 7: [], 8: []}
    for batch_id, keys in batches.items():
        state = KeyedState(store, batch_id, 10.0 + batch_id)  # batch time 11 .. 18
        done = windowed(state, [_record(k, 0, i) for i, k in enumerate(keys)], spec, count())
        emitted.extend(done.results)
        await store.commit(state.changes())
    assert [(r.key, r.start, r.end, r.value) for r in emitted] == [
        (b"a", 8.0, 12.0, 1),  # closed at t=12 (batch 2)
        (b"b", 8.0, 12.0, 1),
        (b"a", 10.0, 14.0, 2),  # t=11 and 12; closed at t=14
        (b"b", 10.0, 14.0, 1),
        (b"a", 12.0, 16.0, 2),  # t=12 and 14; closed by an idle batch at t=16
        (b"a", 14.0, 18.0, 1),  # t=14; closed by an idle batch at t=18
    ]
    leftover = KeyedState(store, 9, 19.0)
    assert list(leftover) == []  # the windows' own entries are not the user's keys


async def test_a_ttl_never_expires_the_windows_own_entries(tmp_path: Path) -> None:
    store = await StateStore.open(
        str(tmp_path / "t.sqlite"), app="a", handler="h", state_id="", ttl=10.0
    )
    try:
        spec = tumbling(60.0)
        results: list[WindowResult] = []
        # The open window [1020, 1080) is not written from 1030 to 1085: past the ttl.
        for batch_id, t in enumerate([1000.0, 1015.0, 1030.0, 1065.0, 1085.0], start=1):
            state = KeyedState(store, batch_id, t)
            assert state.expired == {}  # nothing of the window's book is handed over
            keys = [b"a"] if t < 1060 else []
            done = windowed(state, [_record(k, 0, 0) for k in keys], spec, count())
            results.extend(done.results)
            await store.commit(state.changes())
        assert [(r.key, r.start, r.value) for r in results] == [(b"a", 960.0, 2), (b"a", 1020.0, 1)]
    finally:
        await store.aclose()


async def test_event_time_windows_set_late_records_aside(store: StateStore) -> None:
    spec = tumbling(10.0, time="event", lateness=2.0)
    batches = [
        [_record(b"k", 1.0, 0), _record(b"k", 13.0, 1)],  # watermark after: 11
        [_record(b"k", 5.0, 2), _record(b"k", 12.0, 3)],  # 5 is late; [0, 10) closes
        [_record(b"k", 30.0, 4)],  # watermark after: 28
        [],  # [10, 20) closes
    ]
    results: list[tuple[Any, ...]] = []
    late: list[int] = []
    for batch_id, records in enumerate(batches, start=1):
        state = KeyedState(store, batch_id, 0.0)
        done = windowed(state, records, spec, sum_(lambda r: int(r.value)))
        results.extend((r.start, r.end, r.value) for r in done.results)
        late.extend(r.offset for r in done.late)
        await store.commit(state.changes())
    assert results == [(0.0, 10.0, 0), (10.0, 20.0, 1 + 3)]
    assert late == [2]


_events = st.lists(
    st.tuples(st.sampled_from([b"a", b"b", b"c"]), st.integers(0, 40_000)), max_size=30
)


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    events=_events,
    cuts=st.lists(st.integers(0, 30), max_size=6),
    event_time=st.booleans(),
    size_slide=st.sampled_from([(4.0, 4.0), (6.0, 2.0), (3.0, 1.0)]),
    idle_timeout=st.sampled_from([None, 1.0, 7.5]),
)
async def test_windowed_over_the_store_equals_the_model_over_a_whole_book(
    tmp_path_factory: pytest.TempPathFactory,
    events: list[tuple[bytes, int]],
    cuts: list[int],
    event_time: bool,
    size_slide: tuple[float, float],
    idle_timeout: float | None,
) -> None:
    size, slide = size_slide
    spec = (
        sliding(size, slide, time="event", lateness=1.0, idle_timeout=idle_timeout)
        if event_time
        else sliding(size, slide, time="processing")
    )
    records = [_record(k, ms / 1000, i) for i, (k, ms) in enumerate(events)]
    bounds = sorted({0, len(records), *(min(c, len(records)) for c in cuts)})
    batches = [records[a:b] for a, b in itertools.pairwise(bounds)] + [[], []]
    store = await StateStore.open(
        str(tmp_path_factory.mktemp("w") / "h.sqlite"), app="a", handler="h", state_id=""
    )
    book = Book()
    try:
        for batch_id, batch in enumerate(batches, start=1):
            batch_time = 5.0 * batch_id  # processing time: every batch 5 s later
            model_events = [
                Event(r.key or b"", r.timestamp if event_time else batch_time, r) for r in batch
            ]
            book, want, want_late = apply_batch(book, model_events, batch_time, spec, count())
            state = KeyedState(store, batch_id, batch_time)
            done = windowed(state, batch, spec, count(), event_time=lambda r: r.timestamp)
            await store.commit(state.changes())
            assert done.results == want
            assert done.late == [e.item for e in want_late]
    finally:
        await store.aclose()


async def test_a_processing_time_window_closes_when_input_stops(tmp_path: Path) -> None:
    """No record after the last one: idle batches close its window on the clock."""
    app = sl.App("w", state_dir=tmp_path / "state", batch_interval=0.05)
    numbers = app.source(
        sl.SequenceSource(rate=None, limit=300, key=lambda p, o: b"k%d" % (o % 3)), name="n"
    )
    window = tumbling(0.2)
    sink = ListSink()
    closed_at: list[float] = []

    @app.handler(numbers, sink=sink, state=sl.State())
    async def per_window(batch: sl.Batch, state: KeyedState) -> list[Any]:
        done = windowed(state, batch, window, count())
        if done.results:
            closed_at.append(batch.time)
        return [[r.key.decode(), r.start, r.value] for r in done.results]  # type: ignore[union-attr]

    async with anyio.create_task_group() as tg:
        await tg.start(app.serve)
        with anyio.fail_after(10):
            while sum(v for _, _, v in sink.values()) < 300:  # type: ignore[misc]  # noqa: ASYNC110
                await anyio.sleep(0.02)
        app.stop()
    counts: collections.Counter[str] = collections.Counter()
    for key, _, n in sink.values():  # type: ignore[misc]
        counts[key] += n
    assert counts == {"k0": 100, "k1": 100, "k2": 100}
    windows = [(k, s) for k, s, _ in sink.values()]  # type: ignore[misc]
    assert len(windows) == len(set(windows))  # each window once


@pytest.mark.parametrize("idle_timeout", [0.3, None])
async def test_an_event_time_window_closes_after_its_idle_timeout_when_input_stops(
    tmp_path: Path, idle_timeout: float | None
) -> None:
    """Without input the watermark waits; with idle_timeout it follows the batch clock."""
    app = sl.App("w", state_dir=tmp_path / "state", batch_interval=0.05)
    numbers = app.source(
        sl.SequenceSource(rate=None, limit=300, key=lambda p, o: b"k%d" % (o % 3)), name="n"
    )
    window = tumbling(0.2, time="event", lateness=0.1, idle_timeout=idle_timeout)
    sink = ListSink()

    @app.handler(numbers, sink=sink, state=sl.State())
    async def per_window(batch: sl.Batch, state: KeyedState) -> list[Any]:
        done = windowed(state, batch, window, count())
        assert done.late == []
        return [[r.key.decode(), r.start, r.value] for r in done.results]  # type: ignore[union-attr]

    async with anyio.create_task_group() as tg:
        await tg.start(app.serve)
        with anyio.move_on_after(3 if idle_timeout is None else 10):
            while sum(v for _, _, v in sink.values()) < 300:  # type: ignore[misc]  # noqa: ASYNC110
                await anyio.sleep(0.02)
        app.stop()
    total = sum(v for _, _, v in sink.values())  # type: ignore[misc]
    windows = [(k, s) for k, s, _ in sink.values()]  # type: ignore[misc]
    assert len(windows) == len(set(windows))  # each window once
    if idle_timeout is None:
        assert total < 300  # the last window waits for input that does not come
    else:
        assert total == 300


async def test_a_book_kept_before_idle_timeout_existed_closes_its_windows_once_idle(
    store: StateStore,
) -> None:
    """Its meta has no newest event time: the idle count starts at the first batch that reads it."""
    before = tumbling(10, time="event", lateness=2)
    state = KeyedState(store, 1, 100.0)
    windowed(state, [_record(b"a", 13.0, 0)], before, count())
    meta = dict(state.internal_get(b"window/window/meta"))
    del meta["newest"], meta["raised_at"]  # as an earlier streamlet wrote it
    state.internal_set(b"window/window/meta", meta)
    await store.commit(state.changes())

    spec = tumbling(10, time="event", lateness=2, idle_timeout=5)
    closed: list[tuple[float, WindowResult]] = []
    for batch_id, t in enumerate((101.0, 106.0, 112.0, 130.0), start=2):
        state = KeyedState(store, batch_id, t)
        closed += [(t, r) for r in windowed(state, [], spec, count()).results]
        await store.commit(state.changes())
    # Newest is taken as 11 + 2 from 101 on: 13 - 2 + (130 - 101 - 5) passes 20 at 130.
    assert closed == [(130.0, WindowResult(b"a", 10.0, 20.0, 1))]
