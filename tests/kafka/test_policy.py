"""The Kafka sources' and sink's decisions, without a broker."""

from __future__ import annotations

import pytest

from streamlet.kafka.policy import (
    batch_tag,
    java_string_hash,
    marker_group,
    out_of_range,
    start_offset,
    task_marker_batch,
    task_marker_group,
    task_marker_metadata,
    task_marker_start,
    task_standing,
    transactional_id,
)
from streamlet.records import OffsetRange
from streamlet.sinks.base import SinkContext


def _start(**kw: object) -> tuple[int, str]:
    settings: dict[str, object] = {
        "begin": 10,
        "end": 50,
        "added": False,
        "group_id": "g",
        "committed": None,
    }
    settings.update(kw)
    start = settings.pop("start", "committed")
    return tuple(start_offset(0, start, **settings))  # type: ignore[arg-type, return-value]


def test_where_a_partition_starts() -> None:
    assert _start(start="earliest") == (10, "earliest")
    assert _start(start="latest") == (50, "latest")
    assert _start(start={0: 33}) == (33, "explicit")
    assert _start(start={1: 33}) == (10, "earliest (not named in start)")
    assert _start(committed=42) == (42, "committed by group 'g'")
    assert _start()[0] == 10  # the group has nothing committed
    assert _start(group_id=None)[1] == "earliest (start='committed' without a group_id)"
    # A partition added while running: all of it is new, whatever start says.
    assert _start(start="latest", added=True)[0] == 10


@pytest.mark.parametrize(
    ("offset", "until", "policy", "target"),
    [
        (5, None, "fail", None),
        (5, None, "earliest", 10),  # deleted by retention: the oldest still stored
        (5, None, "latest", 50),
        (5, 8, "earliest", 8),  # never past the batch's range
        (5, 30, "earliest", 10),
        (5, 30, "latest", 30),
        (70, None, "earliest", 10),  # past the end: the topic was recreated
        (70, 80, "earliest", 80),
    ],
)
def test_what_a_lost_offset_does(
    offset: int, until: int | None, policy: str, target: int | None
) -> None:
    decided = out_of_range(
        offset,
        begin=10,
        end=50,
        until=until,
        policy=policy,  # type: ignore[arg-type]
        where="t-0",
    )
    assert decided.target == target
    assert "t-0" in decided.problem
    assert ("deleted" in decided.problem) is (offset < 10)


@pytest.mark.parametrize(
    ("flags", "kind"),
    [
        ({"fenced": True, "committing": True}, "fenced"),
        ({"partitioner_failed": True}, "output"),
        ({"too_large": True}, "output"),
        ({}, "aborted"),
        ({"committing": True}, "unknown"),
        ({"timed_out": True}, "unknown"),
        ({"producer_broken": True}, "unknown"),
        # Whether a commit under way went through is never guessed, whatever the error.
        ({"too_large": True, "committing": True}, "unknown"),
    ],
)
def test_what_a_failed_transaction_means(flags: dict[str, bool], kind: str) -> None:
    from streamlet.kafka.policy import transaction_failure

    settings = dict.fromkeys(
        ("fenced", "partitioner_failed", "too_large", "committing", "timed_out", "producer_broken"),
        False,
    )
    settings.update(flags)
    assert transaction_failure(**settings) == kind


def test_both_kinds_of_kafka_source_are_kafka_sources() -> None:
    """``KafkaSource(...)`` builds the kind ``mode`` asks for; isinstance works on both."""
    import streamlet as sl
    from streamlet.errors import ConfigError
    from streamlet.kafka.direct import KafkaDirectSource
    from streamlet.kafka.receiver import KafkaReceiver

    direct = sl.KafkaSource("t", bootstrap_servers="127.0.0.1:1")
    receiver = sl.KafkaSource("t", bootstrap_servers="127.0.0.1:1", mode="receiver")
    assert type(direct) is KafkaDirectSource
    assert type(receiver) is KafkaReceiver
    assert isinstance(direct, sl.KafkaSource)
    assert isinstance(receiver, sl.KafkaSource)
    assert isinstance(direct, sl.DirectSource)
    assert not isinstance(sl.SequenceSource(rate=1), sl.KafkaSource)
    assert direct.topic == "t"
    with pytest.raises(ConfigError, match="mode must be"):
        sl.KafkaSource("t", bootstrap_servers="x:1", mode="sideways")  # type: ignore[call-overload]


# -- the sink's task markers (group mode) ---------------------------------------------


def _r(source: str, start: int, until: int, partition: int = 3) -> OffsetRange:
    return OffsetRange(source, partition, start, until)


@pytest.mark.parametrize(
    ("ranges", "marker", "standing"),
    [
        # A new task, or a source the task never committed: the next input.
        ([_r("a", 0, 5)], {}, "write"),
        ([_r("a", 5, 9), _r("b", 0, 4)], {"a": 5}, "write"),
        # Starting at the marker: the next input.
        ([_r("a", 5, 9)], {"a": 5}, "write"),
        ([_r("a", 5, 9), _r("b", 2, 2)], {"a": 5, "b": 2}, "write"),
        # Ending at or below the marker: committed before, a re-run.
        ([_r("a", 0, 5)], {"a": 5}, "written"),
        ([_r("a", 0, 5)], {"a": 9}, "written"),
        ([_r("a", 0, 5), _r("b", 2, 2)], {"a": 5, "b": 2}, "written"),
        ([_r("a", 5, 5)], {"a": 5}, "written"),  # no input past the marker, no batch given
        # Crossing the marker: part of it committed.
        ([_r("a", 3, 9)], {"a": 5}, "overlap"),
        # One source's range committed, another's not.
        ([_r("a", 0, 5), _r("b", 2, 6)], {"a": 5, "b": 2}, "overlap"),
        ([_r("a", 0, 5), _r("b", 0, 4)], {"a": 5}, "overlap"),
        # Starting past the marker: input in between would be skipped.
        ([_r("a", 6, 9)], {"a": 5}, "gap"),
        ([_r("a", 5, 9), _r("b", 7, 8)], {"a": 5, "b": 6}, "gap"),
    ],
)
def test_where_a_batch_stands_against_its_task_marker(
    ranges: list[OffsetRange], marker: dict[str, int], standing: str
) -> None:
    assert task_standing(ranges, marker) == standing


@pytest.mark.parametrize(
    ("ranges", "marker", "marked", "standing"),
    [
        # An idle batch (empty ranges at the marker) was written only if the
        # marker names it: after an unknown outcome, that is how it is told.
        ([_r("a", 5, 5)], {"a": 5}, {"a": "me"}, "written"),
        ([_r("a", 5, 5), _r("b", 2, 2)], {"a": 5, "b": 2}, {"a": "me", "b": "me"}, "written"),
        ([_r("a", 5, 5)], {"a": 5}, {"a": "before"}, "write"),
        ([_r("a", 5, 5)], {"a": 5}, {"a": None}, "write"),  # a first-version marker
        ([_r("a", 5, 5)], {"a": 5}, {}, "write"),
        ([_r("a", 5, 5), _r("b", 2, 2)], {"a": 5, "b": 2}, {"a": "me", "b": "x"}, "write"),
        # Batches with input keep the offset rules, whatever the marker names.
        ([_r("a", 0, 5)], {"a": 5}, {"a": "before"}, "written"),
        ([_r("a", 5, 9)], {"a": 5}, {"a": "me"}, "write"),
        ([_r("a", 5, 5), _r("b", 2, 4)], {"a": 5, "b": 2}, {"a": "me", "b": "me"}, "write"),
        # An idle batch off the marker is still refused.
        ([_r("a", 6, 6)], {"a": 5}, {"a": "me"}, "gap"),
    ],
)
def test_an_idle_batch_stands_by_the_batch_its_marker_names(
    ranges: list[OffsetRange],
    marker: dict[str, int],
    marked: dict[str, str | None],
    standing: str,
) -> None:
    assert task_standing(ranges, marker, batch="me", marked=marked) == standing


def test_task_marker_names_and_metadata() -> None:
    context = SinkContext("shop", "copy", "unused", "sid", group="g1")
    assert transactional_id(context) == "streamlet.shop.copy"
    assert transactional_id(context, 0) == "streamlet.shop.copy.t0"
    assert transactional_id(context, 11) == "streamlet.shop.copy.t11"
    assert task_marker_group(context) == "streamlet-tasks.shop.copy"
    # With a source group, the same hash: one AddOffsetsToTxn covers both.
    hashed = task_marker_group(context, "orders")
    assert hashed.startswith("streamlet-tasks.shop.copy.")
    assert java_string_hash(hashed) == java_string_hash("orders")
    assert hashed != marker_group(context, "orders")
    tag = batch_tag("sid", 7, 12.3456)
    assert tag == "sid:7:12346"
    assert task_marker_metadata(42, tag) == "streamlet-task/2 42 sid:7:12346"
    assert task_marker_start(task_marker_metadata(42, tag)) == 42
    assert task_marker_start(task_marker_metadata(0, tag)) == 0
    assert task_marker_batch(task_marker_metadata(0, tag)) == tag
    # A first-version marker (before idle batches) names no batch.
    assert task_marker_start("streamlet-task/1 42") == 42
    assert task_marker_batch("streamlet-task/1 42") is None
    for foreign in (
        "",
        "streamlet-task/1 ",
        "streamlet-task/1 x",
        "streamlet-task/2 5",
        "streamlet-task/2 5 a b",
        "streamlet-task/2 x sid:1:2",
        "streamlet-sink/2 sid",
        "42",
    ):
        assert task_marker_start(foreign) is None, foreign
