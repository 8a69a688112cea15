"""Group mode: a worker killed at each step of a batch's commit; its task moves on, exactly once.

The workers keep keyed state (a count per input key, ``GROUP_KEY=counted``):
each output carries the count of its key's records before it, so a task's
state restored wrong on the worker that takes it over (lost, or a batch
counted twice) shows as a wrong count, not only outputs written twice.
"""

from __future__ import annotations

import collections
from pathlib import Path

import anyio
import pytest
from aiokafka import AIOKafkaProducer

from streamlet.testing.kafka import delete_group
from tests.conftest import TopicFactory
from tests.group.support import Worker, output, setup_group_app

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

RECORDS = 8_000
KEYS = 16


def value(i: int) -> bytes:
    """The ``i``-th input: key ``k<i % KEYS>``, and record ``i // KEYS`` of that key."""
    return b"v%d" % i


async def _produce(bootstrap: str, topic: str, first: int, until: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        for i in range(first, until):
            await producer.send(topic, value(i), key=b"k%d" % (i % KEYS))
        await producer.flush()
    finally:
        await producer.stop()


@pytest.mark.parametrize(
    "points",
    [
        ("after_allocate", "after_handler"),
        ("after_sink_commit", "after_state_commit"),
        ("before_done", "after_done"),
    ],
    ids="+".join,
)
async def test_a_worker_killed_at_a_commit_step_loses_and_repeats_nothing(
    kafka_bootstrap: str, new_topic: TopicFactory, tmp_path: Path, points: tuple[str, str]
) -> None:
    """Two steps at a time, each its own app: a run mostly waits out a session timeout."""
    async with anyio.create_task_group() as tg:
        for point in points:
            (tmp_path / point).mkdir()
            tg.start_soon(_killed_at, kafka_bootstrap, new_topic, tmp_path / point, point)


async def _killed_at(
    kafka_bootstrap: str, new_topic: TopicFactory, tmp_path: Path, point: str
) -> None:
    source, out, env = await setup_group_app(kafka_bootstrap, new_topic, tmp_path)
    env["GROUP_KEY"] = "counted"
    expected = {b"%s|%d" % (value(i), i // KEYS) for i in range(RECORDS)}
    await _produce(kafka_bootstrap, source, 0, RECORDS // 2)
    # w1 kills itself at this step of its 3rd batch; w2 takes its tasks over
    # (after the session timeout), and w1 comes back without the fault. w2
    # starts once w1 owns the tasks: a w2 that joined first could read
    # everything and leave w1 no third batch.
    w1 = Worker(tmp_path, "w1", env, {"STREAMLET_CRASH_AT": f"{point}:3"})
    workers = [w1]
    try:
        with anyio.fail_after(60):
            while not w1.owns_tasks() and w1.process.poll() is None:  # noqa: ASYNC110
                await anyio.sleep(0.1)
        workers.append(Worker(tmp_path, "w2", env))
        with anyio.fail_after(60):
            while w1.process.poll() is None:  # noqa: ASYNC110
                await anyio.sleep(0.1)
        assert w1.process.returncode == -9, w1.log()
        await _produce(kafka_bootstrap, source, RECORDS // 2, RECORDS)
        workers.append(Worker(tmp_path, "w1", env))
        with anyio.move_on_after(90):
            while len(await output(kafka_bootstrap, out)) < RECORDS:  # noqa: ASYNC110
                await anyio.sleep(0.3)
        await anyio.sleep(1.5)  # a repeat would show up by now
        values = await output(kafka_bootstrap, out)
    finally:
        logs = "\n".join(w.log() for w in workers)
        for worker in workers:
            worker.stop(timeout=30)
    counts = collections.Counter(values)
    logs = f"killed at {point}\n{logs}"
    assert len(values) >= RECORDS, logs
    assert {v for v, n in counts.items() if n > 1} == set(), logs
    # Each record once, with its key's count as it came: state exact.
    assert sorted(set(counts) - expected)[:10] == [], logs
    assert sorted(expected - set(counts))[:10] == [], logs


async def _run_until(bootstrap: str, out: str, outputs: int, worker: Worker) -> None:
    """Let ``worker`` run until ``out`` holds ``outputs`` records, then stop it."""
    try:
        with anyio.fail_after(60):
            while len(await output(bootstrap, out)) < outputs:  # noqa: ASYNC110
                await anyio.sleep(0.2)
    finally:
        worker.stop(timeout=30)


async def test_a_new_app_of_an_old_name_on_other_topics_is_refused_its_old_state(
    kafka_bootstrap: str, new_topic: TopicFactory, tmp_path: Path
) -> None:
    """The old app's changelog holds counts; the new input has no position in the sink."""
    source, out, env = await setup_group_app(kafka_bootstrap, new_topic, tmp_path)
    env["GROUP_KEY"] = "counted"
    await _produce(kafka_bootstrap, source, 0, 200)
    await _run_until(kafka_bootstrap, out, 200, Worker(tmp_path, "old", env))
    # Same app name, new topics, a new state directory: as if pointed elsewhere.
    other, _, renamed = await setup_group_app(kafka_bootstrap, new_topic, tmp_path)
    renamed.update(GROUP_KEY="counted", GROUP_APP=env["GROUP_APP"])
    await _produce(kafka_bootstrap, other, 0, 10)
    new = Worker(tmp_path, "new", renamed)
    with anyio.fail_after(60):
        while new.alive():  # noqa: ASYNC110
            await anyio.sleep(0.1)
    assert new.stop() == 1, new.log()
    assert "the changelog of handler 'count' holds state, but its sink holds no position" in (
        new.log()
    )


async def test_a_task_whose_marker_is_lost_resumes_where_its_state_says(
    kafka_bootstrap: str, new_topic: TopicFactory, tmp_path: Path
) -> None:
    """The sink's task markers deleted (or expired after a quiet week): the changelog's
    record of the input the state covers takes their place, and nothing is counted twice."""
    source, out, env = await setup_group_app(kafka_bootstrap, new_topic, tmp_path)
    env["GROUP_KEY"] = "counted"
    await _produce(kafka_bootstrap, source, 0, 400)
    await _run_until(kafka_bootstrap, out, 400, Worker(tmp_path, "w1", env))
    await delete_group(kafka_bootstrap, f"streamlet-tasks.{env['GROUP_APP']}.count")
    await _produce(kafka_bootstrap, source, 400, 600)
    worker = Worker(tmp_path, "w1", env)
    try:
        with anyio.move_on_after(60):
            while len(await output(kafka_bootstrap, out)) < 600:  # noqa: ASYNC110
                await anyio.sleep(0.2)
        await anyio.sleep(1.0)  # a repeat would show up by now
        values = await output(kafka_bootstrap, out)
    finally:
        worker.stop(timeout=30)
    assert "it resumes where its state says its input stopped" in worker.log(), worker.log()
    expected = {b"%s|%d" % (value(i), i // KEYS) for i in range(600)}
    assert sorted(values) == sorted(expected), worker.log()
