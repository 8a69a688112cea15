"""``streamlet wal verify | dump | repair`` on intact, torn and corrupted logs."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from streamlet.cli import main
from streamlet.wal import Position, WriteAheadLog, repair, verify
from streamlet.wal.format import FRAME_HEADER_SIZE, segment_name

Written = list[tuple[Position, bytes]]
RECORDS = [bytes([i + 1]) * (40 + 10 * i) for i in range(9)]


def write_log(directory: Path, records: list[bytes] = RECORDS) -> Written:
    async def go() -> Written:
        async with await WriteAheadLog.open(directory, segment_size=300) as log:
            return [(await log.append(r), r) for r in records]

    return asyncio.run(go())


def replay(directory: Path) -> Written:
    async def go() -> Written:
        async with await WriteAheadLog.open(directory) as log:
            return [item async for item in log.replay()]

    return asyncio.run(go())


def corrupt(directory: Path, position: Position) -> Path:
    """Flip a payload bit of the record at ``position``; return its segment's path."""
    path = directory / segment_name(position.segment)
    data = bytearray(path.read_bytes())
    data[position.offset + FRAME_HEADER_SIZE + 1] ^= 0x04
    path.write_bytes(bytes(data))
    return path


def tear(directory: Path, written: Written) -> Path:
    """Cut the last record in half, as a crash in the middle of writing it would."""
    last = written[-1][0]
    path = directory / segment_name(last.segment)
    os.truncate(path, last.offset + FRAME_HEADER_SIZE + last.length // 2)
    return path


def run(*args: str, input: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def intact(tmp_path: Path) -> tuple[Path, Written]:
    directory = tmp_path / "wal"
    return directory, write_log(directory)


def test_verify_an_intact_log(intact: tuple[Path, Written]) -> None:
    directory, written = intact
    code, out, _ = run("wal", "verify", str(directory))
    segments = len({p.segment for p, _ in written})
    total = sum(len(r) for _, r in written)
    assert code == 0
    assert out.startswith(f"ok: {segments} segments, {len(written)} records, {total} bytes")


def test_dump_prints_one_json_line_per_record(intact: tuple[Path, Written]) -> None:
    directory, written = intact
    code, out, _ = run("wal", "dump", str(directory))
    assert code == 0
    lines = [orjson.loads(line) for line in out.splitlines()]
    assert len(lines) == len(written)
    for line, (position, record) in zip(lines, written, strict=True):
        assert line == {
            "segment": position.segment,
            "offset": position.offset,
            "length": position.length,
            "crc_ok": True,
            "head": record[:32].hex(),
        }


def test_repair_an_intact_log_has_nothing_to_do(intact: tuple[Path, Written]) -> None:
    directory, _ = intact
    code, out, _ = run("wal", "repair", str(directory))
    assert code == 0
    assert "nothing to repair" in out


def test_a_torn_log_verifies_ok_and_names_the_tail(intact: tuple[Path, Written]) -> None:
    directory, written = intact
    path = tear(directory, written)
    last = written[-1][0]
    code, out, _ = run("wal", "verify", str(directory))
    assert code == 0
    assert out.startswith("ok:")
    assert (
        f"torn tail: {last.length // 2 + FRAME_HEADER_SIZE} bytes at {path} offset {last.offset}"
        in out
    )
    code, out, err = run("wal", "dump", str(directory))
    assert code == 0
    assert len(out.splitlines()) == len(written) - 1
    assert f"stopped reading {path} at offset {last.offset}" in err
    code, out, _ = run("wal", "repair", str(directory))
    assert code == 0
    assert "nothing to repair" in out
    assert "torn tail" in out


def test_a_corrupted_log_fails_verify_with_file_offset_and_fix(
    intact: tuple[Path, Written],
) -> None:
    directory, written = intact
    bad = written[1][0]
    path = corrupt(directory, bad)
    code, out, _ = run("wal", "verify", str(directory))
    assert code == 1
    assert f"corrupt: {path} at offset {bad.offset}" in out
    assert "checksum" in out
    assert f"streamlet wal repair {directory}" in out


def test_dump_flags_the_bad_record_and_goes_on(intact: tuple[Path, Written]) -> None:
    directory, written = intact
    bad = written[1][0]
    corrupt(directory, bad)
    code, out, _ = run("wal", "dump", str(directory))
    assert code == 1  # the log is not intact
    lines = [orjson.loads(line) for line in out.splitlines()]
    assert len(lines) == len(written)
    assert [line["crc_ok"] for line in lines] == [p != bad for p, _ in written]


def test_declined_repair_changes_nothing(intact: tuple[Path, Written]) -> None:
    directory, written = intact
    corrupt(directory, written[1][0])
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    code, out, _ = run("wal", "repair", str(directory), input="n\n")
    assert code == 1
    assert "Repair the log?" in out
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before


def test_repair_cuts_at_the_bad_record_and_keeps_broken_copies(
    intact: tuple[Path, Written],
) -> None:
    directory, written = intact
    bad = written[1][0]
    path = corrupt(directory, bad)
    later = sorted({p.segment for p, _ in written if p.segment > bad.segment})
    lost = [r for p, r in written if p >= bad]
    original = path.read_bytes()

    code, out, _ = run("wal", "repair", str(directory), input="y\n")
    assert code == 0, out
    assert f"first bad record: {path} at offset {bad.offset}" in out
    assert f"will cut {path} to {bad.offset} bytes" in out
    assert f"lost: {len(lost)} readable records" in out
    for seq in later:
        assert f"will remove {directory / segment_name(seq)}" in out
    assert (directory / (path.name + ".broken")).read_bytes() == original
    for seq in later:
        assert not (directory / segment_name(seq)).exists()
        assert (directory / (segment_name(seq) + ".broken")).exists()

    code, out, _ = run("wal", "verify", str(directory))
    assert code == 0
    assert replay(directory) == written[:1]


def test_repair_with_yes_does_not_ask(intact: tuple[Path, Written]) -> None:
    directory, written = intact
    corrupt(directory, written[4][0])
    code, out, _ = run("wal", "repair", "--yes", str(directory))
    assert code == 0
    assert "Repair the log?" not in out
    assert [p for p, _ in replay(directory)] == [p for p, _ in written[:4]]


def test_repair_dry_run_and_a_bad_header(intact: tuple[Path, Written]) -> None:
    directory, written = intact
    path = directory / segment_name(2)
    path.write_bytes(b"JUNK" + path.read_bytes()[4:])
    plan = repair(directory, dry_run=True)
    assert plan.problem is not None
    assert (plan.problem.path, plan.problem.offset) == (str(path), 0)
    assert not plan.applied
    assert plan.backups == ()
    assert not (directory / (path.name + ".broken")).exists()
    done = repair(directory)
    assert done.applied
    assert done.recreated == str(path)
    assert verify(directory).ok
    assert replay(directory) == [(p, r) for p, r in written if p.segment == 1]

    # The numbering goes on where it was: segment 2 is there again, empty.
    async def append() -> Position:
        async with await WriteAheadLog.open(directory) as log:
            return await log.append(b"new")

    assert asyncio.run(append()).segment == 2


def test_repair_a_missing_middle_segment(intact: tuple[Path, Written]) -> None:
    directory, written = intact
    (directory / segment_name(2)).unlink()
    code, out, _ = run("wal", "verify", str(directory))
    assert code == 1
    assert "segment 2 is missing" in out
    code, out, _ = run("wal", "repair", "--yes", str(directory))
    assert code == 0
    assert replay(directory) == [(p, r) for p, r in written if p.segment == 1]


@pytest.mark.parametrize("command", ["verify", "dump", "repair"])
def test_a_missing_directory_is_a_usage_error(tmp_path: Path, command: str) -> None:
    code, _, err = run("wal", command, str(tmp_path / "nope"))
    assert code == 2
    assert "does not exist" in err


def test_a_directory_without_segments_is_a_usage_error(tmp_path: Path) -> None:
    code, _, err = run("wal", "verify", str(tmp_path))
    assert code == 2
    assert "holds no write-ahead log segments" in err


def test_repair_refuses_a_log_that_is_open(intact: tuple[Path, Written]) -> None:
    directory, written = intact
    corrupt(directory, written[1][0])

    async def repair_while_open() -> tuple[int, str]:
        async with await WriteAheadLog.open(directory):
            code, _, err = run("wal", "repair", "--yes", str(directory))
            return code, err

    code, err = asyncio.run(repair_while_open())
    assert code == 1
    assert "already open" in err
    assert not list(directory.glob("*.broken"))
