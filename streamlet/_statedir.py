"""The state directory: its lock, its layout and its manifest.

Layout::

    <state_dir>/.lock            flock'd by the one worker that uses the directory
    <state_dir>/app.json         the manifest: what the app is (sources, handlers,
                                 sinks) and the directory's id, made once
    <state_dir>/tracker/         the tracker's write-ahead log
    <state_dir>/data/            the data WAL: receivers' blocks (only with receivers)
    <state_dir>/checkpoints/     checkpoint-<batch id>.json

Invariant: nothing in the directory is written before its lock is held. Two
workers started on one directory would otherwise both find no manifest and
each write one with its own id, and one of them would stamp its sinks with an
id the directory does not hold. The lock is an exclusive ``flock`` on
``.lock``: it belongs to the open file, so it goes with the process and a
crash never leaves it stale.

The manifest stops a state directory from being resumed by a different app,
whose batches would not mean the same thing. Its ``state_id`` names the
directory: batch ids restart from 1 in every new state directory, so sinks
record the id beside the batch ids they commit and refuse another one.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import uuid
from collections.abc import Mapping
from typing import Any

import orjson

from streamlet._upgrade import plan_upgrade
from streamlet.errors import ConfigError
from streamlet.fs import FileSystem, OsFileSystem, lock_held, read_all, try_lock, write_atomic

log = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINTS",
    "DATA",
    "LOCK",
    "MANIFEST",
    "MANIFEST_FORMAT",
    "MANIFEST_VERSION",
    "TRACKER",
    "StateDir",
    "is_locked",
]

LOCK = ".lock"
MANIFEST = "app.json"
TRACKER = "tracker"
DATA = "data"
CHECKPOINTS = "checkpoints"
STATE = "state"
NEW_STATE = "new_state"
MANIFEST_FORMAT = "streamlet.app"
MANIFEST_VERSION = 1
_MANIFEST_KEYS = ("format", "version", "app", "sources", "handlers")


_LOCK_PATIENCE = 1.0
"""Seconds a start waits for the lock: a tool's probe (:func:`is_locked`) holds it an instant."""


def _lock(path: str) -> int:
    """Take the directory's exclusive lock, waiting at most a second; the fd holding it."""
    lock_path = os.path.join(path, LOCK)
    fd = try_lock(lock_path, patience=_LOCK_PATIENCE)
    if fd is None:
        raise ConfigError(
            f"state_dir {path} is in use: another worker (or another App in this process)"
            f" holds its lock {lock_path}. One state directory serves one worker; stop the"
            " other one first, or give this one its own state_dir"
        )
    return fd


def is_locked(path: str) -> bool:
    """Whether a worker holds the lock of the state directory ``path`` now (a shared probe)."""
    return lock_held(os.path.join(path, LOCK))


class StateDir:
    """An app's state directory, locked for as long as it is open.

    Use :meth:`open` (blocking: call it from a worker thread) and
    :meth:`close`.
    """

    def __init__(self, path: str, fs: FileSystem, state_id: str, lock_fd: int | None) -> None:
        self.path = path
        self.fs = fs
        #: The directory's identity, made once when its manifest was written.
        self.state_id = state_id
        self._lock_fd = lock_fd
        #: The app's manifest as written.
        self.manifest: dict[str, Any] = {}
        #: Handlers that gained keyed state in an upgrade and whose store has
        #: not started yet: an empty store is right for them (once), where
        #: for any other handler it means a store was lost.
        self.new_state: set[str] = set()

    @property
    def tracker(self) -> str:
        """The tracker log's directory."""
        return os.path.join(self.path, TRACKER)

    @property
    def data(self) -> str:
        """The data WAL's directory."""
        return os.path.join(self.path, DATA)

    @property
    def checkpoints(self) -> str:
        """The checkpoints' directory."""
        return os.path.join(self.path, CHECKPOINTS)

    @property
    def state(self) -> str:
        """The keyed state's directory (group mode keeps each task's stores under it)."""
        return os.path.join(self.path, STATE)

    def state_store(self, handler: str) -> str:
        """The file of handler ``handler``'s keyed state."""
        return os.path.join(self.path, STATE, f"{handler}.sqlite")

    @classmethod
    def open(cls, path: str, fs: FileSystem, manifest: Mapping[str, Any]) -> StateDir:
        """Lock ``path``, then check its manifest against ``manifest`` (or write it).

        Raises:
            ConfigError: the directory is unusable (permissions, an I/O
                error), in use by another worker, or holds another app's
                manifest.
        """
        lock_fd: int | None = None
        try:
            fs.makedirs(path)
            if isinstance(fs, OsFileSystem):
                _check_permissions(path)
                lock_fd = _lock(path)
            state_id, new_state = _manifest(path, fs, manifest)
        except OSError as exc:
            if lock_fd is not None:
                os.close(lock_fd)
            advice = (
                "the disk is full: free space on it"
                if exc.errno in (errno.ENOSPC, errno.EDQUOT)
                else "fix the path or its permissions, or choose another state_dir"
            )
            raise ConfigError(f"state_dir {path} cannot be used: {exc}; {advice}") from exc
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        opened = cls(path, fs, state_id, lock_fd)
        opened.manifest = dict(manifest)
        opened.new_state = new_state
        return opened

    def state_started(self) -> None:
        """The new handlers' stores exist now: forget :attr:`new_state`."""
        if self.new_state:
            manifest_path = os.path.join(self.path, MANIFEST)
            _write(self.fs, manifest_path, self.manifest, self.state_id, set())
            self.new_state = set()

    def close(self) -> None:
        """Release the lock; the directory may then be opened by another worker."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the fd drops the flock
            self._lock_fd = None


def _check_permissions(path: str) -> None:
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o022:
        raise ConfigError(
            f"state_dir {path} is writable by other users (mode {mode:o});"
            f" run 'chmod 700 {path}' or choose another state_dir"
        )
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise ConfigError(
            f"state_dir {path} is not readable and writable by this user;"
            " fix its permissions or choose another state_dir"
        )


def _manifest(path: str, fs: FileSystem, wanted: Mapping[str, Any]) -> tuple[str, set[str]]:
    """Compare the manifest with ``wanted`` (upgrading it), or write it.

    Returns:
        The state id, and the handlers whose keyed state is new (see
        :attr:`StateDir.new_state`).
    """
    manifest_path = os.path.join(path, MANIFEST)
    if fs.exists(manifest_path):
        try:
            found = orjson.loads(read_all(fs, manifest_path))
        except orjson.JSONDecodeError as exc:
            raise ConfigError(
                f"{manifest_path} is not valid JSON ({exc}); the state directory is"
                " damaged: restore it or choose another state_dir"
            ) from None
        if not isinstance(found, dict):
            raise ConfigError(mismatch(path, manifest_path, found, wanted))
        state_id = str(found.pop("state_id", ""))
        new_state = set(found.pop(NEW_STATE, []))
        if found == dict(wanted):
            return state_id, new_state
        upgrade = plan_upgrade(found, wanted)
        if upgrade.refused:
            raise ConfigError(
                f"state_dir {path} cannot run this version of the app ({manifest_path}): "
                + "; ".join(upgrade.refused)
            )
        stateful = {n for n, h in wanted.get("handlers", {}).items() if "state" in h}
        new_state = (new_state | upgrade.gained_state) & stateful
        for change in upgrade.accepted:
            log.warning("state_dir %s: the app changed: %s", path, change)
        _write(fs, manifest_path, wanted, state_id, new_state)
        return state_id, new_state
    # Under the lock: a leftover temp file is from a crash, never a live writer.
    state_id = uuid.uuid4().hex
    _write(fs, manifest_path, wanted, state_id, set())
    return state_id, set()


def _write(
    fs: FileSystem, manifest_path: str, wanted: Mapping[str, Any], state_id: str, new: set[str]
) -> None:
    body: dict[str, Any] = {**wanted, "state_id": state_id}
    if new:
        body[NEW_STATE] = sorted(new)
    write_atomic(fs, manifest_path, orjson.dumps(body, option=orjson.OPT_INDENT_2))


def mismatch(path: str, manifest_path: str, found: Any, wanted: Mapping[str, Any]) -> str:
    """Why a state directory's manifest refuses this app, and what to do."""
    differences = []
    if not isinstance(found, dict):
        differences.append("the manifest is not a JSON object")
    else:
        for key in _MANIFEST_KEYS:
            if found.get(key) != wanted[key]:
                differences.append(f"{key}: state has {found.get(key)!r}, app has {wanted[key]!r}")
    return (
        f"state_dir {path} belongs to a different app ({manifest_path}): "
        + "; ".join(differences)
        + ". Batches recorded there would not mean the same to this app. Use a new"
        " state_dir for the changed app, or restore the original sources and handlers."
    )
