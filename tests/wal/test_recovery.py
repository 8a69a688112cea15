"""Recovery on open: torn tails are cut off, corruption is reported, never papered over."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import struct
from pathlib import Path

import pytest

from streamlet.errors import WALCorruptionError
from streamlet.wal import Position, WriteAheadLog
from streamlet.wal.format import (
    FRAME_HEADER_SIZE,
    MAGIC,
    SECTOR_SIZE,
    SEGMENT_HEADER_SIZE,
    crc32c,
    segment_name,
)

Written = list[tuple[Position, bytes]]


async def write_log(directory: Path, records: list[bytes], *, segment_size: int = 2**20) -> Written:
    async with await WriteAheadLog.open(directory, segment_size=segment_size) as log:
        positions = [await log.append(r) for r in records]
    return list(zip(positions, records, strict=True))


async def replay_all(directory: Path) -> Written:
    async with await WriteAheadLog.open(directory) as log:
        return [item async for item in log.replay()]


async def collect(log: WriteAheadLog, into: Written) -> None:
    async for item in log.replay():
        into.append(item)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.suffix == ".wal"}


def restore(directory: Path, files: dict[str, bytes]) -> None:
    directory.mkdir(mode=0o700)
    for name, data in files.items():
        (directory / name).write_bytes(data)


def torn_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("streamlet.wal") and r.levelno == logging.WARNING
    ]


async def test_torn_tail_cut_at_every_byte_of_the_last_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="streamlet.wal")
    rng = random.Random(7)
    records = [rng.randbytes(rng.randrange(1, 80)) for _ in range(5)] + [rng.randbytes(300)]
    written = await write_log(tmp_path / "original", records)
    files = snapshot(tmp_path / "original")
    name = segment_name(1)
    last = written[-1][0]
    end = last.offset + FRAME_HEADER_SIZE + last.length
    assert len(files[name]) == end
    for cut in range(last.offset, end):
        caplog.clear()
        directory = tmp_path / f"cut{cut}"
        restore(directory, {name: files[name][:cut]})
        assert await replay_all(directory) == written[:-1], f"cut at {cut}"
        assert (directory / name).stat().st_size == last.offset
        warnings = torn_warnings(caplog)
        if cut == last.offset:
            assert warnings == []
        else:
            assert len(warnings) == 1
            assert f"torn tail of {cut - last.offset} bytes at offset {last.offset}" in warnings[0]
            assert str(directory / name) in warnings[0]
    # A cut log takes appends again, right after its last intact record.
    directory = tmp_path / f"cut{end - 1}"
    async with await WriteAheadLog.open(directory) as log:
        position = await log.append(b"new")
        assert position.offset == last.offset
    assert await replay_all(directory) == [*written[:-1], (position, b"new")]


async def test_zero_filled_tail_is_truncated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="streamlet.wal")
    directory = tmp_path / "wal"
    written = await write_log(directory, [b"a" * 100, b"b" * 200])
    path = directory / segment_name(1)
    size = path.stat().st_size
    with path.open("ab") as f:
        f.write(bytes(8192))
    assert await replay_all(directory) == written
    assert path.stat().st_size == size
    assert any("8192 bytes" in w for w in torn_warnings(caplog))


async def test_zeroed_sector_inside_the_last_record_is_torn(tmp_path: Path) -> None:
    directory = tmp_path / "wal"
    rng = random.Random(3)
    written = await write_log(directory, [b"first", rng.randbytes(3000)])
    last = written[-1][0]
    path = directory / segment_name(1)
    data = bytearray(path.read_bytes())
    sector = (last.offset // SECTOR_SIZE + 2) * SECTOR_SIZE
    data[sector : sector + SECTOR_SIZE] = bytes(SECTOR_SIZE)
    path.write_bytes(bytes(data))
    assert await replay_all(directory) == written[:1]


def test_single_bit_flips_are_detected_and_never_return_wrong_bytes(tmp_path: Path) -> None:
    """At least 1,000 single-bit flips over a 3-segment log of random records."""
    rng = random.Random(20240611)
    records = [rng.randbytes(rng.randrange(0, 160)) for _ in range(36)]
    written = asyncio.run(write_log(tmp_path / "original", records, segment_size=1200))
    files = snapshot(tmp_path / "original")
    names = list(files)
    assert len(names) >= 3
    # Where every byte belongs: the owning record's position, or None for a header.
    owners: dict[str, list[Position | None]] = {n: [None] * len(files[n]) for n in names}
    for position, _ in written:
        name = segment_name(position.segment)
        for i in range(position.offset, position.offset + FRAME_HEADER_SIZE + position.length):
            owners[name][i] = position
    last_position = written[-1][0]
    cases = [
        (name, index, rng.randrange(8))
        for name, index in (
            (n, i)
            for n in rng.choices(names, weights=[len(files[n]) for n in names], k=1200)
            for i in [rng.randrange(len(files[n]))]
        )
    ]

    outcomes = {"on open": 0, "on replay": 0, "torn": 0}

    async def run_case(directory: Path, name: str, index: int, bit: int) -> None:
        damaged = dict(files)
        data = bytearray(files[name])
        data[index] ^= 1 << bit
        damaged[name] = bytes(data)
        restore(directory, damaged)
        path = str(directory / name)
        owner = owners[name][index]
        returned: Written = []
        opened = False
        error: WALCorruptionError | None = None
        try:
            async with await WriteAheadLog.open(directory) as log:
                opened = True
                async for item in log.replay():
                    returned.append(item)
        except WALCorruptionError as exc:
            error = exc
        if error is not None:
            # Detected at the damaged record (or header)...
            assert error.path == path
            assert error.offset == (0 if owner is None else owner.offset)
            assert "streamlet wal repair" in str(error)
            if not opened:
                # ...on open: headers, and the records of the last segment;
                assert owner is None or name == names[-1]
                outcomes["on open"] += 1
            else:
                # ...or by replay, after exactly the intact records before it.
                assert owner is not None
                assert name != names[-1]
                assert returned == [(p, r) for p, r in written if p < owner]
                outcomes["on replay"] += 1
            return
        # Not an error: only allowed as a torn tail, i.e. a flip in the very
        # last record, which is then dropped.
        assert owner == last_position, f"flip at {name}:{index} bit {bit} went unnoticed"
        assert returned == written[:-1]
        outcomes["torn"] += 1

    async def run_all() -> None:
        for number, (name, index, bit) in enumerate(cases):
            await run_case(tmp_path / f"case{number}", name, index, bit)

    asyncio.run(run_all())
    assert sum(outcomes.values()) == len(cases) >= 1000
    assert outcomes["on open"], outcomes
    assert outcomes["on replay"], outcomes


async def test_a_flip_in_an_older_segment_is_reported_at_replay(tmp_path: Path) -> None:
    directory = tmp_path / "wal"
    written = await write_log(directory, [bytes([i]) * 100 for i in range(8)], segment_size=300)
    bad = written[1][0]
    assert bad.segment == 1
    path = directory / segment_name(1)
    data = bytearray(path.read_bytes())
    data[bad.offset + FRAME_HEADER_SIZE + 5] ^= 0x10
    path.write_bytes(bytes(data))
    async with await WriteAheadLog.open(directory) as log:  # only the last segment is scanned
        returned: Written = []
        with pytest.raises(WALCorruptionError) as info:
            await collect(log, returned)
        assert returned == written[:1]
        with pytest.raises(WALCorruptionError):
            await log.read(bad)
    assert info.value.path == str(path)
    assert info.value.offset == bad.offset
    assert f"{path}: corrupt at offset {bad.offset}" in str(info.value)
    assert "checksum" in str(info.value)


async def test_a_torn_older_segment_is_corruption(tmp_path: Path) -> None:
    directory = tmp_path / "wal"
    written = await write_log(directory, [bytes([i]) * 100 for i in range(6)], segment_size=300)
    path = directory / segment_name(1)
    cut = written[1][0].offset + 20
    os.truncate(path, cut)
    with pytest.raises(WALCorruptionError) as info:
        await replay_all(directory)
    assert (info.value.path, info.value.offset) == (str(path), written[1][0].offset)


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("magic", "not a streamlet WAL segment"),
        ("version", "format version 2; this build of streamlet reads version(s) 1"),
        ("seq", "says segment 7, but the file name says 2"),
        ("short", "is incomplete"),
    ],
)
async def test_a_bad_segment_header_is_corruption(
    tmp_path: Path, damage: str, expected: str
) -> None:
    directory = tmp_path / "wal"
    await write_log(directory, [b"x" * 100] * 6, segment_size=300)
    path = directory / segment_name(2)
    data = path.read_bytes()
    if damage == "magic":
        data = b"GARBAGE!" + data[8:]
    elif damage == "short":
        data = data[:20]
    else:
        version, seq = (2, 2) if damage == "version" else (1, 7)
        body = struct.pack("<8sIIQI", MAGIC, version, 0, seq, 0)
        data = body + struct.pack("<I", crc32c(body)) + data[SEGMENT_HEADER_SIZE:]
    path.write_bytes(data)
    with pytest.raises(WALCorruptionError) as info:
        await WriteAheadLog.open(directory)
    assert (info.value.path, info.value.offset) == (str(path), 0)
    assert expected in str(info.value)


async def test_a_missing_middle_segment_is_corruption(tmp_path: Path) -> None:
    directory = tmp_path / "wal"
    await write_log(directory, [b"x" * 100] * 8, segment_size=300)
    assert (directory / segment_name(3)).exists()
    (directory / segment_name(2)).unlink()
    with pytest.raises(WALCorruptionError, match="segment 2 is missing") as info:
        await WriteAheadLog.open(directory)
    assert info.value.path == str(directory / segment_name(2))


async def test_leftover_temp_segment_is_removed(tmp_path: Path) -> None:
    directory = tmp_path / "wal"
    written = await write_log(directory, [b"a", b"b"])
    temp = directory / (segment_name(2) + ".tmp")
    temp.write_bytes(b"half a header")
    async with await WriteAheadLog.open(directory) as log:
        assert not temp.exists()
        position = await log.append(b"c")
        assert position.segment == 1
    assert await replay_all(directory) == [*written, (position, b"c")]


async def test_an_empty_directory_starts_a_log(tmp_path: Path) -> None:
    (tmp_path / "wal").mkdir()
    async with await WriteAheadLog.open(tmp_path / "wal") as log:
        assert (log.first_segment, log.last_segment) == (1, 1)
        assert await log.append(b"x") == Position(1, SEGMENT_HEADER_SIZE, 1)
