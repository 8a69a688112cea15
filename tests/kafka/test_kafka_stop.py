"""Stopping a Kafka app while its broker is down: prompt, clean, and nothing lost or repeated.

Real ``streamlet run`` workers (``kafka_stop_worker.py``) read from a broker
of the test's own, which the test stops under them. A SIGTERM must then stop
each worker within seconds, with exit code 0 and no traceback: nothing is
lost by not waiting for the broker, since a batch not done runs again on
restart and a receiver resumes from its data WAL. Once the broker is back,
restarted workers must bring every record to the sink exactly once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from streamlet.errors import StreamletError
from streamlet.records import OffsetRange
from streamlet.sinks.file import FileSink
from streamlet.sources import KafkaSource
from streamlet.testing.kafka import EmbeddedKafka, admin_client, create_topics, missing_tools
from tests.conftest import REPO_ROOT
from tests.kafka.test_kafka_source import FakeContext

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
#: How long a SIGTERMed worker may take to exit, brokers up or down.
STOP_BOUND = 15.0
RECORDS = 1000


@dataclass
class Worker:
    """One app of the test, run as a ``streamlet run`` subprocess now and then."""

    name: str
    mode: str  # "direct" or "receiver"
    sink: str  # "file" or "kafka"
    group: str
    root: Path
    bootstrap: str
    proc: subprocess.Popen[bytes] | None = None
    runs: int = 0
    logs: list[Path] = field(default_factory=list)

    @property
    def topic(self) -> str:
        return f"in-{self.name}"

    @property
    def out(self) -> str:
        return f"out-{self.name}" if self.sink == "kafka" else str(self.root / "out")

    def start(self) -> None:
        self.runs += 1
        log = self.root / f"run-{self.runs}.log"
        self.logs.append(log)
        env = dict(os.environ)
        env.pop("STREAMLET_CRASH_AT", None)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
        env.update(
            KST_BOOTSTRAP=self.bootstrap,
            KST_TOPIC=self.topic,
            KST_MODE=self.mode,
            KST_GROUP=self.group,
            KST_SINK=self.sink,
            KST_OUT=self.out,
            KST_APP=f"stop-{self.name}",
            KST_STATE=str(self.root / "state"),
        )
        with log.open("wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streamlet", "run", "kafka_stop_worker:app", "--quiet"],
                cwd=self.root,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )

    def stderr(self) -> str:
        return self.logs[-1].read_text(errors="replace")

    def check_alive(self) -> None:
        assert self.proc is not None
        code = self.proc.poll()
        assert code is None, f"worker {self.name} exited with {code}:\n{_digest(self.stderr())}"

    def terminate(self) -> tuple[int | None, float]:
        """SIGTERM the worker; its exit code (None: still running at the bound) and the wait."""
        assert self.proc is not None
        began = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.proc.wait(STOP_BOUND)
        except subprocess.TimeoutExpired:
            code = None
        return code, time.monotonic() - began

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


async def _produce(bootstrap: str, topic: str, values: Sequence[int]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        for v in values:
            await producer.send(topic, str(v).encode())
        await producer.flush()
    finally:
        await producer.stop()


async def _topic_values(bootstrap: str, topic: str) -> list[bytes]:
    """Every committed value of one-partition ``topic`` (read_committed), up to its end."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        values: list[bytes] = []
        with anyio.fail_after(30):
            while await consumer.position(tp) < end:
                for records in (await consumer.getmany(tp, timeout_ms=200)).values():
                    values.extend(r.value for r in records)
        return values
    finally:
        await consumer.stop()


def _committed_lines(directory: Path) -> list[bytes]:
    if not directory.exists():
        return []
    return [line for lines in FileSink.read_committed(directory).values() for line in lines]


async def _sink_values(worker: Worker) -> list[int]:
    if worker.sink == "kafka":
        raw = await _topic_values(worker.bootstrap, worker.out)
    else:
        raw = await anyio.to_thread.run_sync(_committed_lines, Path(worker.out))
    return [int(v) for v in raw]


async def _wait_for_sinks(workers: Sequence[Worker], count: int) -> None:
    with anyio.fail_after(120):
        for worker in workers:
            while len(await _sink_values(worker)) < count:
                worker.check_alive()
                await anyio.sleep(0.3)


def _digest(stderr: str) -> str:
    """The worker's log without aiokafka's lines about the broker being gone."""
    lines = [line for line in stderr.splitlines() if " aiokafka" not in line]
    return "\n".join(lines)[-4000:]


def _assert_stopped_cleanly(worker: Worker, code: int | None, seconds: float, when: str) -> None:
    stderr = worker.stderr()
    digest = _digest(stderr)
    assert code is not None, (
        f"{worker.name}: still running {STOP_BOUND:g} s after SIGTERM {when}:\n{digest}"
    )
    assert code == 0, f"{worker.name}: exit code {code} after SIGTERM {when}:\n{digest}"
    assert "Traceback" not in stderr, f"{worker.name}: a traceback {when}:\n{digest}"
    assert seconds < STOP_BOUND


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedKafka]:
    """A broker of this module's own, which its tests stop and start again."""
    if missing_tools():
        pytest.skip("stopping a broker needs the embedded one: " + ", ".join(missing_tools()))
    kafka = EmbeddedKafka(
        work_dir=tmp_path_factory.mktemp("own-kafka"),
        cache_dir=os.environ.get("STREAMLET_KAFKA_CACHE", REPO_ROOT / ".cache" / "kafka"),
    )
    kafka.start()
    try:
        yield kafka
    finally:
        kafka.stop()


@asynccontextmanager
async def _broker_down(broker: EmbeddedKafka) -> AsyncIterator[None]:
    """Stop the broker for the block; start it again after, whatever happens."""
    await anyio.to_thread.run_sync(broker.stop)
    try:
        yield
    finally:
        await anyio.to_thread.run_sync(broker.start)


@pytest.mark.timeout(400)
async def test_sigterm_while_the_broker_is_down_stops_at_once_and_loses_nothing(
    broker: EmbeddedKafka, tmp_path: Path
) -> None:
    workers: list[Worker] = []
    try:
        bootstrap = broker.bootstrap
        for name, mode, sink, group in (
            ("direct", "direct", "file", ""),
            ("receiver", "receiver", "file", "receiver-group"),
            ("eos", "direct", "kafka", "eos-group"),
        ):
            root = tmp_path / name
            root.mkdir()
            workers.append(Worker(name, mode, sink, group, root, bootstrap))
        async with admin_client(bootstrap) as admin:
            await create_topics(admin, [w.topic for w in workers], 2)
            await create_topics(admin, [w.out for w in workers if w.sink == "kafka"], 1)
        for worker in workers:
            await _produce(bootstrap, worker.topic, range(RECORDS))
            worker.start()
        await _wait_for_sinks(workers, RECORDS)

        async with _broker_down(broker):
            await anyio.sleep(2)  # the workers are now retrying against a broker that is gone
            for worker in workers:
                worker.check_alive()
            stops = [await anyio.to_thread.run_sync(w.terminate) for w in workers]
            for worker, (code, seconds) in zip(workers, stops, strict=True):
                _assert_stopped_cleanly(worker, code, seconds, "with the broker down")

        for worker in workers:
            await _produce(bootstrap, worker.topic, range(RECORDS, 2 * RECORDS))
            worker.start()
        await _wait_for_sinks(workers, 2 * RECORDS)
        stops = [await anyio.to_thread.run_sync(w.terminate) for w in workers]
        for worker, (code, seconds) in zip(workers, stops, strict=True):
            _assert_stopped_cleanly(worker, code, seconds, "with the broker up")

        for worker in workers:
            seen = Counter(await _sink_values(worker))
            repeated = sorted(v for v, n in seen.items() if n > 1)
            assert repeated == [], f"{worker.name}: repeated {repeated[:10]}"
            assert sorted(seen) == list(range(2 * RECORDS)), f"{worker.name}: records missing"
    finally:
        for worker in workers:
            worker.kill()


# -- the source on its own, in this process ---------------------------------------


async def test_a_receiver_stopping_while_the_broker_is_down_does_not_wait_out_its_commit(
    broker: EmbeddedKafka,
) -> None:
    """The group's offsets are bookkeeping: a stop does not wait fetch_timeout for them."""
    bootstrap = broker.bootstrap
    topic = "receiver-commit"
    async with admin_client(bootstrap) as admin:
        await create_topics(admin, [topic], 1)
    await _produce(bootstrap, topic, range(10))
    receiver = KafkaSource(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"{topic}-group",
        mode="receiver",
        fetch_timeout=10,
    )
    context = FakeContext()
    finished = anyio.Event()
    outcome: list[BaseException | None] = []
    took = -1.0

    async def run() -> None:
        try:
            await receiver.run(context)
        except BaseException as exc:  # checked below, whatever it is
            outcome.append(exc)
        else:
            outcome.append(None)
        finished.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await context.wait_for(10)
        async with _broker_down(broker):
            await anyio.sleep(1)
            # The chunk becomes durable only now: its group commit finds no broker.
            began = time.monotonic()
            context.stopping.set()
            context.make_durable()
            with anyio.move_on_after(30):
                await finished.wait()
                took = time.monotonic() - began
    assert outcome == [None], f"the receiver ended with {outcome!r}"
    assert 0 <= took < 6, f"the receiver took {took:.1f} s to stop (-1: over 30 s)"


async def test_a_read_with_the_broker_down_fails_after_fetch_timeout_not_twice_that(
    broker: EmbeddedKafka,
) -> None:
    bootstrap = broker.bootstrap
    topic = "read-down"
    async with admin_client(bootstrap) as admin:
        await create_topics(admin, [topic], 1)
    await _produce(bootstrap, topic, range(5))
    source = KafkaSource(topic, bootstrap_servers=bootstrap, fetch_timeout=4)
    await source.start()
    try:
        assert await source.latest() == {0: 5}
        async with _broker_down(broker):
            began = time.monotonic()
            with pytest.raises(StreamletError, match="made no progress") as info:
                # Nothing of the range was fetched before the broker went.
                await source.read([OffsetRange(topic, 0, 0, 5)])
            took = time.monotonic() - began
            # Between ticks, no new offsets and no waiting while the broker is gone.
            began_latest = time.monotonic()
            assert await source.latest() == {0: 5}
            latest_took = time.monotonic() - began_latest
    finally:
        await source.aclose()
    assert "the brokers did not answer" in str(info.value)
    assert took < 4 + 2.5, f"the read failed after {took:.1f} s"
    assert latest_took < 2.5
