"""What a stateful handler sees: a dict-like view of its state for one batch.

The view starts as the state after the previous batch. Reads go to the
store (:mod:`streamlet.state._store`); changes stay in the view until the
handler returned, then :meth:`KeyedState.changes` encodes them, and the
scheduler commits them after the batch's sinks. A failed attempt's view is
thrown away, so a retry starts from the same state again.

Values behave as in a dict: a value read and then changed in place
(``state[k].append(x)``) is stored changed, because every value the batch
read is encoded again at the end and compared with what was read.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import orjson

from streamlet.errors import StateError
from streamlet.state._store import (
    INTERNAL,
    Changes,
    StateKey,
    StateStore,
    decode_key,
    encode_key,
)

__all__ = ["KeyedState"]

_DELETED: Any = object()


class KeyedState(MutableMapping[StateKey, Any]):
    """A handler's keyed state during one batch: a ``MutableMapping`` persisted exactly once.

    Keys are ``str``, ``bytes`` or ``int``; values anything orjson encodes
    (dicts, lists, numbers, strings, booleans, None). Never pickled.

    Attributes:
        time: the batch's time (seconds since the epoch): what ``ttl`` and
            processing-time windows count with.
        batch_id: the batch.
        expired: with a ``ttl``, the keys whose time ran out by this batch
            and their last values: they are gone from the state (unless the
            handler sets them again), and the handler may emit a final
            output for each, as ``mapWithState`` timeouts do.
    """

    def __init__(self, store: StateStore, batch_id: int, time: float) -> None:
        self._store = store
        self.batch_id = batch_id
        self.time = time
        self._changed: dict[bytes, Any] = {}
        self._read: dict[bytes, tuple[bytes, Any]] = {}
        expired = store.expired(time)
        self._expired_keys = frozenset(k for k, _ in expired)
        self.expired: Mapping[StateKey, Any] = {decode_key(k): orjson.loads(v) for k, v in expired}

    def _key(self, key: object) -> bytes:
        try:
            return encode_key(key)
        except TypeError as exc:
            raise StateError(
                f"handler {self._store.handler!r}, batch {self.batch_id}: {exc} (key {key!r})"
            ) from None

    def __getitem__(self, key: StateKey) -> Any:
        return self._get(self._key(key), key)

    def _get(self, k: bytes, key: object) -> Any:
        if k in self._changed:
            value = self._changed[k]
            if value is _DELETED:
                raise KeyError(key)
            return value
        seen = self._read.get(k)
        if seen is not None:
            return seen[1]
        raw = self._store.read(k, self.time)
        if raw is None:
            raise KeyError(key)
        value = orjson.loads(raw)
        self._read[k] = (raw, value)
        return value

    def __setitem__(self, key: StateKey, value: Any) -> None:
        self._changed[self._key(key)] = value

    def __delitem__(self, key: StateKey) -> None:
        self[key]
        self._changed[self._key(key)] = _DELETED

    def __contains__(self, key: object) -> bool:
        try:
            self[key]  # type: ignore[index]
        except KeyError:
            return False
        return True

    def __iter__(self) -> Iterator[StateKey]:
        """Every key, committed ones in key order and then the ones this batch added."""
        changed = self._changed
        for k in self._store.keys(self.time):
            if changed.get(k, None) is not _DELETED:
                yield decode_key(k)
        for k, value in list(changed.items()):
            if (
                k[:1] != INTERNAL
                and value is not _DELETED
                and self._store.read(k, self.time) is None
            ):
                yield decode_key(k)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def changed(self) -> dict[StateKey, Any]:
        """The keys this batch set so far and their values (deleted ones left out)."""
        return {
            decode_key(k): v
            for k, v in self._changed.items()
            if v is not _DELETED and k[:1] != INTERNAL
        }

    def changes(self) -> Changes:
        """This batch's changes, encoded: ready for :meth:`StateStore.commit`.

        Raises:
            StateError: a value cannot be encoded (the handler counts as failed).
        """
        writes: dict[bytes, bytes] = {}
        deletes = set(self._expired_keys)
        for k, (raw, value) in self._read.items():
            if k not in self._changed:
                again = self._encode(k, value)
                if again != raw:
                    writes[k] = again
        for k, value in self._changed.items():
            if value is _DELETED:
                deletes.add(k)
                writes.pop(k, None)
            else:
                writes[k] = self._encode(k, value)
                deletes.discard(k)
        return Changes(self.batch_id, self.time, writes, frozenset(deletes))

    def _encode(self, k: bytes, value: Any) -> bytes:
        try:
            return orjson.dumps(value)
        except TypeError as exc:
            what = f"entry {k[1:]!r}" if k[:1] == INTERNAL else f"key {decode_key(k)!r}"
            raise StateError(
                f"handler {self._store.handler!r}, batch {self.batch_id}: the state value of"
                f" {what} cannot be stored ({exc}); state values must be what orjson"
                " encodes (dict, list, str, int, float, bool, None)"
            ) from None

    # -- streamlet's own entries (windows' books) ---------------------------------------

    def internal_get(self, name: bytes, default: Any = None) -> Any:
        """Streamlet's own entry ``name`` (not a user key: it never expires or shows)."""
        try:
            return self._get(INTERNAL + name, name)
        except KeyError:
            return default

    def internal_set(self, name: bytes, value: Any) -> None:
        """Set streamlet's own entry ``name`` (windows' books), committed with the batch."""
        self._changed[INTERNAL + name] = value

    def internal_delete(self, name: bytes) -> None:
        """Delete streamlet's own entry ``name`` when the batch commits."""
        self._changed[INTERNAL + name] = _DELETED
