"""``streamlet state show``: handlers' keyed state, read from outside the app.

Input: a state directory. Output: one :class:`StoreView` per handler store
``<state_dir>/state/<handler>.sqlite`` and, in group mode, per task store
``<state_dir>/state/<handler>.tasks/t<task>.sqlite`` (this worker's copy of
the changelog partition of a task it holds or held), read in the format
:mod:`streamlet.state._store` documents (``meta`` and ``kv``; keys through
:func:`~streamlet.state._store.decode_key`, values are orjson).

Invariants, so that this is safe beside a running app and on a copy:

- Nothing is written and the state directory's lock is not taken. Each store
  is opened read-only (``mode=ro``); its meta, key count and keys are read in
  one SQLite read transaction, so they all belong to one committed batch
  (``seq``): in WAL mode a reader sees the last commit and never blocks the
  writer.
- Nothing is created. SQLite's read-only WAL reader creates ``-wal`` and
  ``-shm`` files when they are missing, so a store without ``-wal`` (no app
  has it open: closing checkpoints and removes it) is read as ``immutable``
  instead, and the read counts only if the file and its missing ``-wal`` are
  unchanged afterwards; otherwise an app started meanwhile, and the store is
  read again, as a live one. A ``-wal`` left by a crash is read as a live
  one's (it holds committed batches). Residual: an app closing between the
  check and the open leaves the empty ``-wal`` and ``-shm`` SQLite creates,
  which the next start simply uses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import re
import sqlite3
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from streamlet._statedir import MANIFEST, STATE
from streamlet.errors import StateError, StreamletError
from streamlet.state._store import _USER_ONLY, StateKey, decode_key, encode_key

__all__ = [
    "Entry",
    "StateDirView",
    "StoreView",
    "iso_utc",
    "key_candidates",
    "open_state_dir",
    "read_store",
]

_SUFFIX = ".sqlite"
_TASKS = ".tasks"
_TASK_FILE = re.compile(r"t(0|[1-9]\d*)\.sqlite")
_ATTEMPTS = 5
"""Reads of a store that changed from stopped to running while it was read, before giving up."""
_VALUE_WIDTH = 200
"""Characters of a value a listing prints (a lookup prints all)."""


def _key_type(key: StateKey) -> str:
    return type(key).__name__


def iso_utc(seconds: float) -> str:
    """``seconds`` since the epoch as an ISO 8601 UTC time, to the millisecond."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored key."""

    key: StateKey
    value: Any
    """The decoded value."""
    touched: float
    """The batch time of the write that set it (what a ``ttl`` counts from)."""

    @property
    def key_type(self) -> str:
        """``str``, ``bytes`` or ``int``."""
        return _key_type(self.key)

    def to_json(self) -> dict[str, Any]:
        """The entry as JSON-able data; a bytes key as text (undecodable bytes as ``\\xNN``)."""
        key = self.key
        if isinstance(key, bytes):
            key = key.decode("utf-8", "backslashreplace")
        return {
            "key": key,
            "key_type": self.key_type,
            "value": self.value,
            "touched": iso_utc(self.touched),
        }


@dataclass(frozen=True, slots=True)
class StoreView:
    """One handler's store as of one committed batch."""

    handler: str
    path: str
    app: str | None
    state_id: str | None
    seq: int
    """The newest batch whose changes are in the store (0: none yet)."""
    keys: int
    """How many keys it holds (keys past a ``ttl`` stay until the next batch removes them)."""
    ttl: float | None
    """The handler's ``ttl`` as the manifest records it."""
    entries: tuple[Entry, ...]
    """The first keys in key order, or the matches of a lookup."""
    lookup: str | None = None
    """The key looked up (``--key``), or None for a listing."""
    task: int | None = None
    """Group mode: the task whose part of the state this store holds."""
    changelog: int | None = None
    """Group mode: the changelog offset the store holds up to (a lower bound)."""

    def to_json(self) -> dict[str, Any]:
        """The view as JSON-able data."""
        document: dict[str, Any] = {
            "handler": self.handler,
            "path": self.path,
            "app": self.app,
            "state_id": self.state_id,
            "seq": self.seq,
            "keys": self.keys,
            "ttl": self.ttl,
        }
        if self.task is not None:
            document["task"] = self.task
            document["changelog_offset"] = self.changelog
        if self.lookup is not None:
            document["lookup"] = {"key": self.lookup, "found": bool(self.entries)}
        document["entries"] = [e.to_json() for e in self.entries]
        return document

    def describe(self) -> str:
        """A readable, multi-line summary: the store, then its keys or the lookup's matches."""
        ttl = "none" if self.ttl is None else f"{self.ttl:g} s after touched"
        if self.task is None:
            lines = [f"handler {self.handler!r}: {self.path}"]
            lines.append(f"  as of batch {self.seq}; {self.keys} keys; ttl: {ttl}")
        else:
            lines = [f"handler {self.handler!r}, task {self.task}: {self.path}"]
            lines.append(
                f"  this worker's copy, up to changelog offset {self.changelog} (batch"
                f" {self.seq}); the changelog topic is the state itself, and another"
                f" worker may hold the task now; {self.keys} keys; ttl: {ttl}"
            )
        if self.lookup is not None:
            types = " and ".join(e.key_type for e in self.entries)
            tried = ", ".join(_key_type(k) for k in key_candidates(self.lookup))
            found = f"found as {types}" if self.entries else f"not found (as {tried})"
            lines.append(f"  key {self.lookup!r}: {found}")
        for entry in self.entries:
            value = orjson.dumps(entry.value).decode()
            if self.lookup is None and len(value) > _VALUE_WIDTH:
                value = f"{value[:_VALUE_WIDTH]}... ({len(value)} characters; --key for all)"
            lines.append(
                f"  {entry.key!r} ({entry.key_type}) = {value}, touched {iso_utc(entry.touched)}"
            )
        if self.lookup is None and len(self.entries) < self.keys:
            lines.append(
                f"  (the first {len(self.entries)} of {self.keys} keys in key order;"
                " --limit N for more)"
            )
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class StateDirView:
    """A state directory's manifest and its handlers' store files."""

    directory: str
    manifest: Mapping[str, Any]
    stores: Mapping[str, str]
    """Handler name → its store file, for every store present, by name."""
    tasks: Mapping[str, Mapping[int, str]] = dataclasses.field(default_factory=dict)
    """Group mode: handler name → task → its task store file, for every one present."""

    @property
    def app(self) -> str | None:
        app = self.manifest.get("app")
        return app if isinstance(app, str) else None

    def handlers(self) -> dict[str, Mapping[str, Any]]:
        """The manifest's handlers: name → what it records of each."""
        handlers = self.manifest.get("handlers")
        if not isinstance(handlers, dict):
            return {}
        return {name: h if isinstance(h, dict) else {} for name, h in handlers.items()}

    def ttl(self, handler: str) -> float | None:
        """``handler``'s ``ttl`` as the manifest records it (None: for ever, or unknown)."""
        state = self.handlers().get(handler, {}).get("state")
        ttl = state.get("ttl") if isinstance(state, dict) else None
        return float(ttl) if isinstance(ttl, int | float) else None

    def select(self, handler: str | None) -> list[tuple[str, int | None, str]]:
        """The stores to show, as (handler, task or None, file): all, or ``handler``'s.

        Raises:
            StateError: there is no store, or none for ``handler``.
        """
        found: list[tuple[str, int | None, str]] = [
            (name, None, path) for name, path in self.stores.items()
        ]
        found += [
            (name, task, path)
            for name, tasks in self.tasks.items()
            for task, path in sorted(tasks.items())
        ]
        found.sort(key=lambda target: (target[0], -1 if target[1] is None else target[1]))
        if not found:
            raise StateError(self._no_stores())
        if handler is None:
            return found
        mine = [target for target in found if target[0] == handler]
        if mine:
            return mine
        known = ", ".join(sorted({name for name, _, _ in found}))
        declared = self.handlers()
        if handler in declared:
            why = (
                "has no state store yet (the app has not started since it was given state=)"
                if "state" in declared[handler]
                else "has no keyed state (it is registered without state=)"
            )
            raise StateError(f"handler {handler!r} of {self.directory} {why}; with state: {known}")
        raise StateError(
            f"{self.directory} has no handler {handler!r}; handlers with state: {known}"
        )

    def _no_stores(self) -> str:
        where = os.path.join(self.directory, STATE)
        handlers = self.handlers()
        stateful = [name for name, h in handlers.items() if "state" in h]
        if stateful:
            return (
                f"{self.directory} holds no keyed state yet (no {where}{os.sep}*{_SUFFIX}),"
                f" though handler(s) {', '.join(stateful)} have state=: the app has not"
                " started since; run it, then look again"
            )
        names = ", ".join(handlers) or "none"
        return (
            f"{self.directory} holds no keyed state: none of its handlers ({names}, per"
            f" {MANIFEST}) was registered with state=. Keyed state is what a handler keeps"
            " with @app.handler(..., state=sl.State())"
        )


def open_state_dir(directory: str | os.PathLike[str]) -> StateDirView:
    """Read ``directory``'s manifest and find its handlers' stores; change nothing.

    Raises:
        StreamletError: ``directory`` is not a state directory (no manifest),
            or its manifest is not JSON.
        OSError: the directory cannot be read.
    """
    path = os.path.abspath(os.fspath(directory))
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.exists(manifest_path):
        hint = "pass the app's state_dir (default .streamlet/<app name>)"
        parent = os.path.dirname(path)
        if os.path.basename(path) == STATE and os.path.exists(os.path.join(parent, MANIFEST)):
            hint = f"this is the {STATE}/ folder of one: pass {parent}"
        raise StreamletError(f"{path} is not a streamlet state directory (no {MANIFEST}); {hint}")
    with open(manifest_path, "rb") as file:
        raw = file.read()
    try:
        manifest = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise StreamletError(
            f"{manifest_path} is not valid JSON ({exc}); the state directory is damaged"
        ) from None
    if not isinstance(manifest, dict):
        raise StreamletError(
            f"{manifest_path} is not a JSON object; the state directory is damaged"
        )
    stores: dict[str, str] = {}
    tasks: dict[str, dict[int, str]] = {}
    state_dir = os.path.join(path, STATE)
    if os.path.isdir(state_dir):
        for name in sorted(os.listdir(state_dir)):
            where = os.path.join(state_dir, name)
            if name.endswith(_SUFFIX) and len(name) > len(_SUFFIX):
                stores[name[: -len(_SUFFIX)]] = where
            elif name.endswith(_TASKS) and len(name) > len(_TASKS) and os.path.isdir(where):
                # Set-aside copies (``.bad-<time>``) do not match the pattern.
                for entry in sorted(os.listdir(where)):
                    match = _TASK_FILE.fullmatch(entry)
                    if match is not None:
                        handler_tasks = tasks.setdefault(name[: -len(_TASKS)], {})
                        handler_tasks[int(match.group(1))] = os.path.join(where, entry)
    return StateDirView(path, manifest, stores, tasks)


def key_candidates(text: str) -> list[StateKey]:
    """The keys a key typed as ``text`` may mean: the text, its UTF-8 bytes, the integer."""
    candidates: list[StateKey] = [text, text.encode("utf-8", "surrogateescape")]
    with contextlib.suppress(ValueError):
        candidates.append(int(text))
    return candidates


def read_store(
    handler: str,
    path: str,
    *,
    ttl: float | None = None,
    limit: int = 20,
    key: str | None = None,
    task: int | None = None,
) -> StoreView:
    """Read ``handler``'s store at ``path`` as of its last committed batch; change nothing.

    Args:
        handler: the handler's name (checked against the store's ``meta``).
        path: the store file.
        task: group mode, the task the store holds (checked against ``meta``).
        ttl: the handler's ``ttl``, reported as is.
        limit: how many keys to list, in key order (a lookup ignores it).
        key: look this key up (as text, UTF-8 bytes and integer) instead of listing.

    Raises:
        StateError: the file is damaged, not a state store, or another handler's.
        OSError: the file cannot be read.
    """
    for _ in range(_ATTEMPTS):
        live = os.path.exists(path + "-wal")
        before = _stamp(path)
        uri = f"file:{urllib.parse.quote(path)}?mode=ro" + ("" if live else "&immutable=1")
        try:
            view = _read(uri, handler, path, ttl, limit, key, task)
        except sqlite3.DatabaseError as exc:
            if not live and _stamp(path) != before:
                continue
            raise StateError(
                f"state store {path} cannot be read: {exc}. The file is damaged or is not a"
                " state store; the app will refuse it too: restore the state directory from"
                " a backup"
            ) from exc
        if live or (not os.path.exists(path + "-wal") and _stamp(path) == before):
            return view
    raise StateError(
        f"state store {path} kept changing between a stopped and a running app while it was"
        f" read ({_ATTEMPTS} times); try again"
    )


def _stamp(path: str) -> tuple[int, int, int]:
    info = os.stat(path)
    return info.st_ino, info.st_size, info.st_mtime_ns


def _read(
    uri: str,
    handler: str,
    path: str,
    ttl: float | None,
    limit: int,
    key: str | None,
    task: int | None,
) -> StoreView:
    conn = sqlite3.connect(uri, uri=True, isolation_level=None)
    try:
        # One read transaction: meta, count and keys of the same commit.
        conn.execute("BEGIN")
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
        if not tables:
            # The app is creating it (an empty file until its first commit).
            conn.execute("COMMIT")
            empty = None if task is None else 0
            return StoreView(handler, path, None, None, 0, 0, ttl, (), key, task, empty)
        meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
        # streamlet's own entries (windows' books) are not the user's keys.
        (count,) = conn.execute(f"SELECT COUNT(*) FROM kv WHERE {_USER_ONLY}").fetchone()  # noqa: S608
        if key is None:
            rows = conn.execute(
                f"SELECT k, v, touched FROM kv WHERE {_USER_ONLY} ORDER BY k LIMIT ?",  # noqa: S608
                (max(limit, 0),),
            ).fetchall()
        else:
            rows = []
            for candidate in key_candidates(key):
                row = conn.execute(
                    "SELECT k, v, touched FROM kv WHERE k = ?", (encode_key(candidate),)
                ).fetchone()
                if row is not None:
                    rows.append(row)
        conn.execute("COMMIT")
    finally:
        conn.close()
    try:
        seq = int(meta["seq"])
        changelog = int(meta.get("changelog", "0")) if task is not None else None
        entries = tuple(
            Entry(decode_key(bytes(k)), orjson.loads(v), float(touched)) for k, v, touched in rows
        )
    except (KeyError, ValueError, StateError) as exc:
        raise StateError(
            f"state store {path} has damaged rows ({exc!r}); restore the state directory from"
            " a backup"
        ) from None
    if meta.get("handler", handler) != handler:
        raise StateError(
            f"state store {path} belongs to handler {meta['handler']!r}, not {handler!r}: it"
            " was copied or renamed; the app will refuse it"
        )
    found = meta.get("task")
    if found != (None if task is None else str(task)):
        if task is None:
            raise StateError(
                f"state store {path} holds task {found} of group mode, not a one-worker"
                " handler's state: it was copied or renamed; the app will refuse it"
            )
        what = "a one-worker handler's state" if found is None else f"task {found}"
        raise StateError(
            f"state store {path} holds {what}, not task {task}: it was copied or renamed;"
            " the app sets such a copy aside and rebuilds it from the changelog"
        )
    return StoreView(
        handler,
        path,
        meta.get("app"),
        meta.get("state_id"),
        seq,
        int(count),
        ttl,
        entries,
        key,
        task,
        changelog,
    )
