"""Kafka I/O of a stateful handler's changelog in group mode: the topic, and reading it back.

The records' format and why a local store may lag are in
:mod:`streamlet.state._changelog`; the writes go in the KafkaSink's task
transactions (:meth:`~streamlet.kafka.sink.KafkaSink.commit_changelog`).
Here: making sure the topic exists with one partition per task and
compaction on, and replaying a partition into a task's store on takeover.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import time
import urllib.parse
import uuid
from collections.abc import Mapping
from typing import Any

import anyio
import anyio.to_thread

from streamlet.errors import ConfigError, SinkUnavailableError, StateError
from streamlet.kafka._consumer import Consumer
from streamlet.state import State
from streamlet.state._changelog import (
    STALE_AFTER,
    ChangelogSink,
    check_birth,
    decode_entry,
    replay_start,
    replayed,
    stored_birth,
)
from streamlet.state._store import StateStore

__all__ = [
    "REPLAY_CHUNK",
    "TaskStates",
    "client_settings",
    "consumer_settings",
    "ensure_changelog",
    "restore_task",
]

log = logging.getLogger(__name__)

REPLAY_CHUNK = 50_000
"""Changelog records applied to the store per SQLite transaction while restoring."""
_STALL_TIMEOUT = 60.0

#: producer_config keys that say how to reach and log in to the cluster; a
#: changelog reader needs the same.
_CONNECTION_KEYS = frozenset(
    {
        "security_protocol",
        "ssl_context",
        "sasl_mechanism",
        "sasl_plain_username",
        "sasl_plain_password",
        "sasl_kerberos_service_name",
        "sasl_kerberos_domain_name",
        "sasl_oauth_token_provider",
        "request_timeout_ms",
        "connections_max_idle_ms",
        "api_version",
        "metadata_max_age_ms",
    }
)


def client_settings(
    servers: list[str], producer_config: Mapping[str, Any] | None, client_id: str
) -> dict[str, Any]:
    """How any client reaches the sink's cluster: its servers and security settings."""
    settings = {k: v for k, v in (producer_config or {}).items() if k in _CONNECTION_KEYS}
    settings.update(bootstrap_servers=servers, client_id=client_id)
    return settings


def consumer_settings(client: Mapping[str, Any]) -> dict[str, Any]:
    """A read_committed, group-less consumer's settings, from :func:`client_settings`."""
    settings = dict(client)
    settings.update(
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
    )
    return settings


async def ensure_changelog(admin_settings: Mapping[str, Any], topic: str, partitions: int) -> None:
    """Create the changelog topic (compacted, one partition per task) unless it exists.

    Replicated like the cluster allows, up to 3. A topic that exists must
    have ``partitions`` partitions: task ``p``'s state is in partition ``p``.

    Raises:
        ConfigError: the topic exists with another partition count, or the
            cluster refused to create it.
        SinkUnavailableError: the cluster could not be reached.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import KafkaError

    admin = AIOKafkaAdminClient(**admin_settings)
    try:
        await admin.start()
        # Listed, not described: a metadata request naming a topic that does
        # not exist may create it with the broker's defaults (one partition).
        info: dict[str, Any] = {}
        if topic in await admin.list_topics():
            info = (await admin.describe_topics([topic]))[0]
        else:
            brokers = len((await admin.describe_cluster()).get("brokers", ())) or 1
            new = NewTopic(
                topic,
                num_partitions=partitions,
                replication_factor=min(3, brokers),
                topic_configs={"cleanup.policy": "compact", "delete.retention.ms": "86400000"},
            )
            response = await admin.create_topics([new])
            for name, code, *detail in response.topic_errors:
                # 36: TOPIC_ALREADY_EXISTS, another worker made it meanwhile.
                if code not in (0, 36):
                    raise ConfigError(
                        f"the cluster refused to create changelog topic {name!r} (error code"
                        f" {code}: {detail[0] if detail and detail[0] else 'no message'})."
                        " Create it yourself: compacted, with as many partitions as the"
                        " app's sources"
                    )
            log.info("created changelog topic %r with %d partition(s)", topic, partitions)
            info = await _described(admin, topic, partitions)
        policy = await _cleanup_policy(admin, topic)
        if "compact" not in policy.split(","):
            raise ConfigError(
                f"changelog topic {topic!r} has cleanup.policy={policy}: without compaction"
                " Kafka deletes old records by time or size, and a task's state would be lost"
                " with them. Set cleanup.policy=compact on the topic (kafka-configs --alter"
                " --add-config cleanup.policy=compact), or delete it and let the app make it"
            )
        have = len(info.get("partitions", ()))
        if have != partitions:
            raise ConfigError(
                f"changelog topic {topic!r} has {have} partition(s), but the app's sources have"
                f" {partitions}: task p keeps its state in partition p, so they must match. The"
                " changelog of an app whose partition count changed cannot be reused: delete"
                " the topic and the workers' state directories, or keep the partition count"
            )
    except KafkaError as exc:
        raise SinkUnavailableError(
            f"cannot check or create the changelog topic {topic!r}: {exc}"
        ) from exc
    finally:
        with anyio.CancelScope(shield=True):
            await admin.close()


async def _cleanup_policy(admin: Any, topic: str) -> str:
    """The topic's ``cleanup.policy`` (``delete``, ``compact`` or ``compact,delete``)."""
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    for response in responses:
        for error_code, message, _type, _name, entries, *_ in response.resources:
            if error_code:
                raise ConfigError(
                    f"cannot read the settings of changelog topic {topic!r}: error code"
                    f" {error_code} ({message})"
                )
            for name, value, *_ in entries:
                if name == "cleanup.policy":
                    return str(value)
    return "delete"  # Kafka's default


async def _described(admin: Any, topic: str, partitions: int) -> dict[str, Any]:
    """The topic's description once every partition has a leader (10 s at most)."""
    deadline = time.monotonic() + 10.0
    while True:
        found = await admin.describe_topics([topic])
        info: dict[str, Any] = found[0] if found else {}
        parts = info.get("partitions", ())
        if (
            info.get("error_code", 0) == 0
            and parts
            and all(p.get("leader", -1) >= 0 for p in parts)
        ):
            return info
        if time.monotonic() > deadline:
            raise SinkUnavailableError(
                f"changelog topic {topic!r} was created but its {partitions} partition(s) got"
                " no leader within 10 s"
            )
        await anyio.sleep(0.05)


async def restore_task(
    settings: Mapping[str, Any],
    topic: str,
    task: int,
    store: StateStore,
    *,
    stale_after: float,
    now: float | None = None,
) -> int:
    """Bring ``store`` up to the end of the changelog's partition ``task``; records replayed.

    ``settings``: how to reach the cluster (:func:`client_settings`).

    Called after the task's sink fenced its earlier owners, so the end
    (read_committed: the last stable offset) is final until this worker
    commits. A store behind the end replays from its position; one that
    cannot be trusted is emptied and rebuilt from the partition's start:
    a position past the end or before its start, a birth that is not the
    partition's (the topic was made anew), or a store not known to be
    current for ``stale_after`` seconds (its missing deletes may have been
    compacted away). An empty partition sets ``store.birth_due``: the
    task's first changelog write starts with it.

    Raises:
        StateError: a record is not in the changelog's format, or the store
            cannot be written.
        SinkUnavailableError: the cluster could not be reached.
    """
    now = time.time() if now is None else now
    consumer = Consumer(topic, consumer_settings(settings))
    try:
        await consumer.start()
        _check_partition(topic, task, await consumer.load_partitions())
        consumer.assign([task])
        begin = (await consumer.beginning_offsets([task]))[task]
        end = (await consumer.end_offsets([task]))[task]
        start, why = replay_start(store.position, store.current_at, begin, end, now, stale_after)
        first = await _first_record(consumer, topic, task, begin, end)
        remade, due = check_birth(stored_birth(store), first, store.position)
        if remade and not why:
            start, why = begin, remade
        if why:
            log.warning(
                "state of handler %r, task %d (%s): %s; rebuilt from the changelog's start",
                store.handler,
                task,
                store.path,
                why,
            )
        if start == begin and not store.empty():
            # Replayed whole: nothing the copy holds may outlive it (a delete
            # compacted away, or changes of a batch whose offset was unknown).
            await store.wipe(start)
        replayed_records = await _replay(consumer, topic, task, store, start, end, now)
        # An empty partition's first transaction starts it with a new birth.
        store.birth_due = uuid.uuid4().hex if due else None
    except (StateError, ConfigError):
        raise
    except Exception as exc:
        raise SinkUnavailableError(
            f"cannot restore the state of handler {store.handler!r}, task {task}, from"
            f" changelog topic {topic!r}: {exc!r}"
        ) from exc
    finally:
        with anyio.CancelScope(shield=True):
            await consumer.stop()
    if replayed_records:
        log.info(
            "state of handler %r, task %d: %d changelog record(s) replayed up to offset %d",
            store.handler,
            task,
            replayed_records,
            end,
        )
    return replayed_records


async def _first_record(
    consumer: Consumer, topic: str, task: int, begin: int, end: int
) -> tuple[bytes, bytes] | None:
    """The partition's first committed record (key, value); None if it has none below ``end``."""
    if begin >= end:
        return None
    consumer.seek(task, begin)
    stalled_since = time.monotonic()
    while True:
        fetched = await consumer.getmany([task], wait=0.5, source=topic)
        for record in fetched.get(task, ()):
            if record.offset >= end:
                return None
            return record.key or b"", record.value or b""
        position = await consumer.position(task)
        if position >= end:  # only aborted records and transaction markers
            return None
        if position > begin:
            begin, stalled_since = position, time.monotonic()
        elif time.monotonic() - stalled_since > _STALL_TIMEOUT:
            raise SinkUnavailableError(
                f"changelog topic {topic!r} partition {task}: nothing read for"
                f" {_STALL_TIMEOUT:g}s at offset {position}, short of its end {end}"
            )


def _check_partition(topic: str, task: int, partitions: frozenset[int]) -> None:
    if task not in partitions:
        raise ConfigError(
            f"changelog topic {topic!r} has no partition {task} for task {task}: the app's"
            " sources have more partitions than the changelog (were partitions added?). The"
            " changelog must have as many partitions as the sources"
        )


async def _replay(
    consumer: Consumer, topic: str, task: int, store: StateStore, start: int, end: int, now: float
) -> int:
    consumer.seek(task, start)
    count = 0
    position = start
    entries: list[tuple[bytes, tuple[bytes, float] | None]] = []
    stalled_since = time.monotonic()
    while position < end:
        fetched = await consumer.getmany([task], wait=0.5, source=topic)
        if not fetched.get(task) and time.monotonic() - stalled_since > _STALL_TIMEOUT:
            raise SinkUnavailableError(
                f"changelog topic {topic!r} partition {task}: nothing read for"
                f" {_STALL_TIMEOUT:g}s at offset {position}, short of its end {end}"
            )
        for record in fetched.get(task, ()):
            if record.offset >= end:
                break
            try:
                entries.append(decode_entry(record.key, record.value))
            except ValueError as exc:
                raise StateError(
                    f"changelog topic {topic!r} partition {task} offset {record.offset}: {exc};"
                    " the topic holds records streamlet did not write. Give the app a changelog"
                    " topic of its own"
                ) from None
        # Control records (transaction markers) move the position too.
        moved = min(await consumer.position(task), end)
        if moved > position:
            stalled_since = time.monotonic()
        position = moved
        if len(entries) >= REPLAY_CHUNK or position >= end:
            writes, deletes = replayed(entries)
            count += len(entries)
            entries.clear()
            await store.replay(writes, deletes, position, now)
    if start == end:
        await store.replay({}, set(), end, now)
    return count


class TaskStates:
    """Group mode: each owned task's part of every stateful handler's state, restored on takeover.

    One store per handler and task, ``state/<handler>.tasks/t<task>.sqlite``
    under the state directory: a cache of the changelog's partition
    ``task``, kept across releases so that a task coming back replays only
    what other workers wrote meanwhile.

    Args:
        directory: the state directory's ``state/`` folder.
        app: the app's name; state_id: the state directory's identity.
        handlers: handler name -> (its State, its sink carrying the
            changelog, the changelog topic).
        stale_after: see :data:`~streamlet.state._changelog.STALE_AFTER`.
    """

    def __init__(
        self,
        *,
        directory: str,
        app: str,
        state_id: str,
        handlers: Mapping[str, tuple[State, ChangelogSink, str]],
        stale_after: float = STALE_AFTER,
    ) -> None:
        self.directory = directory
        self.app = app
        self.state_id = state_id
        self.handlers = dict(handlers)
        self.stale_after = stale_after
        self._open: dict[tuple[str, int], StateStore] = {}
        # Copies found on disk at start: (handler, task) -> (position, current_at).
        self._found: dict[tuple[str, int], tuple[int, float]] = {}

    def path(self, handler: str, task: int) -> str:
        """The file of ``handler``'s state of task ``task``."""
        return os.path.join(self.directory, f"{handler}.tasks", f"t{task}.sqlite")

    async def scan(self) -> None:
        """Find the copies earlier runs left on disk (for :meth:`warm`); read-only."""
        self._found = await anyio.to_thread.run_sync(self._scan)

    def _scan(self) -> dict[tuple[str, int], tuple[int, float]]:
        found: dict[tuple[str, int], tuple[int, float]] = {}
        for name in self.handlers:
            folder = os.path.join(self.directory, f"{name}.tasks")
            try:
                files = os.listdir(folder)
            except FileNotFoundError:
                continue
            for file in files:
                match = _TASK_FILE.fullmatch(file)
                if match is None:
                    continue
                seen = _position_of(os.path.join(folder, file))
                if seen is not None:
                    found[name, int(match.group(1))] = seen
        return found

    def warm(self, now: float | None = None) -> dict[int, int]:
        """Tasks this worker holds a current copy of for every stateful handler, each with
        the lowest changelog offset among them: what the group's assignor prefers when a
        task moves. A copy not current for ``stale_after`` would be rebuilt anyway."""
        now = time.time() if now is None else now
        copies = dict(self._found)
        for key, store in self._open.items():
            copies[key] = (store.position, store.current_at)
        tasks: dict[int, int] = {}
        for task in sorted({t for _, t in copies}):
            held = [copies.get((name, task)) for name in self.handlers]
            if all(c is not None and now - c[1] <= self.stale_after for c in held):
                tasks[task] = min(c[0] for c in held if c is not None)
        return tasks

    async def acquire(self, task: int) -> dict[str, StateStore]:
        """Task ``task``'s stores, each brought up to its changelog's end.

        Called after the task's sink fenced the earlier owners, and before
        any batch of the task runs.
        """
        stores: dict[str, StateStore] = {}
        for name, (state, sink, topic) in self.handlers.items():
            store = self._open.get((name, task))
            if store is None:
                store = self._open[name, task] = await self._open_store(name, state, task)
            await restore_task(
                sink.changelog_settings(), topic, task, store, stale_after=self.stale_after
            )
            stores[name] = store
        return stores

    async def _open_store(self, name: str, state: State, task: int) -> StateStore:
        """Open the task's store; one that is damaged or not this task's is set aside.

        The store is only a cache of the changelog, so a bad one costs a
        full replay, never the state: it is renamed to ``<file>.bad-<time>``
        (kept for a look) and a new one rebuilt.
        """
        path = self.path(name, task)

        async def open_store() -> StateStore:
            return await StateStore.open(
                path,
                app=self.app,
                handler=name,
                state_id=self.state_id,
                ttl=state.ttl,
                cache_keys=state.cache_keys,
                task=task,
            )

        try:
            return await open_store()
        except StateError as exc:
            aside = f"{path}.bad-{int(time.time())}"
            await anyio.to_thread.run_sync(_set_aside, path, aside)
            log.warning(
                "handler %r, task %d: the local copy of its state was set aside as %s and is"
                " rebuilt from the changelog: %s",
                name,
                task,
                aside,
                exc,
            )
            return await open_store()

    async def aclose(self) -> None:
        for store in self._open.values():
            await store.aclose()
        self._open.clear()


_TASK_FILE = re.compile(r"t(\d+)\.sqlite")


def _position_of(path: str) -> tuple[int, float] | None:
    """A task store's changelog position and when it was current; None if unreadable.

    Opened for writing but only read (the worker holds the state directory's
    lock): a read-only connection would leave the WAL's files behind.
    """
    try:
        conn = sqlite3.connect(f"file:{urllib.parse.quote(path)}?mode=rw", uri=True)
        try:
            meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
        finally:
            conn.close()
        return int(meta.get("changelog", "0")), float(meta.get("current_at", "0"))
    except (sqlite3.Error, ValueError):
        return None


def _set_aside(path: str, aside: str) -> None:
    """Rename a SQLite file and its journal files from ``path`` to ``aside``."""
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.replace(path + suffix, aside + suffix)
