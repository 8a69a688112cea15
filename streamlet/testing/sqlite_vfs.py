"""SQLite on a :class:`~streamlet.testing.faultfs.FaultFS`: power cuts for SQLite files.

A handler's keyed state is a SQLite file (:mod:`streamlet.state._store`).
SQLite does its own file I/O, so FaultFS's power cuts reach it only through
a SQLite *VFS*: the table of functions SQLite calls to open, read, write,
sync and delete files. Python's :mod:`sqlite3` cannot register one, but it
calls into the shared SQLite library, and ``ctypes`` can: a VFS registered
through the library the ``_sqlite3`` module is linked to is one that
connection can name (``file:<path>?vfs=<name>``).

:class:`FaultVFS` is that VFS. Every file SQLite opens is a FaultFS file;
page writes go through :meth:`~streamlet.testing.faultfs.FaultFile.write`
(numbered operations, like every other), ``xSync`` is ``File.sync``, and
the first sync of a new journal or WAL file also syncs its directory, as
SQLite's own unix VFS does. Locks are no-ops (one process, one connection a
file) and the WAL index ("-shm") lives in memory, as it may: SQLite rebuilds
it from the WAL after a crash. The device reports 512-byte sectors and
power-safe overwrite, as SQLite's unix VFS does on Linux.

An operation that raises (a :class:`~streamlet.testing.faultfs.PowerCut`
included) becomes an I/O error SQLite returns to the caller; the exception
is kept in :attr:`FaultVFS.failures`. Files are FaultFS paths: absolute,
``/``-separated, naming nothing on the real disk.

Example::

    fs = FaultFS()
    with FaultVFS(fs) as vfs:
        store = await StateStore.open("/state/h.sqlite", ..., vfs=vfs.name)
"""

from __future__ import annotations

import _sqlite3
import ctypes
import gc
import itertools
import posixpath
import sqlite3
import threading
from types import TracebackType
from typing import Any

import anyio

from streamlet.testing.faultfs import SECTOR_SIZE, FaultFile, FaultFS

__all__ = ["FaultVFS"]

_OK = 0
_IOERR = 10
_NOTFOUND = 12
_CANTOPEN = 14
_IOERR_SHORT_READ = _IOERR | (2 << 8)
_IOERR_DELETE_NOENT = _IOERR | (23 << 8)
_OPEN_READWRITE = 0x2
_OPEN_CREATE = 0x4
_OPEN_DELETEONCLOSE = 0x8
_OPEN_MAIN_JOURNAL = 0x800
_OPEN_SUPER_JOURNAL = 0x4000
_OPEN_WAL = 0x80000
_IOCAP_POWERSAFE_OVERWRITE = 0x1000

_int64 = ctypes.c_int64
_p = ctypes.c_void_p


class _IoMethods(ctypes.Structure):
    pass


class _File(ctypes.Structure):
    """SQLite's ``sqlite3_file``, with the number of this module's open file after it."""

    _fields_ = (("pMethods", ctypes.POINTER(_IoMethods)), ("number", _int64))


_FP = ctypes.POINTER(_File)
_CLOSE = ctypes.CFUNCTYPE(ctypes.c_int, _FP)
_READ = ctypes.CFUNCTYPE(ctypes.c_int, _FP, _p, ctypes.c_int, _int64)
_WRITE = ctypes.CFUNCTYPE(ctypes.c_int, _FP, _p, ctypes.c_int, _int64)
_TRUNCATE = ctypes.CFUNCTYPE(ctypes.c_int, _FP, _int64)
_SYNC = ctypes.CFUNCTYPE(ctypes.c_int, _FP, ctypes.c_int)
_FILE_SIZE = ctypes.CFUNCTYPE(ctypes.c_int, _FP, ctypes.POINTER(_int64))
_LOCK = ctypes.CFUNCTYPE(ctypes.c_int, _FP, ctypes.c_int)
_CHECK_LOCK = ctypes.CFUNCTYPE(ctypes.c_int, _FP, ctypes.POINTER(ctypes.c_int))
_FILE_CONTROL = ctypes.CFUNCTYPE(ctypes.c_int, _FP, ctypes.c_int, _p)
_SECTOR = ctypes.CFUNCTYPE(ctypes.c_int, _FP)
_SHM_MAP = ctypes.CFUNCTYPE(
    ctypes.c_int, _FP, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.POINTER(_p)
)
_SHM_LOCK = ctypes.CFUNCTYPE(ctypes.c_int, _FP, ctypes.c_int, ctypes.c_int, ctypes.c_int)
_SHM_BARRIER = ctypes.CFUNCTYPE(None, _FP)
_SHM_UNMAP = ctypes.CFUNCTYPE(ctypes.c_int, _FP, ctypes.c_int)

_IoMethods._fields_ = (
    ("iVersion", ctypes.c_int),
    ("xClose", _CLOSE),
    ("xRead", _READ),
    ("xWrite", _WRITE),
    ("xTruncate", _TRUNCATE),
    ("xSync", _SYNC),
    ("xFileSize", _FILE_SIZE),
    ("xLock", _LOCK),
    ("xUnlock", _LOCK),
    ("xCheckReservedLock", _CHECK_LOCK),
    ("xFileControl", _FILE_CONTROL),
    ("xSectorSize", _SECTOR),
    ("xDeviceCharacteristics", _SECTOR),
    ("xShmMap", _SHM_MAP),
    ("xShmLock", _SHM_LOCK),
    ("xShmBarrier", _SHM_BARRIER),
    ("xShmUnmap", _SHM_UNMAP),
)


class _Vfs(ctypes.Structure):
    pass


_VP = ctypes.POINTER(_Vfs)
_OPEN = ctypes.CFUNCTYPE(
    ctypes.c_int, _VP, ctypes.c_char_p, _FP, ctypes.c_int, ctypes.POINTER(ctypes.c_int)
)
_DELETE = ctypes.CFUNCTYPE(ctypes.c_int, _VP, ctypes.c_char_p, ctypes.c_int)
_ACCESS = ctypes.CFUNCTYPE(
    ctypes.c_int, _VP, ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int)
)
_FULL_PATH = ctypes.CFUNCTYPE(ctypes.c_int, _VP, ctypes.c_char_p, ctypes.c_int, _p)

_Vfs._fields_ = (
    ("iVersion", ctypes.c_int),
    ("szOsFile", ctypes.c_int),
    ("mxPathname", ctypes.c_int),
    ("pNext", _VP),
    ("zName", ctypes.c_char_p),
    ("pAppData", _p),
    ("xOpen", _OPEN),
    ("xDelete", _DELETE),
    ("xAccess", _ACCESS),
    ("xFullPathname", _FULL_PATH),
    # The rest (loading extensions, randomness, sleep, time, errors) are
    # the default VFS's own functions, copied as raw pointers.
    ("xDlOpen", _p),
    ("xDlError", _p),
    ("xDlSym", _p),
    ("xDlClose", _p),
    ("xRandomness", _p),
    ("xSleep", _p),
    ("xCurrentTime", _p),
    ("xGetLastError", _p),
    ("xCurrentTimeInt64", _p),
)


def _library() -> ctypes.CDLL:
    """The SQLite library :mod:`sqlite3` calls, through its extension module's handle."""
    lib = ctypes.CDLL(_sqlite3.__file__)
    try:
        lib.sqlite3_vfs_register.argtypes = (_VP, ctypes.c_int)
        lib.sqlite3_vfs_unregister.argtypes = (_VP,)
        lib.sqlite3_vfs_find.argtypes = (ctypes.c_char_p,)
        lib.sqlite3_vfs_find.restype = _VP
    except AttributeError as exc:
        raise RuntimeError(
            f"the sqlite3 module of this Python ({_sqlite3.__file__}) does not expose the"
            f" SQLite library's functions ({exc}), so no VFS can be registered for it; use a"
            " Python whose _sqlite3 links the shared libsqlite3 (Debian's and pyenv's do)"
        ) from exc
    return lib


_counter = itertools.count(1)
_alive: list[FaultVFS] = []


class FaultVFS:
    """A SQLite VFS named :attr:`name` whose files live in ``fs``; see the module docstring.

    Registered on creation (or ``with``), unregistered by :meth:`close`.
    ``fs.sqlite_vfs`` names it, so that code opening SQLite files on ``fs``
    (an :class:`~streamlet.app.App` with ``fs=``) goes through it.
    :meth:`attach` moves it to another disk (the one a power cut left).
    """

    def __init__(self, fs: FaultFS) -> None:
        self.name = f"faultfs{next(_counter)}"
        self.fs = fs
        fs.sqlite_vfs = self.name
        self.failures: list[BaseException] = []
        self._lock = threading.Lock()
        self._files: dict[int, tuple[FaultFile, str, int]] = {}
        self._dir_sync: set[int] = set()
        self._shm: dict[str, list[ctypes.Array[ctypes.c_char]]] = {}
        # Per database, the open files (connections) that mapped its regions:
        # freed only when the last one unmaps with delete set.
        self._shm_users: dict[str, set[int]] = {}
        self._numbers = itertools.count(1)
        self._lib = _library()
        default = self._lib.sqlite3_vfs_find(None)
        if not default:
            raise RuntimeError("SQLite has no default VFS to take its clock and randomness from")
        base = default.contents
        self._methods = _IoMethods(
            2,
            _CLOSE(self._close),
            _READ(self._read),
            _WRITE(self._write),
            _TRUNCATE(self._truncate),
            _SYNC(self._sync),
            _FILE_SIZE(self._file_size),
            _LOCK(lambda f, level: _OK),
            _LOCK(lambda f, level: _OK),
            _CHECK_LOCK(self._check_lock),
            _FILE_CONTROL(lambda f, op, arg: _NOTFOUND),
            _SECTOR(lambda f: SECTOR_SIZE),
            _SECTOR(lambda f: _IOCAP_POWERSAFE_OVERWRITE),
            _SHM_MAP(self._shm_map),
            _SHM_LOCK(lambda f, offset, n, flags: _OK),
            _SHM_BARRIER(lambda f: None),
            _SHM_UNMAP(self._shm_unmap),
        )
        self._name = self.name.encode()
        self._vfs = _Vfs(
            2,
            ctypes.sizeof(_File),
            512,
            None,
            self._name,
            None,
            _OPEN(self._open),
            _DELETE(self._delete),
            _ACCESS(self._access),
            _FULL_PATH(self._full_pathname),
            base.xDlOpen,
            base.xDlError,
            base.xDlSym,
            base.xDlClose,
            base.xRandomness,
            base.xSleep,
            base.xCurrentTime,
            base.xGetLastError,
            base.xCurrentTimeInt64,
        )
        if self._lib.sqlite3_vfs_register(ctypes.byref(self._vfs), 0) != _OK:
            raise RuntimeError(f"SQLite refused to register the VFS {self.name!r}")
        self._registered = True
        # SQLite keeps pointers to the callbacks: this object must outlive them.
        _alive.append(self)
        try:
            sqlite3.connect(f"file:/.probe?vfs={self.name}&mode=memory", uri=True).close()
        except sqlite3.OperationalError as exc:
            self.close()
            raise RuntimeError(
                f"the VFS registered through {_sqlite3.__file__} is unknown to the sqlite3"
                f" module ({exc}): it calls another copy of SQLite, and SQLite files opened"
                " through it cannot be put on a FaultFS"
            ) from exc

    def attach(self, fs: FaultFS) -> None:
        """Serve ``fs`` from now on; no connection through the VFS may be open."""
        self._check_closed()
        with self._lock:
            self._shm.clear()
            self._shm_users.clear()
        self.fs = fs
        fs.sqlite_vfs = self.name

    async def settle(self, patience: float = 10.0) -> None:
        """Wait until SQLite has closed every file opened through this VFS.

        After a power cut, a worker thread may still be finishing the
        statement the cut broke, and a connection closed after a failed
        statement stays open until that statement is freed: call this
        before :meth:`attach` or :meth:`close`.
        """
        with anyio.fail_after(patience):
            # A thread finishing closes them soon; collecting (slow) only after.
            for polls in itertools.count():
                if not self._open_paths(collect=polls >= 20):
                    return
                await anyio.sleep(0.001 if polls < 20 else 0.01)

    def _open_paths(self, *, collect: bool = True) -> list[str]:
        if collect and self._files:
            gc.collect()  # frees statements that keep closed connections open
        with self._lock:
            return sorted(p for _, p, _ in self._files.values())

    def _check_closed(self) -> None:
        paths = self._open_paths()
        if paths:
            raise RuntimeError(
                f"SQLite files are still open through {self.name}: {paths}; close their"
                " connections (and await settle()) first"
            )

    def uri(self, path: str) -> str:
        """A :func:`sqlite3.connect` URI (``uri=True``) for FaultFS path ``path``."""
        return f"file:{path}?vfs={self.name}"

    def close(self) -> None:
        """Unregister the VFS; connections through it must be closed first."""
        self._check_closed()
        if self.fs.sqlite_vfs == self.name:
            self.fs.sqlite_vfs = None
        if self._registered:
            self._lib.sqlite3_vfs_unregister(ctypes.byref(self._vfs))
            self._registered = False

    def __enter__(self) -> FaultVFS:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the VFS ---------------------------------------------------------------

    def _failed(self, exc: BaseException, code: int = _IOERR) -> int:
        # Without its traceback: that reaches, through the callback's caller,
        # the frame holding the connection, which would then never close.
        with self._lock:
            self.failures.append(exc.with_traceback(None))
        return code

    def _open(self, vfs: Any, name: bytes | None, file: Any, flags: int, out_flags: Any) -> int:
        file.contents.pMethods = None
        try:
            fs = self.fs
            number = next(self._numbers)
            path = name.decode() if name else f"/.sqlite-temp-{number}"
            if fs.exists(path):
                handle = fs.open(path, writable=bool(flags & _OPEN_READWRITE))
                new = False
            elif flags & _OPEN_CREATE:
                handle = fs.create(path)
                new = True
            else:
                return _CANTOPEN
            assert isinstance(handle, FaultFile)
            with self._lock:
                self._files[number] = (handle, path, flags)
                if new and flags & (_OPEN_MAIN_JOURNAL | _OPEN_SUPER_JOURNAL | _OPEN_WAL):
                    self._dir_sync.add(number)
            file.contents.number = number
            file.contents.pMethods = ctypes.pointer(self._methods)
            if out_flags:
                out_flags[0] = flags
            return _OK
        except BaseException as exc:  # SQLite gets an error code, never a raise
            return self._failed(exc, _CANTOPEN)

    def _delete(self, vfs: Any, name: bytes, sync_dir: int) -> int:
        try:
            path = name.decode()
            if not self.fs.exists(path):
                return _IOERR_DELETE_NOENT
            self.fs.remove(path)
            if sync_dir:
                self.fs.sync_dir(posixpath.dirname(path) or "/")
            return _OK
        except BaseException as exc:
            return self._failed(exc)

    def _access(self, vfs: Any, name: bytes, flags: int, result: Any) -> int:
        try:
            result[0] = int(self.fs.exists(name.decode()))
            return _OK
        except BaseException as exc:
            return self._failed(exc)

    def _full_pathname(self, vfs: Any, name: bytes, size: int, out: int) -> int:
        path = ("/" + posixpath.normpath("/" + name.decode()).lstrip("/")).encode()
        if len(path) >= size:
            return _CANTOPEN
        ctypes.memmove(out, path + b"\0", len(path) + 1)
        return _OK

    # -- a file ------------------------------------------------------------------

    def _handle(self, file: Any) -> tuple[FaultFile, str, int]:
        with self._lock:
            return self._files[file.contents.number]

    def _close(self, file: Any) -> int:
        try:
            with self._lock:
                handle, path, flags = self._files.pop(file.contents.number)
                self._dir_sync.discard(file.contents.number)
            handle.close()
            if flags & _OPEN_DELETEONCLOSE:
                self.fs.remove(path)
            return _OK
        except BaseException as exc:
            return self._failed(exc)

    def _read(self, file: Any, buffer: int, amount: int, offset: int) -> int:
        try:
            data = self._handle(file)[0].read(offset, amount)
            ctypes.memmove(buffer, data, len(data))
            if len(data) < amount:
                ctypes.memset(buffer + len(data), 0, amount - len(data))
                return _IOERR_SHORT_READ
            return _OK
        except BaseException as exc:
            return self._failed(exc)

    def _write(self, file: Any, buffer: int, amount: int, offset: int) -> int:
        try:
            self._handle(file)[0].write(offset, ctypes.string_at(buffer, amount))
            return _OK
        except BaseException as exc:
            return self._failed(exc)

    def _truncate(self, file: Any, size: int) -> int:
        try:
            self._handle(file)[0].truncate(size)
            return _OK
        except BaseException as exc:
            return self._failed(exc)

    def _sync(self, file: Any, flags: int) -> int:
        try:
            handle, path, _ = self._handle(file)
            handle.sync()
            number = file.contents.number
            if number in self._dir_sync:
                # As SQLite's unix VFS: a new journal's or WAL's name is made
                # durable with its first sync.
                self.fs.sync_dir(posixpath.dirname(path) or "/")
                with self._lock:
                    self._dir_sync.discard(number)
            return _OK
        except BaseException as exc:
            return self._failed(exc)

    def _file_size(self, file: Any, size: Any) -> int:
        try:
            size[0] = self._handle(file)[0].size()
            return _OK
        except BaseException as exc:
            return self._failed(exc)

    def _check_lock(self, file: Any, result: Any) -> int:
        result[0] = 0
        return _OK

    def _shm_map(self, file: Any, region: int, size: int, extend: int, out: Any) -> int:
        try:
            path = self._handle(file)[1]
            with self._lock:
                self._shm_users.setdefault(path, set()).add(file.contents.number)
                regions = self._shm.setdefault(path, [])
                while len(regions) <= region and extend:
                    regions.append(ctypes.create_string_buffer(size))
                out[0] = ctypes.addressof(regions[region]) if region < len(regions) else None
            return _OK
        except BaseException as exc:
            return self._failed(exc)

    def _shm_unmap(self, file: Any, delete: int) -> int:
        try:
            path = self._handle(file)[1]
            with self._lock:
                users = self._shm_users.get(path, set())
                users.discard(file.contents.number)
                if delete and not users:  # another connection may still read them
                    self._shm.pop(path, None)
                    self._shm_users.pop(path, None)
            return _OK
        except BaseException as exc:
            return self._failed(exc)
