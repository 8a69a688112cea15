"""Group mode: a worker killed at each step of a batch's commit; its task moves on, exactly once."""

from __future__ import annotations

import collections
from pathlib import Path

import anyio
import pytest

from tests.conftest import TopicFactory
from tests.group.support import Worker, output, setup_group_app
from tests.kafka.test_kafka_source import _produce

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

RECORDS = 8_000


@pytest.mark.parametrize(
    "point", ["after_allocate", "after_handler", "after_sink_commit", "before_done", "after_done"]
)
async def test_a_worker_killed_at_a_commit_step_loses_and_repeats_nothing(
    kafka_bootstrap: str, new_topic: TopicFactory, tmp_path: Path, point: str
) -> None:
    source, out, env = await setup_group_app(kafka_bootstrap, new_topic, tmp_path)
    expected = [f"v{i}".encode() for i in range(RECORDS)]
    await _produce(kafka_bootstrap, source, expected[: RECORDS // 2])
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
        await _produce(kafka_bootstrap, source, expected[RECORDS // 2 :])
        workers.append(Worker(tmp_path, "w1", env))
        with anyio.fail_after(90):
            while len(await output(kafka_bootstrap, out)) < RECORDS:  # noqa: ASYNC110
                await anyio.sleep(0.3)
        await anyio.sleep(1.5)  # a repeat would show up by now
        values = await output(kafka_bootstrap, out)
    finally:
        logs = "\n".join(w.log() for w in workers)
        for worker in workers:
            worker.stop(timeout=30)
    counts = collections.Counter(values)
    assert {v for v, n in counts.items() if n > 1} == set(), logs
    assert set(counts) == set(expected), logs
