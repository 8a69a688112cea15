"""Which worker of a group owns which task: a sticky, balanced assignment; pure.

In group mode a *task* is partition index ``p`` of every Kafka source of the
app (the sources are co-partitioned: the same partition count). Tasks are
what moves between workers, so the assignment is made per task, never per
topic-partition: partition 3 of every source always lands on one worker.

Moving a task costs a pause (its in-flight batch finishes or is aborted, the
new owner fences the old one and reads where to resume), so the assignment
moves as few as it can: a worker keeps the tasks it owns up to its fair
share, and only the rest is dealt out. Shares differ by at most one task.
Everything here is deterministic in its inputs: every member computing it
would agree (only the group leader does).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from streamlet.errors import ConfigError

__all__ = ["assign_tasks", "tasks_of"]


def tasks_of(partitions: Mapping[str, int]) -> list[int]:
    """The tasks of sources with these partition counts (topic → count).

    Raises:
        ConfigError: the counts differ: partition ``p`` of one source would
            have no partner in another, and keyed input would not meet.
    """
    counts = set(partitions.values())
    if len(counts) > 1:
        listed = ", ".join(f"{t}: {n}" for t, n in sorted(partitions.items()))
        raise ConfigError(
            f"in group mode every Kafka source must have the same number of partitions"
            f" (a task is partition p of each of them); these differ: {listed}. Give the"
            " topics the same partition count, or run them as separate apps"
        )
    return list(range(counts.pop())) if counts else []


def assign_tasks(
    tasks: Sequence[int],
    owned: Mapping[str, Sequence[int]],
    warm: Mapping[str, Mapping[int, int]] | None = None,
) -> dict[str, list[int]]:
    """Deal ``tasks`` out to the members, keeping what each owns where it can; pure.

    Args:
        tasks: every task of the app.
        owned: member id → the tasks it says it owns now (from its join
            metadata; a new member owns none). Claims of tasks that no longer
            exist are ignored; a task claimed by two members (one of them a
            zombie that missed a rebalance) stays with the first by member id.
        warm: member id → task → how far its local copy of the task's keyed
            state goes (the changelog offset). A task that has to move goes
            to a member holding it warm (the warmest first) where shares
            allow, so that its new owner replays less: a worker restarted
            after a kill gets its own tasks back.

    Returns:
        member id → its tasks, sorted; every task exactly once, and the
        members' counts differing by at most one.
    """
    members = sorted(owned)
    if not members:
        return {}
    warm = warm or {}
    valid = set(tasks)
    claimed: dict[str, list[int]] = {m: [] for m in members}
    taken: set[int] = set()
    for member in members:
        for task in sorted(set(owned[member])):
            if task in valid and task not in taken:
                claimed[member].append(task)
                taken.add(task)
    base, extra = divmod(len(valid), len(members))
    # The members that hold the most already get the larger shares: fewer moves.
    by_holding = sorted(members, key=lambda m: (-len(claimed[m]), m))
    quota = {m: base + (1 if i < extra else 0) for i, m in enumerate(by_holding)}
    needy = [m for m in members if len(claimed[m]) < quota[m]]

    def wanted(task: int) -> bool:
        """Whether a member short of its share holds ``task`` warm."""
        return any(task in warm.get(m, {}) for m in needy)

    result: dict[str, list[int]] = {}
    free = sorted(valid - taken)
    for member in members:
        # A member over its share gives up first what another holds warm.
        mine = sorted(claimed[member], key=lambda t: (wanted(t), t))
        result[member] = sorted(mine[: quota[member]])
        free.extend(mine[quota[member] :])
    free.sort()
    for task in list(free):  # each to the warmest member with room, if any
        holders = [m for m in members if len(result[m]) < quota[m] and task in warm.get(m, {})]
        if holders:
            best = min(holders, key=lambda m: (-warm[m][task], m))
            result[best].append(task)
            free.remove(task)
    for member in members:
        need = quota[member] - len(result[member])
        result[member].extend(free[:need])
        del free[:need]
        result[member].sort()
    return result
