"""Shared fixtures: the real Kafka broker and helpers to make topics on it.

``kafka_bootstrap`` is the address of a real Apache Kafka broker for the whole
session. With ``STREAMLET_TEST_KAFKA=host:port`` set, that broker is used;
otherwise the embedded single-node KRaft broker from
:mod:`streamlet.testing.kafka` is started on loopback (jars cached in
``.cache/kafka`` at the repository root) and stopped at the end, even when
tests fail. Without Java or Maven the Kafka tests are skipped with what to
install, except under ``CI=true``, where they fail: CI must never pass
without a broker.
"""

from __future__ import annotations

import os
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from streamlet.testing.kafka import (
    BrokerError,
    EmbeddedKafka,
    admin_client,
    create_topics,
    missing_tools,
    wait_for_broker,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
KAFKA_ENV = "STREAMLET_TEST_KAFKA"


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(f"Kafka is required under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def kafka_broker(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[EmbeddedKafka | None]:
    """The embedded broker this session started, or None for an external one."""
    external = os.environ.get(KAFKA_ENV)
    if external:
        try:
            wait_for_broker(external, timeout=30)
        except BrokerError as exc:
            pytest.fail(f"{KAFKA_ENV}={external} is not reachable: {exc}", pytrace=False)
        yield None
        return
    missing = missing_tools()
    if missing:
        _unavailable(
            "the Kafka tests need a broker; install "
            + " and ".join(missing)
            + f", or set {KAFKA_ENV}=host:port to use your own"
        )
    broker = EmbeddedKafka(
        work_dir=tmp_path_factory.mktemp("kafka"),
        cache_dir=os.environ.get("STREAMLET_KAFKA_CACHE", REPO_ROOT / ".cache" / "kafka"),
    )
    try:
        broker.start()
    except BrokerError as exc:
        broker.stop()
        pytest.fail(f"the embedded Kafka broker did not start: {exc}", pytrace=False)
    print(f"\nembedded Kafka {broker.bootstrap} ready in {broker.startup_seconds:.1f}s")
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: EmbeddedKafka | None) -> str:
    """``host:port`` of the real broker for this session."""
    if kafka_broker is None:
        return os.environ[KAFKA_ENV]
    return kafka_broker.bootstrap


TopicFactory = Callable[..., Coroutine[Any, Any, str]]


@pytest.fixture
async def new_topic(kafka_bootstrap: str) -> AsyncIterator[TopicFactory]:
    """Create a uniquely named topic: ``await new_topic(partitions=3)``."""
    async with admin_client(kafka_bootstrap) as admin:

        async def create(partitions: int = 1, *, prefix: str = "t") -> str:
            name = f"{prefix}-{uuid.uuid4().hex[:12]}"
            await create_topics(admin, [name], partitions)
            return name

        yield create


class StdoutLines:
    """Collects a child process's stdout lines on a thread, as they come.

    For tests that kill the child at a moment of their choosing: ``first`` is
    set at the first line, and after the kill :meth:`close` waits for the
    reader and closes the pipe; ``lines`` then holds everything printed (the
    last one possibly cut by the kill, without its newline).
    """

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self._stdout = proc.stdout
        self.lines: list[str] = []
        self.first = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self._stdout:
            self.lines.append(line)
            self.first.set()

    def close(self, timeout: float) -> None:
        self._reader.join(timeout=timeout)
        self._stdout.close()
