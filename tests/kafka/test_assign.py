"""The group-mode task assignment: balanced, complete, sticky; no broker."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamlet.errors import ConfigError
from streamlet.kafka._assign import assign_tasks, tasks_of
from streamlet.kafka._group import TaskAssignor

members_st = st.lists(
    st.text("abcdefgh", min_size=1, max_size=3), min_size=1, max_size=6, unique=True
)


@settings(deadline=None)  # pure, but shares the machine with a broker
@given(
    tasks=st.integers(0, 24),
    members=members_st,
    claims=st.lists(st.lists(st.integers(0, 30), max_size=10), min_size=6, max_size=6),
)
def test_every_task_has_one_owner_and_shares_differ_by_at_most_one(
    tasks: int, members: list[str], claims: list[list[int]]
) -> None:
    owned = {m: claims[i] for i, m in enumerate(members)}
    result = assign_tasks(range(tasks), owned)
    assert set(result) == set(members)
    dealt = [t for ts in result.values() for t in ts]
    assert sorted(dealt) == list(range(tasks))  # complete, and nobody shares a task
    sizes = [len(ts) for ts in result.values()]
    assert max(sizes) - min(sizes) <= 1


@settings(deadline=None)
@given(tasks=st.integers(0, 24), members=members_st)
def test_a_settled_assignment_does_not_move(tasks: int, members: list[str]) -> None:
    first = assign_tasks(range(tasks), dict.fromkeys(members, ()))
    assert assign_tasks(range(tasks), first) == first


@settings(deadline=None)
@given(tasks=st.integers(1, 24), members=members_st, joiner=st.text("xyz", min_size=1))
def test_a_joining_member_takes_only_its_share_from_the_others(
    tasks: int, members: list[str], joiner: str
) -> None:
    before = assign_tasks(range(tasks), dict.fromkeys(members, ()))
    after = assign_tasks(range(tasks), {**before, joiner: []})
    moved = sum(1 for m in members for t in before[m] if t not in after[m])
    assert moved == len(after[joiner])  # only what the new member gets moves
    for m in members:
        assert set(after[m]) <= set(before[m])


def test_a_leaving_members_tasks_go_to_the_rest_and_nothing_else_moves() -> None:
    before = assign_tasks(range(6), {"a": [], "b": [], "c": []})
    assert before == {"a": [0, 1], "b": [2, 3], "c": [4, 5]}
    after = assign_tasks(range(6), {"a": before["a"], "c": before["c"]})
    assert after == {"a": [0, 1, 2], "c": [3, 4, 5]}


def test_a_task_claimed_twice_stays_with_one_claimant() -> None:
    # "z" missed a rebalance and still claims task 1 (a zombie's metadata).
    result = assign_tasks(range(4), {"a": [0, 1], "b": [2, 3], "z": [1]})
    assert sorted(t for ts in result.values() for t in ts) == [0, 1, 2, 3]
    assert 1 in result["a"]


def test_claims_of_tasks_that_no_longer_exist_are_ignored() -> None:
    assert assign_tasks(range(2), {"a": [5, 7], "b": [1]}) == {"a": [0], "b": [1]}


@settings(deadline=None)
@given(
    tasks=st.integers(0, 24),
    members=members_st,
    claims=st.lists(st.lists(st.integers(0, 30), max_size=10), min_size=6, max_size=6),
    warmth=st.lists(
        st.dictionaries(st.integers(0, 30), st.integers(0, 100), max_size=10),
        min_size=6,
        max_size=6,
    ),
)
def test_warm_copies_never_unbalance_the_assignment_nor_move_a_settled_one(
    tasks: int, members: list[str], claims: list[list[int]], warmth: list[dict[int, int]]
) -> None:
    owned = {m: claims[i] for i, m in enumerate(members)}
    warm = {m: warmth[i] for i, m in enumerate(members)}
    result = assign_tasks(range(tasks), owned, warm)
    assert sorted(t for ts in result.values() for t in ts) == list(range(tasks))
    sizes = [len(ts) for ts in result.values()]
    assert max(sizes) - min(sizes) <= 1
    assert assign_tasks(range(tasks), result, warm) == result


def test_a_restarted_worker_gets_back_the_tasks_whose_state_it_still_holds() -> None:
    # "c" owned tasks 0 and 2 and was killed: "a" and "b" took them over. It
    # comes back with its copies of their state (up to changelog offsets 900
    # and 700). Without them it would get what the others give up by default.
    owned = {"a": [0, 1, 4], "b": [2, 3, 5], "c": []}
    assert assign_tasks(range(6), owned) == {"a": [0, 1], "b": [2, 3], "c": [4, 5]}
    warm = {"c": {0: 900, 2: 700}}
    assert assign_tasks(range(6), owned, warm) == {"a": [1, 4], "b": [3, 5], "c": [0, 2]}
    # A task free for several goes to the warmest copy.
    free = assign_tasks(range(2), {"a": [], "b": []}, {"a": {1: 10}, "b": {1: 90}})
    assert free == {"a": [0], "b": [1]}


class _Cluster:
    def partitions_for_topic(self, topic: str) -> set[int]:
        return set(range(6))


def test_the_join_metadata_carries_the_warm_copies_to_the_leader() -> None:
    members = {
        "a": TaskAssignor("wa"),
        "b": TaskAssignor("wb"),
        "c": TaskAssignor("wc", warm=lambda: {0: 900, 2: 700}),
    }
    members["a"].owned, members["b"].owned = [0, 1, 4], [2, 3, 5]
    metadata = {m: assignor.metadata(["orders"]) for m, assignor in members.items()}
    dealt = members["a"].assign(_Cluster(), metadata)
    assert {m: a.assignment for m, a in dealt.items()} == {
        "a": [("orders", [1, 4])],
        "b": [("orders", [3, 5])],
        "c": [("orders", [0, 2])],
    }


def test_tasks_are_partition_indexes_of_co_partitioned_sources() -> None:
    assert tasks_of({"orders": 4, "payments": 4}) == [0, 1, 2, 3]
    assert tasks_of({}) == []
    with pytest.raises(ConfigError, match="orders: 4, payments: 6"):
        tasks_of({"orders": 4, "payments": 6})
