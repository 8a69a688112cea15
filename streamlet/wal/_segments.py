"""The files of a log directory: segment listing, segment creation and the writer lock.

The writer (:mod:`streamlet.wal._writer`) and the offline tools
(:mod:`streamlet.wal.tools`) both list segments, create them (a new segment,
or repair's empty replacement of one with a bad header) and take the lock;
each is written once, here, so the two cannot drift apart on what a
durably created segment is.
"""

from __future__ import annotations

import os

from streamlet.errors import WALError
from streamlet.fs import FileSystem, lock_held, try_lock, write_atomic
from streamlet.wal.format import (
    TEMP_SUFFIX,
    encode_segment_header,
    parse_segment_name,
    segment_name,
)

__all__ = ["LOCK_NAME", "create_segment", "is_locked", "list_segments", "lock_directory"]

LOCK_NAME = "LOCK"
"""The file in a log directory that a writer holds an exclusive ``flock`` on."""


def list_segments(fs: FileSystem, directory: str) -> list[int]:
    """The seqs of the segment files in ``directory``, in order (other names are ignored)."""
    return sorted(s for s in map(parse_segment_name, fs.listdir(directory)) if s is not None)


def create_segment(fs: FileSystem, directory: str, seq: int, *, sync_dir: bool = True) -> str:
    """Create segment ``seq`` holding only its header, durably; return its path.

    Temp file (a leftover of a crash removed first), header, sync, rename:
    a segment visible under its name always has a whole header (see
    :mod:`streamlet.wal.format`). The directory sync that makes the rename
    durable is left to the caller with ``sync_dir=False`` (repair syncs once
    for all its changes).
    """
    path = os.path.join(directory, segment_name(seq))
    write_atomic(fs, path, encode_segment_header(seq), temp=path + TEMP_SUFFIX, sync_dir=sync_dir)
    return path


def lock_directory(directory: str) -> int:
    """Take the exclusive writer lock of a log directory; return the fd holding it.

    Raises WALError naming the directory when another open file holds it
    (:func:`streamlet.fs.try_lock`: the lock goes with the process, so a
    crash never leaves it stale).
    """
    path = os.path.join(directory, LOCK_NAME)
    fd = try_lock(path)
    if fd is None:
        raise WALError(
            f"the write-ahead log in {directory} is already open: another process (or "
            f"another WriteAheadLog in this one) holds its lock {path}. A log has one "
            f"writer; stop the other one first, or use a different directory."
        )
    return fd


def is_locked(directory: str) -> bool:
    """Whether a writer holds the lock of the log in ``directory`` now.

    For tools that read a log another process may have open
    (:func:`streamlet.fs.lock_held`: a shared probe that creates nothing).
    """
    return lock_held(os.path.join(directory, LOCK_NAME))
