"""Group mode: workers share an app's Kafka partitions through a consumer group (real broker)."""

from __future__ import annotations

import functools
import re
import subprocess
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

import streamlet as sl
from streamlet._group import check_group_mode
from streamlet.errors import ConfigError
from streamlet.kafka._group import describe_group
from tests.conftest import TopicFactory
from tests.kafka.test_kafka_sink import _read_all
from tests.kafka.test_kafka_source import _produce


def _worker(
    name: str,
    tmp_path: Path,
    bootstrap: str,
    topic: str,
    group: str,
    seen: list[tuple[str, int, int]],
) -> sl.App:
    app = sl.App(
        "shared",
        state_dir=tmp_path / name,
        batch_interval=0.05,
        group=group,
        worker=name,
        session_timeout=6.0,
        http="127.0.0.1:0",
    )
    orders = app.source(
        sl.KafkaSource(topic, bootstrap_servers=bootstrap, start="earliest"), name="orders"
    )

    def record(batch: sl.Batch, outputs: Sequence[object]) -> None:
        seen.extend((name, r.partition, r.offset) for r in batch)

    @app.handler(orders, sink=sl.CallbackSink(record))
    async def passthrough(batch: sl.Batch) -> list[int]:
        assert len({r.partition for r in batch}) <= 1  # a batch is one task
        return [len(batch)]

    return app


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
        return str(response.read().decode())


async def _status(app: sl.App) -> Any:
    assert app.http_url is not None
    return orjson.loads(await anyio.to_thread.run_sync(_get, app.http_url + "api/status"))


async def _caught_up(group: str, bootstrap: str) -> bool:
    view = await describe_group(group, bootstrap)
    return bool(view.partitions) and all(p.lag == 0 for p in view.partitions)


async def _until_async(check: Any, within: float) -> None:
    with anyio.fail_after(within):
        while not await check():  # noqa: ASYNC110 - polls the broker
            await anyio.sleep(0.2)


async def _until(check: Any, within: float) -> None:
    with anyio.fail_after(within):
        while not check():  # noqa: ASYNC110 - polls what other tasks change
            await anyio.sleep(0.05)


@pytest.mark.kafka
async def test_two_workers_split_the_tasks_and_one_takes_all_when_the_other_leaves(
    kafka_bootstrap: str, new_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = await new_topic(4)
    group = f"g-{topic}"
    seen: list[tuple[str, int, int]] = []
    first = _worker("w1", tmp_path, kafka_bootstrap, topic, group, seen)
    second = _worker("w2", tmp_path, kafka_bootstrap, topic, group, seen)
    produced = await _produce(kafka_bootstrap, topic, [f"a{i}".encode() for i in range(400)])

    async def split() -> bool:
        s1, s2 = await _status(first), await _status(second)
        return bool(s1["group"]["tasks"]) and bool(s2["group"]["tasks"])

    async with anyio.create_task_group() as tg:
        await tg.start(first.serve)
        await tg.start(second.serve)
        # The first worker may read everything before the second joins: what
        # is produced once both own tasks shows the split.
        await _until_async(split, 60)
        split_at = len(seen)
        produced += await _produce(kafka_bootstrap, topic, [f"m{i}".encode() for i in range(400)])
        await _until(lambda: len({(p, o) for _, p, o in seen}) >= 800, 60)
        since = seen[split_at:]
        owners = {p: {w for w, q, _ in since if q == p} for p in range(4)}
        # After the group settles each partition is read by one worker; both work.
        assert {w for w, _, _ in since} == {"w1", "w2"}, owners

        s1, s2 = await _status(first), await _status(second)
        assert sorted(s1["group"]["tasks"] + s2["group"]["tasks"]) == [0, 1, 2, 3]
        assert {s1["group"]["worker"], s2["group"]["worker"]} == {"w1", "w2"}
        # What an operator sees from outside: workers, their tasks, lag 0 once caught up.
        view = await describe_group(group, kafka_bootstrap)
        assert view.state == "Stable"
        assert {m.worker: list(m.tasks) for m in view.members} == {
            "w1": s1["group"]["tasks"],
            "w2": s2["group"]["tasks"],
        }
        await _until_async(lambda: _caught_up(group, kafka_bootstrap), 30)
        shown = await anyio.to_thread.run_sync(
            functools.partial(
                subprocess.run,
                [
                    sys.executable,
                    "-m",
                    "streamlet",
                    "group",
                    group,
                    "--bootstrap-servers",
                    kafka_bootstrap,
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        )
        assert shown.returncode == 0, shown.stderr
        assert f"group {group!r}: Stable, 2 worker(s)" in shown.stdout
        assert re.search(rf"{topic}\s+0\s+w[12]\s+\d+\s+\d+\s+0", shown.stdout), shown.stdout

        first.stop()  # leaves the group: w2 takes every task over
        await _until(lambda: first.http_url is None, 5)
        await anyio.sleep(0.5)
        before = len(seen)
        produced += await _produce(kafka_bootstrap, topic, [f"b{i}".encode() for i in range(200)])
        await _until(lambda: len({(p, o) for _, p, o in seen}) >= 1000, 60)
        late = seen[before:]
        assert {w for w, _, _ in late} == {"w2"}
        assert {p for _, p, _ in late} == {0, 1, 2, 3}
        status = await _status(second)
        assert status["group"]["tasks"] == [0, 1, 2, 3]
        assert status["group"]["rebalances"] >= 2  # its first assignment, and w1 leaving
        metrics = await anyio.to_thread.run_sync(_get, second.http_url + "metrics")
        assert 'streamlet_tasks_owned{app="shared",worker="w2"} 4.0' in metrics
        assert 'streamlet_rebalance_pause_seconds_count{app="shared",worker="w2"}' in metrics
        second.stop()
    # At-least-once sink: a record may repeat across the hand-over, never go missing.
    assert {(p, o) for _, p, o in seen} == set(produced)


def test_group_mode_refuses_what_one_worker_alone_can_do() -> None:
    from streamlet.sources.sequence import SequenceSource

    seq = SequenceSource(rate=1)
    problems = check_group_mode({"numbers": seq}, [("h", sl.FileSink("/tmp/x"))])
    assert any("numbers" in p and "KafkaSource in direct mode" in p for p in problems)
    assert any("FileSink" in p and "exactly-once only on one worker" in p for p in problems)
    assert check_group_mode({}, [])[0].startswith("group mode shares Kafka sources")


def test_an_app_in_group_mode_with_a_sequence_source_is_refused_at_start(tmp_path: Path) -> None:
    app = sl.App("g", state_dir=tmp_path / "s", group="g1")
    numbers = app.source(sl.SequenceSource(rate=10), name="numbers")

    @app.handler(numbers)
    async def h(batch: sl.Batch) -> None:
        return None

    with pytest.raises(ConfigError, match="cannot run in group mode"):
        app.run(duration=0.1)


@pytest.mark.kafka
async def test_an_idle_worker_stays_in_the_group_and_takes_a_task_when_one_frees_up(
    kafka_bootstrap: str, new_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = await new_topic(2)
    group = f"g-{topic}"
    seen: list[tuple[str, int, int]] = []
    workers = [
        _worker(n, tmp_path, kafka_bootstrap, topic, group, seen) for n in ("w1", "w2", "w3")
    ]
    async with anyio.create_task_group() as tg:
        for w in workers:
            await tg.start(w.serve)

        async def settled() -> bool:
            view = await describe_group(group, kafka_bootstrap)
            return view.state == "Stable" and len(view.members) == 3

        await _until_async(settled, 30)
        await anyio.sleep(8)  # past the 6 s session timeout: an idle worker is not dropped
        view = await describe_group(group, kafka_bootstrap)
        assert view.state == "Stable"
        tasks = {m.worker: m.tasks for m in view.members}
        assert sorted(t for ts in tasks.values() for t in ts) == [0, 1]
        (idle,) = [w for w, ts in tasks.items() if not ts]
        busy = next(w for w in workers if w.worker != idle and tasks[w.worker])
        busy.stop()
        await _until(lambda: busy.http_url is None, 10)
        produced = await _produce(kafka_bootstrap, topic, [f"c{i}".encode() for i in range(200)])
        await _until(lambda: {(p, o) for _, p, o in seen} >= set(produced), 60)
        assert idle in {w for w, _, _ in seen}  # the idle worker took the freed task
        for w in workers:
            w.stop()


def _windowed_worker(tmp_path: Path, bootstrap: str, source: str, out: str) -> sl.App:
    """A group worker counting each task's records in 1 s processing-time windows."""
    app = sl.App(f"win-{source}", state_dir=tmp_path / "w", batch_interval=0.1, group=f"g-{source}")
    orders = app.source(
        sl.KafkaSource(source, bootstrap_servers=bootstrap, start="earliest"), name="orders"
    )
    window = sl.windows.tumbling(1.0)
    sink = sl.KafkaSink(out, bootstrap_servers=bootstrap, value=orjson.dumps)

    @app.handler(orders, sink=sink, state=sl.State())
    async def per_second(batch: sl.Batch, state: sl.KeyedState) -> list[object]:
        tasks = {r.partition for r in batch.ranges}
        done = sl.windows.windowed(state, batch, window, sl.windows.count(), key=lambda r: b"n")
        return [[*tasks, r.start, r.value] for r in done.results]

    return app


@pytest.mark.kafka
async def test_a_tasks_window_closes_on_the_clock_and_is_emitted_once_across_a_restart(
    kafka_bootstrap: str, new_topic: TopicFactory, tmp_path: Path
) -> None:
    """The input stops; each task's idle batches close its last window, exactly once.

    Without idle batches in group mode the last windows would wait for input
    that never comes; with an idle batch taken for written (its ranges are
    empty, at the marker) they would never be written either.
    """
    source, out = await new_topic(2, prefix="in"), await new_topic(1, prefix="out")
    await _produce(kafka_bootstrap, source, [b"%d" % i for i in range(60)])

    async def windows() -> list[list[int | float]]:
        return [orjson.loads(r.value) for r in await _read_all(kafka_bootstrap, out)]

    async def all_counted() -> bool:
        return sum(int(w[2]) for w in await windows()) >= 60

    app = _windowed_worker(tmp_path, kafka_bootstrap, source, out)
    async with anyio.create_task_group() as tg:
        await tg.start(app.serve)
        await _until_async(all_counted, 60)
        app.stop()
    first = await windows()
    # Started again on the same state: its idle batches write nothing twice.
    again = _windowed_worker(tmp_path, kafka_bootstrap, source, out)
    async with anyio.create_task_group() as tg:
        await tg.start(again.serve)
        await anyio.sleep(2.5)
        again.stop()
    emitted = await windows()
    assert emitted == first
    assert {int(w[0]) for w in emitted} == {0, 1}  # each task closed its own
    assert len({(w[0], w[1]) for w in emitted}) == len(emitted)  # each window once
    assert sum(int(w[2]) for w in emitted) == 60
