"""Per-batch figures, as Spark's streaming listener reports them.

The scheduler builds one :class:`BatchInfo` per batch and hands it to every
listener the app registered; ``streamlet run`` prints each as a status line.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BatchInfo"]


@dataclass(frozen=True, slots=True)
class BatchInfo:
    """What happened to one batch. Times are in seconds.

    Attributes:
        batch_id: the batch's id.
        batch_time: wall-clock time the batch was scheduled for.
        records: input records in the batch.
        outputs: outputs committed, over all handlers.
        scheduling_delay: from the scheduled time to the start of the batch
            (grows when batches take longer than the batch interval).
        processing_time: running the handlers, retries included.
        commit_time: sink commits, source commits and the ``done`` record.
        total_delay: from the scheduled time to the batch being done.
        recovered: True when the batch is a re-run after a restart.
        dead_lettered: handlers whose input went to the dead-letter sink.
    """

    batch_id: int
    batch_time: float
    records: int
    outputs: int
    scheduling_delay: float
    processing_time: float
    commit_time: float
    total_delay: float
    recovered: bool = False
    dead_lettered: tuple[str, ...] = ()

    def status_line(self) -> str:
        """One human-readable line for logs and ``streamlet run``."""
        line = (
            f"batch {self.batch_id}: {self.records} records -> {self.outputs} outputs;"
            f" delay {self.scheduling_delay * 1000:.1f} ms,"
            f" processing {self.processing_time * 1000:.1f} ms,"
            f" commit {self.commit_time * 1000:.1f} ms,"
            f" total {self.total_delay * 1000:.1f} ms"
        )
        if self.recovered:
            line += " (recovered)"
        if self.dead_lettered:
            line += f" (dead-lettered: {', '.join(self.dead_lettered)})"
        return line
