"""``streamlet wal verify | dump | repair`` on intact, torn, corrupted and live logs."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import anyio
import anyio.to_thread
import orjson
import pytest
from click.testing import CliRunner

from streamlet.cli import main
from streamlet.errors import WALError
from streamlet.fs import File, OsFileSystem
from streamlet.wal import Position, RepairResult, VerifyReport, WriteAheadLog, repair, verify
from streamlet.wal.format import FRAME_HEADER_SIZE, encode_frame, segment_name
from streamlet.wal.log import LOCK_NAME, is_locked

T = TypeVar("T")

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


@pytest.mark.parametrize("damaged", [True, False])
def test_repair_refuses_a_log_that_is_open_and_says_to_stop_the_app(
    intact: tuple[Path, Written], damaged: bool
) -> None:
    directory, written = intact
    if damaged:
        corrupt(directory, written[1][0])
    before = {p.name: p.read_bytes() for p in directory.iterdir()}

    async def repair_while_open() -> tuple[int, str, str]:
        async with await WriteAheadLog.open(directory):
            return run("wal", "repair", "--yes", str(directory))

    code, out, err = asyncio.run(repair_while_open())
    assert code == 2
    assert out == ""  # no plan shown: nothing was read
    assert f"cannot repair the write-ahead log in {directory}: it is in use" in err
    assert str(directory / LOCK_NAME) in err
    assert "Stop the app first" in err
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    with pytest.raises(WALError, match="it is in use"):
        asyncio.run(_while_open(directory, lambda: repair(directory, dry_run=True)))


async def _while_open(directory: Path, action: Callable[[], T]) -> T:
    """``action()`` in a worker thread while a writer holds the log in ``directory`` open."""
    async with await WriteAheadLog.open(directory):
        return await anyio.to_thread.run_sync(action)


class LockWatchingFs(OsFileSystem):
    """The real file layer, noting at every call whether the log's lock is held."""

    def __init__(self, directory: Path) -> None:
        self.directory = str(directory)
        self.locked_at: list[tuple[str, bool]] = []

    def _note(self, call: str) -> None:
        self.locked_at.append((call, is_locked(self.directory)))

    def listdir(self, path: str) -> list[str]:
        self._note(f"listdir {path}")
        return super().listdir(path)

    def open(self, path: str, *, writable: bool = False) -> File:
        self._note(f"open {path}")
        return super().open(path, writable=writable)

    def exists(self, path: str) -> bool:
        self._note(f"exists {path}")
        return super().exists(path)


@pytest.mark.parametrize("dry_run", [False, True])
def test_repair_reads_the_log_only_while_it_holds_the_lock(
    intact: tuple[Path, Written], dry_run: bool
) -> None:
    directory, written = intact
    corrupt(directory, written[4][0])
    fs = LockWatchingFs(directory)
    result = repair(directory, fs=fs, dry_run=dry_run)
    assert result.problem is not None
    assert result.applied is not dry_run
    assert fs.locked_at, "repair read nothing"
    assert [call for call, locked in fs.locked_at if not locked] == []
    assert not is_locked(str(directory))  # and let it go


def test_the_log_stays_locked_while_a_repair_waits_for_confirmation(
    intact: tuple[Path, Written],
) -> None:
    directory, written = intact
    corrupt(directory, written[4][0])
    seen: list[str] = []

    def confirm(plan: RepairResult) -> bool:
        async def open_log() -> None:
            async with await WriteAheadLog.open(directory):
                pass

        with pytest.raises(WALError, match="already open"):
            asyncio.run(open_log())
        seen.append(str(plan.truncated))
        return False

    declined = repair(directory, confirm=confirm)
    assert seen == [str(declined.truncated)]
    assert declined.problem is not None
    assert not declined.applied
    assert not list(directory.glob("*.broken"))
    assert repair(directory, confirm=lambda plan: True).applied
    assert [p for p, _ in replay(directory)] == [p for p, _ in written[:4]]


def test_verify_beside_an_open_log_says_the_result_is_a_snapshot(
    intact: tuple[Path, Written],
) -> None:
    directory, written = intact
    code, out, _ = asyncio.run(_while_open(directory, lambda: run("wal", "verify", str(directory))))
    assert code == 0
    assert out.startswith(f"ok: 4 segments, {len(written)} records")
    assert f"note: the log is in use by a running app (it holds the lock {directory}/LOCK)" in out
    assert "snapshot" in out
    assert asyncio.run(_while_open(directory, lambda: verify(directory))).live
    # Closed again: no note.
    report = verify(directory)
    assert report.ok
    assert not report.live
    assert "note:" not in run("wal", "verify", str(directory))[1]


def test_verify_takes_an_append_in_progress_for_a_torn_tail_not_damage(
    intact: tuple[Path, Written],
) -> None:
    # What a reader sees while a writer is in the middle of a write: the
    # first part of a frame at the end of the last segment.
    directory, written = intact
    last = directory / segment_name(written[-1][0].segment)
    end = last.stat().st_size
    frame = encode_frame(b"x" * 100)

    async def check() -> tuple[int, str, str]:
        async with await WriteAheadLog.open(directory):
            with last.open("ab") as file:
                file.write(frame[:60])
            return await anyio.to_thread.run_sync(lambda: run("wal", "verify", str(directory)))

    code, out, _ = asyncio.run(check())
    assert code == 0, out
    assert out.startswith("ok:")
    assert f"torn tail: 60 bytes at {last} offset {end} (an append in progress" in out
    assert "snapshot" in out


def test_verify_beside_a_writer_that_appends_and_cleans_reports_no_damage(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "wal"
    reports: list[VerifyReport] = []

    async def go() -> None:
        async with await WriteAheadLog.open(directory, segment_size=4096) as log:
            done = anyio.Event()

            async def write() -> None:
                groups = 0
                while not done.is_set():
                    sizes = [100, 3000, 20] if groups % 2 else [60] * 40
                    positions = await log.append_many([b"r" * n for n in sizes])
                    groups += 1
                    if groups % 4 == 0:
                        await log.clean(positions[-1])  # deletes the segments before it

            async def check() -> None:
                with anyio.move_on_after(1.5):
                    while True:
                        reports.append(await anyio.to_thread.run_sync(verify, directory))
                done.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(write)
                tg.start_soon(check)

    asyncio.run(go())
    assert len(reports) > 20
    assert [r.problem for r in reports if not r.ok] == []
    assert all(r.live for r in reports)


def test_verify_reports_damage_in_a_live_log(intact: tuple[Path, Written]) -> None:
    # Opening checks only the last segment, so a log damaged before it
    # opens, and verify must not take the damage for a change under way.
    directory, written = intact
    bad = written[1][0]
    path = corrupt(directory, bad)
    code, out, _ = asyncio.run(_while_open(directory, lambda: run("wal", "verify", str(directory))))
    assert code == 1
    assert f"corrupt: {path} at offset {bad.offset}" in out
    assert f"to cut the log there, stop the app, then run: streamlet wal repair {directory}" in out
    assert "note: the log is in use" in out


def test_repair_of_a_state_directory_names_its_logs(tmp_path: Path) -> None:
    state = tmp_path / "state"
    write_log(state / "tracker")
    (state / "app.json").write_text("{}")
    code, _, err = run("wal", "repair", "--yes", str(state))
    assert code == 2
    assert f"it is an app's state directory: name one of its logs ({state / 'tracker'})" in err
    assert not (state / "LOCK").exists()
