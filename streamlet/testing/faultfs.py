"""An in-memory file system that loses what a power cut would lose.

A SIGKILL cannot test durability: the page cache survives a killed process,
so a missing fsync never shows. :class:`FaultFS` implements the
:class:`~streamlet.fs.FileSystem` protocol in memory and keeps, for every
file and directory, what is merely written apart from what is durable, so a
test can ask what a power cut at any moment would leave behind.

The model, and the rules of :mod:`streamlet.fs` it follows:

* A file has current content (what reads return) and durable content.
  ``File.sync`` makes the current content, data and size, durable.
* Writes append (``File.append``, all streamlet's own code does) or, with
  :meth:`FaultFile.write`, overwrite in place (SQLite through
  :mod:`streamlet.testing.sqlite_vfs`). Bytes overwritten below the
  unsynced tail are remembered as such; a power cut keeps or loses each
  sector's share of them independently (never touching bytes not written,
  as a disk with power-safe overwrite, which is what Linux file systems
  report to SQLite).
* Directory entries (``create``, ``rename``, ``remove``) are volatile until
  ``sync_dir`` of their directory; ``makedirs`` is durable at once. A rename
  between two directories is durable in each of them once that directory is
  synced; until both are, a cut may leave the file under both names.
* :meth:`FaultFS.power_cut` returns what a power cut could leave: only the
  durable state (``"drop"``), or that plus a random part of what was not
  yet synced (``"sectors"``, ``"garble"``). Synced data is never damaged.
* Every operation that changes the disk or makes something durable is
  numbered in :attr:`FaultFS.ops`. :meth:`FaultFS.cut_at` and
  :meth:`FaultFS.cut_after` make the n-th of them raise :class:`PowerCut`,
  after which every call raises it: the machine is off. A test runs a
  workload once to count its operations, then again with a cut at each.
* :meth:`FaultFS.fail_sync` and :meth:`FaultFS.fail_append` inject I/O errors,
  :meth:`FaultFS.slow_sync` slow disks. A failed sync is modelled the way
  Linux behaves: the data it should have written is dropped from the dirty
  set, so a later sync that succeeds does not make it durable. Code that
  retries fsync and carries on is caught by that.

Paths are virtual: absolute, ``/``-separated strings naming nothing on the
real disk (a relative path is taken relative to ``/``). Files are created
with mode 0600 and directories with 0700, and :meth:`FaultFS.mode` reports
them. :meth:`FaultFS.materialize` writes a tree out to a real directory, so
the real command line tools can examine it, and :meth:`FaultFS.from_directory`
loads one. All methods are thread-safe; unlike the real file system, none of
them blocks (except an injected slow sync), so the event loop rules of
:mod:`streamlet.fs` are the caller's to keep.

Example, counting a workload's operations and cutting the power at each::

    fs = FaultFS()
    await run_until_cut(fs, workload(fs))
    for index in range(len(fs.ops)):
        fs = FaultFS()
        fs.cut_at(index)
        await run_until_cut(fs, workload(fs))
        check_recovery(fs.power_cut("sectors", rng=random.Random(index)))
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fnmatch
import os
import posixpath
import random
import stat
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypeAlias

from streamlet.fs import DIR_MODE, FILE_MODE, File, FileSystem

__all__ = [
    "SECTOR_SIZE",
    "CutMode",
    "FaultFS",
    "FaultFile",
    "Op",
    "PowerCut",
    "run_until_cut",
]

SECTOR_SIZE = 512
"""The unit in which the ``"sectors"`` and ``"garble"`` modes keep or lose data."""

CutMode: TypeAlias = Literal["drop", "sectors", "garble"]
"""What a power cut does to data that was written but not synced (see :meth:`FaultFS.power_cut`)."""

PathMatch: TypeAlias = str | Callable[[str], bool]
"""A glob matched against the whole path (``*`` crosses ``/``), or a predicate on it."""


class PowerCut(BaseException):
    """The power went off: raised by the cut operation and by every call after it.

    A ``BaseException``, so that the ``except Exception`` handlers of the code
    under test cannot mistake the end of the world for an I/O error and go on.

    Attributes:
        index: the number of the operation where the power went, in ``ops``.
        op: that operation.
    """

    def __init__(self, message: str, *, index: int, op: Op) -> None:
        super().__init__(message)
        self.index = index
        self.op = op


class Op(NamedTuple):
    """One numbered operation of a :class:`FaultFS`."""

    name: str
    """``makedirs``, ``create``, ``append``, ``truncate``, ``sync``, ``remove``,
    ``rename`` or ``sync_dir``."""
    path: str
    """The path operated on; the source for ``rename``."""


class _Inode:
    """A file's content, current and durable, independent of its names."""

    __slots__ = ("data", "dirty_from", "dropped", "durable", "mode", "patched")

    def __init__(self, data: bytes = b"", mode: int = FILE_MODE) -> None:
        self.data = bytearray(data)
        self.durable = bytes(data)
        # Invariant: data[:dirty_from] == durable[:dirty_from] (zero-padded
        # where a dropped range left a hole): only bytes from dirty_from on
        # were written since the last sync.
        self.dirty_from = len(data)
        # Ranges a failed sync dropped from the dirty set: never durable,
        # even after a later sync succeeds (they read back as holes).
        self.dropped: list[tuple[int, int]] = []
        # Byte ranges below dirty_from overwritten since the last sync:
        # sorted, disjoint, each within one sector. Invariant: data and
        # durable differ before dirty_from only inside them (and dropped).
        self.patched: list[tuple[int, int]] = []
        self.mode = mode

    def patch(self, start: int, end: int) -> None:
        """Note ``[start, end)`` (below ``dirty_from``) as overwritten and not yet synced."""
        pieces = []
        while start < end:
            cut = min(end, start - start % SECTOR_SIZE + SECTOR_SIZE)
            pieces.append((start, cut))
            start = cut
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted(self.patched + pieces):
            last = merged[-1] if merged else None
            if last is not None and lo <= last[1] and lo // SECTOR_SIZE == last[0] // SECTOR_SIZE:
                merged[-1] = (last[0], max(hi, last[1]))
            else:
                merged.append((lo, hi))
        self.patched = merged

    def clip(self, size: int) -> None:
        """Forget patched bytes at or past ``size`` (the tail or a truncation covers them)."""
        self.patched = [(lo, min(hi, size)) for lo, hi in self.patched if lo < size]

    def rewritten(self, start: int, end: int) -> None:
        """``[start, end)`` was written again: what a failed sync dropped there is dirty again."""
        kept: list[tuple[int, int]] = []
        for lo, hi in self.dropped:
            if lo < start:
                kept.append((lo, min(hi, start)))
            if hi > end:
                kept.append((max(lo, end), hi))
        self.dropped = [(lo, hi) for lo, hi in kept if lo < hi]

    def sync(self) -> None:
        durable = bytearray(self.data)
        for start, end in self.dropped:
            end = min(end, len(durable))
            if start < end:
                old = self.durable[start:end]
                durable[start:end] = old + bytes(end - start - len(old))
        self.durable = bytes(durable)
        self.dirty_from = len(self.data)
        self.dropped.clear()
        self.patched.clear()

    def base(self) -> bytes:
        """The durable bytes before ``dirty_from``, with holes where data was dropped."""
        return self.durable[: self.dirty_from].ljust(self.dirty_from, b"\0")

    def is_clean(self) -> bool:
        return (
            self.dirty_from == len(self.data) == len(self.durable)
            and not self.dropped
            and not self.patched
        )


class _DirOp(NamedTuple):
    """An unsynced change to one directory's entries, replayed on a power cut."""

    kind: Literal["link", "unlink"]
    name: str
    inode: _Inode
    fate: list[bool]
    """Shared by the two halves of a rename, so that it is kept or lost whole."""


class _Dir:
    """A directory: its current entries, its durable ones, and the changes between."""

    __slots__ = ("durable", "entries", "mode", "pending")

    def __init__(self, entries: dict[str, _Inode] | None = None, mode: int = DIR_MODE) -> None:
        # File entries only; subdirectories are found by path in FaultFS._dirs.
        self.entries: dict[str, _Inode] = dict(entries or {})
        self.durable: dict[str, _Inode] = dict(self.entries)
        # Invariant: applying every pending change to durable gives entries.
        self.pending: list[_DirOp] = []
        self.mode = mode


@dataclass
class _Fault:
    match: PathMatch
    errno: int
    times: int | None
    partial: bool = False
    seconds: float = 0.0

    def applies(self, path: str) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        if isinstance(self.match, str):
            return fnmatch.fnmatchcase(path, self.match)
        return self.match(path)

    def use(self) -> None:
        if self.times is not None:
            self.times -= 1


def _normalize(path: str | os.PathLike[str]) -> str:
    return posixpath.normpath(posixpath.join("/", os.fspath(path)))


def _error(code: int, path: str) -> OSError:
    # OSError(errno, ...) builds the matching subclass (FileNotFoundError, ...).
    return OSError(code, os.strerror(code), path)


class FaultFile:
    """An open file of a :class:`FaultFS`; see :class:`streamlet.fs.File`."""

    __slots__ = ("_closed", "_fs", "_inode", "_path", "_writable")

    def __init__(self, fs: FaultFS, inode: _Inode, path: str, writable: bool) -> None:
        self._fs = fs
        self._inode = inode
        self._path = path
        self._writable = writable
        self._closed = False

    @property
    def path(self) -> str:
        return self._path

    def append(self, data: bytes) -> None:
        self._fs._append(self, data)

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset``, over what is there (a gap past the end reads as zeros).

        Not part of :class:`streamlet.fs.File`: streamlet only appends. For
        :mod:`streamlet.testing.sqlite_vfs`, whose SQLite writes pages in place.
        """
        self._fs._write(self, offset, data)

    def read(self, offset: int, size: int) -> bytes:
        if offset < 0:
            raise _error(errno.EINVAL, self._path)
        with self._fs._lock:
            self._fs._check_alive()
            self._check_open()
            return bytes(self._inode.data[offset : offset + max(size, 0)])

    def size(self) -> int:
        with self._fs._lock:
            self._fs._check_alive()
            self._check_open()
            return len(self._inode.data)

    def sync(self) -> None:
        self._fs._sync(self)

    def truncate(self, size: int) -> None:
        self._fs._truncate(self, size)

    def close(self) -> None:
        # Never raises, not even after a power cut: releasing a handle
        # changes nothing on disk, and cleanup code should not trip on it.
        with self._fs._lock:
            if not self._closed:
                self._closed = True
                self._fs._open_files.discard(self)

    def _check_open(self) -> None:
        if self._closed:
            raise _error(errno.EBADF, self._path)

    def _check_writable(self) -> None:
        self._check_open()
        if not self._writable:
            raise _error(errno.EBADF, self._path)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "writable" if self._writable else "read-only"
        return f"<FaultFile {self._path} {state}>"


class FaultFS:
    """An in-memory :class:`~streamlet.fs.FileSystem` that models durability and faults.

    See the module docstring for the model. A new FaultFS holds an empty
    root directory ``/``.

    Args:
        rng: the randomness :meth:`power_cut` uses unless given its own;
            ``random.Random(0)`` by default, so runs are repeatable.
    """

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self.rng = rng if rng is not None else random.Random(0)
        # Set by streamlet.testing.sqlite_vfs.FaultVFS: SQLite files live here too.
        self.sqlite_vfs: str | None = None
        self.ops: list[Op] = []
        """Every numbered operation so far, in order (reads and opens are not
        numbered: a cut before one leaves the same disk as a cut after the
        write before it)."""
        self._lock = threading.RLock()
        self._dirs: dict[str, _Dir] = {"/": _Dir()}
        self._open_files: set[FaultFile] = set()
        self._cut_at: int | None = None
        self._cut_after: int | None = None
        self._cut: PowerCut | None = None
        self._on_cut: list[Callable[[], object]] = []
        self._sync_faults: list[_Fault] = []
        self._append_faults: list[_Fault] = []
        self._slow_syncs: list[_Fault] = []

    # ---- cut points ------------------------------------------------------

    def cut_at(self, index: int) -> None:
        """Cut the power as operation ``index`` starts: it has no effect and raises PowerCut.

        ``index`` counts from 0 over :attr:`ops`, including operations made
        before this call. Raises ValueError if that operation has already run.
        """
        with self._lock:
            self._check_future(index)
            self._cut_at = index

    def cut_after(self, index: int) -> None:
        """Cut the power as operation ``index`` returns: it took effect, then raises PowerCut.

        The caller never learns that the operation succeeded; a sync cut this
        way has made its data durable all the same.
        """
        with self._lock:
            self._check_future(index)
            self._cut_after = index

    def on_cut(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` when the power is cut (at once if it already was).

        It runs in the thread that hit the cut, holding this file system's
        lock: it must be quick and must not call back into it. To wake an
        event loop, use ``loop.call_soon_threadsafe``; see :func:`run_until_cut`.
        """
        with self._lock:
            if self._cut is None:
                self._on_cut.append(callback)
                return
        callback()

    @property
    def is_cut(self) -> bool:
        """Whether the power is off: every call raises :class:`PowerCut`."""
        return self._cut is not None

    @property
    def cut_index(self) -> int | None:
        """The number of the operation at which the power was cut, if it was."""
        return None if self._cut is None else self._cut.index

    def _check_future(self, index: int) -> None:
        if index < len(self.ops):
            raise ValueError(f"operation {index} has already run ({len(self.ops)} ops so far)")

    def _check_alive(self) -> None:
        if self._cut is not None:
            raise PowerCut(str(self._cut), index=self._cut.index, op=self._cut.op)

    def _begin(self, name: str, path: str) -> int:
        """Number an operation about to change the disk; cut the power if it is the one.

        Called with the lock held.
        """
        self._check_alive()
        index = len(self.ops)
        op = Op(name, path)
        self.ops.append(op)
        if index == self._cut_at:
            self._power_off(
                PowerCut(f"power cut before op {index}: {name} {path}", index=index, op=op)
            )
        return index

    def _end(self, index: int) -> None:
        """After an operation took effect: cut the power if it is the one (lock held)."""
        if index == self._cut_after:
            op = self.ops[index]
            self._power_off(
                PowerCut(f"power cut after op {index}: {op.name} {op.path}", index=index, op=op)
            )

    def _power_off(self, cut: PowerCut) -> None:
        if self._cut is None:
            self._cut = cut
            callbacks, self._on_cut = self._on_cut, []
            for callback in callbacks:
                callback()
        raise cut

    # ---- fault injection -------------------------------------------------

    def fail_sync(
        self, match: PathMatch = "*", *, errno: int = errno.EIO, times: int | None = None
    ) -> None:
        """Make ``File.sync`` and ``sync_dir`` of matching paths raise ``OSError(errno)``.

        ``times`` limits how many syncs fail (None: all of them, until
        :meth:`clear_faults`). A failed file sync makes nothing durable, and
        the data it should have written stays volatile even through a later
        sync that succeeds, as on Linux, where the kernel marks the pages
        clean after a writeback error.
        """
        with self._lock:
            self._sync_faults.append(_Fault(match, errno, times))

    def fail_append(
        self,
        match: PathMatch = "*",
        *,
        errno: int = errno.ENOSPC,
        partial: bool = True,
        times: int | None = None,
    ) -> None:
        """Make ``File.append`` to matching paths raise ``OSError(errno)``.

        With ``partial`` the first half of the data (rounded down) is written
        before the error, as a write that runs out of space part way does.
        """
        with self._lock:
            self._append_faults.append(_Fault(match, errno, times, partial=partial))

    def slow_sync(
        self, seconds: float, match: PathMatch = "*", *, times: int | None = None
    ) -> None:
        """Make syncs of matching paths take ``seconds`` longer (a struggling disk).

        The delay is a ``time.sleep`` in the calling thread, outside the
        lock, so other threads' operations go on meanwhile.
        """
        with self._lock:
            self._slow_syncs.append(_Fault(match, 0, times, seconds=seconds))

    def clear_faults(self) -> None:
        """Remove every injected failure and delay."""
        with self._lock:
            self._sync_faults.clear()
            self._append_faults.clear()
            self._slow_syncs.clear()

    @staticmethod
    def _take(faults: list[_Fault], path: str) -> _Fault | None:
        for fault in faults:
            if fault.applies(path):
                fault.use()
                return fault
        return None

    def _delay_sync(self, path: str) -> None:
        with self._lock:
            slow = self._take(self._slow_syncs, path)
        if slow is not None:
            time.sleep(slow.seconds)

    # ---- the FileSystem protocol ------------------------------------------

    def create(self, path: str) -> File:
        """Create a new, empty file (mode 0600); fail if it exists. The entry is volatile."""
        path = _normalize(path)
        parent, name = posixpath.split(path)
        with self._lock:
            index = self._begin("create", path)
            directory = self._dir(parent)
            if name in directory.entries or path in self._dirs:
                raise _error(errno.EEXIST, path)
            inode = _Inode()
            self._link(parent, name, inode)
            file = FaultFile(self, inode, path, writable=True)
            self._open_files.add(file)
            self._end(index)
            return file

    def open(self, path: str, *, writable: bool = False) -> File:
        """Open an existing file for reading, or reading and appending."""
        path = _normalize(path)
        with self._lock:
            self._check_alive()
            inode = self._lookup(path)
            file = FaultFile(self, inode, path, writable)
            self._open_files.add(file)
            return file

    def exists(self, path: str) -> bool:
        """Whether ``path`` names a file or directory (as of now, durable or not)."""
        path = _normalize(path)
        with self._lock:
            self._check_alive()
            if path in self._dirs:
                return True
            parent, name = posixpath.split(path)
            directory = self._dirs.get(parent)
            return directory is not None and name in directory.entries

    def listdir(self, path: str) -> list[str]:
        """The names in directory ``path``, files and subdirectories, sorted."""
        path = _normalize(path)
        with self._lock:
            self._check_alive()
            directory = self._dir(path)
            names = set(directory.entries)
            names.update(posixpath.basename(d) for d in self._subdirs(path))
            return sorted(names)

    def makedirs(self, path: str) -> None:
        """Create ``path`` and missing parents with mode 0700; durable at once."""
        path = _normalize(path)
        with self._lock:
            index = self._begin("makedirs", path)
            missing: list[str] = []
            head = path
            while head not in self._dirs:  # "/" always is
                parent, name = posixpath.split(head)
                holder = self._dirs.get(parent)
                if holder is not None and name in holder.entries:
                    raise _error(errno.EEXIST if head == path else errno.ENOTDIR, head)
                missing.append(head)
                head = parent
            for directory in reversed(missing):
                self._dirs[directory] = _Dir()
            self._end(index)

    def remove(self, path: str) -> None:
        """Unlink a file; durable only after ``sync_dir`` of its directory."""
        path = _normalize(path)
        parent, name = posixpath.split(path)
        with self._lock:
            index = self._begin("remove", path)
            if path in self._dirs:
                raise _error(errno.EISDIR, path)
            inode = self._lookup(path)
            self._unlink(parent, name, inode)
            self._end(index)

    def rename(self, src: str, dst: str) -> None:
        """Atomically replace ``dst`` by file ``src``; durable after ``sync_dir``.

        Until the directory is synced, a power cut leaves the file under
        either name, never neither (if ``src`` was durable) and never both
        (within one directory). Renaming directories is not supported.
        """
        src, dst = _normalize(src), _normalize(dst)
        src_parent, src_name = posixpath.split(src)
        dst_parent, dst_name = posixpath.split(dst)
        with self._lock:
            index = self._begin("rename", src)
            if src in self._dirs:
                raise OSError(errno.ENOTSUP, "FaultFS cannot rename directories", src)
            inode = self._lookup(src)
            if dst in self._dirs:
                raise _error(errno.EISDIR, dst)
            self._dir(dst_parent)
            if src != dst:
                fate: list[bool] = []
                self._unlink(src_parent, src_name, inode, fate)
                self._link(dst_parent, dst_name, inode, fate)
            self._end(index)

    def sync_dir(self, path: str) -> None:
        """Make the entries of directory ``path`` durable."""
        path = _normalize(path)
        self._delay_sync(path)
        with self._lock:
            index = self._begin("sync_dir", path)
            directory = self._dir(path)
            fault = self._take(self._sync_faults, path)
            if fault is not None:
                raise _error(fault.errno, path)
            directory.durable = dict(directory.entries)
            directory.pending = []
            self._end(index)

    # ---- file operations (called by FaultFile) ------------------------------

    def _append(self, file: FaultFile, data: bytes) -> None:
        with self._lock:
            index = self._begin("append", file.path)
            file._check_writable()
            inode = file._inode
            fault = self._take(self._append_faults, file.path)
            if fault is not None:
                data = bytes(data[: len(data) // 2]) if fault.partial else b""
            if data:
                inode.dirty_from = min(inode.dirty_from, len(inode.data))
                inode.data += data
            if fault is not None:
                raise _error(fault.errno, file.path)
            self._end(index)

    def _write(self, file: FaultFile, offset: int, data: bytes) -> None:
        if offset < 0:
            raise _error(errno.EINVAL, file.path)
        with self._lock:
            index = self._begin("write", file.path)
            file._check_writable()
            inode = file._inode
            if data:
                end = offset + len(data)
                size = len(inode.data)
                if end > size:  # the file grows: what lies past its old end is new
                    inode.dirty_from = min(inode.dirty_from, size)
                    inode.clip(inode.dirty_from)
                if offset > size:
                    inode.data += bytes(offset - size)
                inode.rewritten(offset, end)
                below = min(end, inode.dirty_from)
                if offset < below:
                    inode.patch(offset, below)
                inode.data[offset:end] = data
            self._end(index)

    def _truncate(self, file: FaultFile, size: int) -> None:
        if size < 0:
            raise _error(errno.EINVAL, file.path)
        with self._lock:
            index = self._begin("truncate", file.path)
            file._check_writable()
            inode = file._inode
            old = len(inode.data)
            if size < old:
                del inode.data[size:]
            else:
                inode.data += bytes(size - old)
            inode.dirty_from = min(inode.dirty_from, size, old)
            inode.clip(inode.dirty_from)
            inode.rewritten(size, max(size, old))  # gone, or zeros written
            self._end(index)

    def _sync(self, file: FaultFile) -> None:
        self._delay_sync(file.path)
        with self._lock:
            index = self._begin("sync", file.path)
            file._check_open()
            inode = file._inode
            fault = self._take(self._sync_faults, file.path)
            if fault is not None:
                # The kernel forgets the dirty range; it is not on disk and
                # a later successful sync will not write it.
                if inode.dirty_from < len(inode.data):
                    inode.dropped.append((inode.dirty_from, len(inode.data)))
                inode.dropped.extend(inode.patched)  # overwrites too: they keep the old bytes
                inode.patched = []
                inode.dirty_from = len(inode.data)
                raise _error(fault.errno, file.path)
            inode.sync()
            self._end(index)

    # ---- directory internals (lock held) ------------------------------------

    def _dir(self, path: str) -> _Dir:
        directory = self._dirs.get(path)
        if directory is None:
            parent, name = posixpath.split(path)
            holder = self._dirs.get(parent)
            if holder is not None and name in holder.entries:
                raise _error(errno.ENOTDIR, path)
            raise _error(errno.ENOENT, path)
        return directory

    def _lookup(self, path: str) -> _Inode:
        if path in self._dirs:
            raise _error(errno.EISDIR, path)
        parent, name = posixpath.split(path)
        inode = self._dir(parent).entries.get(name)
        if inode is None:
            raise _error(errno.ENOENT, path)
        return inode

    def _subdirs(self, path: str) -> list[str]:
        return [d for d in self._dirs if d != "/" and posixpath.dirname(d) == path]

    def _link(self, parent: str, name: str, inode: _Inode, fate: list[bool] | None = None) -> None:
        directory = self._dir(parent)
        directory.entries[name] = inode
        directory.pending.append(_DirOp("link", name, inode, [] if fate is None else fate))

    def _unlink(
        self, parent: str, name: str, inode: _Inode, fate: list[bool] | None = None
    ) -> None:
        directory = self._dir(parent)
        del directory.entries[name]
        directory.pending.append(_DirOp("unlink", name, inode, [] if fate is None else fate))

    # ---- inspection --------------------------------------------------------

    def mode(self, path: str) -> int:
        """The permission bits of a file or directory (0600 / 0700 when made here)."""
        path = _normalize(path)
        with self._lock:
            if path in self._dirs:
                return self._dirs[path].mode
            return self._lookup(path).mode

    def read_file(self, path: str, *, durable: bool = False) -> bytes:
        """The whole content of a file: as reads see it, or (``durable``) as the disk holds it.

        With ``durable`` the name must be durable too; this is what a power
        cut in ``"drop"`` mode leaves under ``path``. Works after a cut.
        """
        path = _normalize(path)
        with self._lock:
            if not durable:
                return bytes(self._lookup(path).data)
            parent, name = posixpath.split(path)
            inode = self._dir(parent).durable.get(name)
            if inode is None:
                raise _error(errno.ENOENT, path)
            return inode.durable

    def open_files(self) -> list[str]:
        """Paths of the files opened and not yet closed, sorted (to find leaked handles)."""
        with self._lock:
            return sorted(f.path for f in self._open_files)

    def walk(self, *, durable: bool = False) -> dict[str, bytes]:
        """Every file, by path, with its current (or durable) content."""
        with self._lock:
            found: dict[str, bytes] = {}
            for path, directory in sorted(self._dirs.items()):
                entries = directory.durable if durable else directory.entries
                for name, inode in sorted(entries.items()):
                    found[posixpath.join(path, name)] = (
                        inode.durable if durable else bytes(inode.data)
                    )
            return found

    # ---- power cuts ----------------------------------------------------------

    def power_cut(
        self,
        mode: CutMode = "drop",
        *,
        rng: random.Random | None = None,
        random_bytes: bool = True,
    ) -> FaultFS:
        """Cut the power (if not already) and return the disk as it could come back.

        The result is a new FaultFS whose state is all durable, with no
        faults or cut points set. This one stays off. Durable data and
        directory entries always survive, whatever the mode; what was not
        synced fares as follows:

        * ``"drop"``: all of it is lost, file data and directory entries alike.
        * ``"sectors"``: of each file's unsynced tail a random prefix of whole
          512-byte sectors (counted from the start of the file) is kept and
          the rest lost, as a disk that writes sectors in order would leave
          it. If none is kept, an unsynced truncation is lost too.
        * ``"garble"``: each file either loses all of it, or keeps a size
          anywhere between its durable and current size, and each sector of
          the unsynced part within that size independently holds the written
          bytes, zeros (a hole) or, with ``random_bytes``, random bytes (stale
          blocks some file systems expose after a crash).

        In ``"sectors"`` and ``"garble"`` modes every unsynced directory
        change (a create, remove or rename) is independently kept or lost; a
        rename is kept or lost whole.

        Args:
            mode: see above.
            rng: the randomness to use; :attr:`rng` by default.
            random_bytes: whether ``"garble"`` may write random bytes; False
                leaves garbled sectors zero.
        """
        if mode not in ("drop", "sectors", "garble"):
            raise ValueError(f"mode={mode!r} is not one of 'drop', 'sectors', 'garble'")
        rng = rng if rng is not None else self.rng
        with self._lock:
            if self._cut is None:
                index = len(self.ops)
                self._cut = PowerCut(
                    f"power cut by power_cut() after {index} ops",
                    index=index,
                    op=Op("power_cut", ""),
                )
                callbacks, self._on_cut = self._on_cut, []
                for callback in callbacks:
                    callback()
            after = FaultFS(rng=random.Random(rng.getrandbits(64)))
            contents: dict[int, _Inode] = {}  # id(old inode) -> new inode (keeps hard links)

            def survivor(inode: _Inode) -> _Inode:
                new = contents.get(id(inode))
                if new is None:
                    new = _Inode(_after_cut(inode, mode, rng, random_bytes), inode.mode)
                    contents[id(inode)] = new
                return new

            for path in sorted(self._dirs):
                directory = self._dirs[path]
                entries = dict(directory.durable)
                for op in directory.pending:
                    if not op.fate:  # the first half of a rename decides for both
                        op.fate.append(mode != "drop" and rng.random() < 0.5)
                    if not op.fate[0]:
                        continue
                    if op.kind == "link":
                        entries[op.name] = op.inode
                    elif entries.get(op.name) is op.inode:
                        del entries[op.name]
                survived = {name: survivor(inode) for name, inode in sorted(entries.items())}
                after._dirs[path] = _Dir(survived, directory.mode)
            # Forget the fates drawn here, so another power_cut() draws afresh.
            for directory in self._dirs.values():
                for op in directory.pending:
                    op.fate.clear()
            return after

    # ---- real directories ------------------------------------------------------

    def materialize(
        self, directory: str | os.PathLike[str], *, root: str = "/", durable: bool = False
    ) -> None:
        """Write the tree under ``root`` into the real ``directory`` (created if missing).

        Files get their recorded mode bits (0600 when created here),
        directories theirs (0700). With ``durable`` only what is durable is
        written, as :meth:`power_cut` in ``"drop"`` mode would leave it.
        Existing files in ``directory`` with the same names are replaced.
        """
        root = _normalize(root)
        target = os.fspath(directory)
        with self._lock:
            if root not in self._dirs:
                raise _error(errno.ENOENT, root)
            prefix = root.rstrip("/") + "/"
            trees = sorted(path for path in self._dirs if path == root or path.startswith(prefix))
            for path in trees:
                real = os.path.join(target, posixpath.relpath(path, root))
                os.makedirs(real, mode=DIR_MODE, exist_ok=True)
                os.chmod(real, self._dirs[path].mode)
                entries = self._dirs[path].durable if durable else self._dirs[path].entries
                for name, inode in sorted(entries.items()):
                    file_path = os.path.join(real, name)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(file_path)
                    fd = os.open(file_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, inode.mode)
                    try:
                        os.fchmod(fd, inode.mode)
                        view = memoryview(inode.durable if durable else bytes(inode.data))
                        while view:
                            view = view[os.write(fd, view) :]
                    finally:
                        os.close(fd)

    @classmethod
    def from_directory(
        cls,
        directory: str | os.PathLike[str],
        *,
        root: str = "/",
        rng: random.Random | None = None,
    ) -> FaultFS:
        """A FaultFS holding the real ``directory``'s tree under ``root``, all of it durable.

        Mode bits are taken from the real files; symbolic links and other
        special files are skipped.
        """
        root = _normalize(root)
        source = os.fspath(directory)
        fs = cls(rng=rng)
        fs.makedirs(root)
        fs.ops.clear()
        for here, subdirs, files in os.walk(source):
            relative = os.path.relpath(here, source)
            path = root if relative == "." else _normalize(posixpath.join(root, relative))
            folder = fs._dirs.setdefault(path, _Dir())
            folder.mode = stat.S_IMODE(os.stat(here).st_mode)
            subdirs[:] = [d for d in subdirs if not os.path.islink(os.path.join(here, d))]
            for name in sorted(files):
                real = os.path.join(here, name)
                info = os.lstat(real)
                if not stat.S_ISREG(info.st_mode):
                    continue
                with open(real, "rb") as handle:
                    inode = _Inode(handle.read(), stat.S_IMODE(info.st_mode))
                folder.entries[name] = inode
                folder.durable[name] = inode
        return fs

    def __repr__(self) -> str:
        state = "cut" if self._cut is not None else "on"
        return f"<FaultFS {state} ops={len(self.ops)} dirs={len(self._dirs)}>"


def _after_cut(inode: _Inode, mode: CutMode, rng: random.Random, random_bytes: bool) -> bytes:
    """What a power cut leaves of one file (see :meth:`FaultFS.power_cut`)."""
    if mode == "drop" or inode.is_clean():
        return inode.durable
    start, data = inode.dirty_from, inode.data
    base = bytearray(inode.base())
    # Bytes overwritten in place: each sector's share kept, lost or (garble) damaged.
    for lo, hi in inode.patched:
        fate = rng.random()
        if fate < 0.5:
            base[lo:hi] = data[lo:hi]
        elif mode == "garble" and fate >= 0.75:
            base[lo:hi] = rng.randbytes(hi - lo) if random_bytes else bytes(hi - lo)
    # The file if its unsynced tail is lost: as synced (its length, whatever a
    # failed sync dropped), with the overwrites' fates.
    durable = bytes(base[: len(inode.durable)]) + inode.durable[len(base) :]
    if mode == "sectors":
        # The ends of the sectors the unsynced tail touches, the last one cut
        # at the end of the file.
        ends = list(range(start - start % SECTOR_SIZE + SECTOR_SIZE, len(data), SECTOR_SIZE))
        ends.append(len(data))
        keep = rng.randrange(len(ends) + 1)
        if keep == 0:
            return durable
        return bytes(base) + bytes(data[start : ends[keep - 1]])
    choice = rng.random()
    if choice < 0.2:
        return durable
    size = len(data) if choice < 0.5 else rng.randint(start, len(data))
    out = base + data[start:size]
    sector = start - start % SECTOR_SIZE
    while sector < size:
        lo, hi = max(sector, start), min(sector + SECTOR_SIZE, size)
        fate = rng.random()
        if fate >= 0.5:
            garbage = rng.randbytes(hi - lo) if random_bytes and fate >= 0.8 else bytes(hi - lo)
            out[lo:hi] = garbage
        sector += SECTOR_SIZE
    return bytes(out)


async def run_until_cut(
    fs: FaultFS, work: Coroutine[Any, Any, object], *, settle: float = 1.0
) -> bool:
    """Run ``work`` until it finishes or ``fs`` loses power; return whether it did.

    When the power goes, code waiting for a thread that died of
    :class:`PowerCut` would wait forever; so ``work`` is cancelled as soon as
    the cut happens, and PowerCut and the cancellation are swallowed. Any
    other exception from ``work`` is raised.

    Tasks started while ``work`` ran and still running after it (a close
    shielded from the cancellation, say) are given up to ``settle`` seconds
    to finish; their PowerCut is taken from them, so it is not reported later
    as a "Task exception was never retrieved" when they are collected.
    """
    loop = asyncio.get_running_loop()
    cut: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not cut.done():
            cut.set_result(None)

    def notify() -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(wake)

    before = asyncio.all_tasks()
    task = asyncio.ensure_future(work)
    fs.on_cut(notify)
    try:
        await asyncio.wait((task, cut), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        cut.cancel()
    try:
        await task
    except (PowerCut, asyncio.CancelledError):
        if not fs.is_cut:
            raise
    if fs.is_cut:
        leftovers = asyncio.all_tasks() - before - {task}
        if leftovers:
            done, _ = await asyncio.wait(leftovers, timeout=settle)
            for leftover in done:
                if leftover.cancelled():
                    continue
                error = leftover.exception()  # marks it retrieved
                if error is not None and not isinstance(error, PowerCut):
                    loop.call_exception_handler(
                        {
                            "message": "Task exception was never retrieved",
                            "exception": error,
                            "future": leftover,
                        }
                    )
    return fs.is_cut


if TYPE_CHECKING:

    def _conforms(fs: FaultFS, file: FaultFile) -> tuple[FileSystem, File]:
        """Never called: mypy checks here that the protocols are met."""
        return fs, file
