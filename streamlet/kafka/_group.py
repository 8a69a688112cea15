"""Group membership: the worker's seat in the app's Kafka consumer group.

One consumer per worker joins the group and subscribes to every Kafka source
topic of the app, with :class:`TaskAssignor` as its assignment strategy, so
that Kafka's group protocol says which worker owns which task. It never
fetches: every partition it is assigned is paused at once, and the sources'
own group-less consumers read the batches' ranges. Kafka is the coordinator;
streamlet builds none.

aiokafka calls the rebalance listener from its coordinator task:
``on_partitions_revoked`` while heartbeats still run (the place to wait for
the batch under way) and ``on_partitions_assigned`` with *no* heartbeats
(it must return in milliseconds, so the new tasks are only handed on).
Exceptions in either are logged and swallowed by aiokafka, so both catch
everything themselves and pass failures on to the worker.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import TopicPartition

from streamlet.errors import ConfigError, StreamletError
from streamlet.kafka._assign import assign_tasks, tasks_of
from streamlet.kafka._consumer import stop_consumer

__all__ = [
    "GroupMember",
    "GroupView",
    "MemberView",
    "PartitionView",
    "TaskAssignor",
    "describe_group",
    "render_group",
]

log = logging.getLogger(__name__)

ASSIGNOR = "streamlet-tasks"
END_OFFSET_TRIES = 5


class TaskAssignor(AbstractPartitionAssignor):  # type: ignore[misc]
    """Assigns whole tasks (partition p of every topic), sticky and balanced.

    Each member's join metadata carries the tasks it owns now, so the leader
    can keep them where they are, and the tasks whose keyed state it holds a
    current copy of (``warm``: task → changelog offset), so that a task that
    moves goes where it replays least (:func:`~streamlet.kafka._assign.assign_tasks`).
    """

    version = 0

    def __init__(self, worker: str, warm: Callable[[], Mapping[int, int]] | None = None) -> None:
        self.worker = worker
        self.owned: list[int] = []
        self.warm = warm

    @property
    def name(self) -> str:
        return ASSIGNOR

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        warm = {str(t): int(p) for t, p in (self.warm() if self.warm else {}).items()}
        user_data = orjson.dumps({"worker": self.worker, "tasks": self.owned, "warm": warm})
        return ConsumerProtocolMemberMetadata(self.version, sorted(topics), user_data)

    def assign(
        self, cluster: Any, members: Mapping[str, ConsumerProtocolMemberMetadata]
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        topics = sorted({t for m in members.values() for t in m.subscription})
        counts = {t: len(cluster.partitions_for_topic(t) or ()) for t in topics}
        try:
            tasks = tasks_of(counts)
        except ConfigError as exc:
            log.error("cannot assign tasks: %s", exc)  # noqa: TRY400 - the message says it all
            tasks = []
        owned = {member: _claims(meta.user_data) for member, meta in members.items()}
        warm = {member: _warmth(meta.user_data) for member, meta in members.items()}
        dealt = assign_tasks(tasks, owned, warm)
        return {
            member: ConsumerProtocolMemberAssignment(
                self.version, [(t, list(dealt[member])) for t in topics], b""
            )
            for member in members
        }

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        pass


def _claims(user_data: bytes | None) -> list[int]:
    """The tasks a member's metadata says it owns (nothing, if unreadable)."""
    try:
        tasks = orjson.loads(user_data or b"{}").get("tasks", [])
        return [int(t) for t in tasks]
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        return []


def _warmth(user_data: bytes | None) -> dict[int, int]:
    """The warm copies a member's metadata lists: task → changelog offset (none, if unreadable)."""
    try:
        warm = orjson.loads(user_data or b"{}").get("warm", {})
        return {int(t): int(p) for t, p in warm.items()}
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        return {}


Revoked = Callable[[], Awaitable[None]]
Assigned = Callable[[set[int]], None]


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, member: GroupMember) -> None:
        self.member = member

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        try:
            await self.member.revoked()
        except Exception as exc:
            log.exception("handling revoked partitions failed")
            self.member.failed(exc)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        try:
            partitions = list(assigned)
            if partitions:
                self.member.consumer.pause(*partitions)  # it never fetches
            tasks = {tp.partition for tp in partitions}
            self.member.assignor.owned = sorted(tasks)
            self.member.assigned(tasks)
        except Exception as exc:
            log.exception("handling assigned partitions failed")
            self.member.failed(exc)


class GroupMember:
    """One worker's membership of the app's group.

    Args:
        group: the consumer group id (one per app).
        worker: this worker's name, in its join metadata and logs.
        topics: every Kafka source topic of the app.
        bootstrap_servers, consumer_config: where Kafka is and how to reach
            it (the sources' own settings: security, client ids).
        revoked: awaited when a rebalance takes this worker's tasks away
            (heartbeats go on meanwhile, within ``rebalance_timeout``).
        assigned: told the tasks of a new assignment; must return at once.
        failed: told of an error in the callbacks (the worker then stops).
        session_timeout: seconds without heartbeats before the group drops
            this worker (a crash, a stop, a long pause: then it is a zombie).
        rebalance_timeout: seconds the group waits for members to rejoin.
        warm: the tasks whose keyed state this worker holds a current copy
            of, and how far each goes, told to the group's leader at each
            join (:meth:`streamlet.kafka.changelog.TaskStates.warm`).
    """

    def __init__(
        self,
        *,
        group: str,
        worker: str,
        topics: Iterable[str],
        bootstrap_servers: str | Sequence[str],
        consumer_config: Mapping[str, object],
        revoked: Revoked,
        assigned: Assigned,
        failed: Callable[[BaseException], None],
        session_timeout: float = 10.0,
        rebalance_timeout: float = 30.0,
        warm: Callable[[], Mapping[int, int]] | None = None,
    ) -> None:
        self.group = group
        self.topics = sorted(set(topics))
        self.revoked = revoked
        self.assigned = assigned
        self.failed = failed
        self.assignor = TaskAssignor(worker, warm)
        self.consumer = AIOKafkaConsumer(
            **{
                **dict(consumer_config),
                "bootstrap_servers": (
                    bootstrap_servers
                    if isinstance(bootstrap_servers, str)
                    else list(bootstrap_servers)
                ),
                "group_id": group,
                "enable_auto_commit": False,
                "isolation_level": "read_committed",
                "auto_offset_reset": "earliest",
                "partition_assignment_strategy": (self.assignor,),
                "session_timeout_ms": int(session_timeout * 1000),
                "heartbeat_interval_ms": max(100, int(session_timeout * 1000) // 10),
                "rebalance_timeout_ms": int(rebalance_timeout * 1000),
                "max_poll_interval_ms": max(300_000, int(rebalance_timeout * 1000)),
            }
        )

    async def start(self) -> None:
        """Join the group (the first assignment comes through ``assigned``)."""
        self.consumer.subscribe(topics=self.topics, listener=_Listener(self))
        await self.consumer.start()

    async def run(self) -> None:
        """Keep the membership alive: poll (nothing is fetched) until cancelled."""
        while True:
            await self.consumer.getmany(timeout_ms=1000)

    async def commit(self, offsets: Mapping[tuple[str, int], int]) -> None:
        """Commit ``(topic, partition) → next offset`` under the group, with this generation.

        For lag tools and for at-least-once sinks (where a task's next owner
        starts when no sink knows better). The group refuses it while a
        rebalance is under way: then it is skipped, as the next batch's
        commit carries the same information further on.
        """
        try:
            await self.consumer.commit({TopicPartition(t, p): o for (t, p), o in offsets.items()})
        except (CommitFailedError, IllegalStateError, KafkaError) as exc:
            log.debug("group offset commit skipped: %s", exc)

    async def committed(self, topic: str, partition: int) -> int | None:
        """The group's committed offset of ``topic`` partition ``partition`` (None: none)."""
        offset = await self.consumer.committed(TopicPartition(topic, partition))
        return int(offset) if offset is not None else None

    async def stop(self) -> None:
        """Leave the group: the others take this worker's tasks over at once."""
        await stop_consumer(self.consumer, f"the membership of group {self.group!r}")


@dataclass(frozen=True, slots=True)
class MemberView:
    """One worker of a group, as Kafka describes it."""

    worker: str
    member_id: str
    host: str
    tasks: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PartitionView:
    """One source partition: its task's worker, the group's position and the end."""

    topic: str
    partition: int
    worker: str | None
    committed: int | None
    end: int | None

    @property
    def lag(self) -> int | None:
        if self.end is None:
            return None
        return max(0, self.end - (self.committed or 0))


@dataclass(frozen=True, slots=True)
class GroupView:
    """What ``streamlet group`` shows: who owns which task, and how far behind it is."""

    group: str
    state: str
    members: tuple[MemberView, ...]
    partitions: tuple[PartitionView, ...]


async def describe_group(
    group: str, bootstrap_servers: str | Sequence[str], config: Mapping[str, object] | None = None
) -> GroupView:
    """Ask Kafka about a group-mode app's group (read-only).

    Raises:
        StreamletError: Kafka cannot be reached, or the group is not a
            streamlet group (another assignment protocol).
    """
    servers = bootstrap_servers if isinstance(bootstrap_servers, str) else list(bootstrap_servers)
    admin = AIOKafkaAdminClient(**{**dict(config or {}), "bootstrap_servers": servers})
    try:
        await admin.start()
        described = await admin.describe_consumer_groups([group])
        committed = await admin.list_consumer_group_offsets(group)
        (_error, _name, state, _ptype, protocol, raw_members, *_rest) = described[0].groups[0]
        topics = sorted(
            {t for m in raw_members for t in _subscription(m[3])} | {tp.topic for tp in committed}
        )
        counts = (
            {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics(topics)}
            if topics
            else {}
        )
    except KafkaError as exc:
        raise StreamletError(f"cannot describe group {group!r} at {servers}: {exc}") from exc
    finally:
        await admin.close()
    if protocol and protocol != ASSIGNOR:  # empty while a rebalance is under way
        raise StreamletError(
            f"group {group!r} assigns with {protocol!r}, not {ASSIGNOR!r}: it is not the group"
            " of a streamlet app in group mode"
        )
    members = tuple(sorted((_member(m) for m in raw_members), key=lambda m: m.worker))
    tps = [TopicPartition(t, p) for t in topics for p in range(counts.get(t, 0))]
    ends: dict[TopicPartition, int] = {}
    if tps:
        consumer = AIOKafkaConsumer(
            **{**dict(config or {}), "bootstrap_servers": servers},
            isolation_level="read_committed",
            enable_auto_commit=False,
        )
        try:
            await consumer.start()
            consumer.assign(tps)  # the topics' metadata, which end_offsets needs
            for attempt in range(1, END_OFFSET_TRIES + 1):
                try:
                    ends = dict(await consumer.end_offsets(tps))
                    break
                except KafkaError:
                    # A consumer this fresh may not know the partitions' leaders yet.
                    if attempt == END_OFFSET_TRIES:
                        raise
                    await anyio.sleep(0.2 * attempt)
        except KafkaError as exc:
            raise StreamletError(f"cannot read the end offsets of {topics}: {exc}") from exc
        finally:
            await stop_consumer(consumer, "the end-offset reader")
    owner = {t: m.worker for m in members for t in m.tasks}
    partitions = tuple(
        PartitionView(
            tp.topic,
            tp.partition,
            owner.get(tp.partition),
            committed[tp].offset if tp in committed else None,
            end,
        )
        for tp, end in sorted(ends.items())
    )
    return GroupView(group, state, members, partitions)


def _member(raw: Sequence[Any]) -> MemberView:
    member_id, _client_id, host, metadata, assignment = raw[:5]
    worker = member_id
    try:
        decoded = ConsumerProtocolMemberMetadata.decode(metadata)
        worker = str(orjson.loads(decoded.user_data or b"{}").get("worker") or member_id)
    except Exception:  # noqa: S110 - describing, not trusting: fall back to the id
        pass
    tasks: set[int] = set()
    with contextlib.suppress(Exception):
        for _topic, parts in ConsumerProtocolMemberAssignment.decode(assignment).assignment:
            tasks.update(parts)
    return MemberView(worker, member_id, host, tuple(sorted(tasks)))


def _subscription(metadata: bytes) -> list[str]:
    try:
        return list(ConsumerProtocolMemberMetadata.decode(metadata).subscription)
    except Exception:
        return []


def render_group(view: GroupView) -> str:
    """``streamlet group``'s text: the workers and their tasks, then each partition's lag; pure."""
    lines = [f"group {view.group!r}: {view.state}, {len(view.members)} worker(s)"]
    if view.members:
        width = max(len(m.worker) for m in view.members)
        for m in view.members:
            tasks = ", ".join(map(str, m.tasks)) or "none"
            lines.append(f"  {m.worker:<{width}}  {m.host}  tasks {tasks}")
    if view.partitions:
        lines.append("")
        rows = [("topic", "partition", "worker", "committed", "end", "lag")] + [
            (
                p.topic,
                str(p.partition),
                p.worker or "-",
                "-" if p.committed is None else str(p.committed),
                "-" if p.end is None else str(p.end),
                "-" if p.lag is None else str(p.lag),
            )
            for p in view.partitions
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(6)]
        lines += [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
        ]
    return "\n".join(lines)
