"""A Kafka receiver commits its group's offsets only for records durable in the data WAL.

The durable path of a receiver mode worker, in order: a chunk is fetched and
stored; the block generator appends it to the data WAL, logs its ``block``
event (with the partitions' next offsets as acks) in the tracker, and only
then completes the store; only then does the receiver commit the group's
offsets. A real ``streamlet run`` worker (``kafka_stop_worker.py``) on its
first run, nothing in its WAL yet, is SIGKILLed by its own crash point
(``STREAMLET_CRASH_AT``, see :mod:`streamlet._faults`) at each step:

- ``block_before_tracker_event``: the chunk is in the data WAL only; the
  group must hold no offset (a restart starts from ``start="committed"``,
  and an offset there would skip records no batch will ever read).
- ``block_after_tracker_event``: durable in both logs, store not completed;
  the group must still hold no offset, and the restart resumes from the
  logged acks without reading the chunk twice.
- ``receiver_after_group_commit``: the group holds an offset; the records
  below it must be durable.

A restarted worker must then bring every produced record to the sink
exactly once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import anyio
import pytest
from aiokafka import AIOKafkaProducer

from streamlet.sinks.file import FileSink
from streamlet.testing.kafka import group_offsets
from tests.conftest import TopicFactory

pytestmark = pytest.mark.kafka

HERE = Path(__file__).resolve().parent
RECORDS = 400
#: Seconds between block cuts (and batches): a chunk stays not durable for up
#: to this long, so that a group commit made before durability would come
#: well before the cut that makes the chunk durable.
INTERVAL = "2"


async def _produce(bootstrap: str, topic: str, count: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        for i in range(count):
            await producer.send(topic, str(i).encode(), partition=i % 2)
        await producer.flush()
    finally:
        await producer.stop()


def _start(
    root: Path, bootstrap: str, topic: str, group: str, crash_at: str | None
) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.pop("STREAMLET_CRASH_AT", None)
    if crash_at is not None:
        env["STREAMLET_CRASH_AT"] = crash_at
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    env.update(
        KST_BOOTSTRAP=bootstrap,
        KST_TOPIC=topic,
        KST_MODE="receiver",
        KST_GROUP=group,
        KST_SINK="file",
        KST_OUT=str(root / "out"),
        KST_APP="receiver-crash",
        KST_STATE=str(root / "state"),
        KST_INTERVAL=INTERVAL,
    )
    with (root / "worker.log").open("ab") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "streamlet", "run", "kafka_stop_worker:app", "--quiet"],
            cwd=root,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


def _handles_sigterm(proc: subprocess.Popen[bytes]) -> bool:
    """Whether the worker's SIGTERM handler is up (a SIGTERM now is a graceful stop)."""
    try:
        status = Path(f"/proc/{proc.pid}/status").read_text()
    except OSError:
        return False
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) >> (signal.SIGTERM - 1) & 1)


def _sink_values(out: Path) -> list[int]:
    if not out.exists():
        return []
    return [int(v) for lines in FileSink.read_committed(out).values() for v in lines]


@pytest.mark.parametrize(
    "point",
    ["block_before_tracker_event", "block_after_tracker_event", "receiver_after_group_commit"],
)
async def test_a_first_run_killed_on_the_durable_path_loses_and_repeats_nothing(
    kafka_bootstrap: str, new_topic: TopicFactory, tmp_path: Path, point: str
) -> None:
    topic = await new_topic(partitions=2)
    group = f"{topic}-group"
    await _produce(kafka_bootstrap, topic, RECORDS)
    log = tmp_path / "worker.log"
    worker = _start(tmp_path, kafka_bootstrap, topic, group, point)
    try:
        code = await anyio.to_thread.run_sync(lambda: worker.wait(60))
        assert code == -signal.SIGKILL, f"no crash at {point} (exit {code}):\n{log.read_text()}"
        committed = await group_offsets(kafka_bootstrap, group)
        if point == "receiver_after_group_commit":
            assert committed, "killed after a group commit, yet the group holds no offset"
        else:
            # The store was not complete: nothing of it may be in the group.
            assert committed == {}, f"the group holds {committed} for records not yet durable"

        worker = _start(tmp_path, kafka_bootstrap, topic, group, None)
        # Until the sink has every record, or long enough that it would have
        # (records lost by a broken order would never come).
        with anyio.move_on_after(30):
            while (
                not _handles_sigterm(worker)
                or len(await anyio.to_thread.run_sync(_sink_values, tmp_path / "out")) < RECORDS
            ):
                assert worker.poll() is None, log.read_text()
                await anyio.sleep(0.2)
        worker.send_signal(signal.SIGTERM)  # graceful: a last batch takes every block
        code = await anyio.to_thread.run_sync(lambda: worker.wait(60))
        assert code == 0, log.read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()

    seen = Counter(await anyio.to_thread.run_sync(_sink_values, tmp_path / "out"))
    repeated = sorted(v for v, n in seen.items() if n > 1)
    missing = sorted(set(range(RECORDS)) - set(seen))
    assert repeated == [], f"{len(repeated)} records repeated, e.g. {repeated[:5]}"
    assert missing == [], f"{len(missing)} records lost, e.g. {missing[:5]}"
