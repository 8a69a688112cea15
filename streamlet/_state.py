"""A read-only view of an app's state directory, for tools and operators.

``streamlet checkpoint show`` must be safe to run beside a live app and on a
directory copied from a broken machine, so nothing here opens the tracker's
log for writing (which would take its lock and cut a torn tail): the newest
readable checkpoint is loaded and the tracker events after it are read with
:func:`streamlet.wal.tools.read_records`, exactly as recovery would apply them.

:func:`verify_state` (``streamlet wal verify STATE_DIR``) checks everything a
restart reads: the tracker log and the data WAL record by record
(:func:`streamlet.wal.tools.verify`), every checkpoint's checksum and body,
and that the tracker log still holds the events each readable checkpoint
stops at (recovery replays the log from there).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import orjson

from streamlet._checkpoint import Checkpoint, decode, list_checkpoints, load_latest
from streamlet._statedir import CHECKPOINTS, DATA, MANIFEST, TRACKER
from streamlet._statedir import is_locked as state_dir_in_use
from streamlet._tracker import TrackerState, decode_event, restore
from streamlet.errors import StreamletError
from streamlet.fs import FileSystem, OsFileSystem, read_all
from streamlet.wal.log import Position, Problem, is_locked
from streamlet.wal.tools import VerifyReport, read_records, verify

__all__ = [
    "CheckpointCheck",
    "StateCheck",
    "StateView",
    "is_state_directory",
    "read_state",
    "verify_state",
]


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
        try:
            manifest = orjson.loads(read_all(fs, manifest_path))
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
            state.apply(decode_event(payload))
            events += 1
    return StateView(path, manifest, checkpoint, state, events, problems)


def is_state_directory(directory: str | os.PathLike[str], *, fs: FileSystem | None = None) -> bool:
    """Whether ``directory`` is an app's state directory: it holds app.json or tracker/."""
    fs = fs or OsFileSystem()
    path = os.fspath(directory)
    return fs.exists(os.path.join(path, MANIFEST)) or fs.exists(os.path.join(path, TRACKER))


@dataclass(frozen=True, slots=True)
class CheckpointCheck:
    """One checkpoint file as :func:`verify_state` found it."""

    path: str
    batch_id: int
    error: str | None
    """Why recovery cannot use it (header, checksum, body, or its place in the
    tracker log), or None."""
    last_event: Position | None = None
    """The newest tracker event it holds (None: none, or unreadable)."""

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True)
class StateCheck:
    """What :func:`verify_state` found in a state directory."""

    directory: str
    tracker: VerifyReport | None
    """The tracker log; None when there is no ``tracker/`` directory."""
    data: VerifyReport | None
    """The data WAL; None when there is no ``data/`` directory (no receivers)."""
    checkpoints: tuple[CheckpointCheck, ...]
    """Every checkpoint file, newest first."""
    live: bool
    """A running app held the state directory's lock or a log's: the check is a snapshot.
    Checkpoints are then not matched against the tracker log (the app writes
    the one and cleans the other while they are read)."""

    @property
    def ok(self) -> bool:
        """True when every log and every checkpoint is sound."""
        logs = (r for r in (self.tracker, self.data) if r is not None)
        return all(r.ok for r in logs) and all(c.ok for c in self.checkpoints)


def verify_state(directory: str | os.PathLike[str], *, fs: FileSystem | None = None) -> StateCheck:
    """Check the logs and checkpoints of the state directory ``directory``; change nothing.

    Each checkpoint must decode (header, length, CRC32C) to a tracker state
    (what recovery loads), and, unless the app is running, the tracker log
    must hold the event the checkpoint stops at: a checkpoint behind the
    log's first segment cannot be recovered from (its events were cleaned),
    and one past the log's end means the log lost events the checkpoint holds
    (new events would then be taken for them and skipped on recovery).

    Raises:
        StreamletError: ``directory`` is not a state directory.
        OSError: a log directory cannot be read.
    """
    fs = fs or OsFileSystem()
    path = os.path.abspath(os.fspath(directory))
    if not is_state_directory(path, fs=fs):
        raise StreamletError(
            f"{path} is not a streamlet state directory (no {MANIFEST} and no {TRACKER}/);"
            " pass the app's state_dir (default .streamlet/<app name>)"
        )
    tracker_dir = os.path.join(path, TRACKER)
    data_dir = os.path.join(path, DATA)
    locks = isinstance(fs, OsFileSystem)
    live = locks and (state_dir_in_use(path) or any(is_locked(d) for d in (tracker_dir, data_dir)))
    # Checkpoints first, the tracker log after, as recovery reads them: every
    # event a checkpoint read here holds is in the log read next.
    checkpoints: list[CheckpointCheck] = []
    for batch_id, checkpoint_path in list_checkpoints(fs, os.path.join(path, CHECKPOINTS)):
        try:
            raw = read_all(fs, checkpoint_path)
        except FileNotFoundError:
            if live:
                continue  # retired by the running app since it was listed
            raise
        try:
            _, last_event = restore(decode(raw, checkpoint_path), checkpoint_path)
        except StreamletError as exc:
            checkpoints.append(CheckpointCheck(checkpoint_path, batch_id, str(exc)))
            continue
        checkpoints.append(CheckpointCheck(checkpoint_path, batch_id, None, last_event))
    tracker = verify(tracker_dir, fs=fs) if fs.exists(tracker_dir) else None
    data = verify(data_dir, fs=fs) if fs.exists(data_dir) else None
    live = live or any(r.live for r in (tracker, data) if r is not None)
    if not live and (tracker is None or tracker.ok):
        checkpoints = [_check_reach(c, tracker) for c in checkpoints]
    return StateCheck(path, tracker, data, tuple(checkpoints), live)


def _check_reach(checkpoint: CheckpointCheck, tracker: VerifyReport | None) -> CheckpointCheck:
    """``checkpoint`` with an error if the tracker log does not hold its last event."""
    if not checkpoint.ok:
        return checkpoint
    first = min(tracker.ends) if tracker is not None and tracker.ends else None
    event = checkpoint.last_event
    error: str | None = None
    if event is None:
        if first is not None and first > 1:
            error = (
                f"checkpoint {checkpoint.path} holds no tracker event, so recovery would"
                f" replay the tracker log from its start, but the log begins at segment"
                f" {first}: the events before it were cleaned"
            )
    elif tracker is None or first is None:
        error = (
            f"checkpoint {checkpoint.path} holds tracker events up to {tuple(event)}"
            f" (segment, offset, length), but the tracker log is missing or empty: events logged"
            f" from now on would be taken for ones the checkpoint holds and skipped"
            f" when the app recovers"
        )
    elif event.segment < first:
        error = (
            f"checkpoint {checkpoint.path} holds tracker events up to segment"
            f" {event.segment}, but the tracker log begins at segment {first}: the events"
            f" after the checkpoint were cleaned, so the app cannot recover from it"
        )
    elif not tracker.holds(event):
        error = (
            f"checkpoint {checkpoint.path} holds tracker events up to {tuple(event)}"
            f" (segment, offset, length), past the end of the tracker log: the log lost"
            f" events the checkpoint holds (was it repaired, or copied back from an older"
            f" backup?), and events logged from now on would be taken for ones the"
            f" checkpoint holds and skipped when the app recovers"
        )
    if error is None:
        return checkpoint
    return CheckpointCheck(checkpoint.path, checkpoint.batch_id, error, event)
