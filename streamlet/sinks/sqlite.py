"""SQLiteSink: a batch's rows and its bookkeeping in one SQL transaction.

The user's ``apply(conn, batch, outputs)`` writes the rows; the sink wraps it
in ``BEGIN IMMEDIATE … COMMIT`` together with its own bookkeeping, so a crash
leaves both or neither, and a batch whose bookkeeping row exists is skipped.

Bookkeeping tables (created on open, shared by every app and handler that
uses the database, keyed by ``(app, handler)``)::

    streamlet_batches(app, handler, batch_id, committed_at, ranges_json)
        one row per committed batch: the idempotency record; ranges_json is
        the batch's offset ranges, [{"source", "partition", "start", "until"}]
    streamlet_offsets(app, handler, source, partition, batch_id, start, until)
        per source partition, the range of the newest batch that read it

``streamlet_offsets`` is what makes the sink exactly-once with a Kafka
source: the offsets live in the same transaction as the outputs, so a
source can resume from :meth:`SQLiteSink.committed_ranges` (``until`` is the
next offset to read) even if its own position was lost. It is kept apart
from ``streamlet_batches`` so that resuming costs a lookup per partition, not
a scan of every batch ever committed.

Threads: an ``sqlite3.Connection`` belongs to the thread that made it, so
the sink owns one worker thread, and every call on the connection (open,
commit, the helpers, close) runs there, one at a time; the event loop never
blocks on SQLite. ``journal_mode=WAL`` with ``synchronous=FULL`` makes a
commit durable when ``COMMIT`` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar, cast

import orjson

from streamlet.errors import ConfigError, OutputError, SinkError, SinkUnavailableError
from streamlet.fs import FileSystem, OsFileSystem, connect_sqlite, sqlite_vfs_of
from streamlet.records import Batch, OffsetRange
from streamlet.sinks.base import Sink, SinkContext, ddl_scripts

__all__ = ["ApplyFunction", "SQLiteSink"]

log = logging.getLogger(__name__)

_Out = TypeVar("_Out")

ApplyFunction = Callable[[sqlite3.Connection, Batch, Sequence[_Out]], None]
"""``apply(conn, batch, outputs)``: write a batch's rows; must not commit.

Generic in the outputs' type: ``SQLiteSink(path, insert)`` takes the type
``insert`` declares for them, so the function type-checks as written."""

_T = TypeVar("_T")

_BOOKKEEPING = (
    """CREATE TABLE IF NOT EXISTS streamlet_batches (
        app TEXT NOT NULL,
        handler TEXT NOT NULL,
        batch_id INTEGER NOT NULL,
        committed_at REAL NOT NULL,
        ranges_json TEXT NOT NULL,
        PRIMARY KEY (app, handler, batch_id)
    )""",
    """CREATE TABLE IF NOT EXISTS streamlet_offsets (
        app TEXT NOT NULL,
        handler TEXT NOT NULL,
        source TEXT NOT NULL,
        partition INTEGER NOT NULL,
        batch_id INTEGER NOT NULL,
        start INTEGER NOT NULL,
        until INTEGER NOT NULL,
        PRIMARY KEY (app, handler, source, partition)
    )""",
)
_STATE_TABLE = """CREATE TABLE IF NOT EXISTS streamlet_state (
        app TEXT NOT NULL,
        handler TEXT NOT NULL,
        state_id TEXT NOT NULL,
        PRIMARY KEY (app, handler)
    )"""
_IS_COMMITTED = "SELECT 1 FROM streamlet_batches WHERE app = ? AND handler = ? AND batch_id = ?"
_INSERT_BATCH = (
    "INSERT INTO streamlet_batches (app, handler, batch_id, committed_at, ranges_json)"
    " VALUES (?, ?, ?, ?, ?)"
)
# Only forward: a re-run of an old batch never moves a partition back.
_UPSERT_OFFSET = """INSERT INTO streamlet_offsets
        (app, handler, batch_id, source, partition, start, until) VALUES (?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (app, handler, source, partition) DO UPDATE SET
        batch_id = excluded.batch_id, start = excluded.start, until = excluded.until
    WHERE excluded.batch_id > streamlet_offsets.batch_id"""


def split_script(script: str) -> list[str]:
    """The SQL statements of ``script``, split where SQLite says one is complete.

    ``sqlite3.complete_statement`` knows about quotes, comments and trigger
    bodies, so a ``;`` inside them does not split a statement.
    """
    statements: list[str] = []
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \t\r\n;"):
                statements.append(pending)
            pending = ""
    if pending.strip(" \t\r\n;"):
        statements.append(pending)
    return statements


class _ApplyFailed(Exception):
    """Carries the user's exception out of the transaction to be wrapped."""


class SQLiteSink(Sink, Generic[_Out]):
    """Writes each batch through ``apply`` in one transaction, at most once.

    Args:
        path: the database file; created with mode 0600 (and its directory
            with 0700) if missing. SQLite gives its ``-wal`` and ``-shm``
            files the same mode.
        apply: ``apply(conn, batch, outputs)``, a plain (not async) function
            that writes the batch's rows with ``conn``. It runs in the sink's
            worker thread inside the sink's transaction; it must not commit
            or roll back (the sink refuses such statements while it runs).
        table_ddl: SQL run in one transaction at every :meth:`open`, before
            the bookkeeping tables are made: a script (str) or a list of
            them. Write it idempotent (``CREATE TABLE IF NOT EXISTS``).
        timeout: seconds to wait for another connection's write lock.
        fs: the file layer the database lives on; SQLite reaches it through
            the VFS it names (``fs.sqlite_vfs``; the power-cut tests' FaultFS
            with :class:`~streamlet.testing.sqlite_vfs.FaultVFS`). Default:
            the real disk.

    Raises:
        ConfigError: ``apply`` is not a plain callable or ``table_ddl`` is
            not SQL text.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        apply: ApplyFunction[_Out],
        *,
        table_ddl: str | Sequence[str] | None = None,
        timeout: float = 30.0,
        fs: FileSystem | None = None,
    ) -> None:
        if not callable(apply):
            raise ConfigError(f"SQLiteSink apply must be a function, not {type(apply).__name__}")
        if inspect.iscoroutinefunction(apply):
            raise ConfigError(
                "SQLiteSink apply must be a plain function, not async: it runs in the sink's"
                " worker thread inside the batch's transaction"
            )
        scripts = ddl_scripts("SQLiteSink", table_ddl)
        if not timeout >= 0:
            raise ConfigError(f"SQLiteSink timeout must be >= 0 seconds, not {timeout!r}")
        self._path = os.fspath(path)
        self._apply = apply
        self._ddl = [stmt for script in scripts for stmt in split_script(script)]
        self._timeout = timeout
        self._fs: FileSystem = fs if fs is not None else OsFileSystem()
        self._context: SinkContext | None = None
        self._executor: ThreadPoolExecutor | None = None
        # Touched only in the worker thread.
        self._conn: sqlite3.Connection | None = None
        self._in_apply = False

    @property
    def path(self) -> str:
        """The database file (absolute once the sink is open)."""
        return self._path

    async def _run(self, func: Callable[[], _T]) -> _T:
        """``func()`` on the sink's thread.

        If the caller is cancelled, a call already running finishes there
        (its transaction commits or rolls back as a whole); one still queued
        never runs.
        """
        if self._executor is None or self._context is None:
            raise SinkError(f"SQLiteSink {self._path} is not open; call open() first")
        return await asyncio.get_running_loop().run_in_executor(self._executor, func)

    async def open(self, context: SinkContext) -> None:
        """Create the database if needed, set WAL mode, run the DDL.

        Raises:
            ConfigError: the file cannot be used as a database, WAL mode is
                not available there, or ``table_ddl`` fails.
        """
        if self._executor is not None:
            raise SinkError(f"SQLiteSink {self._path} is already open")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamlet-sqlite")
        self._context = context
        try:
            await self._run(self._open_sync)
        except BaseException:
            # If the caller was cancelled, the open job may still finish and
            # leave a connection: the queued close job releases it.
            self._executor.submit(self._close_sync)
            self._executor.shutdown(wait=False)
            self._executor = None
            self._context = None
            raise

    def _open_sync(self) -> None:
        fs = self._fs
        vfs = sqlite_vfs_of(fs)
        if vfs is None and not isinstance(fs, OsFileSystem):
            # It would make the file there, and SQLite would write beside it.
            raise ConfigError(
                f"SQLiteSink {self._path}: SQLite cannot reach the file system"
                f" {type(fs).__name__} given as fs=; give it a SQLite VFS in its sqlite_vfs"
                " attribute (streamlet.testing.sqlite_vfs.FaultVFS does for FaultFS), or leave"
                " fs= out for the real disk"
            )
        path = os.path.abspath(self._path) if vfs is None else self._path
        self._path = path
        try:
            if not fs.exists(path):
                fs.makedirs(os.path.dirname(path))
                try:
                    fs.create(path).close()  # mode 0600; SQLite opens the file as it is
                    fs.sync_dir(os.path.dirname(path))
                except FileExistsError:
                    pass
        except OSError as exc:
            raise ConfigError(
                f"SQLiteSink cannot create {path}: {exc}; fix the path or its permissions"
            ) from exc
        try:
            conn = connect_sqlite(path, vfs, timeout=self._timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise ConfigError(f"SQLiteSink cannot open {path}: {exc}") from exc
        try:
            self._prepare(conn, path)
        except BaseException:
            conn.close()
            raise
        conn.set_authorizer(self._authorize)
        self._conn = conn

    def _prepare(self, conn: sqlite3.Connection, path: str) -> None:
        try:
            row = conn.execute("PRAGMA journal_mode=WAL").fetchone()
            conn.execute("PRAGMA synchronous=FULL")
        except sqlite3.DatabaseError as exc:
            raise ConfigError(
                f"SQLiteSink cannot use {path}: {exc}; point it at an SQLite database or a new file"
            ) from exc
        if row is None or str(row[0]).lower() != "wal":
            raise ConfigError(
                f"SQLiteSink {path}: the database did not switch to WAL journal mode"
                f" (it is {row[0] if row else None!r}); use a local file system"
            )
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise SinkError(f"SQLiteSink {path}: cannot start a transaction: {exc}") from exc
        try:
            for index, statement in enumerate(self._ddl):
                try:
                    conn.execute(statement)
                except sqlite3.OperationalError as exc:
                    if _is_busy(exc) or _is_disk(exc):
                        raise  # the disk's fault, not the DDL's
                    raise ConfigError(
                        f"SQLiteSink {path}: table_ddl statement {index + 1} failed: {exc}"
                        f" ({statement.strip()[:200]!r}); fix the DDL"
                    ) from exc
                except sqlite3.Error as exc:
                    raise ConfigError(
                        f"SQLiteSink {path}: table_ddl statement {index + 1} failed: {exc}"
                        f" ({statement.strip()[:200]!r}); fix the DDL"
                    ) from exc
            for statement in _BOOKKEEPING:
                conn.execute(statement)
            conn.execute(_STATE_TABLE)
            self._check_state_id(conn, path)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            _roll_back(conn)
            kind = SinkUnavailableError if _is_busy(exc) else SinkError
            raise kind(
                f"SQLiteSink {path}: making its tables failed: {exc}; {_advice(exc)}"
            ) from exc
        except BaseException:
            _roll_back(conn)
            raise

    def _check_state_id(self, conn: sqlite3.Connection, path: str) -> None:
        """Refuse a database whose batches were counted by another state directory."""
        context = self._context
        if context is None or not context.state_id:
            return
        row = conn.execute(
            "SELECT state_id FROM streamlet_state WHERE app = ? AND handler = ?",
            (context.app, context.handler),
        ).fetchone()
        if row is None:
            conn.execute(
                "INSERT INTO streamlet_state (app, handler, state_id) VALUES (?, ?, ?)",
                (context.app, context.handler, context.state_id),
            )
        elif row[0] != context.state_id:
            raise ConfigError(
                f"SQLiteSink {path} holds batches of app {context.app!r}, handler"
                f" {context.handler!r} written under another state directory (id {row[0]});"
                f" this app's state_dir {context.state_dir} has id {context.state_id}. Batch"
                " ids restart with a new state directory, so its batches would be taken for"
                " ones already written and skipped. Restore the original state_dir, or write"
                " to a new database (or delete this handler's rows from streamlet_batches,"
                " streamlet_offsets and streamlet_state if the old outputs are unwanted)"
            )

    def _authorize(
        self, action: int, arg1: str | None, arg2: str | None, db: str | None, trigger: str | None
    ) -> int:
        # Invariant: while apply runs, the batch's transaction stays open, so
        # that its rows and its bookkeeping row commit together.
        if self._in_apply and action == sqlite3.SQLITE_TRANSACTION:
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    async def commit(self, batch: Batch, outputs: Sequence[object]) -> bool:
        """Run ``apply`` and record the batch in one transaction, unless recorded.

        Returns:
            True if this call wrote the batch, False if it was committed before.

        Raises:
            SinkError: ``apply`` raised (its exception is the ``__cause__``)
                or SQLite failed; the transaction was rolled back and nothing
                of the batch is in the database.
        """
        return await self._run(lambda: self._commit_sync(batch, outputs))

    def _state(self) -> tuple[sqlite3.Connection, SinkContext]:
        """The connection and context, on the sink's thread after a successful open."""
        if self._conn is None or self._context is None:
            raise SinkError(f"SQLiteSink {self._path} is not open; call open() first")
        return self._conn, self._context

    def _commit_sync(self, batch: Batch, outputs: Sequence[object]) -> bool:
        conn, context = self._state()
        where = f"batch {batch.id} of handler {context.handler!r} (app {context.app!r})"
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                key = (context.app, context.handler, batch.id)
                if conn.execute(_IS_COMMITTED, key).fetchone() is not None:
                    conn.execute("ROLLBACK")
                    return False
                self._in_apply = True
                try:
                    self._apply(conn, batch, cast("Sequence[_Out]", outputs))
                except Exception as exc:
                    raise _ApplyFailed from exc
                finally:
                    self._in_apply = False
                ranges = [
                    {
                        "source": r.source,
                        "partition": r.partition,
                        "start": r.start,
                        "until": r.until,
                    }
                    for r in batch.ranges
                ]
                conn.execute(_INSERT_BATCH, (*key, time.time(), orjson.dumps(ranges).decode()))
                conn.executemany(
                    _UPSERT_OFFSET,
                    [(*key, r.source, r.partition, r.start, r.until) for r in batch.ranges],
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except _ApplyFailed as failed:
            cause = failed.__cause__
            hint = ""
            if isinstance(cause, sqlite3.DatabaseError) and "not authorized" in str(cause):
                hint = " (apply must not commit or roll back: the sink commits the batch)"
            message = (
                f"SQLiteSink {self._path}: the apply function failed on {where}: {cause!r}{hint}."
                " The transaction was rolled back, nothing of the batch was written"
            )
            if isinstance(cause, _DATA_ERRORS):
                # The function, or a constraint, refused these outputs: the
                # same outputs would fail again.
                raise OutputError(
                    message + "; the outputs do not fit the function or the table: fix one"
                    " or the other"
                ) from cause
            if isinstance(cause, sqlite3.Error):
                kind = SinkUnavailableError if _is_busy(cause) else SinkError
                raise kind(message + f"; {_advice(cause)}") from cause
            # Anything else (a lookup the function makes, say) may pass.
            raise SinkUnavailableError(message + "; it is tried again") from cause
        except sqlite3.Error as exc:
            kind = SinkUnavailableError if _is_busy(exc) else SinkError
            raise kind(
                f"SQLiteSink {self._path} could not commit {where}: {exc}. The transaction"
                f" was rolled back; {_advice(exc)}"
            ) from exc
        return True

    async def committed_batches(self) -> list[int]:
        """The ids of every batch this app and handler committed, ascending."""
        return await self._run(self._committed_batches_sync)

    def _committed_batches_sync(self) -> list[int]:
        conn, context = self._state()
        rows = conn.execute(
            "SELECT batch_id FROM streamlet_batches WHERE app = ? AND handler = ?"
            " ORDER BY batch_id",
            (context.app, context.handler),
        ).fetchall()
        return [int(row[0]) for row in rows]

    async def last_committed(self) -> int | None:
        """The newest batch id this app and handler committed (0: none)."""
        return await self._run(self._last_committed_sync)

    def _last_committed_sync(self) -> int:
        conn, context = self._state()
        row = conn.execute(
            "SELECT MAX(batch_id) FROM streamlet_batches WHERE app = ? AND handler = ?",
            (context.app, context.handler),
        ).fetchone()
        return int(row[0]) if row is not None and row[0] is not None else 0

    async def committed_ranges(self) -> dict[tuple[str, int], OffsetRange]:
        """Per ``(source, partition)``, the range of the newest committed batch.

        A direct source resumes a partition at ``until`` (the next offset to
        read): offsets stored with the outputs, so outputs and positions can
        never disagree.
        """
        return await self._run(self._committed_ranges_sync)

    def _committed_ranges_sync(self) -> dict[tuple[str, int], OffsetRange]:
        conn, context = self._state()
        rows = conn.execute(
            "SELECT source, partition, start, until FROM streamlet_offsets"
            " WHERE app = ? AND handler = ?",
            (context.app, context.handler),
        ).fetchall()
        return {
            (str(source), int(partition)): OffsetRange(str(source), int(partition), start, until)
            for source, partition, start, until in rows
        }

    async def aclose(self) -> None:
        """Close the connection and stop the sink's thread."""
        executor = self._executor
        if executor is None:
            return
        try:
            await self._run(self._close_sync)
        finally:
            self._executor = None
            self._context = None
            # The close job has run, so the thread is idle; do not join it
            # on the event loop.
            executor.shutdown(wait=False)

    def _close_sync(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


_DATA_ERRORS = (sqlite3.IntegrityError, TypeError, ValueError, KeyError, IndexError)
"""What an apply function raises on outputs it cannot store: the outputs' fault."""


def _is_busy(exc: sqlite3.Error) -> bool:
    """Whether trying again may pass: a lock held by another connection, a full disk."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return False
    return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_FULL)


def _is_disk(exc: sqlite3.Error) -> bool:
    """Whether the disk failed under SQLite (an I/O error), whatever the statement."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF == sqlite3.SQLITE_IOERR


def _roll_back(conn: sqlite3.Connection) -> None:
    """End an open transaction; after an I/O error that may fail too (SQLite rolls back
    when the connection closes, and a hot journal or WAL is undone by the next one)."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _advice(exc: sqlite3.Error) -> str:
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if code is not None else None
    if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return "another connection holds the write lock; the batch is tried again"
    if primary == sqlite3.SQLITE_FULL:
        return "the disk is full: free space on it; the batch is tried again"
    if primary == sqlite3.SQLITE_IOERR:
        return "the disk reported an I/O error: check the device before restarting"
    if primary in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM):
        return "the database is not writable: fix its permissions"
    return "the batch is not committed and runs again on retry or restart"
