"""PostgresSink: a batch's rows and streamlet's row for it in one PostgreSQL transaction.

Needs ``asyncpg`` (``pip install 'streamlet[postgres]'``), imported when the
sink opens, not when streamlet is imported.

The user's ``apply(conn, batch, outputs)`` writes the rows; the sink runs it
inside a transaction of its own that also writes streamlet's bookkeeping, so
a crash leaves both or neither.

**Tables** (created at :meth:`PostgresSink.open` if missing; shared by every
app and handler writing to the database, keyed by ``(app, handler)``)::

    streamlet_batches(app, handler, state_id, batch_id, ranges, committed_at)
        one row per committed batch, primary key (app, handler, state_id,
        batch_id); ranges (jsonb) are the batch's input offset ranges,
        [{"source", "partition", "start", "until"}]
    streamlet_offsets(app, handler, source, partition, next_offset, owner,
                      state_id, batch_id, updated_at)
        per source partition, the next offset to read (NULL: none committed
        yet) and, in group mode, the worker that owns the task (a token made
        at each acquire)
    streamlet_state(app, handler, state_id)
        the state directory whose batch ids the handler's rows are keyed by

**A batch's transaction**, in this order:

1. ``INSERT`` its ``streamlet_batches`` row, ``ON CONFLICT DO NOTHING``.
   No row inserted: the batch was committed before, the transaction is
   rolled back and the commit returns False. This insert comes first on
   purpose: a unique index makes it wait for any other transaction still
   holding the same key (an earlier attempt of this batch whose backend has
   not finished), so its answer is final.
2. The offsets: outside group mode an upsert of ``next_offset = until`` per
   range (in the same statement as 1). In group mode the task's rows are
   locked (``SELECT ... FOR UPDATE``, in source order); the commit goes on
   only if this worker's token is still the owner (else
   :class:`~streamlet.errors.FencedError`) and each range starts at the
   stored ``next_offset``; then ``next_offset`` becomes the range's ``until``.
3. ``apply``.
4. ``COMMIT``.

**Failures.** A lost connection, a server shut down or restarting, a
failover (a standby that refuses writes), a serialization failure, a
deadlock or a ``statement_timeout`` make the sink drop the connection and
try the whole transaction again with backoff (0.1 s doubling up to 2 s) for
up to ``retry_timeout`` seconds: these roll the transaction back, so the
outcome is known. When the connection is lost after ``COMMIT`` was sent,
the outcome is unknown; the next attempt resolves it at step 1, from
``streamlet_batches``: the row found means the earlier attempt committed (the
commit returns True, nothing is written twice); no row means it rolled back,
and the batch is written now. The sink never guesses. If the server stays
away past ``retry_timeout``, the commit raises
:class:`~streamlet.errors.SinkUnavailableError` (retriable) and the batch
stays uncommitted; a later commit or a restart resolves it the same way.

**State directory.** Outside group mode, ``streamlet_state`` records the
state directory's id for the app and handler; a sink opened under another
one is refused, as :class:`~streamlet.sinks.sqlite.SQLiteSink` refuses it
(batch ids restart from 1 in a new state directory, so its batches would be
taken for ones already written).

**Group mode.** Batch ids are a worker's own, so a batch is keyed by its
input offsets per task instead. :meth:`PostgresSink.acquire` writes a new
owner token into every row of the task (creating them) and returns their
``next_offset``: where the task resumes. The upsert waits for the row locks
of any transaction of the previous owner still under way, so that
transaction either committed before (and acquire reads its offsets) or
finds the new owner at step 2 and fails with FencedError, writing nothing.
A batch whose ranges end at or below the stored offsets was written (the
commit returns False); one that starts past them or crosses them is
refused (two owners, or a bug).

**Server settings** of the sink's connections: ``statement_timeout``,
``idle_in_transaction_session_timeout`` (so that a worker stopped in the
middle of a transaction does not hold the task's locks for ever) and
``application_name`` ``streamlet/<app>/<handler>``. The password (in the
DSN or in ``connect_options``) is never logged: messages name the sink by
user, host, port and database only.
"""

from __future__ import annotations

import inspect
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Generic, Literal, TypeVar, cast
from urllib.parse import unquote, urlsplit

import anyio
import orjson

from streamlet.errors import (
    ConfigError,
    FencedError,
    OutputError,
    SinkError,
    SinkUnavailableError,
    TaskNotHeldError,
)
from streamlet.kafka.policy import task_standing
from streamlet.records import Batch
from streamlet.sinks.base import Sink, SinkContext, ddl_scripts

__all__ = ["Failure", "PostgresApply", "PostgresSink", "failure_kind"]

log = logging.getLogger(__name__)

_Out = TypeVar("_Out")

PostgresApply = Callable[[Any, Batch, Sequence[_Out]], Awaitable[None] | None]
"""``apply(conn, batch, outputs)``: write a batch's rows with the ``asyncpg.Connection``.

Usually ``async def``; a plain function returning an awaitable (such as
``conn.executemany(...)``) works too. Must not commit or roll back.
"""

Isolation = Literal["read_committed", "repeatable_read", "serializable"]
Failure = Literal["retry", "unknown", "output", "config", "error"]

_T = TypeVar("_T")

_FIRST_BACKOFF = 0.1
_MAX_BACKOFF = 2.0
_ACQUIRE_TIMEOUT = 30.0
"""Seconds a commit waits for a pooled connection before it counts as a retriable failure."""
# One lock id for every streamlet DDL transaction: workers starting together
# would otherwise race on CREATE TABLE IF NOT EXISTS (a unique violation).
_DDL_LOCK = 0x5354524D4C4554  # "STRMLET"

_BOOKKEEPING = """
CREATE TABLE IF NOT EXISTS streamlet_batches (
    app text NOT NULL,
    handler text NOT NULL,
    state_id text NOT NULL,
    batch_id bigint NOT NULL,
    ranges jsonb NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app, handler, state_id, batch_id)
);
CREATE TABLE IF NOT EXISTS streamlet_offsets (
    app text NOT NULL,
    handler text NOT NULL,
    source text NOT NULL,
    partition integer NOT NULL,
    next_offset bigint,
    owner text,
    state_id text,
    batch_id bigint,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app, handler, source, partition)
);
CREATE TABLE IF NOT EXISTS streamlet_state (
    app text NOT NULL,
    handler text NOT NULL,
    state_id text NOT NULL,
    PRIMARY KEY (app, handler)
);
"""

# Step 1 and, outside group mode, step 2 in one round trip. The offsets are
# written only when the batch row was (a data-modifying CTE's RETURNING).
_RECORD_BATCH = """
WITH batch AS (
    INSERT INTO streamlet_batches (app, handler, state_id, batch_id, ranges)
    VALUES ($1, $2, $3, $4, $5::jsonb)
    ON CONFLICT DO NOTHING
    RETURNING batch_id
), moved AS (
    INSERT INTO streamlet_offsets AS o
        (app, handler, source, partition, next_offset, state_id, batch_id)
    SELECT $1, $2, r.source, r.partition, r.until, $3, $4
    FROM unnest($6::text[], $7::integer[], $8::bigint[]) AS r(source, partition, until)
    WHERE $9 AND EXISTS (SELECT 1 FROM batch)
    ON CONFLICT (app, handler, source, partition) DO UPDATE SET
        next_offset = excluded.next_offset, state_id = excluded.state_id,
        batch_id = excluded.batch_id, updated_at = now()
)
SELECT count(*) FROM batch
"""
# Only the batch's sources: a row of a source the app no longer has keeps
# its old owner, and would fence every commit.
_LOCK_TASK = """
SELECT source, next_offset, owner FROM streamlet_offsets
WHERE app = $1 AND handler = $2 AND partition = $3 AND source = ANY($4::text[])
ORDER BY source FOR UPDATE
"""
_ADVANCE_TASK = """
UPDATE streamlet_offsets AS o SET
    next_offset = r.until, state_id = $4, batch_id = $5, updated_at = now()
FROM unnest($6::text[], $7::bigint[]) AS r(source, until)
WHERE o.app = $1 AND o.handler = $2 AND o.partition = $3 AND o.source = r.source
"""
# Rows upserted in source order, as _LOCK_TASK locks them: no deadlock
# between an acquire and the old owner's commit.
_ACQUIRE = """
INSERT INTO streamlet_offsets AS o (app, handler, source, partition, owner)
SELECT $1, $2, s.source, $3, $4 FROM unnest($5::text[]) AS s(source) ORDER BY s.source
ON CONFLICT (app, handler, source, partition) DO UPDATE SET
    owner = excluded.owner, updated_at = now()
RETURNING source, next_offset
"""

# SQLSTATEs after which the transaction is rolled back and trying again may
# pass: serialization failure, deadlock, statement_timeout, lock not
# available, a server shutting down, crashed or starting, a read-only
# standby (a failover not finished), an idle transaction killed.
_RETRY_STATES = {
    "40001",
    "40P01",
    "57014",
    "55P03",
    "57P01",
    "57P02",
    "57P03",
    "25006",
    "25P03",
    "58000",
    "58030",
}
_RETRY_CLASSES = ("08", "53")  # connection exceptions; insufficient resources
_OUTPUT_CLASSES = ("22", "23")  # data exceptions; integrity constraint violations
_CONFIG_STATES = {"3D000"}  # the database does not exist
_CONFIG_CLASSES = ("28",)  # authorization: user, password
_KNOWN_AT_COMMIT = {"40001", "40P01"}  # a refusal of the COMMIT itself


def failure_kind(exc: BaseException, *, committing: bool = False, closed: bool = False) -> Failure:
    """What a failed statement of the sink (or of ``apply``) means; pure.

    Args:
        exc: the exception.
        committing: ``COMMIT`` had been sent when it failed.
        closed: the connection is closed after it.

    Returns:
        ``"retry"``: rolled back, and trying again may pass (a lost
        connection, a failover, a serialization failure, a deadlock, a
        timeout). ``"unknown"``: the connection failed after ``COMMIT`` was
        sent, so the batch may be committed; the next attempt resolves it.
        ``"output"``: the outputs do not fit the table or the function
        (PostgreSQL classes 22 and 23, values the driver cannot encode,
        TypeError, ValueError, KeyError, IndexError). ``"config"``: the
        user or password is refused, or the database does not exist.
        ``"error"``: anything else (an SQL error in the function, a missing
        table): not retriable.
    """
    kind = _kind(exc, closed=closed)
    if committing and kind == "retry":
        state = getattr(exc, "sqlstate", None)
        return "retry" if state in _KNOWN_AT_COMMIT else "unknown"
    return kind


def _kind(exc: BaseException, *, closed: bool) -> Failure:
    state = getattr(exc, "sqlstate", None)
    if isinstance(state, str) and len(state) == 5:
        if state == "40003":  # statement completion unknown
            return "unknown"
        if state in _RETRY_STATES or state.startswith(_RETRY_CLASSES):
            return "retry"
        if state.startswith(_OUTPUT_CLASSES):
            return "output"
        if state in _CONFIG_STATES or state.startswith(_CONFIG_CLASSES):
            return "config"
        return "error"
    name = type(exc).__name__
    module = type(exc).__module__
    if module.startswith("asyncpg"):
        if name == "DataError":  # the driver cannot encode a value
            return "output"
        if name in ("TargetServerAttributeNotMatched", "ConnectionDoesNotExistError"):
            return "retry"
        # InterfaceError and friends: a closed connection is one more lost
        # connection; on an open one they are misuse (a missing await).
        return "retry" if closed else "error"
    if isinstance(exc, (OSError, TimeoutError, EOFError)):
        return "retry"
    if isinstance(exc, (TypeError, ValueError, KeyError, IndexError)):
        return "output"
    return "error"


class _Retry(Exception):
    """One attempt failed in a way another attempt may not (``unknown``: COMMIT was sent)."""

    def __init__(self, cause: BaseException, *, unknown: bool) -> None:
        super().__init__(cause)
        self.cause = cause
        self.unknown = unknown


class _ApplyFailed(Exception):
    """Carries the user's exception out of the transaction to be classified and wrapped."""


async def _keep_session(conn: Any) -> None:
    """The pool's reset of a connection given back: nothing beyond asyncpg's own.

    asyncpg rolls back a transaction left open (there is none: every attempt
    commits, rolls back or drops its connection) before it calls this. Its
    default reset would add a round trip per batch (``RESET ALL``, ``UNLISTEN
    *``, ...) for session state that apply functions must not leave behind.
    """


def _discard(conn: Any) -> bool:
    """Close ``conn`` at once (the server rolls back its transaction); whether it was closed.

    A connection the driver found broken has already left the pool, and its
    pool proxy then refuses every call: that is a closed connection too.
    """
    try:
        closed = bool(conn.is_closed())
    except Exception:
        return True
    conn.terminate()
    return closed


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class PostgresSink(Sink, Generic[_Out]):
    """Writes each batch through ``apply`` in one PostgreSQL transaction, exactly once.

    Args:
        dsn: ``postgresql://user[:password]@host[:port][,host2...]/database[?options]``
            (asyncpg's form; several hosts for a failover pair). The
            password may also come from ``connect_options``, ``PGPASSWORD``
            or ``~/.pgpass``. Connections ask for a read-write server
            (``target_session_attrs=read-write``) unless the DSN says
            otherwise.
        apply: ``apply(conn, batch, outputs)``: writes the batch's rows
            with ``conn`` (an ``asyncpg.Connection``) inside the sink's
            transaction; must not commit or roll back, nor leave session
            state behind (``SET`` without ``LOCAL``, session advisory locks,
            ``LISTEN``): connections are reused without a reset.
        table_ddl: SQL run in one transaction at every :meth:`open` (a
            script, or a list of them). Write it idempotent (``CREATE TABLE
            IF NOT EXISTS``).
        min_connections: connections the pool keeps open even when idle. With
            the default 0 a connection is made when first needed and kept
            while in use (and 5 minutes idle); above 0 the pool also
            reconnects on its own after an outage, logging each try.
        max_connections: the pool's limit.
        statement_timeout: seconds one statement may run (the server's
            ``statement_timeout``; 0: no limit). Also bounds how long a
            commit or an acquire waits for locks.
        idle_in_transaction_timeout: seconds the server keeps a
            transaction of the sink's that sends nothing (0: for ever).
        retry_timeout: seconds a commit (or open, or acquire) keeps trying
            while the server is unreachable or rolls the transaction back.
        isolation: the transaction's isolation level.
        connect_options: more keyword arguments for ``asyncpg.connect``
            (``ssl``, ``password``, ``server_settings``...).

    Raises:
        ConfigError: a setting is out of range or ``apply`` is not callable.
    """

    def __init__(
        self,
        dsn: str,
        apply: PostgresApply[_Out],
        *,
        table_ddl: str | Sequence[str] | None = None,
        min_connections: int = 0,
        max_connections: int = 4,
        statement_timeout: float = 60.0,
        idle_in_transaction_timeout: float = 60.0,
        retry_timeout: float = 120.0,
        isolation: Isolation = "read_committed",
        connect_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not callable(apply):
            raise ConfigError(f"PostgresSink apply must be a function, not {type(apply).__name__}")
        if not isinstance(dsn, str) or urlsplit(dsn).scheme not in ("postgresql", "postgres"):
            raise ConfigError("PostgresSink dsn must be a postgresql://user@host:port/database URL")
        scripts = ddl_scripts("PostgresSink", table_ddl)
        if not 0 <= min_connections <= max_connections or max_connections < 1:
            raise ConfigError(
                "PostgresSink needs 0 <= min_connections <= max_connections and"
                f" max_connections >= 1, not {min_connections} and {max_connections}"
            )
        for name, value in (
            ("statement_timeout", statement_timeout),
            ("idle_in_transaction_timeout", idle_in_transaction_timeout),
            ("retry_timeout", retry_timeout),
        ):
            if not value >= 0:
                raise ConfigError(f"PostgresSink {name} must be >= 0 seconds, not {value!r}")
        if isolation not in ("read_committed", "repeatable_read", "serializable"):
            raise ConfigError(f"PostgresSink isolation {isolation!r} is not a known level")
        self._dsn = dsn
        self._apply = apply
        self._ddl = scripts
        self._min = min_connections
        self._max = max_connections
        self._statement_timeout = statement_timeout
        self._idle_timeout = idle_in_transaction_timeout
        self._retry_timeout = retry_timeout
        self._isolation: Isolation = isolation
        self._connect_options = dict(connect_options or {})
        self._context: SinkContext | None = None
        self._pool: Any = None
        # Connections of finished commits, held for the next ones.
        self._spare: list[Any] = []
        self._owners: dict[int, str] = {}

    # -- naming ---------------------------------------------------------------------

    def describe(self) -> str:
        """``PostgresSink(user@host:port/database)``: never the password."""
        parts = urlsplit(self._dsn)
        netloc = parts.netloc.rpartition("@")
        user = unquote(netloc[0].partition(":")[0]) if netloc[1] else ""
        where = f"{user}@{netloc[2]}" if user else netloc[2]
        return f"PostgresSink({where}{parts.path})"

    def _where(self) -> str:
        context = self._context
        if context is None:
            return self.describe()
        return f"{self.describe()} of handler {context.handler!r} (app {context.app!r})"

    # -- connections ----------------------------------------------------------------

    def _asyncpg(self) -> Any:
        try:
            import asyncpg  # optional: `streamlet[postgres]`, loaded on use
        except ImportError as exc:
            raise ConfigError(
                "PostgresSink needs asyncpg: pip install 'streamlet[postgres]'"
            ) from exc
        return asyncpg

    def _pool_options(self, context: SinkContext) -> dict[str, Any]:
        options = dict(self._connect_options)
        settings = {
            "application_name": f"streamlet/{context.app}/{context.handler}"[:63],
            "statement_timeout": str(round(self._statement_timeout * 1000)),
            "idle_in_transaction_session_timeout": str(round(self._idle_timeout * 1000)),
        }
        settings.update(options.pop("server_settings", None) or {})
        options["server_settings"] = settings
        if "target_session_attrs" not in self._dsn and "target_session_attrs" not in options:
            options["target_session_attrs"] = "read-write"
        if self._statement_timeout > 0 and "command_timeout" not in options:
            # The client's own limit, for a server that stopped answering
            # (a network partition): the server's limit cannot fire then.
            options["command_timeout"] = self._statement_timeout + 10.0
        return options

    async def open(self, context: SinkContext) -> None:
        """Connect, run ``table_ddl``, create streamlet's tables, check the state directory.

        Waits up to ``retry_timeout`` for a server that is down or starting.

        Raises:
            ConfigError: asyncpg is missing, the credentials or the database
                are refused, ``table_ddl`` fails, or (outside group mode) the
                handler's rows were written under another state directory.
            SinkUnavailableError: the server stayed unreachable.
        """
        if self._pool is not None:
            raise SinkError(f"{self.describe()} is already open")
        asyncpg = self._asyncpg()
        self._context = context
        options = self._pool_options(context)

        async def connect() -> Any:
            return await asyncpg.create_pool(
                self._dsn, min_size=self._min, max_size=self._max, reset=_keep_session, **options
            )

        try:
            self._pool = await self._retrying("connecting", connect)
            await self._retrying("creating the tables", self._prepare)
        except BaseException:
            pool, self._pool = self._pool, None
            if pool is not None:
                pool.terminate()
            self._context = None
            raise

    async def _prepare(self) -> None:
        context = self._require()
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _DDL_LOCK)
            for index, script in enumerate(self._ddl):
                try:
                    await conn.execute(script)
                except Exception as exc:
                    if failure_kind(exc, closed=conn.is_closed()) in ("retry", "unknown"):
                        raise
                    raise ConfigError(
                        f"{self._where()}: table_ddl script {index + 1} failed: {_describe(exc)}"
                        f" ({script.strip()[:200]!r}); fix the DDL"
                    ) from exc
            await conn.execute(_BOOKKEEPING)
            if context.group is None and context.state_id:
                await self._check_state_id(conn, context)

    async def _check_state_id(self, conn: Any, context: SinkContext) -> None:
        """Refuse a database whose rows for this handler were keyed by another state directory."""
        found = await conn.fetchval(
            "SELECT state_id FROM streamlet_state WHERE app = $1 AND handler = $2",
            context.app,
            context.handler,
        )
        if found is None:
            await conn.execute(
                "INSERT INTO streamlet_state (app, handler, state_id) VALUES ($1, $2, $3)",
                context.app,
                context.handler,
                context.state_id,
            )
        elif found != context.state_id:
            raise ConfigError(
                f"{self.describe()} holds batches of app {context.app!r}, handler"
                f" {context.handler!r} written under another state directory (id {found});"
                f" this app's state_dir {context.state_dir} has id {context.state_id}. Batch"
                " ids restart with a new state directory, so its batches would be taken for"
                " ones already written and skipped. Restore the original state_dir, or write"
                " to another database (or delete this app and handler's rows from"
                " streamlet_batches, streamlet_offsets and streamlet_state if the old outputs"
                " are unwanted)"
            )

    def _require(self) -> SinkContext:
        if self._pool is None or self._context is None:
            raise SinkError(f"{self.describe()} is not open; call open() first")
        return self._context

    async def _retrying(self, what: str, call: Callable[[], Awaitable[_T]]) -> _T:
        """``call()``, tried again with backoff for ``retry_timeout`` while failures may pass."""
        deadline = time.monotonic() + self._retry_timeout
        backoff = _FIRST_BACKOFF
        attempt = 0
        while True:
            attempt += 1
            try:
                return await call()
            except (ConfigError, SinkError):
                raise
            except Exception as exc:
                kind = failure_kind(exc, closed=True)
                if kind == "config":
                    raise ConfigError(
                        f"{self.describe()}: the server refused {what}: {_describe(exc)}; check"
                        " the user, the password and the database"
                    ) from exc
                if kind not in ("retry", "unknown"):
                    raise SinkError(f"{self._where()}: {what} failed: {_describe(exc)}") from exc
                error = exc
            left = deadline - time.monotonic()
            if left <= 0:
                raise SinkUnavailableError(
                    f"{self._where()}: {what} did not succeed within retry_timeout="
                    f"{self._retry_timeout:g}s ({attempt} attempt(s)); last error:"
                    f" {_describe(error)}. Check that the server is up and reachable"
                ) from error
            pause = min(backoff, left)
            log.warning(
                "%s: %s failed (attempt %d): %s; retrying in %.2fs",
                self._where(),
                what,
                attempt,
                _describe(error),
                pause,
            )
            await anyio.sleep(pause)
            backoff = min(backoff * 2, _MAX_BACKOFF)

    # -- committing -----------------------------------------------------------------

    async def commit(self, batch: Batch, outputs: Sequence[object]) -> bool:
        """Run ``apply`` and record the batch in one transaction, unless it is recorded.

        Returns:
            True if the batch is committed by this call (or by an earlier
            attempt of it whose outcome was unknown), False if it had been
            committed before.

        Raises:
            OutputError: the outputs do not fit the function or the table.
            FencedError: group mode: another worker took the task over.
            SinkUnavailableError: the server stayed unreachable for
                ``retry_timeout``, or ``apply`` raised an exception that
                may pass; nothing of the batch is committed, or an unknown
                outcome is still to be resolved by the next commit.
            SinkError: an SQL error in ``apply`` or in the DDL's tables, or
                a batch that does not follow its task's offsets.
        """
        context = self._require()
        task = self._task_of(batch) if context.group is not None else None
        deadline = time.monotonic() + self._retry_timeout
        backoff = _FIRST_BACKOFF
        unknown = False
        attempt = 0
        while True:
            attempt += 1
            try:
                written = await self._attempt(context, batch, outputs, task)
            except _Retry as failed:
                error = failed.cause
                if failed.unknown and not unknown:
                    unknown = True
                    log.warning(
                        "%s: the connection failed while batch %d was committing (%s): the"
                        " outcome is unknown; it is resolved from streamlet_batches",
                        self._where(),
                        batch.id,
                        _describe(error),
                    )
            else:
                if unknown:
                    log.warning(
                        "%s: batch %d, whose commit outcome was unknown, %s",
                        self._where(),
                        batch.id,
                        "had been committed; nothing was written again"
                        if not written
                        else "had not been committed; it is committed now",
                    )
                    return True
                return written
            left = deadline - time.monotonic()
            if left <= 0:
                still = (
                    " Its outcome is still unknown: the next commit of the batch resolves it"
                    " from streamlet_batches."
                    if unknown
                    else " Nothing of it was committed."
                )
                raise SinkUnavailableError(
                    f"{self._where()} could not commit batch {batch.id} within retry_timeout="
                    f"{self._retry_timeout:g}s ({attempt} attempt(s)); last error:"
                    f" {_describe(error)}.{still}"
                ) from error
            pause = min(backoff, left)
            log.warning(
                "%s: batch %d: %s (attempt %d); retrying in %.2fs",
                self._where(),
                batch.id,
                _describe(error),
                attempt,
                pause,
            )
            await anyio.sleep(pause)
            backoff = min(backoff * 2, _MAX_BACKOFF)

    async def _attempt(
        self, context: SinkContext, batch: Batch, outputs: Sequence[object], task: int | None
    ) -> bool:
        """One transaction; raises :class:`_Retry` for failures another attempt may fix."""
        conn = self._spare.pop() if self._spare else None
        if conn is None:
            try:
                conn = await self._pool.acquire(timeout=_ACQUIRE_TIMEOUT)
            except TimeoutError as exc:
                raise _Retry(exc, unknown=False) from exc
            except Exception as exc:
                if failure_kind(exc, closed=True) in ("retry", "unknown"):
                    raise _Retry(exc, unknown=False) from exc
                raise
        committing = False
        healthy = False
        try:
            written = await self._transact(conn, context, batch, outputs, task)
            if written is None:
                committing = True
                await conn.execute("COMMIT")
                written = True
            else:
                await conn.execute("ROLLBACK")
            healthy = True
            return written
        except _ApplyFailed as failed:
            closed = _discard(conn)
            raise self._apply_error(failed, batch, closed=closed) from failed.__cause__
        except (ConfigError, SinkError):
            _discard(conn)
            raise
        except Exception as exc:
            closed = _discard(conn)
            kind = failure_kind(exc, committing=committing, closed=closed)
            if kind in ("retry", "unknown"):
                raise _Retry(exc, unknown=kind == "unknown") from exc
            raise self._sql_error(exc, batch, kind) from exc
        except BaseException:
            # Cancelled: the server rolls back what did not reach COMMIT; a
            # COMMIT under way is resolved by the batch's next commit.
            _discard(conn)
            raise
        finally:
            if healthy and not self._spare:
                # One kept for the next batch, out of the pool: a pool round
                # trip per batch costs as much as one more statement. Only
                # one: commits of several tasks at once would otherwise keep
                # every connection out of the pool, and the next acquire
                # would wait for ever.
                self._spare.append(conn)
            else:
                await self._release(conn)

    async def _release(self, conn: Any, pool: Any = None) -> None:
        """Give ``conn`` back to the pool; a no-op for a discarded one (it left the pool).

        If that fails, the pool drops the connection, and what the attempt
        decided stands.
        """
        with anyio.CancelScope(shield=True):
            try:
                await (pool or self._pool).release(conn)
            except Exception as exc:
                log.debug(
                    "%s: a connection failed as it went back to the pool: %r", self._where(), exc
                )

    async def _transact(
        self,
        conn: Any,
        context: SinkContext,
        batch: Batch,
        outputs: Sequence[object],
        task: int | None,
    ) -> bool | None:
        """Steps 1-3 of the module docstring; None: commit now, a bool: roll back, return it."""
        isolation = self._isolation.replace("_", " ").upper()
        await conn.execute(f"BEGIN ISOLATION LEVEL {isolation}")
        ends: dict[tuple[str, int], int] = {}
        for r in batch.ranges:
            key = (r.source, r.partition)
            ends[key] = max(ends.get(key, r.until), r.until)
        ranges = orjson.dumps(
            [
                {"source": r.source, "partition": r.partition, "start": r.start, "until": r.until}
                for r in batch.ranges
            ]
        ).decode()
        inserted = await conn.fetchval(
            _RECORD_BATCH,
            context.app,
            context.handler,
            context.state_id,
            batch.id,
            ranges,
            [s for s, _ in ends],
            [p for _, p in ends],
            list(ends.values()),
            task is None,
        )
        if not inserted:
            return False
        if task is not None and not await self._advance_task(conn, context, batch, task):
            return False
        try:
            result = self._apply(conn, batch, cast("Sequence[_Out]", outputs))
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            raise _ApplyFailed from exc
        if not conn.is_in_transaction():
            raise SinkError(
                f"{self._where()}: the apply function ended the sink's transaction on batch"
                f" {batch.id} (a COMMIT or ROLLBACK): the batch's row and part of its rows may"
                " be committed apart from the rest. apply must not commit or roll back: the"
                " sink commits the batch. Check the table for this batch before restarting"
            )
        return None

    async def _advance_task(self, conn: Any, context: SinkContext, batch: Batch, task: int) -> bool:
        """Group mode, step 2: lock the task's rows, check owner and offsets, advance them.

        Returns False when the batch's input was committed before.
        """
        owner = self._owners.get(task)
        if owner is None:
            raise TaskNotHeldError(
                f"{self._where()}: batch {batch.id} belongs to task {task}, which this worker"
                f" has not acquired (or has released); call acquire({task}) first"
            )
        sources = sorted({r.source for r in batch.ranges})
        rows = await conn.fetch(_LOCK_TASK, context.app, context.handler, task, sources)
        holders = {row["owner"] for row in rows}
        if holders != {owner}:
            others = sorted(str(h) for h in holders - {owner})
            raise FencedError(
                f"{self._where()}: task {task} was taken over by another worker (owner"
                f" {', '.join(others) or 'none'}; this worker's {owner}) while batch"
                f" {batch.id} ran. Nothing of the batch was written; the new owner resumes"
                " from the task's offsets"
            )
        marker = {
            str(row["source"]): int(row["next_offset"])
            for row in rows
            if row["next_offset"] is not None
        }
        standing = task_standing(batch.ranges, marker)
        if standing == "written":
            return False
        if standing != "write":
            at = ", ".join(f"{name} {offset}" for name, offset in sorted(marker.items()))
            reads = ", ".join(
                f"{r.source}[{r.partition}] {r.start}..{r.until}" for r in batch.ranges
            )
            raise SinkError(
                f"{self._where()}: batch {batch.id} of task {task} reads {reads},"
                f" but the task's offsets say its input resumes at {at}: the batch"
                + (" starts past them" if standing == "gap" else " overlaps what was committed")
                + ". Two workers own the task, or its input did not resume where acquire()"
                " said. Nothing of the batch is written"
            )
        missing = {r.source for r in batch.ranges} - {str(row["source"]) for row in rows}
        if missing:
            raise SinkError(
                f"{self._where()}: batch {batch.id} reads {', '.join(sorted(missing))}, which"
                f" task {task} has no offsets row for; in group mode a handler reads the app's"
                " Kafka sources only"
            )
        ends = {r.source: r.until for r in batch.ranges}
        await conn.execute(
            _ADVANCE_TASK,
            context.app,
            context.handler,
            task,
            context.state_id,
            batch.id,
            list(ends),
            list(ends.values()),
        )
        return True

    def _apply_error(self, failed: _ApplyFailed, batch: Batch, *, closed: bool) -> Exception:
        cause = failed.__cause__
        assert cause is not None
        kind = failure_kind(cause, closed=closed)
        message = (
            f"{self._where()}: the apply function failed on batch {batch.id}:"
            f" {_describe(cause)}. The transaction was rolled back, nothing of the batch was"
            " written"
        )
        if kind in ("retry", "unknown"):
            return _Retry(cause, unknown=False)
        if kind == "output":
            return OutputError(
                message + "; the outputs do not fit the function or the table: fix one or the other"
            )
        if getattr(cause, "sqlstate", None) is not None:
            return SinkError(message + "; fix the SQL of the apply function or the table")
        # Anything else (a lookup the function makes, say) may pass.
        return SinkUnavailableError(message + "; it is tried again")

    def _sql_error(self, exc: Exception, batch: Batch, kind: Failure) -> Exception:
        message = f"{self._where()} could not commit batch {batch.id}: {_describe(exc)}"
        if kind == "output":
            return OutputError(message + "; the outputs do not fit the table")
        return SinkError(message + ". The transaction was rolled back")

    # -- reading back ---------------------------------------------------------------

    async def _read(self, what: str, query: str, *args: object) -> list[Any]:
        self._require()

        async def read() -> list[Any]:
            async with self._pool.acquire() as conn:
                return list(await conn.fetch(query, *args))

        return await self._retrying(what, read)

    async def last_committed(self) -> int | None:
        """The newest batch id this app, handler and state directory committed (0: none)."""
        context = self._require()
        rows = await self._read(
            "reading the last batch",
            "SELECT coalesce(max(batch_id), 0) FROM streamlet_batches"
            " WHERE app = $1 AND handler = $2 AND state_id = $3",
            context.app,
            context.handler,
            context.state_id,
        )
        return int(rows[0][0])

    async def committed_batches(self) -> list[int]:
        """The ids of every batch this app, handler and state directory committed, ascending."""
        context = self._require()
        rows = await self._read(
            "reading the batches",
            "SELECT batch_id FROM streamlet_batches WHERE app = $1 AND handler = $2"
            " AND state_id = $3 ORDER BY batch_id",
            context.app,
            context.handler,
            context.state_id,
        )
        return [int(row[0]) for row in rows]

    async def committed_offsets(self) -> dict[tuple[str, int], int]:
        """Per ``(source, partition)``, the next offset to read, as committed with the rows."""
        context = self._require()
        rows = await self._read(
            "reading the offsets",
            "SELECT source, partition, next_offset FROM streamlet_offsets"
            " WHERE app = $1 AND handler = $2 AND next_offset IS NOT NULL",
            context.app,
            context.handler,
        )
        return {(str(s), int(p)): int(o) for s, p, o in rows}

    # -- group mode -----------------------------------------------------------------

    def _task_of(self, batch: Batch) -> int:
        partitions = {r.partition for r in batch.ranges}
        if len(partitions) != 1:
            raise SinkError(
                f"{self._where()}: batch {batch.id} reads"
                f" {len(partitions)} partitions; in group mode a batch reads one partition (its"
                " task) of the app's Kafka sources"
            )
        return partitions.pop()

    async def acquire(self, task: int) -> Mapping[str, int] | None:
        """Group mode: make this worker the task's owner; where its input resumes.

        Writes a new owner token into the task's rows of ``streamlet_offsets``
        (one per Kafka source of the app), waiting for the row locks of a
        transaction of the previous owner still under way. From then on,
        that owner's commits of the task fail with FencedError.

        Returns:
            Source name -> the next offset of its partition ``task`` to
            read, for each source with a committed batch; None outside
            group mode.

        Raises:
            SinkUnavailableError: the server stayed unreachable.
        """
        context = self._require()
        if context.group is None:
            return None
        owner = f"{context.state_id[:8] or 'worker'}-{secrets.token_hex(6)}"
        sources = sorted(context.source_topics)
        rows = await self._read(
            f"taking task {task} over",
            _ACQUIRE,
            context.app,
            context.handler,
            task,
            owner,
            sources,
        )
        self._owners[task] = owner
        positions = {
            str(row["source"]): int(row["next_offset"])
            for row in rows
            if row["next_offset"] is not None
        }
        log.info(
            "%s: task %d acquired (owner %s), resumes at %s",
            self._where(),
            task,
            owner,
            positions or "the sources' start (no offsets)",
        )
        return positions

    async def release(self, task: int) -> None:
        """Group mode: forget the task; its next owner's acquire fences this worker anyway."""
        self._owners.pop(task, None)

    async def aclose(self) -> None:
        """Close the pool (a commit still running is cut; the server rolls it back)."""
        pool, self._pool = self._pool, None
        self._context = None
        if pool is None:
            return
        spare, self._spare = self._spare, []
        for conn in spare:
            await self._release(conn, pool)
        try:
            with anyio.fail_after(5):
                await pool.close()
        except (TimeoutError, OSError):
            pool.terminate()
