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

import os
import stat
from typing import Protocol

__all__ = ["DIR_MODE", "FILE_MODE", "File", "FileSystem", "OsFile", "OsFileSystem"]

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
    """Directory and file operations, in the terms of durability."""

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


def is_private(path: str) -> bool:
    """Whether ``path`` is closed to group and others (mode bits 077 clear)."""
    return stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0
