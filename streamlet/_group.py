"""Group mode: many workers share an app's Kafka partitions through one consumer group.

A *task* is partition ``p`` of every Kafka source of the app; it is the unit
that moves between workers, and each batch covers one task. Kafka's group
protocol says who owns what (:mod:`streamlet.kafka._group`); this module turns
its verdicts into the scheduler's and the sinks' actions, in this order:

* **revoke** (a rebalance begins; heartbeats still run): the scheduler starts
  no new batch and the one under way gets up to ``revoke_budget`` seconds to
  commit. One still running after that goes on; if its task moves, the new
  owner's takeover fences its commit and it is dropped, never committed
  twice.
* **assign** (the new generation): tasks lost are released (their pending
  batches dropped, their producers closed); tasks gained are *acquired*:
  each exactly-once sink fences every earlier owner of the task (for
  KafkaSink, InitProducerId of the task's own transactional id, which also
  settles the old owner's open transaction) and then says where the task's
  input resumes. Only then does the scheduler run batches of it. A task
  with no committed position starts where its source says (``start=``).

Why this is exactly once: only the current owner of a task can commit for it
(the takeover fences the others first), its outputs and its position commit
in one transaction, and the owner resumes from the position read after
fencing. A batch that had run but not committed when its task moved is
re-run by the new owner from the same position.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from streamlet._retry import GaveUp, RetryPolicy, retrying
from streamlet._scheduler import BatchScheduler
from streamlet.errors import SinkError, StateError, StreamletError
from streamlet.kafka._group import GroupMember
from streamlet.metrics import BatchInfo, LatencyHistogram
from streamlet.sinks.base import Sink
from streamlet.sources.base import DirectSource
from streamlet.state._changelog import stored_positions
from streamlet.state._store import StateStore

if TYPE_CHECKING:
    from streamlet.kafka.changelog import TaskStates

__all__ = ["GroupWorker"]

log = logging.getLogger(__name__)

COMMIT_SPACING = 1.0
"""Seconds between two commits of batch ends to the group (lag tools need no more)."""


class GroupWorker:
    """Keeps the scheduler's tasks in step with the group's assignment.

    Args:
        scheduler: runs the batches of the tasks this worker owns.
        sources: the app's Kafka sources by name (where a task with no
            committed position starts).
        topics: their topics, by source name.
        sinks: every sink of the app (handlers' and the dead-letter sink).
        member: the membership, built with this worker's callbacks
            (:meth:`revoked`, :meth:`assigned`, :meth:`failed`).
        revoke_budget: seconds a rebalance waits for the batch under way.
        retry: how often taking a task over is tried before the worker stops.
        states: the stateful handlers' per-task state, restored from their
            changelogs when a task is taken over (None: no keyed state).
    """

    def __init__(
        self,
        *,
        scheduler: BatchScheduler,
        sources: Mapping[str, DirectSource],
        sinks: Sequence[Sink],
        revoke_budget: float,
        retry: RetryPolicy,
        topics: Mapping[str, str],
        group: str = "",
        worker: str = "",
        states: TaskStates | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.states = states
        self.sources = dict(sources)
        self.sinks = list(sinks)
        self.revoke_budget = revoke_budget
        self.retry = retry
        self.member: GroupMember | None = None
        #: The error that stopped the group work (None: none).
        self.error: BaseException | None = None
        self.stopped = anyio.Event()
        self.group = group
        self.worker = worker
        #: Assignments taken over, and how long each kept batches paused.
        self.rebalances = 0
        self.pauses = LatencyHistogram()
        self.last_pause: float | None = None
        self._send, self._receive = anyio.create_memory_object_stream[set[int]](math.inf)
        self._revoked_at: float | None = None
        self._assignment: set[int] = set()
        self._closing = False
        self._done: dict[tuple[str, int], int] = {}
        self._done_changed = anyio.Event()
        self._topics = dict(topics)

    def on_batch(self, info: BatchInfo) -> None:
        """A listener: the batch's ends become the group's committed offsets (soon)."""
        for r in info.ranges:
            topic = self._topics.get(r.source)
            if topic is not None:
                self._done[(topic, r.partition)] = r.until
        self._done_changed.set()

    async def _commit_offsets(self, member: GroupMember) -> None:
        """Commit the newest batch ends to the group, at most once a second, never mid-rebalance.

        A commit that reaches the coordinator during a rebalance fails with
        the old generation, and aiokafka then drops its member id and joins
        again as a new member: the group waits a whole session timeout for
        the old one. So commits wait while batches are paused (a rebalance
        is under way), and are spaced out to make such a race rare; they
        only serve lag tools and at-least-once sinks.
        """
        while True:
            await self._done_changed.wait()
            self._done_changed = anyio.Event()
            while self.scheduler.paused:  # noqa: ASYNC110 - a rebalance: commit once it is over
                await anyio.sleep(COMMIT_SPACING / 10)
            owned = self.scheduler.tasks or set()
            offsets = {tp: o for tp, o in self._done.items() if tp[1] in owned}
            if offsets:
                await member.commit(offsets)
            await anyio.sleep(COMMIT_SPACING)

    # -- the membership's callbacks ------------------------------------------------

    async def revoked(self) -> None:
        """A rebalance takes the tasks away: pause, let the batch under way finish."""
        self._revoked_at = time.monotonic()
        if not await self.scheduler.pause(self.revoke_budget):
            log.warning(
                "rebalance: the batch under way did not finish within revoke_budget=%gs;"
                " it goes on, and is dropped if its task moves",
                self.revoke_budget,
            )

    def assigned(self, tasks: set[int]) -> None:
        """The group's new assignment; taken over in :meth:`run`, not here (no heartbeats now)."""
        self._assignment = set(tasks)
        self._hand_on(tasks)

    def _hand_on(self, tasks: set[int]) -> None:
        if self._closing:
            return  # leaving the group: a last rebalance may still call back
        # Stopping: nobody follows the assignments any more.
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            self._send.send_nowait(set(tasks))

    def status(self) -> dict[str, Any]:
        """The worker's place in the group, for the status page and metrics."""
        return {
            "group": self.group,
            "worker": self.worker,
            "tasks": sorted(self.scheduler.tasks or ()),
            "assigned": sorted(self._assignment),
            "rebalances": self.rebalances,
            "last_pause": self.last_pause,
            "pauses": self.pauses,
        }

    def fenced(self, task: int) -> None:
        """A commit of ``task`` was fenced: take it over again if the group still says it is ours.

        That happens to a worker that was paused past the session timeout
        and kept its tasks in the next assignment: meanwhile another worker
        took one over (and fenced this one's producer). Taking it over again
        fences that worker in turn and resumes from what it committed.
        """
        if task in self._assignment:
            self._hand_on(self._assignment)

    def failed(self, error: BaseException) -> None:
        """The membership's callbacks failed: the worker stops (not while it is leaving)."""
        if self._closing:
            log.warning("while leaving the group: %s", error)
            return
        if not isinstance(error, StreamletError):
            wrapped = StreamletError(f"following the group's assignment failed: {error!r}")
            wrapped.__cause__ = error
            error = wrapped
        self.error = self.error or error
        self.stopped.set()

    # -- running -------------------------------------------------------------------

    async def run(self, member: GroupMember) -> None:
        """Join the group and follow its assignments until cancelled or failed."""
        self.member = member
        try:
            if self.states is not None:
                await self.states.scan()  # copies left by earlier runs: the join tells them
            await member.start()
            async with anyio.create_task_group() as group:
                group.start_soon(member.run)
                group.start_soon(self._commit_offsets, member)
                async with self._receive:
                    async for tasks in self._receive:
                        # Only the newest assignment matters: skip the superseded.
                        while True:
                            try:
                                tasks = self._receive.receive_nowait()
                            except anyio.WouldBlock:
                                break
                        try:
                            await self._apply(tasks)
                        except StreamletError as exc:
                            self.failed(exc)
                            group.cancel_scope.cancel()
        finally:
            self._closing = True
            self._send.close()
            with anyio.CancelScope(shield=True):
                await member.stop()

    async def _apply(self, tasks: set[int]) -> None:
        scheduler = self.scheduler
        owned = set(scheduler.tasks or ())
        for task in sorted(owned - tasks):
            await scheduler.release_task(task)
        gained = sorted(tasks - owned)
        for task in gained:
            await scheduler.task_idle(task)
            positions, marked = await self._take_over(task)
            # After the sinks fenced the earlier owners: the changelogs'
            # ends are final, and the state matches ``positions``.
            stores = await self._restore(task)
            for name, store in stores.items():
                covered = stored_positions(store, self._topics)
                if marked:
                    differ = {s: o for s, o in covered.items() if positions.get(s) != o}
                    if differ:
                        raise StateError(state_elsewhere(task, name, positions, covered))
                elif covered:
                    log.warning(
                        "task %d: its sinks hold no position (the marker expired or was"
                        " deleted); it resumes where its state says its input stopped: %s",
                        task,
                        covered,
                    )
                    positions.update(covered)
                # Not the store's changelog position: aborted transactions move it too.
                elif not store.empty():
                    raise StateError(unmarked_state(task, name, store.path))
            await scheduler.acquire_task(task, positions, stores)
        scheduler.resume()
        paused = time.monotonic() - self._revoked_at if self._revoked_at is not None else 0.0
        self.rebalances += 1
        self.pauses.observe(paused)
        self.last_pause = paused
        log.info(
            "group: this worker owns tasks %s (gained %s, lost %s; batches paused %.2fs)",
            sorted(tasks) or "none",
            gained or "none",
            sorted(owned - tasks) or "none",
            paused,
        )
        self._revoked_at = None

    async def _restore(self, task: int) -> dict[str, StateStore]:
        """The task's keyed state, replayed from the changelogs (with the app's retries)."""
        states = self.states
        if states is None:
            return {}
        try:
            return await retrying(
                self.retry, f"restoring task {task}'s state", lambda: states.acquire(task)
            )
        except GaveUp as gave_up:
            raise StreamletError(
                f"cannot restore the state of task {task} after {gave_up.attempts}"
                f" attempt(s): {gave_up.error}"
            ) from gave_up.error

    async def _take_over(self, task: int) -> tuple[dict[str, int], bool]:
        """Fence the task's earlier owners in every sink; where its input resumes.

        Returns the positions, and whether a sink knew them (False: they
        come from the group's offsets or the sources' start).
        """
        positions: dict[str, int] = {}
        for sink in self.sinks:

            async def acquire(sink: Sink = sink) -> Mapping[str, int] | None:
                return await sink.acquire(task)

            try:
                marks = await retrying(self.retry, f"taking task {task} over", acquire)
            except GaveUp as gave_up:
                raise SinkError(
                    f"cannot take task {task} over in {sink.describe()} after"
                    f" {gave_up.attempts} attempt(s): {gave_up.error}"
                ) from gave_up.error
            if marks:
                for name, offset in marks.items():
                    positions[name] = min(offset, positions.get(name, offset))
        marked = bool(positions)
        for name, source in self.sources.items():
            if name in positions:
                continue
            # No sink knows: where the group's last owner got to, else the start.
            topic = self._topics.get(name)
            if topic is not None and self.member is not None:
                committed = await self.member.committed(topic, task)
                if committed is not None:
                    positions[name] = committed
                    continue
            start = await source.start_positions([task])
            if task in start:
                positions[name] = start[task]
        return positions, marked


def state_elsewhere(
    task: int, handler: str, positions: Mapping[str, int], covered: Mapping[str, int]
) -> str:
    """Why a task whose state covers other input than its sink's marker says cannot run."""
    return (
        f"task {task}: the state of handler {handler!r} covers input up to {dict(covered)},"
        f" but its sink's marker says the task resumes at {dict(positions)}. Both are written"
        " in one transaction, so they only differ when one was changed by hand (the marker"
        " group's offsets reset, or the changelog topic replaced): running on would count"
        " input twice or skip it. Put back what was changed, or start the state over (a new"
        " app name)"
    )


def unmarked_state(task: int, handler: str, path: str) -> str:
    """Why a task whose sink knows no position cannot run on the state its changelog holds."""
    return (
        f"task {task}: the changelog of handler {handler!r} holds state, but its sink holds no"
        " position for the task's input. State is only written with a position, so either"
        " the changelog belongs to an earlier app of the same name that read other topics,"
        " or the sink's task marker is gone (deleted, or expired: Kafka drops the offsets of"
        " a group without members offsets.retention.minutes after their last commit, 7 days"
        " by default, so a partition without input for that long loses its marker; raise it"
        " on the cluster). Running on would count input on top of state that does not match"
        " it. To start the state over on purpose, give the app a new name, or delete the"
        " changelog topic and every worker's"
        f" {os.path.dirname(path)} folder"
    )


def check_group_mode(
    sources: Mapping[str, object],
    sinks: Sequence[tuple[str, Sink]],
    stateful: Sequence[tuple[str, Sink | None]] = (),
) -> list[str]:
    """What group mode cannot run in this app, as messages (empty: it can); pure.

    ``stateful``: the handlers with keyed state, and their sinks.
    """
    from streamlet.kafka.direct import KafkaDirectSource
    from streamlet.kafka.sink import KafkaSink
    from streamlet.sinks.postgres import PostgresSink

    problems: list[str] = []
    if not sources:
        problems.append("group mode shares Kafka sources' partitions, and the app has none")
    for name, source in sources.items():
        if not isinstance(source, KafkaDirectSource):
            problems.append(
                f"source {name!r} is a {type(source).__name__}: in group mode every source must"
                " be a KafkaSource in direct mode (a receiver's stored records would be"
                " stranded on a worker that lost its partitions)"
            )
            continue
        if source.config.partitions is not None:
            problems.append(
                f"source {name!r} sets partitions=: in group mode the group assigns them"
            )
        if source.config.group_id is not None:
            problems.append(
                f"source {name!r} sets group_id=: in group mode its consumer must not commit"
                " to a group (the worker group owns the partitions; positions live in the"
                " sink's transactions)"
            )
    exactly_once = []
    for handler, sink in sinks:
        if sink.guarantee != "exactly-once":
            continue
        # These two key what they committed by each task's input offsets and
        # fence a task's earlier owners when it is acquired.
        if not isinstance(sink, (KafkaSink, PostgresSink)):
            problems.append(
                f"the sink of {handler!r} ({sink.describe()}) is exactly-once only on one"
                " worker: in group mode use a KafkaSink or a PostgresSink (or an"
                " at-least-once sink)"
            )
        else:
            exactly_once.append(handler)
    for handler, kept_by in stateful:
        # The changelog goes in the task's Kafka transaction, beside the
        # outputs and the input position: state, outputs and position move
        # together. A PostgresSink could keep the state in its own
        # transaction; not built.
        if not isinstance(kept_by, KafkaSink) or kept_by.guarantee != "exactly-once":
            what = "no sink" if kept_by is None else f"the sink {kept_by.describe()}"
            problems.append(
                f"handler {handler!r} has keyed state and {what}: in group mode a stateful"
                " handler's state is written to a Kafka changelog in its sink's transaction,"
                " so its sink must be a KafkaSink with transactions"
            )
    if len(exactly_once) > 1:
        problems.append(
            f"handlers {', '.join(repr(h) for h in exactly_once)} each have an exactly-once"
            " sink: group mode takes one exactly-once sink per app for now (each task"
            " resumes from its sink's position)"
        )
    return problems
