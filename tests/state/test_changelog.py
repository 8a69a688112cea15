"""Group mode's changelog: its record format, a task store's replay, and restoring from a broker."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from hypothesis import given
from hypothesis import strategies as st

import streamlet as sl
from streamlet._group import check_group_mode
from streamlet.errors import ConfigError, StateError
from streamlet.kafka.changelog import TaskStates, client_settings, ensure_changelog, restore_task
from streamlet.records import OffsetRange
from streamlet.sinks.file import FileSink
from streamlet.state._changelog import (
    BIRTH_KEY,
    changelog_topic,
    check_birth,
    decode_entry,
    encode_changes,
    replay_start,
    replayed,
    stored_birth,
    stored_positions,
    with_birth,
    with_positions,
)
from streamlet.state._store import INTERNAL, Changes, StateStore, encode_key
from streamlet.testing.kafka import admin_client, create_topics
from tests.conftest import TopicFactory

# -- the record format (pure) ------------------------------------------------------------


def test_a_batch_s_changes_read_back_as_written() -> None:
    changes = Changes(7, 1234.5, {b"sa": b"1", b"sb": b'{"x":2}'}, frozenset({b"sgone", b"sother"}))
    records = encode_changes(changes)
    # Deletes first: a key both deleted and written cannot be, but order is fixed anyway.
    assert [k for k, v in records if v is None] == [b"sgone", b"sother"]
    decoded = dict(decode_entry(k, v) for k, v in records)
    assert decoded == {
        b"sa": (b"1", 1234.5),
        b"sb": (b'{"x":2}', 1234.5),
        b"sgone": None,
        b"sother": None,
    }
    # streamlet's Kafka reads turn a missing value into b"": still a delete.
    assert decode_entry(b"sgone", b"") == (b"sgone", None)


def test_records_streamlet_did_not_write_are_refused() -> None:
    with pytest.raises(ValueError, match="without a key"):
        decode_entry(None, b"x" * 20)
    with pytest.raises(ValueError, match="too short"):
        decode_entry(b"sk", b"12345")


@given(
    st.lists(
        st.tuples(
            st.sampled_from([b"sa", b"sb", b"sc"]),
            st.one_of(st.none(), st.binary(min_size=1, max_size=3)),
        )
    )
)
def test_replaying_records_gives_what_applying_them_one_by_one_gives(
    ops: list[tuple[bytes, bytes | None]],
) -> None:
    model: dict[bytes, bytes] = {}
    for key, value in ops:
        if value is None:
            model.pop(key, None)
        else:
            model[key] = value
    writes, deletes = replayed((k, None if v is None else (v, 1.0)) for k, v in ops)
    assert {k: v for k, (v, _) in writes.items()} == model
    assert not set(writes) & deletes
    assert deletes <= {k for k, _ in ops}


def test_where_a_replay_starts() -> None:
    now = 10_000.0
    assert replay_start(0, 0.0, 5, 90, now, 60) == (5, "")  # a fresh store
    assert replay_start(40, now - 10, 5, 90, now, 60) == (40, "")  # kept, replayed from 40
    start, why = replay_start(120, now, 5, 90, now, 60)
    assert (start, "past the topic's end" in why) == (5, True)
    start, why = replay_start(3, now, 5, 90, now, 60)
    assert (start, "no longer holds offset 3" in why) == (5, True)
    start, why = replay_start(40, now - 61, 5, 90, now, 60)
    assert (start, "last current" in why) == (5, True)


def test_a_birth_goes_first_and_tells_a_topic_made_anew() -> None:
    changes = with_birth(_batch(1, 1.0, a=1, gone=None), "b1")
    records = encode_changes(changes)
    assert records[0][0] == BIRTH_KEY  # the partition's first record
    assert [k for k, _ in records[1:]] == [encode_key("gone"), encode_key("a")]
    first = records[0]
    assert first[1] is not None
    birth = (first[0], first[1])
    assert with_birth(changes, None) is changes
    # An empty partition: a birth is due; a store holding one is of a topic made anew.
    assert check_birth(None, None, 0) == ("", True)
    why, due = check_birth("b0", None, 40)
    assert due
    assert "made anew" in why
    # The partition's birth: kept when it is the store's, or the store is new.
    assert check_birth("b1", birth, 40) == ("", False)
    assert check_birth(None, birth, 0) == ("", False)
    why, due = check_birth("b0", birth, 40)
    assert (due, "birth is now b1" in why) == (False, True)
    why, _ = check_birth(None, birth, 40)  # built from a changelog without a birth
    assert "no birth" in why
    # A partition written before births: nothing to compare, no birth due.
    assert check_birth("b0", (encode_key("a"), records[2][1] or b""), 40) == ("", False)


def test_a_changelog_topic_needs_a_kafka_topic_name() -> None:
    assert changelog_topic("orders", "count") == "orders.count.changelog"
    with pytest.raises(ConfigError, match="not a valid topic name"):
        changelog_topic("orders app", "count")


def test_group_mode_refuses_state_without_a_transactional_kafka_sink(tmp_path: Path) -> None:
    problems = check_group_mode({}, [], [("count", None), ("sum", FileSink(str(tmp_path / "out")))])
    assert any("'count' has keyed state and no sink" in p for p in problems)
    assert any("'sum' has keyed state and the sink FileSink" in p for p in problems)
    transactional = sl.KafkaSink("out", bootstrap_servers="127.0.0.1:1")
    plain = sl.KafkaSink("out", bootstrap_servers="127.0.0.1:1", transactional=False)
    problems = check_group_mode({}, [], [("ok", transactional), ("bad", plain)])
    assert not any("'ok'" in p for p in problems)
    assert any("'bad' has keyed state" in p for p in problems)


# -- a task's store ------------------------------------------------------------------------


async def _task_store(tmp_path: Path, task: int = 2, **kwargs: Any) -> StateStore:
    return await StateStore.open(
        str(tmp_path / "h.tasks" / f"t{task}.sqlite"),
        app="a",
        handler="h",
        state_id="id1",
        task=task,
        **kwargs,
    )


async def test_a_task_store_keeps_its_position_and_is_emptied_by_a_wipe(tmp_path: Path) -> None:
    store = await _task_store(tmp_path)
    await store.replay({b"sa": (b"1", 5.0), b"sb": (b"2", 5.0)}, set(), 17, 100.0)
    await store.commit(Changes(1, 6.0, {b"sa": b"3"}, frozenset({b"sb"}), position=23))
    await store.aclose()
    store = await _task_store(tmp_path)
    try:
        assert (store.position, store.current_at) == (23, 6.0)
        assert [store.read(k, 6.0) for k in (b"sa", b"sb")] == [b"3", None]
        # A batch with no state records leaves the position (a lower bound).
        await store.commit(Changes(2, 7.0, {b"sc": b"4"}, frozenset()))
        assert store.position == 23
        assert not store.empty()
        await store.wipe(5)
        assert (store.position, store.count(7.0), store.read(b"sa", 7.0)) == (5, 0, None)
        assert store.empty()
    finally:
        await store.aclose()


async def test_a_store_of_another_task_or_mode_is_refused(tmp_path: Path) -> None:
    await (await _task_store(tmp_path, task=2)).aclose()
    (tmp_path / "h.tasks" / "t2.sqlite").rename(tmp_path / "h.tasks" / "t3.sqlite")
    with pytest.raises(StateError, match=r"holds task .2.*not 3"):
        await _task_store(tmp_path, task=3)
    with pytest.raises(StateError, match=r"holds task .2.*not None"):
        await StateStore.open(
            str(tmp_path / "h.tasks" / "t3.sqlite"), app="a", handler="h", state_id="id1"
        )


# -- restoring from a real broker ------------------------------------------------------------


async def _write(
    bootstrap: str, topic: str, partition: int, batches: list[Changes], *, abort: bool = False
) -> None:
    """Each batch's changelog records in a transaction of their own (aborted if asked)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, transactional_id=f"test-{topic}-{partition}-{abort}"
    )
    await producer.start()
    try:
        for changes in batches:
            await producer.begin_transaction()
            for key, value in encode_changes(changes):
                await producer.send(topic, value, key=key, partition=partition)
            await (producer.abort_transaction() if abort else producer.commit_transaction())
    finally:
        await producer.stop()


def _batch(n: int, time: float, **values: int | None) -> Changes:
    writes = {encode_key(k): orjson.dumps(v) for k, v in values.items() if v is not None}
    deletes = frozenset(encode_key(k) for k, v in values.items() if v is None)
    return Changes(n, time, writes, deletes)


def _contents(store: StateStore) -> dict[Any, Any]:
    return {k: orjson.loads(store.read(k, 0.0) or b"null") for k in store.keys(0.0)}


@pytest.mark.kafka
async def test_a_task_s_store_is_restored_from_the_changelog_then_caught_up(
    kafka_bootstrap: str, new_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = await new_topic(3, prefix="changelog")
    settings = client_settings([kafka_bootstrap], None, "test")
    now = time.time()
    await _write(kafka_bootstrap, topic, 2, [_batch(1, 1.0, a=1, b=1), _batch(2, 2.0, a=2, c=1)])
    await _write(kafka_bootstrap, topic, 2, [_batch(9, 9.0, a=99, z=1)], abort=True)
    await _write(kafka_bootstrap, topic, 1, [_batch(1, 1.0, other=1)])  # another task
    await _write(kafka_bootstrap, topic, 2, [_batch(3, 3.0, b=None, d=4)])

    store = await _task_store(tmp_path)
    try:
        assert await restore_task(settings, topic, 2, store, stale_after=60, now=now) == 6
        want = {b"sa": 2, b"sc": 1, b"sd": 4}  # no aborted write, no other task's key
        assert _contents(store) == want
        first = store.position
        assert first > 0
        assert store.read(b"sd", 0.0) == b"4"

        # Another owner writes on, and its last transaction is aborted (as
        # when the next owner fences it): this store replays only what is new,
        # to the end, past the aborted records at the partition's tail.
        await _write(kafka_bootstrap, topic, 2, [_batch(4, 4.0, a=None, e=5)])
        await _write(kafka_bootstrap, topic, 2, [_batch(5, 5.0, e=6)], abort=True)
        assert await restore_task(settings, topic, 2, store, stale_after=60, now=now) == 2
        assert _contents(store) == {b"sc": 1, b"sd": 4, b"se": 5}
        assert store.position > first

        # Out of touch for too long: rebuilt from the start, to the same state.
        await store.replay({b"sstale": (b"1", 0.0)}, set(), store.position, now - 120)
        assert await restore_task(settings, topic, 2, store, stale_after=60, now=now) == 8
        assert _contents(store) == {b"sc": 1, b"sd": 4, b"se": 5}

        # A position past the topic's end (the topic made anew): rebuilt too.
        await store.replay({b"sstale": (b"1", 0.0)}, set(), 10_000, now)
        await restore_task(settings, topic, 2, store, stale_after=60, now=now)
        assert _contents(store) == {b"sc": 1, b"sd": 4, b"se": 5}
    finally:
        await store.aclose()


@pytest.mark.kafka
async def test_a_changelog_holding_foreign_records_is_refused_by_offset(
    kafka_bootstrap: str, new_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = await new_topic(1, prefix="changelog")
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"hello", key=b"sk", partition=0)
    finally:
        await producer.stop()
    store = await _task_store(tmp_path, task=0)
    try:
        with pytest.raises(StateError, match=f"{topic}.*partition 0 offset 0.*too short"):
            await restore_task(
                client_settings([kafka_bootstrap], None, "test"), topic, 0, store, stale_after=60
            )
    finally:
        await store.aclose()


class _ChangelogOnly:
    """The part of a KafkaSink that TaskStates uses: how to reach the cluster."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap

    def changelog_settings(self) -> dict[str, Any]:
        return client_settings([self.bootstrap], None, "test")

    async def commit_changelog(self, batch: Any, outputs: Any, changelog: Any) -> bool:
        raise AssertionError("not called here")


@pytest.mark.kafka
async def test_a_damaged_local_copy_is_set_aside_and_rebuilt_from_the_changelog(
    kafka_bootstrap: str, new_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = await new_topic(2, prefix="changelog")
    await _write(kafka_bootstrap, topic, 1, [_batch(1, 1.0, a=1, b=2), _batch(2, 2.0, b=None)])
    states = TaskStates(
        directory=str(tmp_path),
        app="a",
        state_id="id1",
        handlers={"h": (sl.State(), _ChangelogOnly(kafka_bootstrap), topic)},
    )
    store = (await states.acquire(1))["h"]
    assert _contents(store) == {b"sa": 1}
    assert states.warm() == {1: store.position}  # told to the group's assignor
    await states.aclose()

    def again() -> TaskStates:
        return TaskStates(
            directory=str(tmp_path),
            app="a",
            state_id="id1",
            handlers={"h": (sl.State(), _ChangelogOnly(kafka_bootstrap), topic)},
        )

    # A new run finds the copy on disk; one out of touch too long is not warm.
    states = again()
    await states.scan()
    assert states.warm() == {1: store.position}
    assert states.warm(now=time.time() + states.stale_after + 60) == {}
    path = Path(states.path("h", 1))
    await anyio.Path(path).write_bytes(b"not a database" * 100)
    states = again()
    await states.scan()
    assert states.warm() == {}  # unreadable: not counted on
    try:
        store = (await states.acquire(1))["h"]
        assert _contents(store) == {b"sa": 1}
    finally:
        await states.aclose()
    aside = [p.name for p in path.parent.iterdir() if ".bad-" in p.name]
    assert len(aside) == 1, aside
    assert aside[0].startswith("t1.sqlite.bad-"), aside


@pytest.mark.kafka
async def test_a_changelog_topic_must_be_compacted_and_have_a_partition_per_task(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    settings = client_settings([kafka_bootstrap], None, "test")
    plain = await new_topic(2, prefix="plain")  # cleanup.policy=delete
    with pytest.raises(ConfigError, match=r"cleanup\.policy=delete: without compaction"):
        await ensure_changelog(settings, plain, 2)
    made = f"changelog-{plain}"
    await ensure_changelog(settings, made, 3)
    await ensure_changelog(settings, made, 3)  # there already: fine
    with pytest.raises(ConfigError, match=r"has 3 partition.*sources have 4"):
        await ensure_changelog(settings, made, 4)


async def test_the_input_position_goes_with_the_state_it_covers(tmp_path: Path) -> None:
    ranges = [OffsetRange("orders", 2, 10, 25), OffsetRange("other", 2, 0, 0)]
    changes = with_positions(
        Changes(1, 1.0, {b"sa": b"1"}, frozenset()), ranges, {"orders": "orders-topic"}
    )
    assert set(changes.writes) == {b"sa", INTERNAL + b"input:orders-topic"}
    store = await _task_store(tmp_path)
    try:
        await store.commit(changes)
        assert stored_positions(store, {"orders": "orders-topic"}) == {"orders": 25}
        # Another topic under the same source name is another input: no position.
        assert stored_positions(store, {"orders": "renamed-topic"}) == {}
        assert store.count(1.0) == 1  # not one of the user's keys
    finally:
        await store.aclose()


@pytest.mark.kafka
async def test_a_store_of_a_changelog_deleted_and_made_anew_is_rebuilt(
    kafka_bootstrap: str, new_topic: TopicFactory, tmp_path: Path
) -> None:
    """The new topic is as long as the store's position: only the birth tells them apart."""
    topic = await new_topic(1, prefix="changelog")
    settings = client_settings([kafka_bootstrap], None, "test")
    store = await _task_store(tmp_path, task=0)
    try:
        await restore_task(settings, topic, 0, store, stale_after=60)
        first_birth = store.birth_due
        assert first_birth is not None  # an empty partition: the first write starts it
        await _write(kafka_bootstrap, topic, 0, [with_birth(_batch(1, 1.0, a=1), first_birth)])
        await _write(kafka_bootstrap, topic, 0, [_batch(2, 2.0, b=2)])
        await restore_task(settings, topic, 0, store, stale_after=60)
        assert store.birth_due is None
        assert stored_birth(store) == first_birth
        assert _contents(store) == {b"sa": 1, b"sb": 2}
        position = store.position

        async with admin_client(kafka_bootstrap) as admin:
            await admin.delete_topics([topic])
            with anyio.fail_after(30):
                while topic in await admin.list_topics():  # noqa: ASYNC110 - the broker's pace
                    await anyio.sleep(0.2)
            for _ in range(50):
                try:
                    await create_topics(admin, [topic], 1)
                    break
                except Exception:  # still being deleted
                    await anyio.sleep(0.2)
        # Another owner (its own store) starts the new topic, as long as the old one.
        other = await _task_store(tmp_path / "other", task=0)
        try:
            await restore_task(settings, topic, 0, other, stale_after=60)
            new_birth = other.birth_due
            assert new_birth not in (None, first_birth)
        finally:
            await other.aclose()
        await _write(kafka_bootstrap, topic, 0, [with_birth(_batch(1, 1.0, c=3), new_birth)])
        await _write(kafka_bootstrap, topic, 0, [_batch(2, 2.0, d=4), _batch(3, 3.0, e=5)])

        await restore_task(settings, topic, 0, store, stale_after=60)
        assert stored_birth(store) == new_birth
        assert _contents(store) == {b"sc": 3, b"sd": 4, b"se": 5}  # nothing of the old topic
        assert store.position >= position
    finally:
        await store.aclose()
