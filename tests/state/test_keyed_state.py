"""The keyed state store and its per-batch view: a dict that commits once per batch."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import streamlet as sl
from streamlet._checkpoint import Checkpointer
from streamlet._handlers import HandlerSpec
from streamlet._retry import RetryPolicy
from streamlet._scheduler import BatchPolicy, BatchScheduler
from streamlet._tracker import Tracker
from streamlet.errors import ConfigError, HandlerError, StateError
from streamlet.fs import OsFileSystem
from streamlet.records import Batch
from streamlet.sources.sequence import SequenceSource
from streamlet.state import KeyedState
from streamlet.state._store import StateStore
from tests.engine.test_app import ListSink


async def _store(path: Path, **kwargs: Any) -> StateStore:
    options: dict[str, Any] = {"app": "a", "handler": "h", "state_id": "id1"}
    options.update(kwargs)
    return await StateStore.open(str(path / "h.sqlite"), **options)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[StateStore]:
    opened = await _store(tmp_path)
    try:
        yield opened
    finally:
        await opened.aclose()


async def test_a_batch_sees_the_previous_batch_and_its_changes_commit_once(
    store: StateStore,
) -> None:
    first = KeyedState(store, 1, 100.0)
    first["a"] = 1
    first[b"b"] = {"n": [1, 2]}
    first[7] = "seven"
    await store.commit(first.changes())
    second = KeyedState(store, 2, 101.0)
    assert (second["a"], second[b"b"], second[7]) == (1, {"n": [1, 2]}, "seven")
    assert sorted(map(repr, second)) == sorted(map(repr, ["a", b"b", 7]))
    second["a"] += 1
    second[b"b"]["n"].append(3)  # changed in place, as in a dict
    del second[7]
    assert 7 not in second
    assert len(second) == 2
    await store.commit(second.changes())
    await store.commit(second.changes())  # the same batch again: nothing changes
    third = KeyedState(store, 3, 102.0)
    assert dict(third.items()) == {"a": 2, b"b": {"n": [1, 2, 3]}}
    assert store.seq == 2


async def test_a_commit_is_durable_when_it_returns(store: StateStore) -> None:
    """The durability step: a WAL journal with synchronous=FULL fsyncs the log at each commit.

    synchronous=NORMAL would still be atomic, but a power cut could lose the
    last commits after the sinks held them; the store would then be behind
    the tracker's done batches and refused. (A power-cut test of the store
    itself needs a SQLite VFS over FaultFS, which is not built.)
    """
    conn = store._conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


async def test_a_discarded_view_leaves_nothing_behind(store: StateStore) -> None:
    attempt = KeyedState(store, 1, 0.0)
    attempt["x"] = 1
    again = KeyedState(store, 1, 0.0)  # a retry: a fresh view of the same state
    assert "x" not in again
    assert again.changes().writes == {}


async def test_a_key_of_another_type_or_a_value_orjson_cannot_encode_is_a_state_error(
    store: StateStore,
) -> None:
    state = KeyedState(store, 5, 0.0)
    with pytest.raises(StateError, match=r"handler 'h', batch 5: a state key must be str"):
        state[1.5] = 1  # type: ignore[index]
    state["s"] = {1, 2}
    with pytest.raises(StateError, match=r"state value of key 's' cannot be stored"):
        state.changes()


async def test_keys_past_their_ttl_are_handed_over_once_and_gone(tmp_path: Path) -> None:
    store = await _store(tmp_path, ttl=10.0)
    try:
        state = KeyedState(store, 1, 100.0)
        state["old"], state["kept"] = "o", "k"
        await store.commit(state.changes())
        state = KeyedState(store, 2, 105.0)
        state["kept"] = "k2"  # a write renews it
        await store.commit(state.changes())
        state = KeyedState(store, 3, 112.0)
        assert state.expired == {"old": "o"}
        assert "old" not in state
        assert list(state) == ["kept"]
        await store.commit(state.changes())
        state = KeyedState(store, 4, 113.0)
        assert state.expired == {}
        assert store.count(113.0) == 1
    finally:
        await store.aclose()


async def test_a_state_larger_than_the_cache_reads_what_it_needs_from_disk(
    tmp_path: Path,
) -> None:
    store = await _store(tmp_path, cache_keys=10)
    try:
        state = KeyedState(store, 1, 0.0)
        for i in range(1000):
            state[i] = i * i
        await store.commit(state.changes())
        assert len(store._cache) <= 10
        state = KeyedState(store, 2, 0.0)
        assert sum(state[i] for i in range(1000)) == sum(i * i for i in range(1000))
        assert len(store._cache) <= 10
    finally:
        await store.aclose()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"app": "other"}, r"belongs to app 'a', not 'other'"),
        ({"handler": "g"}, r"belongs to handler 'h', not 'g'"),
        ({"state_id": "id2"}, r"made in another state directory"),
    ],
)
async def test_a_store_of_another_app_handler_or_state_directory_is_refused(
    tmp_path: Path, change: dict[str, str], message: str
) -> None:
    await (await _store(tmp_path)).aclose()
    with pytest.raises(StateError, match=message):
        await _store(tmp_path, **change)


async def test_a_damaged_store_is_refused_with_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "h.sqlite").write_bytes(b"this is not a database, " * 100)
    with pytest.raises(StateError, match=r"cannot be read: .*restore the state directory"):
        await _store(tmp_path)


async def test_a_store_that_does_not_fit_the_tracker_is_refused(store: StateStore) -> None:
    state = KeyedState(store, 3, 0.0)
    state["k"] = 1
    await store.commit(state.changes())
    store.check_against(last_done=3, pending=[], allocated=3)
    store.check_against(last_done=2, pending=[3], allocated=3)  # state in, done not yet
    with pytest.raises(StateError, match=r"stops at batch 3, but batch 5 is done"):
        store.check_against(last_done=5, pending=[], allocated=5)
    with pytest.raises(StateError, match=r"past batch 2, the newest the state directory"):
        store.check_against(last_done=2, pending=[], allocated=2)


async def test_an_empty_store_beside_done_batches_is_refused(store: StateStore) -> None:
    with pytest.raises(StateError, match=r"is empty, but batch 4 is done"):
        store.check_against(last_done=4, pending=[], allocated=4)


def test_a_stateful_handler_must_take_the_state() -> None:
    app = sl.App("a", state_dir="/tmp/unused")
    seq = app.source(sl.SequenceSource(rate=1), name="seq")
    with pytest.raises(ConfigError, match=r"cannot be called as h\(batch, state\)"):

        @app.handler(seq, state=sl.State())
        async def h(batch: sl.Batch) -> None:
            return None

    with pytest.raises(ConfigError, match=r"ttl must be a positive number"):
        sl.State(ttl=0)


# -- in the scheduler -------------------------------------------------------------


@pytest.fixture
async def tracker(tmp_path: Path) -> AsyncIterator[Tracker]:
    opened = await Tracker.open(str(tmp_path / "tracker"), base=None, after=None)
    try:
        yield opened
    finally:
        await opened.aclose()


def _scheduler(
    tmp_path: Path, tracker: Tracker, spec: HandlerSpec, store: StateStore
) -> BatchScheduler:
    source = SequenceSource(rate=None, limit=4, key=lambda p, o: b"k")
    source.name = "seq"
    return BatchScheduler(
        app="a",
        tracker=tracker,
        sources={"seq": source},
        handlers=[spec],
        policy=BatchPolicy(interval=0.01, max_batch_records=2, retry=RetryPolicy(backoff=0)),
        checkpointer=Checkpointer(
            OsFileSystem(), str(tmp_path / "cp"), "a", interval=0, loaded=None, last_done=0
        ),
        stores={spec.name: store},
    )


async def test_a_retried_handler_starts_again_from_the_previous_batch_state(
    tmp_path: Path, tracker: Tracker, store: StateStore
) -> None:
    attempts: list[int] = []

    async def count(batch: Batch, state: KeyedState) -> list[int]:
        state["n"] = state.get("n", 0) + len(batch)
        attempts.append(state["n"])
        if len(attempts) == 1:
            raise ConnectionError("first attempt fails after changing the state")
        return [state["n"]]

    sink = ListSink()
    scheduler = _scheduler(tmp_path, tracker, HandlerSpec("h", count, ("seq",), sink), store)
    for _ in range(2):
        alloc = await scheduler.allocate(0.0)
        assert alloc is not None
        await scheduler._run_batch(alloc, scheduled=None, recovered=False)
    assert attempts == [2, 2, 4]
    assert sink.values() == [2, 4]
    assert store.seq == 2


async def test_a_batch_whose_state_committed_before_a_crash_is_not_run_again(
    tmp_path: Path, tracker: Tracker, store: StateStore
) -> None:
    calls: list[int] = []

    async def count(batch: Batch, state: KeyedState) -> list[int]:
        calls.append(batch.id)
        state["n"] = state.get("n", 0) + len(batch)
        return [state["n"]]

    sink = ListSink()
    scheduler = _scheduler(tmp_path, tracker, HandlerSpec("h", count, ("seq",), sink), store)
    alloc = await scheduler.allocate(0.0)
    assert alloc is not None
    # What a crash after the state commit and before done leaves behind:
    # the sink and the store hold the batch, the tracker has it pending.
    state = KeyedState(store, alloc.id, alloc.time)
    state["n"] = 2
    await store.commit(state.changes())
    await sink.commit(Batch(alloc.id, alloc.time, [], alloc.ranges, ()), [2])
    assert await scheduler.recover() == 1
    assert calls == []  # run on the state after itself, it would count twice
    assert tracker.state.pending == []
    assert KeyedState(store, 9, 0.0)["n"] == 2


async def test_a_handler_whose_state_cannot_be_stored_fails_before_its_sink_commits(
    tmp_path: Path, tracker: Tracker, store: StateStore
) -> None:
    async def bad(batch: Batch, state: KeyedState) -> list[int]:
        state["x"] = object()
        return [1]

    sink = ListSink()
    scheduler = _scheduler(tmp_path, tracker, HandlerSpec("h", bad, ("seq",), sink), store)
    alloc = await scheduler.allocate(0.0)
    assert alloc is not None
    with pytest.raises(HandlerError, match=r"state value of key 'x' cannot be stored"):
        await scheduler._run_batch(alloc, scheduled=None, recovered=False)
    assert sink.batches == {}
    assert store.seq == 0


# -- against a model ----------------------------------------------------------------

# Few keys, of each type, so that batches meet the keys earlier ones stored.
_keys = st.sampled_from(["a", "b", "", b"a", b"", 0, -1, 2**70])
_ops = st.lists(
    st.tuples(st.sampled_from(["set", "del", "bump"]), _keys, st.integers(0, 9)), max_size=12
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batches=st.lists(st.tuples(_ops, st.booleans()), max_size=6), cache=st.integers(0, 4))
async def test_the_store_behaves_as_a_dict_committed_per_batch(
    tmp_path_factory: pytest.TempPathFactory,
    batches: list[tuple[list[tuple[str, Any, int]], bool]],
    cache: int,
) -> None:
    path = tmp_path_factory.mktemp("model")
    store = await _store(path, cache_keys=cache)
    model: dict[Any, Any] = {}
    try:
        batch_id = 0
        for ops, commit in batches:
            batch_id += 1
            state = KeyedState(store, batch_id, 0.0)
            pending = dict(model)
            for op, key, value in ops:
                if op == "set":
                    state[key] = [value]
                    pending[key] = [value]
                elif op == "del" and key in pending:
                    del state[key]
                    del pending[key]
                elif op == "bump" and key in pending:
                    state[key].append(value)  # in place
                    pending[key] = [*pending[key], value]
            assert dict(state.items()) == pending
            if commit:
                await store.commit(state.changes())
                model = pending
            else:
                batch_id -= 1  # a failed attempt: the batch runs again
        assert dict(KeyedState(store, batch_id + 1, 0.0).items()) == model
        assert store.count(0.0) == len(model)
    finally:
        await store.aclose()


async def test_a_stateful_handler_failing_on_a_rerun_batch_stops_rather_than_dead_letters(
    tmp_path: Path, tracker: Tracker, store: StateStore
) -> None:
    # Its outputs may have been committed before the crash; dead-lettering
    # the input now would leave them without the state that made them.
    async def fails(batch: Batch, state: KeyedState) -> list[int]:
        raise ConnectionError("down")

    source = SequenceSource(rate=None, limit=4, key=lambda p, o: b"k")
    source.name = "seq"
    scheduler = BatchScheduler(
        app="a",
        tracker=tracker,
        sources={"seq": source},
        handlers=[HandlerSpec("h", fails, ("seq",), ListSink())],
        policy=BatchPolicy(
            interval=0.01, on_failure="dead_letter", retry=RetryPolicy(max_retries=0)
        ),
        checkpointer=Checkpointer(
            OsFileSystem(), str(tmp_path / "cp"), "a", interval=0, loaded=None, last_done=0
        ),
        dead_letter=ListSink(),
        stores={"h": store},
    )
    alloc = await scheduler.allocate(0.0)
    assert alloc is not None
    with pytest.raises(HandlerError, match="failed on batch 1"):
        await scheduler._run_batch(alloc, scheduled=None, recovered=True)
    assert store.seq == 0
