"""Checkpoints: atomic, versioned, verified, with fallback to the older one."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamlet._checkpoint import (
    Checkpoint,
    CheckpointError,
    decode,
    encode,
    list_checkpoints,
    load_latest,
    write_checkpoint,
)
from streamlet.fs import OsFileSystem
from streamlet.testing.faultfs import CutMode, FaultFS, PowerCut

FS = OsFileSystem()


def test_round_trip_and_retention(tmp_path: Path) -> None:
    d = str(tmp_path / "ck")
    for batch in (1, 2, 3):
        write_checkpoint(FS, d, batch, {"batch": batch})
    assert [b for b, _ in list_checkpoints(FS, d)] == [3, 2]
    latest = load_latest(FS, d)
    assert latest is not None
    assert latest.batch_id == 3
    assert latest.body == {"batch": 3}
    assert sorted(os.listdir(d)) == ["checkpoint-000000000002.json", "checkpoint-000000000003.json"]


def test_files_are_owner_only(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = write_checkpoint(FS, str(tmp_path / "ck"), 1, {})
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(tmp_path / "ck").st_mode & 0o777 == 0o700


def test_corrupt_newest_falls_back_to_older(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = str(tmp_path / "ck")
    write_checkpoint(FS, d, 1, {"batch": 1})
    newest = write_checkpoint(FS, d, 2, {"batch": 2})
    data = bytearray(Path(newest).read_bytes())
    data[-2] ^= 0x01
    Path(newest).write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="streamlet._checkpoint"):
        latest = load_latest(FS, d)
    assert latest is not None
    assert latest.body == {"batch": 1}
    assert "CRC32C" in caplog.text
    assert newest in caplog.text


def test_no_readable_checkpoint_is_an_error_naming_the_files(tmp_path: Path) -> None:
    d = str(tmp_path / "ck")
    path = write_checkpoint(FS, d, 1, {"batch": 1})
    Path(path).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no readable checkpoint") as info:
        load_latest(FS, d)
    assert path in str(info.value)


def test_unknown_version_is_refused_by_name(tmp_path: Path) -> None:
    data = encode({"x": 1}).replace(b'"version":1', b'"version":9', 1)
    with pytest.raises(CheckpointError, match="version 9 is not readable"):
        decode(data, "f.json")


def test_truncated_body_is_detected() -> None:
    data = encode({"x": list(range(100))})
    with pytest.raises(CheckpointError, match="header says"):
        decode(data[:-5], "f.json")


def test_missing_directory_has_no_checkpoint(tmp_path: Path) -> None:
    assert load_latest(FS, str(tmp_path / "none")) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_checkpoint_error(data: bytes) -> None:
    try:
        decoded = decode(data, "fuzz.json")
    except CheckpointError:
        return
    assert isinstance(decoded, dict)


@settings(max_examples=200, deadline=None)
@given(
    body=st.dictionaries(
        st.text(max_size=8), st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8)
    ),
    flip=st.data(),
)
def test_any_single_bit_flip_is_detected_or_harmless(
    body: dict[str, object], flip: st.DataObject
) -> None:
    data = bytearray(encode(body))
    index = flip.draw(st.integers(0, len(data) - 1))
    data[index] ^= 1 << flip.draw(st.integers(0, 7))
    try:
        decoded = decode(bytes(data), "f.json")
    except CheckpointError:
        return
    # A flip that still decodes can only have hit the header's spelling of a
    # value that does not matter (never the body).
    assert decoded == body


# ---- power cuts ------------------------------------------------------------------

CHECKPOINTS = "/state/checkpoints"
CUTS: list[tuple[CutMode, int]] = [("drop", 1), ("sectors", 6), ("garble", 6)]  # (mode, seeds)


@pytest.mark.parametrize("earlier", [0, 1, 2])
def test_a_power_cut_right_after_a_checkpoint_is_written_keeps_it(earlier: int) -> None:
    # The rename is the commit: the file's data must be durable before it
    # (fsync of the temp file), and the rename itself after it (fsync of the
    # directory). With no earlier checkpoint or one, no later directory sync
    # (the deletion of the oldest) would make up for a missing one.
    fs = FaultFS()
    for batch in range(1, earlier + 1):
        write_checkpoint(fs, CHECKPOINTS, batch, {"batch": batch})
    batch = earlier + 1
    path = write_checkpoint(fs, CHECKPOINTS, batch, {"batch": batch})
    for mode, seeds in CUTS:
        for seed in range(seeds):
            disk = fs.power_cut(mode, rng=random.Random(seed))
            latest = load_latest(disk, CHECKPOINTS)
            assert latest == Checkpoint(path, batch, {"batch": batch}), (mode, seed)


def _write_four(fs: FaultFS, written: list[int]) -> None:
    for batch in range(1, 5):
        write_checkpoint(fs, CHECKPOINTS, batch, {"batch": batch})
        written.append(batch)


@pytest.mark.parametrize("when", ["at", "after"])
def test_a_power_cut_at_any_operation_leaves_the_newest_checkpoint_written(when: str) -> None:
    counted = FaultFS()
    _write_four(counted, [])
    ops = counted.ops
    assert {op.name for op in ops} >= {"create", "append", "sync", "rename", "sync_dir", "remove"}
    for index, op in enumerate(ops):
        fs = FaultFS()
        (fs.cut_at if when == "at" else fs.cut_after)(index)
        written: list[int] = []
        with pytest.raises(PowerCut):
            _write_four(fs, written)
        for mode, seeds in CUTS:
            for seed in range(seeds):
                where = f"cut {when} op {index} ({op.name} {op.path}), {mode}, seed {seed}"
                disk = fs.power_cut(mode, rng=random.Random(seed))
                latest = load_latest(disk, CHECKPOINTS)  # never "none readable"
                if latest is None:
                    assert written == [], f"{where}: checkpoint {written[-1]} is gone"
                    continue
                assert latest.body == {"batch": latest.batch_id}, where
                assert latest.batch_id >= (written or [0])[-1], (
                    f"{where}: checkpoint {written[-1]} was written, but the newest"
                    f" readable is {latest.batch_id}"
                )


def test_an_unreadable_checkpoint_is_pruned_before_a_readable_older_one(tmp_path: Path) -> None:
    """After recovery fell back from a corrupt newest checkpoint, the readable one stays."""
    from streamlet._checkpoint import list_checkpoints, load_latest, write_checkpoint
    from streamlet.fs import OsFileSystem

    fs = OsFileSystem()
    directory = str(tmp_path / "checkpoints")
    write_checkpoint(fs, directory, 5, {"n": 5})
    corrupt = write_checkpoint(fs, directory, 7, {"n": 7})
    Path(corrupt).write_bytes(b"garbage")
    write_checkpoint(fs, directory, 9, {"n": 9})
    assert [batch for batch, _ in list_checkpoints(fs, directory)] == [9, 5]
    Path(list_checkpoints(fs, directory)[0][1]).write_bytes(b"garbage")
    loaded = load_latest(fs, directory)
    assert loaded is not None
    assert loaded.batch_id == 5
