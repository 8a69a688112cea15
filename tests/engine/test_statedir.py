"""The state directory: lock before anything is written, manifest, pure decisions."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import orjson
import pytest

from streamlet._checkpoint import retain_checkpoint
from streamlet._statedir import LOCK, MANIFEST, StateDir, is_locked
from streamlet.errors import ConfigError
from streamlet.fs import OsFileSystem
from streamlet.sinks.base import sink_ahead
from streamlet.wal import Position

WANTED = {"format": "streamlet.app", "version": 1, "app": "a", "sources": {}, "handlers": {}}


def test_a_second_opener_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "state")
    first = StateDir.open(path, OsFileSystem(), WANTED)
    try:
        assert is_locked(path)
        manifest = (tmp_path / "state" / MANIFEST).read_bytes()
        other = {**WANTED, "app": "b"}
        with pytest.raises(ConfigError, match="is in use"):
            StateDir.open(path, OsFileSystem(), other)
        # Refused before it looked at (or wrote) the manifest.
        assert (tmp_path / "state" / MANIFEST).read_bytes() == manifest
    finally:
        first.close()
    assert not is_locked(path)
    again = StateDir.open(path, OsFileSystem(), WANTED)
    assert again.state_id == first.state_id == orjson.loads(manifest)["state_id"]
    again.close()


def test_concurrent_starters_on_a_fresh_directory_agree_on_its_id(tmp_path: Path) -> None:
    """One wins the lock and writes the manifest; every other is refused, never misled."""
    for trial in range(8):
        path = str(tmp_path / f"state{trial}")
        opened: list[StateDir] = []
        refused: list[ConfigError] = []
        barrier = threading.Barrier(4)

        def start(
            path: str,
            opened: list[StateDir],
            refused: list[ConfigError],
            barrier: threading.Barrier,
        ) -> None:
            barrier.wait()
            try:
                opened.append(StateDir.open(path, OsFileSystem(), WANTED))
            except ConfigError as exc:
                refused.append(exc)

        threads = [
            threading.Thread(target=start, args=(path, opened, refused, barrier)) for _ in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(opened) + len(refused) == 4
        assert opened, "somebody must win"
        found = orjson.loads((Path(path) / MANIFEST).read_bytes())["state_id"]
        assert {s.state_id for s in opened} == {found}
        for s in opened:
            s.close()


def test_a_leftover_manifest_temp_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    (path / (MANIFEST + ".tmp")).write_bytes(b"half a manifest")
    opened = StateDir.open(str(path), OsFileSystem(), WANTED)
    opened.close()
    assert not (path / (MANIFEST + ".tmp")).exists()
    assert orjson.loads((path / MANIFEST).read_bytes())["app"] == "a"
    assert (path / LOCK).exists()
    assert os.stat(path / LOCK).st_mode & 0o077 == 0


def test_a_sink_ahead_of_the_state_is_named_with_what_to_do() -> None:
    assert sink_ahead("h", "FileSink(out)", None, 3, "s") is None
    assert sink_ahead("h", "FileSink(out)", 5, None, "s") is None
    assert sink_ahead("h", "FileSink(out)", 0, 0, "s") is None
    # A pending batch the sink committed before a crash is normal recovery.
    assert sink_ahead("h", "FileSink(out)", 4, 4, "s") is None
    message = sink_ahead("h", "FileSink(out)", 7, 4, "s")
    assert message is not None
    assert "holds batches up to 7" in message
    assert "allocated batches only up to 4" in message
    assert "5..7" in message


def test_the_log_is_cleaned_only_to_the_older_retained_checkpoint() -> None:
    p = [Position(1, 16, 10), Position(2, 16, 10), Position(3, 16, 10), Position(4, 16, 10)]
    # Only the loaded checkpoint is known: the one on disk before it is not.
    kept, clean = retain_checkpoint([(5, p[0])], (5, p[1]))
    assert kept == [(5, p[1])]
    assert clean is None
    kept, clean = retain_checkpoint(kept, (8, p[2]))
    assert kept == [(8, p[2]), (5, p[1])]
    assert clean == p[1]
    # Rewriting the newest under its own name keeps the older one's log.
    kept, clean = retain_checkpoint(kept, (8, p[3]))
    assert kept == [(8, p[3]), (5, p[1])]
    assert clean == p[1]
