"""Atomic, versioned metadata checkpoints.

A checkpoint is a snapshot of the tracker's state plus the position of the
newest tracker-log event it includes; recovery loads the newest readable
checkpoint and replays only the events after that position, so the log can
be cleaned up to it.

File format (``checkpoint-<batch id, 12 digits>.json``)::

    {"format":"streamlet._checkpoint","version":1,"length":N,"crc32c":C}\\n
    <N bytes: the body, one orjson document>

The header line says what the file is for a person reading it; the CRC32C
over the body catches a torn or bit-rotten file, which then is skipped in
favour of the previous checkpoint (the tracker log is kept back to the oldest
retained checkpoint so that fallback can replay). Nothing is pickled:
a checkpoint is data only.

Writing: temp file, fsync, rename, fsync directory (the rename is the
commit point), then delete all but the new one and the newest readable
others, ``keep`` in all (an unreadable checkpoint is deleted first).
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
import google_crc32c
import orjson

from streamlet.clock import SYSTEM_CLOCK, Clock
from streamlet.errors import CheckpointError
from streamlet.fs import FileSystem, read_all, write_atomic
from streamlet.wal import Position

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "Checkpointer",
    "RetainedCheckpoint",
    "list_checkpoints",
    "load_latest",
    "retain_checkpoint",
    "write_checkpoint",
]

log = logging.getLogger(__name__)

FORMAT = "streamlet._checkpoint"
VERSION = 1
_NAME = re.compile(r"^checkpoint-(\d{12})\.json$")
_MAX_HEADER = 4096


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A checkpoint as read back: its file and body."""

    path: str
    batch_id: int
    body: dict[str, Any]


def _name(batch_id: int) -> str:
    return f"checkpoint-{batch_id:012d}.json"


def encode(body: Mapping[str, Any]) -> bytes:
    """The bytes of a checkpoint file holding ``body``."""
    payload = orjson.dumps(body)
    header = orjson.dumps(
        {
            "format": FORMAT,
            "version": VERSION,
            "length": len(payload),
            "crc32c": google_crc32c.value(payload),
        }
    )
    return header + b"\n" + payload


def decode(data: bytes, path: str) -> dict[str, Any]:
    """Parse and verify a checkpoint file's bytes.

    Raises:
        CheckpointError: naming ``path`` and what is wrong with it.
    """
    newline = data.find(b"\n", 0, _MAX_HEADER)
    if newline < 0:
        raise CheckpointError(f"checkpoint {path}: no header line in the first {_MAX_HEADER} bytes")
    try:
        header = orjson.loads(data[:newline])
    except orjson.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {path}: header is not JSON ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: not a streamlet checkpoint")
    if header.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path}: format version {header.get('version')!r} is not readable"
            f" by this streamlet (reads version {VERSION})"
        )
    payload = data[newline + 1 :]
    if header.get("length") != len(payload):
        raise CheckpointError(
            f"checkpoint {path}: body is {len(payload)} bytes, header says {header.get('length')}"
        )
    if header.get("crc32c") != google_crc32c.value(payload):
        raise CheckpointError(f"checkpoint {path}: body fails its CRC32C check")
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:  # pragma: no cover - CRC passed, so a writer bug
        raise CheckpointError(f"checkpoint {path}: body is not JSON ({exc})") from None
    if not isinstance(body, dict):
        raise CheckpointError(f"checkpoint {path}: body is not a JSON object")
    return body


def list_checkpoints(fs: FileSystem, directory: str) -> list[tuple[int, str]]:
    """``(batch id, path)`` of every checkpoint file, newest first."""
    if not fs.exists(directory):
        return []
    found = []
    for name in fs.listdir(directory):
        match = _NAME.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(directory, name)))
    return sorted(found, reverse=True)


def write_checkpoint(
    fs: FileSystem, directory: str, batch_id: int, body: Mapping[str, Any], *, keep: int = 2
) -> str:
    """Durably write the checkpoint for ``batch_id``; blocking (worker thread).

    Returns the path written. Older checkpoints beyond the newest ``keep``
    are deleted after the new one is durable.

    Raises:
        CheckpointError: a file operation failed (the ``OSError`` is the
            cause); what is on disk is still recoverable: the tracker log
            reaches back to the previous checkpoint.
    """
    final = os.path.join(directory, _name(batch_id))
    try:
        _write(fs, directory, final, body, keep)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            advice = "the disk is full: free space on it"
        elif exc.errno == errno.EIO:
            advice = "the disk reported an I/O error: check the device (kernel log)"
        else:
            advice = "check the directory and the disk"
        raise CheckpointError(
            f"cannot write checkpoint {final}: {exc}; {advice}. Batch {batch_id} is done and"
            " logged; a restart recovers from the tracker log and the previous checkpoint"
        ) from exc
    return final


def _write(fs: FileSystem, directory: str, final: str, body: Mapping[str, Any], keep: int) -> None:
    fs.makedirs(directory)
    write_atomic(fs, final, encode(body))
    # Keep the new one and the newest readable others: after recovery fell
    # back from an unreadable newest checkpoint, that one must go, not the
    # readable one the tracker log still reaches back to.
    stale: list[str] = []
    kept = 0
    for _, path in list_checkpoints(fs, directory):
        if kept < keep and (path == final or _readable(fs, path)):
            kept += 1
        else:
            stale.append(path)
    for path in stale:
        fs.remove(path)
    if stale:
        fs.sync_dir(directory)


def _readable(fs: FileSystem, path: str) -> bool:
    try:
        decode(read_all(fs, path), path)
    except (CheckpointError, OSError):
        return False
    return True


def load_latest(fs: FileSystem, directory: str) -> Checkpoint | None:
    """The newest readable checkpoint, or None when there is none at all.

    An unreadable newer checkpoint is skipped with a warning (the tracker log
    still reaches back to the older one).

    Raises:
        CheckpointError: checkpoints exist but none is readable.
    """
    found = list_checkpoints(fs, directory)
    errors: list[str] = []
    for batch_id, path in found:
        try:
            body = decode(read_all(fs, path), path)
        except (CheckpointError, OSError) as exc:
            log.warning("skipping unreadable checkpoint: %s", exc)
            errors.append(str(exc))
            continue
        return Checkpoint(path, batch_id, body)
    if found:
        raise CheckpointError(
            "no readable checkpoint in "
            f"{directory}: {'; '.join(errors)}. Restore the directory from a backup,"
            " or move it away to start the app from scratch (its batches would run again)"
        )
    return None


RetainedCheckpoint = tuple[int, Position | None]
"""A checkpoint kept on disk: its batch id and the tracker event it covers (None: unknown)."""


def retain_checkpoint(
    retained: Sequence[RetainedCheckpoint], new: RetainedCheckpoint, keep: int = 2
) -> tuple[list[RetainedCheckpoint], Position | None]:
    """The checkpoints kept after writing ``new``, and how far the tracker log may be cleaned.

    Mirrors :func:`~streamlet._checkpoint.write_checkpoint`, which keeps the
    newest ``keep`` checkpoints by batch id and replaces one of the same
    batch id. The log must reach back to the oldest kept checkpoint, so that
    recovery can fall back to it if a newer one is unreadable. When that
    checkpoint's event is not known (a checkpoint this process did not
    write, or fewer than ``keep`` known), nothing is cleaned. Pure.

    Returns:
        The retained checkpoints, newest first, and the position up to which
        the tracker log may be cleaned (None: clean nothing).
    """
    kept = sorted(
        [new, *(c for c in retained if c[0] != new[0])], key=lambda c: c[0], reverse=True
    )[:keep]
    if len(kept) < keep:
        return kept, None
    return kept, kept[-1][1]


class Checkpointer:
    """Writes the tracker's checkpoints now and then; says how far its log may be cleaned.

    Args:
        fs: the file layer.
        directory: where checkpoints go.
        app: the app's name, recorded in every checkpoint.
        interval: seconds between checkpoints (0: after every batch).
        loaded: the batch id and tracker position of the checkpoint recovery
            loaded (None: none was); the tracker log is cleaned up to the
            older of the two retained checkpoints, so either can be
            recovered from (:func:`retain_checkpoint`).
        last_done: the newest done batch at start (what ``loaded`` plus the
            log replay covers).
        clock: what the interval is measured on (:mod:`streamlet.clock`).
    """

    def __init__(
        self,
        fs: FileSystem,
        directory: str,
        app: str,
        *,
        interval: float,
        loaded: RetainedCheckpoint | None,
        last_done: int,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.fs = fs
        self.clock = clock
        self.directory = directory
        self.app = app
        self.interval = interval
        self._retained: list[RetainedCheckpoint] = [loaded] if loaded is not None else []
        self._written_at = self.clock.monotonic()
        self._written_batch = last_done
        #: The clock's monotonic time of the last checkpoint written (None: none yet).
        self.last_written: float | None = None

    def due(self, last_done: int, *, force: bool = False) -> bool:
        """Whether a checkpoint should be written now: forced, or a batch done and time up."""
        if force:
            return True
        return (
            last_done != self._written_batch
            and self.clock.monotonic() - self._written_at >= self.interval
        )

    async def write(
        self, last_done: int, event: Position | None, state: Mapping[str, Any]
    ) -> Position | None:
        """Write the checkpoint of ``state``; return how far the tracker log may be cleaned.

        Raises:
            CheckpointError: the checkpoint could not be written.
        """
        body: dict[str, Any] = {
            "app": self.app,
            "last_event": list(event) if event is not None else None,
            "state": state,
        }
        await anyio.to_thread.run_sync(write_checkpoint, self.fs, self.directory, last_done, body)
        self._written_at = self.last_written = self.clock.monotonic()
        self._written_batch = last_done
        # A forced checkpoint at stop may rewrite the newest under its own
        # name: then the older one is still the one the log must reach.
        self._retained, clean_to = retain_checkpoint(self._retained, (last_done, event))
        return clean_to
