"""Changing an app on its state directory: what runs on, what is refused and why."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import anyio
import pytest

import streamlet as sl
from streamlet._upgrade import plan_upgrade
from tests.engine.test_app import ListSink

BASE: dict[str, Any] = {
    "format": "streamlet.app",
    "version": 1,
    "app": "shop",
    "sources": {
        "orders": "KafkaSource(topic='orders', partitions=all, mode=direct)",
        "seq": "SequenceSource(partitions=1)",
    },
    "handlers": {
        "totals": {"sources": ["orders"], "sink": "KafkaSink(totals)"},
        "count": {"sources": ["seq"], "sink": None},
    },
}


def _changed(**edits: Any) -> dict[str, Any]:
    manifest = copy.deepcopy(BASE)
    for path, value in edits.items():
        *parents, last = path.split("__")
        target = manifest
        for part in parents:
            target = target[part]
        if value is None and last in target:
            del target[last]
        else:
            target[last] = value
    return manifest


def test_an_unchanged_app_has_nothing_to_say() -> None:
    assert not plan_upgrade(BASE, copy.deepcopy(BASE)).changed


@pytest.mark.parametrize(
    ("edits", "said"),
    [
        ({"sources__extra": "SequenceSource(partitions=2)"}, "source 'extra' added"),
        ({"sources__seq": "SequenceSource(partitions=4)"}, "partitions changed"),
        (
            {"sources__orders": "KafkaSource(topic='orders', partitions=0,1, mode=direct)"},
            "partitions changed",
        ),
        ({"handlers__audit": {"sources": ["orders"], "sink": None}}, "handler 'audit' added"),
        ({"handlers__count": None}, "handler 'count' removed"),
        ({"handlers__count__sink": "FileSink(out)"}, "sink None -> FileSink(out)"),
        ({"handlers__count__sources": ["orders", "seq"]}, "now reads ['orders', 'seq']"),
        ({"handlers__count__state": {"ttl": None}}, "gained keyed state"),
    ],
)
def test_changes_that_keep_every_stored_meaning_are_accepted(
    edits: dict[str, Any], said: str
) -> None:
    upgrade = plan_upgrade(BASE, _changed(**edits))
    assert upgrade.refused == []
    assert any(said in change for change in upgrade.accepted), upgrade.accepted


@pytest.mark.parametrize(
    ("edits", "said"),
    [
        ({"app": "other"}, "another app's state directory"),
        (
            {"sources__orders": "KafkaSource(topic='orders-v2', partitions=all, mode=direct)"},
            "give it a new name",
        ),
        (
            {"sources__orders": "KafkaSource(topic='orders', partitions=all, mode=receiver)"},
            "belong to the old input",
        ),
    ],
)
def test_changes_that_would_read_or_write_again_are_refused(
    edits: dict[str, Any], said: str
) -> None:
    upgrade = plan_upgrade(BASE, _changed(**edits))
    assert any(said in reason for reason in upgrade.refused), upgrade.refused


def test_a_renamed_source_or_handler_is_refused_with_the_name_to_keep() -> None:
    renamed = _changed(sources__seq=None, sources__numbers="SequenceSource(partitions=1)")
    renamed["handlers"]["count"]["sources"] = ["numbers"]
    (reason,) = plan_upgrade(BASE, renamed).refused
    assert "source 'seq' appears renamed to 'numbers'" in reason
    assert "name='seq'" in reason

    moved = _changed(handlers__totals=None)
    moved["handlers"]["order_totals"] = BASE["handlers"]["totals"]
    (reason,) = plan_upgrade(BASE, moved).refused
    assert "handler 'totals' appears renamed to 'order_totals'" in reason
    assert "name='totals'" in reason


def _app(state_dir: Path, *, partitions: int, extra: bool, sink: ListSink, **more: Any) -> sl.App:
    app = sl.App("shop", state_dir=state_dir, **more)
    numbers = app.source(
        sl.SequenceSource(rate=None, limit=40, partitions=partitions), name="numbers"
    )

    @app.handler(numbers, sink=sink, name="copy")
    async def copy_v1(batch: sl.Batch) -> list[str]:
        return [f"{r.partition}:{int(r.value)}" for r in batch]

    if extra:
        counts = ListSink()
        app.counts = counts  # type: ignore[attr-defined]

        @app.handler(numbers, sink=counts, state=sl.State(idle=False))
        async def running(batch: sl.Batch, state: sl.KeyedState) -> list[int]:
            state["n"] = state.get("n", 0) + len(batch)
            return [state["n"]]

    return app


async def _until(app: sl.App, done: Any) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(app.serve)
        with anyio.fail_after(20):
            while not done():  # noqa: ASYNC110 - polls what the app's batches change
                await anyio.sleep(0.02)
        app.stop()


async def test_an_upgraded_app_runs_on_its_state_dir_without_writing_anything_twice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    first = ListSink()
    v1 = _app(state, partitions=1, extra=False, sink=first, batch_interval=0.01)
    await _until(v1, lambda: len(first.values()) == 40)

    # v2: the function renamed (its handler name kept), one more partition, a
    # stateful handler added, another batch interval.
    second = ListSink()
    second.batches = dict(first.batches)  # the same sink, as a database would be
    v2 = _app(state, partitions=2, extra=True, sink=second, batch_interval=0.02)
    await _until(v2, lambda: len(second.values()) == 80)
    values = second.values()
    assert len(values) == len(set(values)) == 80  # partition 0 once, partition 1 new
    assert "the app changed: source 'numbers': partitions changed" in caplog.text
    assert "handler 'running' added" in caplog.text
    # The new stateful handler started empty and counted only what came after.
    assert v2.counts.values()[-1] == 40  # type: ignore[attr-defined]

    # v3 = v2 again: nothing to upgrade, and the new state's store is settled.
    caplog.clear()
    v3 = _app(state, partitions=2, extra=True, sink=second, batch_interval=0.02)
    async with anyio.create_task_group() as tg:
        await tg.start(v3.serve)
        v3.stop()
    assert "the app changed" not in caplog.text


async def test_a_store_lost_after_its_upgrade_is_still_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    sink = ListSink()
    await _until(
        _app(state, partitions=1, extra=False, sink=sink), lambda: len(sink.values()) == 40
    )
    upgraded = _app(state, partitions=1, extra=True, sink=sink)  # state added: starts empty
    async with anyio.create_task_group() as tg:
        await tg.start(upgraded.serve)
        upgraded.stop()
    # Once started, the new store is like any other: losing it is refused.
    (state / "state" / "running.sqlite").unlink()
    with anyio.fail_after(20), pytest.raises(sl.StateError, match="is empty, but batch"):
        await _app(state, partitions=1, extra=True, sink=sink).serve(duration=5)
