"""The file layer under everything streamlet writes to disk.

The WAL, the tracker log, checkpoints and file sinks reach the disk only
through a :class:`FileSystem`. The real one, :class:`OsFileSystem`, is a thin
layer over ``os``; :mod:`streamlet.testing.faultfs` provides one that keeps
track of what was fsync'd and can simulate a power cut, which a SIGKILL cannot
(the page cache survives a killed process, so a missing fsync never shows).

Rules every implementation keeps:

* All calls are blocking and are made from worker threads, never on the event
  loop.
* Files are created with mode 0600 and directories with 0700, whatever the
  umask: the state directory holds user data.
* ``File.sync`` makes the file's data and size durable; it does not make a new
  or renamed directory entry durable. Only ``FileSystem.sync_dir`` does.
* An ``OSError`` from ``sync`` or ``sync_dir`` is passed to the caller as is;
  deciding that it is fatal is the caller's job (see the WAL).
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
import urllib.parse
from typing import Any, Protocol

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "File",
    "FileSystem",
    "OsFile",
    "OsFileSystem",
    "lock_held",
    "read_all",
    "try_lock",
    "write_atomic",
]

FILE_MODE = 0o600
DIR_MODE = 0o700


class File(Protocol):
    """An open file: appends at the end, positional reads, sync."""

    @property
    def path(self) -> str:
        """The path the file was opened with."""
        ...

    def append(self, data: bytes) -> None:
        """Write all of ``data`` at the end of the file."""
        ...

    def read(self, offset: int, size: int) -> bytes:
        """Read up to ``size`` bytes at ``offset``; shorter only at end of file."""
        ...

    def size(self) -> int:
        """The file's current size in bytes."""
        ...

    def sync(self) -> None:
        """Make the data and size written so far durable (fdatasync)."""
        ...

    def truncate(self, size: int) -> None:
        """Cut the file to ``size`` bytes (not durable until ``sync``)."""
        ...

    def close(self) -> None:
        """Release the file; unsynced data stays as volatile as it was."""
        ...


class FileSystem(Protocol):
    """Directory and file operations, in the terms of durability.

    SQLite files (keyed state, SQLiteSink) are opened by SQLite itself: a file
    system other than the real one says through which SQLite VFS they reach
    it in an attribute ``sqlite_vfs`` (see :func:`sqlite_vfs_of`).
    """

    def create(self, path: str) -> File:
        """Create a new, empty file (mode 0600); fail if it exists."""
        ...

    def open(self, path: str, *, writable: bool = False) -> File:
        """Open an existing file for reading, or for reading and appending."""
        ...

    def exists(self, path: str) -> bool:
        """Whether ``path`` names an existing file or directory."""
        ...

    def listdir(self, path: str) -> list[str]:
        """The names in directory ``path``, sorted."""
        ...

    def makedirs(self, path: str) -> None:
        """Create ``path`` and missing parents (mode 0700) and make them durable."""
        ...

    def remove(self, path: str) -> None:
        """Unlink a file (durable only after ``sync_dir`` of its directory)."""
        ...

    def rename(self, src: str, dst: str) -> None:
        """Atomically replace ``dst`` by ``src`` (durable after ``sync_dir``)."""
        ...

    def sync_dir(self, path: str) -> None:
        """Make the entries of directory ``path`` durable (fsync on the directory)."""
        ...


class OsFile:
    """A :class:`File` over a raw file descriptor."""

    __slots__ = ("_fd", "_path")

    def __init__(self, fd: int, path: str) -> None:
        self._fd = fd
        self._path = path

    @property
    def path(self) -> str:
        return self._path

    def append(self, data: bytes) -> None:
        # O_APPEND puts every write at the end; loop because os.write may be
        # partial for large buffers.
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def read(self, offset: int, size: int) -> bytes:
        chunks: list[bytes] = []
        while size > 0:
            chunk = os.pread(self._fd, size, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
            size -= len(chunk)
        return b"".join(chunks)

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def truncate(self, size: int) -> None:
        os.ftruncate(self._fd, size)

    def close(self) -> None:
        os.close(self._fd)


class OsFileSystem:
    """The real file system."""

    sqlite_vfs: str | None = None
    """SQLite's own VFS: the real disk."""

    def create(self, path: str) -> File:
        fd = os.open(
            path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE
        )
        # The mode argument is filtered by the umask; set it exactly.
        os.fchmod(fd, FILE_MODE)
        return OsFile(fd, path)

    def open(self, path: str, *, writable: bool = False) -> File:
        flags = (os.O_RDWR | os.O_APPEND) if writable else os.O_RDONLY
        return OsFile(os.open(path, flags | os.O_CLOEXEC), path)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(path))

    def makedirs(self, path: str) -> None:
        path = os.path.abspath(path)
        missing: list[str] = []
        head = path
        while not os.path.isdir(head):
            missing.append(head)
            head = os.path.dirname(head)
        for directory in reversed(missing):
            try:
                os.mkdir(directory, DIR_MODE)
            except FileExistsError:
                if not os.path.isdir(directory):
                    raise
            os.chmod(directory, DIR_MODE)
            self.sync_dir(os.path.dirname(directory))
        if missing:
            self.sync_dir(path)

    def remove(self, path: str) -> None:
        os.unlink(path)

    def rename(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def sync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sqlite_vfs_of(fs: FileSystem) -> str | None:
    """The SQLite VFS through which SQLite files are opened on ``fs``.

    None: SQLite's own, on the real disk, at the same path. That is the
    real file system's, and the one a file system without ``sqlite_vfs``
    gets (:class:`~streamlet.testing.harness.AppHarness` keeps its
    state directory in memory but keyed state on the real disk, there).
    """
    vfs = getattr(fs, "sqlite_vfs", None)
    return str(vfs) if vfs is not None else None


def connect_sqlite(path: str, vfs: str | None, **options: Any) -> sqlite3.Connection:
    """``sqlite3.connect`` to the file ``path``, through the SQLite VFS ``vfs`` if given.

    ``vfs`` is a :class:`FileSystem`'s ``sqlite_vfs``: None opens the real
    file, as ``sqlite3.connect(path)`` does.
    """
    if vfs is None:
        return sqlite3.connect(path, **options)  # type: ignore[no-any-return]
    uri = f"file:{urllib.parse.quote(path)}?vfs={urllib.parse.quote(vfs)}"
    return sqlite3.connect(uri, uri=True, **options)  # type: ignore[no-any-return]


def read_all(fs: FileSystem, path: str) -> bytes:
    """The whole content of the file at ``path``."""
    file = fs.open(path)
    try:
        return file.read(0, file.size())
    finally:
        file.close()


def write_atomic(
    fs: FileSystem, path: str, data: bytes, *, temp: str | None = None, sync_dir: bool = True
) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old file or the new, whole.

    Temp file (a leftover of a crash removed first), fsync, rename, and an
    fsync of the directory: the rename is the commit point, and only the
    directory fsync makes it durable. ``sync_dir=False`` leaves that to the
    caller (who syncs the directory once for several renames).
    """
    temp = temp if temp is not None else path + ".tmp"
    if fs.exists(temp):
        fs.remove(temp)
    file = fs.create(temp)
    try:
        file.append(data)
        file.sync()
    finally:
        file.close()
    fs.rename(temp, path)
    if sync_dir:
        fs.sync_dir(os.path.dirname(path) or ".")


def try_lock(lock_path: str, *, patience: float = 0.0) -> int | None:
    """Take an exclusive ``flock`` on ``lock_path`` (created 0600); the fd holding it.

    Returns None when another open file holds it for longer than
    ``patience`` seconds. ``flock`` locks belong to the open file, so a
    second opener fails whether it is another process or this one, and the
    lock goes with the process: a crash never leaves it stale. Blocking.
    """
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    deadline = time.monotonic() + patience
    try:
        os.fchmod(fd, FILE_MODE)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return None
                time.sleep(0.05)
            else:
                return fd
    except BaseException:
        os.close(fd)
        raise


def lock_held(lock_path: str) -> bool:
    """Whether some open file holds the ``flock`` on ``lock_path`` now.

    For tools beside a live writer: it takes a shared lock and drops it at
    once, so two probes never take each other for a writer, and it creates
    nothing. A writer locking in that very instant waits or is refused.
    """
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing the fd drops a lock taken here
    return False
