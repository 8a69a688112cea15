"""A read-only view of an app's state directory, for tools and operators.

``streamlet checkpoint show`` must be safe to run beside a live app and on a
directory copied from a broken machine, so nothing here opens the tracker's
log for writing (which would take its lock and cut a torn tail): the newest
readable checkpoint is loaded and the tracker events after it are read with
:func:`streamlet.wal.tools.read_records`, exactly as recovery would apply them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import orjson

from streamlet.checkpoint import Checkpoint, load_latest
from streamlet.errors import StreamletError
from streamlet.fs import FileSystem, OsFileSystem
from streamlet.tracker import TrackerState, restore
from streamlet.wal.log import Position, Problem
from streamlet.wal.tools import read_records

__all__ = ["StateView", "read_state"]

MANIFEST = "app.json"
CHECKPOINTS = "checkpoints"
TRACKER = "tracker"


@dataclass(slots=True)
class StateView:
    """What a state directory says, as recovery would rebuild it."""

    directory: str
    manifest: dict[str, Any] | None
    checkpoint: Checkpoint | None
    state: TrackerState
    events_after_checkpoint: int
    problems: list[Problem] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The view as plain JSON-able data (``streamlet checkpoint show --json``)."""
        return {
            "directory": self.directory,
            "app": (self.manifest or {}).get("app"),
            "checkpoint": None
            if self.checkpoint is None
            else {"path": self.checkpoint.path, "batch_id": self.checkpoint.batch_id},
            "events_after_checkpoint": self.events_after_checkpoint,
            "state": self.state.to_json(),
            "problems": [
                {"path": p.path, "offset": p.offset, "reason": p.reason} for p in self.problems
            ],
        }

    def describe(self) -> str:
        """A readable, multi-line summary."""
        s = self.state
        app = (self.manifest or {}).get("app", "?")
        lines = [f"state directory {self.directory} (app {app!r})"]
        if self.checkpoint is None:
            lines.append("  checkpoint: none yet (state is rebuilt from the tracker log alone)")
        else:
            lines.append(
                f"  checkpoint: {self.checkpoint.path} (as of batch {self.checkpoint.batch_id})"
            )
        lines.append(f"  tracker events after it: {self.events_after_checkpoint}")
        lines.append(f"  last done batch: {s.last_done}; next batch id: {s.next_batch_id}")
        if s.pending:
            lines.append(f"  pending (re-run on next start): {len(s.pending)} batch(es)")
            for alloc in s.pending:
                parts = [f"{r.source}[{r.partition}] {r.start}..{r.until}" for r in alloc.ranges]
                parts += [f"block {b.id} of {b.source} ({b.records} records)" for b in alloc.blocks]
                lines.append(f"    batch {alloc.id}: {', '.join(parts) or 'no input'}")
        else:
            lines.append("  pending: none")
        for source in sorted(set(s.positions) | set(s.committed)):
            lines.append(f"  source {source}:")
            allocated = s.positions.get(source, {})
            done = s.committed.get(source, {})
            for partition in sorted(set(allocated) | set(done)):
                lines.append(
                    f"    partition {partition}: committed up to {done.get(partition, '-')},"
                    f" allocated up to {allocated.get(partition, '-')}"
                )
        for source, refs in sorted(s.blocks.items()):
            if refs:
                waiting = sum(b.records for b in refs)
                lines.append(
                    f"  receiver {source}: {waiting} records in {len(refs)} unbatched block(s)"
                )
        for problem in self.problems:
            lines.append(
                f"  stopped reading at {problem.path} offset {problem.offset}: {problem.reason}"
                " (a torn tail is cut on the next start; otherwise see 'streamlet wal verify')"
            )
        return "\n".join(lines)


def read_state(directory: str | os.PathLike[str], *, fs: FileSystem | None = None) -> StateView:
    """Rebuild the tracker state of ``directory`` without changing anything.

    Raises:
        StreamletError: ``directory`` is not a streamlet state directory, or a
            checkpoint or tracker event cannot be understood.
        OSError: files cannot be read.
    """
    fs = fs or OsFileSystem()
    path = os.path.abspath(os.fspath(directory))
    manifest_path = os.path.join(path, MANIFEST)
    tracker_dir = os.path.join(path, TRACKER)
    if not fs.exists(manifest_path) and not fs.exists(tracker_dir):
        raise StreamletError(
            f"{path} is not a streamlet state directory (no {MANIFEST} and no {TRACKER}/);"
            " pass the app's state_dir (default .streamlet/<app name>)"
        )
    manifest: dict[str, Any] | None = None
    if fs.exists(manifest_path):
        file = fs.open(manifest_path)
        try:
            raw = file.read(0, file.size())
        finally:
            file.close()
        try:
            manifest = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise StreamletError(f"{manifest_path} is not valid JSON: {exc}") from None
    checkpoint = load_latest(fs, os.path.join(path, CHECKPOINTS))
    state = TrackerState()
    after: Position | None = None
    if checkpoint is not None:
        state, after = restore(checkpoint.body, checkpoint.path)
    problems: list[Problem] = []
    events = 0
    if fs.exists(tracker_dir):
        for position, payload in read_records(tracker_dir, fs=fs, on_problem=problems.append):
            if after is not None and position[:2] <= after[:2]:
                continue
            state.apply(orjson.loads(payload))
            events += 1
    return StateView(path, manifest, checkpoint, state, events, problems)
