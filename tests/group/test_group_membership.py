"""Group membership does not depend on batches: a slow first batch does not get a worker evicted.

Heartbeats run in the membership consumer's own task, apart from the
batches, so a worker whose first batch outlasts the session timeout stays in
the group with its tasks, and nothing moves. (An idle worker staying in the
group is in tests/group/test_group_mode.py.)
"""

from __future__ import annotations

import collections
import time
from pathlib import Path

import anyio
import pytest

from streamlet.kafka._group import GroupView, describe_group
from tests.conftest import TopicFactory
from tests.group.support import Worker, group_settled, output, setup_group_app
from tests.kafka.test_kafka_source import _produce

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

RECORDS = 4_000
SESSION_TIMEOUT = 6.0  # group_worker.py's
SLOW = 1.5 * SESSION_TIMEOUT


def _at(worker: Worker, text: str) -> int | None:
    """The index of the first line of ``worker``'s log that holds ``text``, None if none."""
    return next((i for i, line in enumerate(worker.lines) if text in line), None)


async def test_a_first_batch_longer_than_the_session_timeout_does_not_evict_the_worker(
    kafka_bootstrap: str, new_topic: TopicFactory, tmp_path: Path
) -> None:
    source, out, env = await setup_group_app(kafka_bootstrap, new_topic, tmp_path)
    group = env["GROUP_NAME"]
    fast = Worker(tmp_path, "w1", env)
    slow = Worker(tmp_path, "w2", env, {"GROUP_SLOW_FIRST_BATCH": str(SLOW)})
    workers = [fast, slow]
    polls = 0
    changed: GroupView | None = None  # the group as first seen changed during the slow batch
    try:
        before = await group_settled(kafka_bootstrap, group, workers)
        members = {m.member_id: m.tasks for m in before.members}
        settled_at = {w.name: len(w.lines) for w in workers}
        # Nothing was produced before: w2's first batch comes now, and sleeps.
        expected = [f"v{i}".encode() for i in range(RECORDS)]
        await _produce(kafka_bootstrap, source, expected)
        with anyio.fail_after(60):
            while _at(slow, "slow first batch: sleeping") is None:  # noqa: ASYNC110
                await anyio.sleep(0.1)
        began = time.monotonic()
        # All through the slow batch, and past the session timeout: the same
        # members with the same tasks, in a Stable group.
        with anyio.fail_after(SLOW + 30):
            while _at(slow, "slow first batch: done") is None:
                view = await describe_group(group, kafka_bootstrap)
                polls += 1
                if (
                    view.state != "Stable"
                    or {m.member_id: m.tasks for m in view.members} != members
                ):
                    changed = view
                    break
                await anyio.sleep(0.5)
        slept = time.monotonic() - began
        with anyio.fail_after(60):
            while len(await output(kafka_bootstrap, out)) < RECORDS:  # noqa: ASYNC110
                await anyio.sleep(0.3)
        await anyio.sleep(1.5)  # a repeat would show up by now
        values = await output(kafka_bootstrap, out)
        after = await describe_group(group, kafka_bootstrap)
        # Neither worker rejoined or was told of a new assignment: no rebalance
        # happened (looked at before the workers stop, which is one).
        moved = [
            line
            for w in workers
            for line in w.lines[settled_at[w.name] :]
            if any(s in line for s in ("owns tasks", "Heartbeat failed", "joining", "Revoking"))
        ]
    finally:
        logs = "\n".join(w.log() for w in workers)
        for worker in workers:
            worker.stop()
    assert changed is None, f"the group changed during the slow batch: {changed}\n{logs}"
    assert slept > SESSION_TIMEOUT, f"the slow batch ended after {slept:.1f}s\n{logs}"
    assert polls >= 5, logs  # the group was looked at all along
    assert {m.member_id: m.tasks for m in after.members} == members, logs
    assert moved == [], "".join(moved) + logs
    counts = collections.Counter(values)
    assert {v for v, n in counts.items() if n > 1} == set(), logs
    assert set(counts) == set(expected), logs
