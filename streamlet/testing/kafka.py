"""A real, single-node Apache Kafka broker (KRaft) for tests and benchmarks.

The broker is the genuine Apache Kafka server, fetched from Maven Central as
``org.apache.kafka:kafka_2.13`` with its runtime dependencies by ``mvn`` into
a cache folder (downloaded once, reused after), formatted in a fresh
directory and run as a ``java`` subprocess bound to loopback ports. Nothing
is mocked: transactions, consumer groups and ``read_committed`` behave as in
production, which is what streamlet's exactly-once tests need.

Usage::

    broker = EmbeddedKafka(work_dir=tmp, cache_dir=".cache/kafka")
    broker.start()            # formats storage on first start, waits until ready
    ...  # broker.bootstrap == "127.0.0.1:PORT"
    broker.stop()             # graceful; broker.kill() is SIGKILL
    broker.start()            # restarts on the same data and ports

Requirements: Java 17 or newer and Maven on PATH (:func:`missing_tools` says
what is absent). The settings suit one node: replication factor 1 for the
offsets and transaction logs, min ISR 1, no initial rebalance delay.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import anyio

__all__ = [
    "KAFKA_VERSION",
    "SCALA_VERSION",
    "BrokerError",
    "EmbeddedKafka",
    "admin_client",
    "create_topics",
    "delete_group",
    "ensure_broker_jars",
    "group_offsets",
    "missing_tools",
    "wait_for_broker",
]

#: The pinned broker version; bump deliberately (and the cache follows).
KAFKA_VERSION = "4.1.1"
SCALA_VERSION = "2.13"
#: Matches the slf4j-api the broker's jars resolve to, so the broker logs.
_SLF4J_VERSION = "1.7.36"

_POM = """<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>streamlet.testing</groupId>
  <artifactId>embedded-kafka</artifactId>
  <version>{kafka}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_{scala}</artifactId>
      <version>{kafka}</version>
    </dependency>
    <dependency>
      <groupId>org.slf4j</groupId>
      <artifactId>slf4j-simple</artifactId>
      <version>{slf4j}</version>
    </dependency>
  </dependencies>
</project>
"""

_COMPLETE_MARKER = ".complete"


class BrokerError(RuntimeError):
    """The embedded broker could not be fetched, formatted or started."""


def missing_tools() -> list[str]:
    """What this machine lacks to run the embedded broker, as install hints.

    Returns an empty list when ``java`` (17 or newer) and ``mvn`` are usable.
    """
    missing: list[str] = []
    java = shutil.which("java")
    if java is None:
        missing.append("java (install a JDK 17 or newer, e.g. apt-get install openjdk-17-jdk)")
    else:
        version = _java_major_version(java)
        if version is not None and version < 17:
            missing.append(f"java 17 or newer (found java {version} at {java})")
    if shutil.which("mvn") is None:
        missing.append("mvn (install Apache Maven, e.g. apt-get install maven)")
    return missing


def _java_major_version(java: str) -> int | None:
    try:
        out = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if match is None:
        return None
    major = int(match.group(1))
    # Java 8 and older report "1.8".
    return int(match.group(2) or 0) if major == 1 else major


def ensure_broker_jars(cache_dir: str | os.PathLike[str]) -> Path:
    """Return the folder of broker jars, fetching them with Maven if not cached.

    The jars land in ``cache_dir/kafka_<scala>-<version>/libs``; a marker file
    written after a complete download makes later calls return at once, and a
    half-finished download is thrown away and fetched again.

    Raises:
        BrokerError: Maven failed; the message carries the end of its output.
    """
    home = Path(cache_dir).resolve() / f"kafka_{SCALA_VERSION}-{KAFKA_VERSION}"
    libs = home / "libs"
    if (home / _COMPLETE_MARKER).exists() and libs.is_dir():
        return libs
    home.mkdir(parents=True, exist_ok=True)
    # One fetch at a time (processes or threads: each open has its own lock);
    # whoever waited finds the jars the other fetched.
    with open(home / ".fetch.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (home / _COMPLETE_MARKER).exists() and libs.is_dir():
            return libs
        return _fetch(home, libs)


def _fetch(home: Path, libs: Path) -> Path:
    """Fetch the jars into ``libs`` with Maven (the caller holds the cache's lock)."""
    (home / "pom.xml").write_text(
        _POM.format(kafka=KAFKA_VERSION, scala=SCALA_VERSION, slf4j=_SLF4J_VERSION)
    )
    staging = home / "libs.partial"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(libs, ignore_errors=True)
    command = [
        "mvn",
        "--batch-mode",
        "--quiet",
        "-f",
        str(home / "pom.xml"),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={staging}",
        "-DincludeScope=runtime",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-4000:]
        raise BrokerError(
            f"fetching Kafka {KAFKA_VERSION} with Maven failed (exit {result.returncode});"
            f" command: {' '.join(command)}\n{tail}"
        )
    staging.rename(libs)
    (home / _COMPLETE_MARKER).write_text(KAFKA_VERSION + "\n")
    return libs


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


#: How long create_topics waits for a new topic to be usable.
_TOPIC_READY_SECONDS = 10.0


@contextlib.asynccontextmanager
async def admin_client(bootstrap: str, **settings: Any) -> AsyncIterator[Any]:
    """A started ``AIOKafkaAdminClient``, closed on the way out (even when cancelled)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **settings)
    try:
        await admin.start()
        yield admin
    finally:
        with anyio.CancelScope(shield=True):
            await admin.close()


async def group_offsets(bootstrap: str, group: str) -> dict[int, int]:
    """The offsets consumer group ``group`` has committed, per partition (any topic)."""
    async with admin_client(bootstrap) as admin:
        found = await admin.list_consumer_group_offsets(group)
    return {int(tp.partition): int(meta.offset) for tp, meta in found.items() if meta.offset >= 0}


async def delete_group(bootstrap: str, group: str) -> None:
    """Delete consumer group ``group`` and its committed offsets (it must have no members).

    What an operator's ``kafka-consumer-groups --delete`` does, and what
    Kafka itself does to a group without members once its offsets expire.

    Raises:
        BrokerError: the broker refused (the error code says why).
    """
    from aiokafka.protocol.admin import DeleteGroupsRequest

    async with admin_client(bootstrap) as admin:
        node = await admin.find_coordinator(group)
        response = await admin._send_request_to_node(node, DeleteGroupsRequest([group]))
    for name, code in response.results:
        if code:
            raise BrokerError(f"deleting group {name!r} failed with error code {code}")


async def create_topics(admin: Any, names: Sequence[str], partitions: int) -> None:
    """Create ``names`` and wait until the broker describes each with all partitions led.

    A new topic reaches the brokers' metadata caches asynchronously; a client
    that used it at once could be told it does not exist.

    Raises:
        BrokerError: a topic is not ready within 10 seconds.
    """
    from aiokafka.admin import NewTopic

    await admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=1) for name in names]
    )
    deadline = time.monotonic() + _TOPIC_READY_SECONDS
    for name in names:
        while True:
            described = await admin.describe_topics([name])
            topic = described[0] if described else {}
            parts = topic.get("partitions", ())
            if (
                topic.get("error_code", 0) == 0
                and len(parts) == partitions
                and all(p.get("leader", -1) >= 0 for p in parts)
            ):
                break
            if time.monotonic() > deadline:
                raise BrokerError(f"topic {name} did not appear with {partitions} partitions")
            await anyio.sleep(0.05)


async def _probe(bootstrap: str) -> None:
    # A metadata round trip through the real client: an open port alone does
    # not mean the broker has finished joining its own KRaft quorum.
    async with admin_client(bootstrap, request_timeout_ms=5000) as admin:
        await admin.describe_cluster()


def wait_for_broker(bootstrap: str, timeout: float = 60.0) -> None:
    """Block until a metadata request to ``bootstrap`` succeeds.

    Raises:
        BrokerError: no success within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            seconds = min(5.0, max(0.5, deadline - time.monotonic()))
            asyncio.run(asyncio.wait_for(_probe(bootstrap), seconds))
        except Exception as exc:  # any failure means "not ready yet"
            last = exc
            time.sleep(0.2)
        else:
            return
    raise BrokerError(f"Kafka at {bootstrap} did not answer a metadata request: {last!r}")


class EmbeddedKafka:
    """One Kafka broker+controller process on loopback, for tests.

    Args:
        work_dir: where the broker's config, data and log live; a temporary
            directory is made when omitted (and removed by :meth:`cleanup`).
        cache_dir: where the broker jars are cached across runs
            (default ``~/.cache/streamlet/kafka``).
        heap: the JVM heap, small enough for a 2-core test machine.
    """

    def __init__(
        self,
        *,
        work_dir: str | os.PathLike[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        heap: str = "512m",
    ) -> None:
        self._own_work_dir = work_dir is None
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="streamlet-kafka-"))
        self.cache_dir = Path(cache_dir or Path.home() / ".cache" / "streamlet" / "kafka")
        self.heap = heap
        self.port = 0
        self.controller_port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._formatted = False
        self.startup_seconds: float | None = None

    @property
    def bootstrap(self) -> str:
        """``host:port`` for clients; valid once :meth:`start` has run."""
        if not self.port:
            raise BrokerError("the broker has not been started")
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        """The broker's own log (stdout and stderr of the JVM)."""
        return self.work_dir / "broker.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` of the broker's log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no broker log)"
        return "\n".join(text.splitlines()[-lines:])

    def _java(self, libs: Path, main_class: str, *args: str) -> list[str]:
        java = shutil.which("java") or "java"
        return [
            java,
            f"-Xmx{self.heap}",
            "-XX:+UseSerialGC",
            "-Djava.awt.headless=true",
            "-Dorg.slf4j.simpleLogger.defaultLogLevel=info",
            "-Dorg.slf4j.simpleLogger.showDateTime=true",
            "-cp",
            f"{libs}{os.sep}*",
            main_class,
            *args,
        ]

    def _write_config(self) -> Path:
        data = self.work_dir / "data"
        config = self.work_dir / "server.properties"
        settings = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": (
                f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}"
            ),
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(data),
            "num.partitions": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",
            # Short so that tests of fencing and aborted transactions finish.
            "transaction.abort.timed.out.transaction.cleanup.interval.ms": "5000",
            "log.flush.interval.messages": str(2**62),
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
        }
        config.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
        return config

    def start(self, timeout: float = 90.0) -> None:
        """Fetch (first time), format (first start) and start the broker; wait for it.

        Raises:
            BrokerError: with the tail of the broker's log when it does not
                come up.
        """
        if self.running:
            return
        missing = missing_tools()
        if missing:
            raise BrokerError(
                "cannot run the embedded Kafka broker; missing: " + "; ".join(missing)
            )
        libs = ensure_broker_jars(self.cache_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = _free_port()
            self.controller_port = _free_port()
        config = self._write_config()
        began = time.monotonic()
        if not self._formatted:
            # A Kafka cluster id is 16 random bytes in URL-safe base64; one that
            # begins with "-" would be taken for an option, so it is passed
            # as "--cluster-id=<id>".
            cluster_id = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
            fmt = subprocess.run(
                self._java(
                    libs,
                    "kafka.tools.StorageTool",
                    "format",
                    f"--cluster-id={cluster_id}",
                    "-c",
                    str(config),
                ),
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if fmt.returncode != 0:
                raise BrokerError(
                    f"formatting Kafka storage in {self.work_dir} failed:\n"
                    f"{(fmt.stdout + fmt.stderr)[-4000:]}"
                )
            self._formatted = True
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self._java(libs, "kafka.Kafka", str(config)),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise BrokerError(
                    f"the Kafka broker exited with code {code} during start-up; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                wait_for_broker(
                    self.bootstrap, timeout=min(5.0, max(0.5, deadline - time.monotonic()))
                )
                break
            except BrokerError:
                if time.monotonic() >= deadline:
                    self.kill()
                    raise BrokerError(
                        f"the Kafka broker did not become ready within {timeout:.0f}s; "
                        f"log {self.log_path}:\n{self.log_tail()}"
                    ) from None
        self.startup_seconds = time.monotonic() - began

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the broker gracefully (SIGTERM), killing it after ``timeout``."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._process = None

    def kill(self) -> None:
        """SIGKILL the broker, as a machine or process crash would."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait()
        self._process = None

    def cleanup(self) -> None:
        """Stop the broker and delete a work directory this object created."""
        self.stop()
        if self._own_work_dir:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.work_dir)

    def __enter__(self) -> EmbeddedKafka:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()
