"""The tracker's state machine and allocation decision, without I/O."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamlet._tracker import (
    Allocation,
    AllocEvent,
    TrackerState,
    decode_event,
    encode_event,
    plan_allocation,
)
from streamlet.errors import StreamletError
from streamlet.records import BlockRef, OffsetRange


def _alloc_event(alloc: Allocation) -> AllocEvent:
    return AllocEvent(alloc)


def test_allocation_starts_where_the_previous_ended_and_respects_limits() -> None:
    state = TrackerState(positions={"s": {0: 0, 1: 5}})
    first = plan_allocation(state, batch_time=1.0, latest={"s": {0: 100, 1: 7}}, limits={"s": 10})
    assert first.ranges == (OffsetRange("s", 0, 0, 10), OffsetRange("s", 1, 5, 7))
    state.apply(_alloc_event(first))
    second = plan_allocation(state, batch_time=2.0, latest={"s": {0: 100, 1: 7}}, limits={"s": 10})
    assert second.id == first.id + 1
    # Partition 1 has nothing new: it is left out rather than logged empty.
    assert second.ranges == (OffsetRange("s", 0, 10, 20),)


def test_nothing_new_gives_an_empty_allocation() -> None:
    state = TrackerState(positions={"s": {0: 3}})
    alloc = plan_allocation(state, batch_time=0.0, latest={"s": {0: 3}}, limits={"s": None})
    assert alloc.empty


def test_done_commits_positions_in_order() -> None:
    state = TrackerState(positions={"s": {0: 0}})
    a1 = plan_allocation(state, batch_time=0, latest={"s": {0: 4}}, limits={"s": None})
    state.apply(_alloc_event(a1))
    a2 = plan_allocation(state, batch_time=0, latest={"s": {0: 9}}, limits={"s": None})
    state.apply(_alloc_event(a2))
    assert [a.id for a in state.pending] == [1, 2]
    assert state.committed == {}
    state.apply(decode_event({"e": "done", "id": 1}))
    assert state.committed == {"s": {0: 4}}
    assert state.last_done == 1
    assert [a.id for a in state.pending] == [2]


def test_done_out_of_order_is_refused() -> None:
    state = TrackerState(positions={"s": {0: 0}})
    state.apply(_alloc_event(plan_allocation(state, batch_time=0, latest={"s": {0: 1}}, limits={})))
    with pytest.raises(StreamletError, match="oldest pending is 1"):
        state.apply(decode_event({"e": "done", "id": 2}))


def test_a_dropped_batch_leaves_pending_without_committing_its_positions() -> None:
    state = TrackerState(positions={"s": {0: 0, 1: 0}})
    a1 = plan_allocation(state, batch_time=0, latest={"s": {0: 4}}, limits={})
    state.apply(_alloc_event(a1))
    a2 = plan_allocation(state, batch_time=0, latest={"s": {1: 6}}, limits={})
    state.apply(_alloc_event(a2))
    # Group mode: batch 1's task moved away; batch 2 goes on and is done.
    state.apply(decode_event({"e": "drop", "id": 1}))
    assert [a.id for a in state.pending] == [2]
    state.apply(decode_event({"e": "done", "id": 2}))
    assert state.committed == {"s": {1: 6}}  # nothing of batch 1
    with pytest.raises(StreamletError, match="drops batch 1, which is not pending"):
        state.apply(decode_event({"e": "drop", "id": 1}))


def test_allocation_with_wrong_id_is_refused() -> None:
    state = TrackerState()
    bogus = Allocation(7, 0.0, (OffsetRange("s", 0, 0, 1),), ())
    with pytest.raises(StreamletError, match="allocates batch 7 where 1 was next"):
        state.apply(_alloc_event(bogus))


def test_blocks_are_allocated_once_and_acks_kept() -> None:
    state = TrackerState()
    b1 = BlockRef(1, "tcp", 1, 32, 100, 3)
    b2 = BlockRef(2, "tcp", 1, 144, 50, 1)
    state.apply(decode_event({"e": "block", "b": list(b1), "acks": {"client-a": 3}}))
    state.apply(decode_event({"e": "block", "b": list(b2), "acks": {"client-a": 4}}))
    alloc = plan_allocation(state, batch_time=0, latest={}, limits={}, receivers=frozenset({"tcp"}))
    assert alloc.blocks == (b1, b2)
    state.apply(_alloc_event(alloc))
    assert state.blocks == {"tcp": []}
    assert state.acks == {"tcp": {"client-a": 4}}
    assert state.next_block_id == 3
    again = plan_allocation(state, batch_time=0, latest={}, limits={}, receivers=frozenset({"tcp"}))
    assert again.empty


def test_unknown_event_is_refused() -> None:
    with pytest.raises(StreamletError, match="unknown tracker event"):
        TrackerState().apply(decode_event({"e": "bogus"}))


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.integers(0, 50), st.integers(0, 50), st.booleans()), min_size=1, max_size=20
    )
)
def test_state_round_trips_through_json_at_any_point(
    steps: list[tuple[int, int, bool]],
) -> None:
    state = TrackerState(positions={"s": {0: 0, 1: 0}})
    for grow0, grow1, finish in steps:
        latest = {"s": {0: state.positions["s"][0] + grow0, 1: state.positions["s"][1] + grow1}}
        alloc = plan_allocation(state, batch_time=1.5, latest=latest, limits={"s": 30})
        if not alloc.empty:
            state.apply(_alloc_event(alloc))
        if finish and state.pending:
            state.apply(decode_event({"e": "done", "id": state.pending[0].id}))
        assert TrackerState.from_json(state.to_json()) == state


def test_a_receiver_limit_takes_whole_blocks_oldest_first_and_at_least_one() -> None:
    from streamlet._tracker import TrackerState, plan_allocation
    from streamlet.records import BlockRef

    state = TrackerState()
    for i, size in enumerate([300, 300, 300, 5000], start=1):
        state.apply(decode_event({"e": "block", "b": [i, "r", 1, 100 * i, 10, size]}))
    limited = plan_allocation(
        state,
        batch_time=0.0,
        latest={},
        limits={},
        receivers=frozenset({"r"}),
        receiver_limits={"r": 700},
    )
    assert [b.id for b in limited.blocks] == [1, 2]
    one = plan_allocation(
        state,
        batch_time=0.0,
        latest={},
        limits={},
        receivers=frozenset({"r"}),
        receiver_limits={"r": 10},
    )
    assert [b.id for b in one.blocks] == [1]
    unlimited = plan_allocation(
        state, batch_time=0.0, latest={}, limits={}, receivers=frozenset({"r"})
    )
    assert [b.id for b in unlimited.blocks] == [1, 2, 3, 4]
    assert isinstance(unlimited.blocks[0], BlockRef)


@pytest.mark.parametrize(
    "event",
    [
        {"e": "done", "id": 99},
        {"e": "alloc", "id": 7, "t": 0.0, "r": [], "b": []},
        {"e": "block", "b": ["x"]},
        {"e": "nonsense"},
    ],
)
async def test_an_impossible_event_is_refused_before_it_is_logged(
    tmp_path: Path, event: dict[str, object]
) -> None:
    from streamlet._tracker import Tracker

    directory = str(tmp_path / "tracker")
    tracker = await Tracker.open(directory, base=None, after=None)
    try:
        with pytest.raises(StreamletError):
            await tracker._log(decode_event(dict(event)))
        assert tracker.state == TrackerState()
        assert tracker.last_event is None
        if event["e"] == "done":
            with pytest.raises(StreamletError, match="done while the oldest pending is None"):
                await tracker.log_done(99)
        # A valid event still goes through after the refusal.
        await tracker.log_blocks([(BlockRef(1, "r", 1, 0, 10, 1), {})])
    finally:
        await tracker.aclose()
    # Had the bad event been appended, every reopen would fail replaying it.
    reopened = await Tracker.open(directory, base=None, after=None)
    try:
        assert [b.id for b in reopened.state.blocks["r"]] == [1]
    finally:
        await reopened.aclose()


@given(
    st.one_of(
        st.builds(
            lambda i, n, acks: decode_event(
                {"e": "block", "b": [i, "r", 1, 32, 10, n], "acks": acks}
            ),
            st.integers(1, 10**9),
            st.integers(1, 10**6),
            st.dictionaries(st.text(max_size=8), st.integers(0, 10**9), max_size=3),
        ),
        st.builds(lambda i: decode_event({"e": "done", "id": i}), st.integers(1, 10**9)),
        st.builds(lambda i: decode_event({"e": "drop", "id": i}), st.integers(1, 10**9)),
        st.builds(
            lambda i, t, start, n: AllocEvent(
                Allocation(i, t, (OffsetRange("s", 0, start, start + n),), ())
            ),
            st.integers(1, 10**9),
            st.floats(0, 2e9),
            st.integers(0, 10**12),
            st.integers(0, 10**6),
        ),
    )
)
def test_an_event_reads_back_as_it_was_written(event: object) -> None:
    assert decode_event(encode_event(event)) == event  # type: ignore[arg-type]
