"""Group mode, exactly once through kills, joins, leaves and a paused zombie (real processes).

Worker processes of tests/group/group_worker.py share a 4-partition topic
through one consumer group and copy every record to an output topic with a
KafkaSink. While they run, one is SIGKILLed and started again, one more
joins, one is SIGSTOPped past the session timeout (the group gives its tasks
away; when it is resumed it is a zombie whose commits must be fenced) and
one leaves gracefully. A read_committed reader must then see every input
value exactly once.
"""

from __future__ import annotations

import collections
import os
import signal
import time
from pathlib import Path

import anyio
import pytest

from tests.conftest import TopicFactory
from tests.group.support import RECORDS, Worker, output, setup_group_app
from tests.kafka.test_kafka_source import _produce

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


async def settled(workers: list[Worker], joined: Worker) -> None:
    """Wait until ``joined`` owns tasks and no worker's tasks changed for 2 s.

    A worker stopped while the group is still rebalancing may be waited
    for rather than evicted, and then it is no zombie.
    """
    with anyio.fail_after(60):
        while True:
            quiet = all(time.time() - w.last_assignment() > 2 for w in workers if w.alive())
            if joined.owns_tasks() and quiet:
                return
            await anyio.sleep(0.2)


async def test_every_record_once_through_kills_joins_leaves_and_a_zombie(
    kafka_bootstrap: str, new_topic: TopicFactory, tmp_path: Path
) -> None:
    source, out, env = await setup_group_app(kafka_bootstrap, new_topic, tmp_path)
    expected = [f"v{i}".encode() for i in range(RECORDS)]
    workers: list[Worker] = []

    def start(name: str) -> Worker:
        worker = Worker(tmp_path, name, env)
        workers.append(worker)
        return worker

    async def progress(at_least: int, within: float = 90) -> None:
        with anyio.fail_after(within):
            while len(await output(kafka_bootstrap, out)) < at_least:  # noqa: ASYNC110
                await anyio.sleep(0.3)

    try:
        w1, w2 = start("w1"), start("w2")
        await _produce(kafka_bootstrap, source, expected[:10_000])
        await progress(2_000)
        w1.stop(signal.SIGKILL)  # a crash mid-run: its tasks move to w2
        w1 = start("w1")  # back with the same state directory
        await progress(5_000)
        w3 = start("w3")  # one more joins
        await _produce(kafka_bootstrap, source, expected[10_000:18_000])
        await progress(8_000)
        await settled(workers, w3)
        w2.process.send_signal(signal.SIGSTOP)  # a long pause: the group moves on
        await anyio.sleep(9)  # past the 6 s session timeout
        w2.process.send_signal(signal.SIGCONT)  # a zombie now: it must be fenced
        # Everything so far, with all three workers in the group: no task may
        # be left without a worker after the zombie comes back.
        await progress(18_000)
        code = w3.stop()  # a graceful leave
        assert code == 0, w3.log()
        await _produce(kafka_bootstrap, source, expected[18_000:])
        await progress(RECORDS, within=120)
        await anyio.sleep(2)  # anything written twice would show up by now
        values = await output(kafka_bootstrap, out)
    finally:
        logs = "\n".join(w.log() for w in workers)
        for worker in workers:
            worker.stop(signal.SIGKILL)  # also closes the pipe of one that ended
    counts = collections.Counter(values)
    twice = {v: n for v, n in counts.items() if n > 1}
    missing = set(expected) - set(counts)
    assert twice == {}, f"{len(twice)} values written more than once\n{logs}"
    assert missing == set(), f"{len(missing)} values missing\n{logs}"
    assert len(values) == RECORDS
    # The zombie either had a batch under way and was fenced, or woke between
    # batches and learnt from the group that its tasks had moved.
    zombie = "".join(w2.lines)
    assert "fenced" in logs.lower() or "taken over" in logs or "lost [" in zombie, logs
    assert os.environ.get("SHOW_GROUP_LOGS") is None, logs
