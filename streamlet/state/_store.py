"""A handler's keyed state on disk: one SQLite file, changed once per batch.

Layout: ``<state_dir>/state/<handler>.sqlite``, in WAL journal mode with
``synchronous=FULL``, so a commit is durable when it returns and readers
(``streamlet state show``) never block the app.

Tables (format 1)::

    kv(k BLOB PRIMARY KEY, v BLOB NOT NULL, touched REAL NOT NULL) WITHOUT ROWID
    meta(name TEXT PRIMARY KEY, value TEXT NOT NULL)

``k`` is the encoded key (:func:`encode_key`: a type byte, then the key),
``v`` the orjson encoding of the value, ``touched`` the batch time of the
write that set it (what a ``ttl`` counts from). ``meta`` holds ``format``,
``app``, ``handler``, ``state_id`` (the state directory's identity) and
``seq``: the id of the newest batch whose changes are in the file.

The commit protocol (single worker; docs/architecture.md, "Keyed state"):
a batch's handler works on a :class:`~streamlet.state._keyed.KeyedState`
over the state as of the previous batch; its changes are encoded as soon as
it returns (a value that cannot be stored fails the handler, before any
sink commits) and written, with ``seq`` = the batch id, in one SQLite
transaction *after* every sink committed the batch and *before* the tracker
marks it done. A batch run again after a crash therefore finds either
``seq`` below its id (its changes are not in: it runs on the state it ran
on before, and the sinks skip what they already hold) or ``seq`` equal to
its id (everything of the batch committed: the handler is skipped). The
store is never ahead of the sinks, and never behind the tracker's ``done``.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import anyio.to_thread

from streamlet.errors import StateError
from streamlet.fs import connect_sqlite

__all__ = [
    "INTERNAL",
    "STATE_FORMAT",
    "Changes",
    "StateKey",
    "StateStore",
    "decode_key",
    "encode_key",
]

STATE_FORMAT = 1

StateKey = str | bytes | int
"""What a state key may be: text, bytes (a Kafka record's key) or an integer."""

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS kv("
    "k BLOB PRIMARY KEY, v BLOB NOT NULL, touched REAL NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS meta(name TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
# Only a store with a ttl looks keys up by age: without one, the index would
# cost every write (about a third of an upsert) for nothing.
_WITH_TTL = "CREATE INDEX IF NOT EXISTS kv_touched ON kv(touched)"
_WITHOUT_TTL = "DROP INDEX IF EXISTS kv_touched"

INTERNAL = b"w"
"""The type byte of streamlet's own entries in a store (windows' books):
:func:`encode_key` never makes it, so no user key can take theirs, and they
never expire or show among the user's keys."""
_USER_ONLY = "NOT (k >= x'77' AND k < x'78')"
EXPIRED_PER_BATCH = 10_000
"""The most expired keys one batch takes out, oldest first: a store that
was stopped past its ``ttl`` for a long time drains over several batches
instead of loading every key at once."""


def encode_key(key: object) -> bytes:
    """The stored form of a key; keys of other types are refused (TypeError)."""
    if isinstance(key, str):
        return b"s" + key.encode("utf-8", "surrogatepass")
    if isinstance(key, bytes):
        return b"b" + key
    if isinstance(key, int) and not isinstance(key, bool):
        return b"i" + str(key).encode("ascii")
    raise TypeError(f"a state key must be str, bytes or int, not {type(key).__name__}")


def decode_key(raw: bytes) -> StateKey:
    """The key :func:`encode_key` stored as ``raw``."""
    kind, body = raw[:1], raw[1:]
    if kind == b"s":
        return body.decode("utf-8", "surrogatepass")
    if kind == b"b":
        return bytes(body)
    if kind == b"i":
        return int(body)
    raise StateError(f"a stored state key has an unknown type byte {kind!r}")


@dataclass(frozen=True, slots=True)
class Changes:
    """What one batch does to a store, encoded: ready to commit.

    Attributes:
        batch_id: the batch; becomes the store's ``seq``.
        time: the batch's time (the ``touched`` of what it writes).
        writes: encoded key → encoded value, set by the batch.
        deletes: encoded keys the batch removed (expired ones included).
        position: group mode: the changelog offset after the batch's records
            (None: the store's position stays).
    """

    batch_id: int
    time: float
    writes: dict[bytes, bytes]
    deletes: frozenset[bytes]
    position: int | None = None


class StateStore:
    """One handler's keyed state: reads for the batch under way, one commit per batch.

    Reads go through a bounded cache of encoded values (``cache_keys``), so
    a state larger than memory works: only the keys a batch touches are
    loaded. Use :meth:`open`; see the module docstring for the protocol.
    """

    def __init__(
        self,
        path: str,
        conn: sqlite3.Connection,
        *,
        handler: str,
        seq: int,
        ttl: float | None,
        cache_keys: int,
        position: int = 0,
        current_at: float = 0.0,
    ) -> None:
        self.path = path
        self.handler = handler
        #: The newest batch whose changes are in the store (0: none yet).
        self.seq = seq
        #: Group mode: the changelog offset up to which the store holds the
        #: task's state (a lower bound: replaying from it is always right).
        self.position = position
        #: Group mode: when the store was last known to match the changelog
        #: (wall clock; 0: never). Older than the changelog's tombstone
        #: retention, it may miss deletes compaction has since removed.
        self.current_at = current_at
        #: Group mode: the birth the task's next changelog write must start
        #: with (its partition is empty); None once one is committed.
        self.birth_due: str | None = None
        self.ttl = ttl
        self._conn = conn
        self._lock = threading.Lock()
        self._cache: OrderedDict[bytes, tuple[bytes, float] | None] = OrderedDict()
        self._cache_keys = cache_keys

    @classmethod
    async def open(
        cls,
        path: str,
        *,
        app: str,
        handler: str,
        state_id: str,
        ttl: float | None = None,
        cache_keys: int = 100_000,
        task: int | None = None,
        vfs: str | None = None,
    ) -> StateStore:
        """Open (or create) the store at ``path``, checking it belongs to this app.

        ``task``: group mode, the task whose part of the state this store
        holds (a cache of the changelog's partition ``task``). ``vfs``: the
        SQLite VFS to open ``path`` through, its directory made already (the
        power-cut tests' :class:`~streamlet.testing.sqlite_vfs.FaultVFS`;
        None: the real file system).

        Raises:
            StateError: the file is damaged, of another format, or of another
                app, handler, task or state directory.
        """
        return await anyio.to_thread.run_sync(
            lambda: cls._open(path, app, handler, state_id, ttl, cache_keys, task, vfs)
        )

    @classmethod
    def _open(
        cls,
        path: str,
        app: str,
        handler: str,
        state_id: str,
        ttl: float | None,
        cache_keys: int,
        task: int | None = None,
        vfs: str | None = None,
    ) -> StateStore:
        try:
            if vfs is None:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                created = not os.path.exists(path)
            else:
                created = False  # an empty file is told by its empty tables below
            conn = connect_sqlite(path, vfs, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise StateError(_unopenable(path, exc)) from exc
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(_WITH_TTL if ttl is not None else _WITHOUT_TTL)
            meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
            orphan = not created and conn.execute("SELECT 1 FROM kv LIMIT 1").fetchone()
            if not meta and not orphan:
                meta = {
                    "format": str(STATE_FORMAT),
                    "app": app,
                    "handler": handler,
                    "state_id": state_id,
                    "seq": "0",
                    **(
                        {"task": str(task), "changelog": "0", "current_at": "0"}
                        if task is not None
                        else {}
                    ),
                }
                conn.executemany("INSERT INTO meta(name, value) VALUES (?, ?)", meta.items())
            conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            conn.close()
            if _io_failure(exc):
                raise StateError(_unopenable(path, exc)) from exc
            raise StateError(
                f"state store {path} cannot be read: {exc}. The file is damaged or is not"
                " a state store; restore the state directory from a backup (the state"
                " cannot be rebuilt from the outputs)"
            ) from exc
        except BaseException:
            conn.close()
            raise
        try:
            _check_identity(path, meta, app=app, handler=handler, state_id=state_id, task=task)
            seq = int(meta["seq"])
            position = int(meta.get("changelog", "0"))
            current_at = float(meta.get("current_at", "0"))
        except (StateError, KeyError, ValueError) as exc:
            conn.close()
            if isinstance(exc, StateError):
                raise
            raise StateError(f"state store {path} has damaged identity rows: {exc!r}") from exc
        return cls(
            path,
            conn,
            handler=handler,
            seq=seq,
            ttl=ttl,
            cache_keys=cache_keys,
            position=position,
            current_at=current_at,
        )

    # -- the batch under way -------------------------------------------------------

    def read(self, key: bytes, time: float) -> bytes | None:
        """The encoded value of ``key`` as committed, or None (absent, or expired at ``time``)."""
        cached = self._cache.get(key, _UNCACHED)
        if cached is _UNCACHED:
            with self._lock:
                row = self._conn.execute("SELECT v, touched FROM kv WHERE k = ?", (key,)).fetchone()
            found = (bytes(row[0]), float(row[1])) if row is not None else None
            self._remember(key, found)
        else:
            self._cache.move_to_end(key)
            found = cached  # type: ignore[assignment]
        if found is None:
            return None
        value, touched = found
        if self.ttl is not None and touched < time - self.ttl and key[:1] != INTERNAL:
            return None
        return value

    def _remember(self, key: bytes, found: tuple[bytes, float] | None) -> None:
        cache = self._cache
        cache[key] = found
        cache.move_to_end(key)
        while len(cache) > self._cache_keys:
            cache.popitem(last=False)

    def expired(self, time: float) -> list[tuple[bytes, bytes]]:
        """Keys (and values) whose ``ttl`` ran out by ``time``, oldest first; empty without one."""
        if self.ttl is None:
            return []
        with self._lock:
            rows = self._conn.execute(
                f"SELECT k, v FROM kv WHERE touched < ? AND {_USER_ONLY}"  # noqa: S608 - constants
                " ORDER BY touched, k LIMIT ?",
                (time - self.ttl, EXPIRED_PER_BATCH),
            ).fetchall()
        return [(bytes(k), bytes(v)) for k, v in rows]

    def keys(self, time: float) -> Iterator[bytes]:
        """Every committed user key not expired at ``time``, in key order, read in pages."""
        after = b""
        floor = -float("inf") if self.ttl is None else time - self.ttl
        while True:
            with self._lock:
                rows = self._conn.execute(
                    f"SELECT k FROM kv WHERE k > ? AND touched >= ? AND {_USER_ONLY}"  # noqa: S608
                    " ORDER BY k LIMIT 1000",
                    (after, floor),
                ).fetchall()
            if not rows:
                return
            for (k,) in rows:
                yield bytes(k)
            after = bytes(rows[-1][0])

    def count(self, time: float) -> int:
        """How many committed keys are live at ``time``."""
        floor = -float("inf") if self.ttl is None else time - self.ttl
        with self._lock:
            (n,) = self._conn.execute(
                f"SELECT COUNT(*) FROM kv WHERE touched >= ? AND {_USER_ONLY}",  # noqa: S608
                (floor,),
            ).fetchone()
        return int(n)

    def empty(self) -> bool:
        """Whether the store holds nothing at all (streamlet's own entries included)."""
        with self._lock:
            return self._conn.execute("SELECT 1 FROM kv LIMIT 1").fetchone() is None

    # -- committing ------------------------------------------------------------------

    async def commit(self, changes: Changes) -> None:
        """Make ``changes`` durable with ``seq`` = their batch, in one transaction.

        Called after the batch's sinks committed and before it is marked
        done. A batch at or below ``seq`` is already in: nothing is written.

        Raises:
            StateError: the write failed (disk full, I/O error): the batch is
                not done and runs again on restart.
        """
        if changes.batch_id <= self.seq:
            return
        await anyio.to_thread.run_sync(self._commit, changes)

    def _commit(self, changes: Changes) -> None:
        conn = self._conn
        # Never backwards: a lower bound only ever rises (an offset reported
        # as -1, for a duplicate send, would lower it).
        position = changes.position
        advance = position if position is not None and position > self.position else None
        with self._lock:
            try:
                conn.execute("BEGIN IMMEDIATE")
                self._write_rows(
                    changes.deletes, [(k, v, changes.time) for k, v in changes.writes.items()]
                )
                conn.execute(
                    "UPDATE meta SET value = ? WHERE name = 'seq'", (str(changes.batch_id),)
                )
                if advance is not None:
                    self._set_position(advance, changes.time)
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                # What is cached may be ahead of the file now: forget it.
                self._cache.clear()
                raise StateError(
                    f"state of handler {self.handler!r} could not be written to {self.path}"
                    f" for batch {changes.batch_id}: {exc}. The batch is not done and runs"
                    " again when the app restarts (free disk space first if it is full)"
                ) from exc
        for k in changes.deletes:
            self._remember(k, None)
        for k, v in changes.writes.items():
            self._remember(k, (v, changes.time))
        self.seq = changes.batch_id
        if advance is not None:
            self.position, self.current_at = advance, changes.time

    def _write_rows(
        self, deletes: Iterable[bytes], rows: Sequence[tuple[bytes, bytes, float]]
    ) -> None:
        """Delete keys, then upsert (key, value, touched) rows (caller holds the lock, in a
        transaction): what a batch's commit and a changelog replay both write."""
        conn = self._conn
        conn.executemany("DELETE FROM kv WHERE k = ?", [(k,) for k in deletes])
        if rows:
            conn.executemany(
                "INSERT INTO kv(k, v, touched) VALUES (?, ?, ?) ON CONFLICT(k) DO"
                " UPDATE SET v = excluded.v, touched = excluded.touched",
                rows,
            )

    def _set_position(self, position: int, current_at: float) -> None:
        """Record the changelog position (caller holds the lock, in a transaction)."""
        self._conn.executemany(
            "INSERT INTO meta(name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE"
            " SET value = excluded.value",
            [("changelog", str(position)), ("current_at", repr(current_at))],
        )

    # -- group mode: the changelog's cache ---------------------------------------------

    async def replay(
        self,
        writes: dict[bytes, tuple[bytes, float]],
        deletes: set[bytes],
        position: int,
        current_at: float,
    ) -> None:
        """Apply changelog records read up to ``position``, in one transaction.

        ``writes`` and ``deletes`` are their net effect (see
        :func:`~streamlet.state._changelog.replayed`).

        Raises:
            StateError: the write failed (disk full, I/O error).
        """
        await anyio.to_thread.run_sync(self._replay, writes, deletes, position, current_at)

    def _replay(
        self,
        writes: dict[bytes, tuple[bytes, float]],
        deletes: set[bytes],
        position: int,
        current_at: float,
        wipe: bool = False,
    ) -> None:
        conn = self._conn
        with self._lock:
            self._cache.clear()
            try:
                conn.execute("BEGIN IMMEDIATE")
                if wipe:
                    conn.execute("DELETE FROM kv")
                self._write_rows(deletes, [(k, v, t) for k, (v, t) in writes.items()])
                self._set_position(position, current_at)
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise StateError(
                    f"state of handler {self.handler!r} could not be restored into"
                    f" {self.path}: {exc}. Free disk space if it is full; the task is taken"
                    " over again when the app restarts"
                ) from exc
        self.position, self.current_at = position, current_at

    async def wipe(self, position: int) -> None:
        """Empty the store, to be rebuilt from the changelog from ``position`` (its start)."""
        await anyio.to_thread.run_sync(self._replay, {}, set(), position, 0.0, True)

    async def start_at(self, batch_id: int) -> None:
        """Start an empty store at ``batch_id`` (keyed state added to a running app).

        A store that holds anything already is left as it is.
        """
        if self.seq == 0 and self.count(-float("inf")) == 0 and batch_id > 0:
            await anyio.to_thread.run_sync(self._commit, Changes(batch_id, 0.0, {}, frozenset()))

    def check_against(self, last_done: int, pending: Sequence[int], allocated: int) -> None:
        """Refuse a store that does not fit the tracker (a lost, stale or foreign file).

        Every batch commits the store before it is done, so ``seq`` is the
        last done batch, or a pending one whose state committed just before
        a crash.

        Raises:
            StateError: ``seq`` is behind the last done batch (the store was
                replaced by an older copy, or deleted) or ahead of what the
                state directory allocated (the state directory is older).
        """
        seq = self.seq
        if seq == last_done or seq in pending:
            return
        if seq > allocated:
            raise StateError(
                f"state store {self.path} holds batch {seq}, past batch {allocated}, the"
                " newest the state directory allocated: the state directory is older than"
                " the store (restored from a backup?). Restore both from the same backup"
            )
        what = "is empty" if seq == 0 else f"stops at batch {seq}"
        raise StateError(
            f"state store {self.path} of handler {self.handler!r} {what}, but batch"
            f" {last_done} is done: the store was deleted or replaced by an older copy, and"
            " running on would lose the state of the batches between. Restore the state"
            " directory (store and tracker together) from one backup; to start over on"
            " purpose, use a new state_dir and new outputs"
        )

    async def aclose(self) -> None:
        with self._lock:
            self._conn.close()


_UNCACHED: object = object()

# SQLite's primary result codes that mean the disk, not the file, failed:
# SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN.
_IO_CODES = frozenset({10, 13, 14})


def _io_failure(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _IO_CODES


def _unopenable(path: str, exc: BaseException) -> str:
    return (
        f"state store {path} cannot be opened: {exc}. Check that its directory exists and"
        " is writable and that the disk is not full, then start again; nothing was changed"
    )


def _check_identity(
    path: str,
    meta: dict[str, str],
    *,
    app: str,
    handler: str,
    state_id: str,
    task: int | None = None,
) -> None:
    if not meta:
        raise StateError(
            f"state store {path} holds values but no identity; it is not a streamlet state"
            " store of this version. Move it away"
        )
    if meta.get("format") != str(STATE_FORMAT):
        raise StateError(
            f"state store {path} is of format {meta.get('format')!r}; this streamlet reads"
            f" format {STATE_FORMAT}"
        )
    for name, want in (("app", app), ("handler", handler)):
        if meta.get(name) != want:
            raise StateError(
                f"state store {path} belongs to {name} {meta.get(name)!r}, not {want!r}: it was"
                " copied from another app or handler. Move it away, or run the app it belongs to"
            )
    if meta.get("task") != (None if task is None else str(task)):
        raise StateError(
            f"state store {path} holds task {meta.get('task')!r} of handler {handler!r}, not"
            f" {task!r}: a store of one worker mode or task was copied over another's. Move"
            " it away (in group mode a task's state is restored from its changelog)"
        )
    if state_id and meta.get("state_id") and meta["state_id"] != state_id:
        raise StateError(
            f"state store {path} was made in another state directory (id {meta['state_id']},"
            f" this one is {state_id}): its batch numbers mean nothing here. Restore the"
            " store of this state directory, or use a new state_dir to start over"
        )
