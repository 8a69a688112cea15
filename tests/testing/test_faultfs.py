"""FaultFS: the durability model, power-cut modes, cut points, injected faults, real dirs."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import stat
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from streamlet.cli import main
from streamlet.fs import File
from streamlet.testing.faultfs import (
    SECTOR_SIZE,
    CutMode,
    FaultFile,
    FaultFS,
    Op,
    PowerCut,
    run_until_cut,
)
from streamlet.wal import WriteAheadLog


def write(fs: FaultFS, path: str, data: bytes, *, sync: bool = True) -> File:
    """Create ``path`` holding ``data`` (synced unless told not to); return it open."""
    file = fs.create(path)
    file.append(data)
    if sync:
        file.sync()
    return file


# ---- the durability model ----------------------------------------------------


def test_drop_keeps_synced_data_and_loses_the_rest() -> None:
    fs = FaultFS()
    fs.makedirs("/d")
    file = write(fs, "/d/f", b"synced")
    fs.sync_dir("/d")
    file.append(b"+unsynced")
    assert fs.read_file("/d/f") == b"synced+unsynced"
    assert file.read(0, 100) == b"synced+unsynced"
    after = fs.power_cut("drop")
    assert after.read_file("/d/f") == b"synced"
    assert after.read_file("/d/f", durable=True) == b"synced"


def test_a_new_file_needs_its_directory_synced() -> None:
    fs = FaultFS()
    fs.makedirs("/d")
    write(fs, "/d/f", b"data").close()  # data synced, the entry is not
    assert not fs.power_cut("drop").exists("/d/f")
    fs = FaultFS()
    fs.makedirs("/d")
    write(fs, "/d/f", b"data").close()
    fs.sync_dir("/d")
    assert fs.power_cut("drop").read_file("/d/f") == b"data"


def test_makedirs_is_durable_at_once() -> None:
    fs = FaultFS()
    fs.makedirs("/a/b/c")
    after = fs.power_cut("drop")
    assert after.listdir("/a") == ["b"]
    assert after.listdir("/a/b/c") == []


def test_a_remove_is_undone_by_a_cut_until_the_directory_is_synced() -> None:
    fs = FaultFS()
    fs.makedirs("/d")
    write(fs, "/d/f", b"old").close()
    fs.sync_dir("/d")
    fs.remove("/d/f")
    assert not fs.exists("/d/f")
    assert fs.power_cut("drop").read_file("/d/f") == b"old"
    fs = FaultFS()
    fs.makedirs("/d")
    write(fs, "/d/f", b"old").close()
    fs.sync_dir("/d")
    fs.remove("/d/f")
    fs.sync_dir("/d")
    assert not fs.power_cut("drop").exists("/d/f")


def test_an_unsynced_truncate_is_lost_by_drop() -> None:
    fs = FaultFS()
    fs.makedirs("/d")
    file = write(fs, "/d/f", b"0123456789")
    fs.sync_dir("/d")
    file.truncate(3)
    assert file.size() == 3
    assert fs.power_cut("drop").read_file("/d/f") == b"0123456789"
    fs = FaultFS()
    file = write(fs, "/f", b"0123456789")
    fs.sync_dir("/")
    file.truncate(3)
    file.sync()
    assert fs.power_cut("drop").read_file("/f") == b"012"


def test_an_unsynced_rename_leaves_the_file_under_one_name_or_the_other() -> None:
    outcomes = set()
    for seed in range(40):
        fs = FaultFS()
        fs.makedirs("/d")
        write(fs, "/d/a", b"content").close()
        fs.sync_dir("/d")
        fs.rename("/d/a", "/d/b")
        assert fs.listdir("/d") == ["b"]
        after = fs.power_cut("sectors", rng=random.Random(seed))
        names = after.listdir("/d")
        assert names in (["a"], ["b"]), f"seed {seed}: {names}"
        assert after.read_file(f"/d/{names[0]}") == b"content"
        outcomes.add(names[0])
    assert outcomes == {"a", "b"}


def test_an_unsynced_rename_over_a_file_keeps_one_of_the_two_contents_there() -> None:
    outcomes = set()
    for seed in range(40):
        fs = FaultFS()
        fs.makedirs("/d")
        write(fs, "/d/target", b"old").close()
        write(fs, "/d/target.tmp", b"new").close()
        fs.sync_dir("/d")
        fs.rename("/d/target.tmp", "/d/target")
        after = fs.power_cut("garble", rng=random.Random(seed))
        state = {name: after.read_file(f"/d/{name}") for name in after.listdir("/d")}
        assert state in ({"target": b"new"}, {"target": b"old", "target.tmp": b"new"}), state
        outcomes.add(state["target"])
    assert outcomes == {b"old", b"new"}


def test_a_synced_rename_is_kept_in_every_mode() -> None:
    for mode in ("drop", "sectors", "garble"):
        fs = FaultFS()
        fs.makedirs("/d")
        write(fs, "/d/a", b"content").close()
        fs.rename("/d/a", "/d/b")
        fs.sync_dir("/d")
        for seed in range(10):
            after = fs.power_cut(mode, rng=random.Random(seed))
            assert after.listdir("/d") == ["b"], (mode, seed)


def test_drop_loses_every_unsynced_directory_change() -> None:
    fs = FaultFS()
    fs.makedirs("/d")
    write(fs, "/d/kept", b"k").close()
    fs.sync_dir("/d")
    write(fs, "/d/new", b"n").close()
    fs.rename("/d/kept", "/d/moved")
    assert fs.listdir("/d") == ["moved", "new"]
    for seed in range(10):
        assert fs.power_cut("drop", rng=random.Random(seed)).listdir("/d") == ["kept"]


def test_sectors_mode_keeps_a_prefix_of_whole_sectors_of_the_unsynced_tail() -> None:
    synced = bytes(range(256)) * 2 + b"x" * 100  # 612 bytes: ends inside sector 1
    tail = random.Random(1).randbytes(2000)
    lengths = set()
    for seed in range(60):
        fs = FaultFS()
        file = write(fs, "/f", synced)
        fs.sync_dir("/")
        file.append(tail)
        data = fs.power_cut("sectors", rng=random.Random(seed)).read_file("/f")
        assert data == (synced + tail)[: len(data)], f"seed {seed}: not a prefix"
        assert len(data) >= len(synced)
        assert len(data) in (len(synced), len(synced) + len(tail)) or (
            len(data) % SECTOR_SIZE == 0
        ), f"seed {seed}: {len(data)} bytes is not a whole number of sectors"
        lengths.add(len(data))
    # Nothing, everything, and whole sectors in between all happen.
    assert {len(synced), len(synced) + len(tail), 1024, 2048} <= lengths


@pytest.mark.parametrize("random_bytes", [False, True])
def test_garble_never_touches_synced_bytes(random_bytes: bool) -> None:
    synced = b"S" * 700
    tail = b"T" * 3000
    seen = set()
    for seed in range(60):
        fs = FaultFS()
        file = write(fs, "/f", synced)
        fs.sync_dir("/")
        file.append(tail)
        after = fs.power_cut("garble", rng=random.Random(seed), random_bytes=random_bytes)
        data = after.read_file("/f")
        assert data[: len(synced)] == synced, f"seed {seed}: synced bytes changed"
        assert len(synced) <= len(data) <= len(synced) + len(tail)
        # Sector by sector, the unsynced part holds what was written, zeros,
        # or (only with random_bytes) something else.
        start = len(synced)
        for sector in range(start - start % SECTOR_SIZE, len(data), SECTOR_SIZE):
            lo, hi = max(sector, start), min(sector + SECTOR_SIZE, len(data))
            chunk = data[lo:hi]
            if chunk == b"T" * len(chunk):
                seen.add("written")
            elif chunk == bytes(len(chunk)):
                seen.add("zeros")
            else:
                assert random_bytes, f"seed {seed}: garbage at {lo} without random_bytes"
                seen.add("random")
        seen.add("lost" if len(data) == len(synced) else "size kept")
    expected = {"written", "zeros", "lost", "size kept"} | ({"random"} if random_bytes else set())
    assert seen == expected


@pytest.mark.parametrize("mode", ["sectors", "garble"])
def test_an_overwrite_in_place_keeps_or_loses_each_sectors_share_and_nothing_else(
    mode: CutMode,
) -> None:
    """SQLite's page writes: bytes not written stay; written ones are old, new or damaged."""
    synced = bytes(range(256)) * 8  # 2048 bytes, four sectors
    seen = set()
    for seed in range(60):
        fs = FaultFS()
        file = write(fs, "/f", synced)
        fs.sync_dir("/")
        assert isinstance(file, FaultFile)
        file.write(300, b"A" * 600)  # over sectors 0, 1 and 2
        file.write(2040, b"B" * 20)  # over the end: the file grows
        assert fs.read_file("/f")[300:900] == b"A" * 600
        data = fs.power_cut(mode, rng=random.Random(seed)).read_file("/f")
        assert data[:300] == synced[:300], seed
        assert data[900:2040] == synced[900:2040], seed
        for lo, hi in ((300, 512), (512, 900)):  # each sector's share of the write
            share = data[lo:hi]
            if share == b"A" * (hi - lo):
                seen.add("new")
            elif share == synced[lo:hi]:
                seen.add("old")
            else:
                assert mode == "garble", f"seed {seed}: damage at {lo} in {mode} mode"
                seen.add("damaged")
        assert 2048 <= len(data) <= 2060, seed
    assert {"new", "old"} <= seen
    assert (mode == "sectors") == ("damaged" not in seen)


def test_an_overwrite_is_durable_once_synced_and_a_truncate_forgets_it() -> None:
    fs = FaultFS()
    file = write(fs, "/f", b"x" * 1000)
    fs.sync_dir("/")
    assert isinstance(file, FaultFile)
    file.write(10, b"yy")
    assert fs.power_cut("drop").read_file("/f") == b"x" * 1000
    fs = FaultFS()
    handle = write(fs, "/f", b"x" * 1000)
    fs.sync_dir("/")
    assert isinstance(handle, FaultFile)
    handle.write(10, b"yy")
    handle.write(1200, b"z")  # past the end: a hole of zeros before it
    assert fs.read_file("/f") == b"x" * 10 + b"yy" + b"x" * 988 + bytes(200) + b"z"
    handle.sync()
    for mode in ("drop", "sectors", "garble"):
        assert fs.power_cut(mode).read_file("/f") == fs.read_file("/f"), mode
    fs = FaultFS()
    handle = write(fs, "/f", b"x" * 1000)
    fs.sync_dir("/")
    assert isinstance(handle, FaultFile)
    handle.write(10, b"yy")
    handle.truncate(5)
    handle.sync()
    assert fs.power_cut("garble").read_file("/f") == b"x" * 5
    assert [op.name for op in fs.ops] == [
        "create",
        "append",
        "sync",
        "sync_dir",
        "write",
        "truncate",
        "sync",
    ]


def _failed_sync(fs: FaultFS, handle: File) -> None:
    fs.fail_sync("/f", times=1)
    with pytest.raises(OSError, match="Input/output error"):
        handle.sync()


def _synced_file(size: int) -> tuple[FaultFS, FaultFile]:
    fs = FaultFS()
    handle = write(fs, "/f", b"x" * size)
    fs.sync_dir("/")
    assert isinstance(handle, FaultFile)
    return fs, handle


def test_an_overwrite_a_failed_sync_dropped_stays_lost_until_written_again() -> None:
    fs, handle = _synced_file(2000)
    handle.write(100, b"A" * 50)
    _failed_sync(fs, handle)
    handle.sync()  # succeeds, but the page the failed one lost is not written again
    assert fs.power_cut("drop").read_file("/f") == b"x" * 2000
    # Written again after the failure, it is dirty like any write.
    fs, handle = _synced_file(2000)
    handle.append(b"y" * 500)
    _failed_sync(fs, handle)
    handle.write(2000, b"z" * 500)
    handle.sync()
    assert fs.power_cut("drop").read_file("/f") == b"x" * 2000 + b"z" * 500
    # Truncated away, then written: the same.
    fs, handle = _synced_file(2000)
    handle.append(b"y" * 500)
    _failed_sync(fs, handle)
    handle.truncate(0)
    handle.append(b"w" * 10)
    handle.sync()
    assert fs.power_cut("drop").read_file("/f") == b"w" * 10


def test_the_same_seed_gives_the_same_disk() -> None:
    fs = FaultFS()
    file = write(fs, "/f", b"a" * 100)
    fs.sync_dir("/")
    file.append(random.Random(3).randbytes(5000))
    first = fs.power_cut("garble", rng=random.Random(9)).walk()
    second = fs.power_cut("garble", rng=random.Random(9)).walk()
    assert first == second
    outcomes = {bytes(fs.power_cut("garble", rng=random.Random(s)).walk()["/f"]) for s in range(8)}
    assert len(outcomes) > 1


def test_a_cut_disk_is_all_durable() -> None:
    fs = FaultFS()
    file = write(fs, "/f", b"a" * 10)
    fs.sync_dir("/")
    file.append(b"b" * 2000)
    after = fs.power_cut("sectors", rng=random.Random(4))
    assert after.read_file("/f")[:10] == b"a" * 10
    assert after.walk() == after.walk(durable=True)
    assert after.power_cut("drop").walk() == after.walk()


# ---- cut points and the operation log ------------------------------------------


def test_ops_number_every_change_and_no_read() -> None:
    fs = FaultFS()
    fs.makedirs("/d")
    file = write(fs, "/d/f", b"x")
    file.read(0, 1)
    file.size()
    fs.listdir("/d")
    fs.exists("/d/f")
    fs.open("/d/f").close()
    file.truncate(0)
    fs.rename("/d/f", "/d/g")
    fs.sync_dir("/d")
    fs.remove("/d/g")
    assert fs.ops == [
        Op("makedirs", "/d"),
        Op("create", "/d/f"),
        Op("append", "/d/f"),
        Op("sync", "/d/f"),
        Op("truncate", "/d/f"),
        Op("rename", "/d/f"),
        Op("sync_dir", "/d"),
        Op("remove", "/d/g"),
    ]


def test_cut_at_raises_before_the_operation_takes_effect() -> None:
    fs = FaultFS()
    called: list[int | None] = []
    fs.on_cut(lambda: called.append(fs.cut_index))
    fs.makedirs("/d")
    file = write(fs, "/d/f", b"first")  # ops 1-3
    fs.sync_dir("/d")  # op 4
    fs.cut_at(6)
    file.append(b"+second")  # op 5
    with pytest.raises(PowerCut) as cut:
        file.sync()  # op 6
    assert cut.value.index == 6
    assert cut.value.op == Op("sync", "/d/f")
    assert fs.is_cut
    assert fs.cut_index == 6
    assert called == [6]
    assert not isinstance(cut.value, Exception)  # `except Exception` cannot swallow it
    # The machine is off: every later call raises too, reads included.
    for call in (lambda: file.read(0, 1), lambda: fs.listdir("/d"), lambda: file.append(b"x")):
        with pytest.raises(PowerCut):
            call()
    file.close()  # releasing a handle still works
    assert fs.power_cut("drop").read_file("/d/f") == b"first"


def test_cut_after_lets_the_operation_take_effect() -> None:
    fs = FaultFS()
    fs.makedirs("/d")
    file = write(fs, "/d/f", b"first")
    fs.sync_dir("/d")
    file.append(b"+second")
    fs.cut_after(len(fs.ops))  # the next op: the sync
    with pytest.raises(PowerCut):
        file.sync()
    assert fs.power_cut("drop").read_file("/d/f") == b"first+second"


def test_a_cut_point_must_lie_ahead() -> None:
    fs = FaultFS()
    fs.makedirs("/d")
    with pytest.raises(ValueError, match="already run"):
        fs.cut_at(0)
    with pytest.raises(ValueError, match="already run"):
        fs.cut_after(0)
    fs.cut_at(1)
    with pytest.raises(PowerCut):
        fs.create("/d/f")
    assert fs.power_cut("drop").listdir("/d") == []


def test_on_cut_after_the_cut_runs_at_once() -> None:
    fs = FaultFS()
    fs.power_cut()
    called: list[bool] = []
    fs.on_cut(lambda: called.append(True))
    assert called == [True]
    with pytest.raises(PowerCut):
        fs.makedirs("/x")


async def test_run_until_cut_stops_work_stuck_behind_a_dead_thread() -> None:
    fs = FaultFS()
    fs.makedirs("/d")
    file = write(fs, "/d/f", b"x")
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def writer() -> None:
        with contextlib.suppress(PowerCut):
            file.append(b"y")

    thread = threading.Thread(target=writer)

    async def work() -> None:
        fs.cut_at(len(fs.ops))
        thread.start()
        await never  # like an append whose writer thread died of the cut

    assert await run_until_cut(fs, work())
    thread.join()
    assert never.cancelled()
    fs2 = FaultFS()
    done: list[bool] = []

    async def finishes() -> None:
        fs2.makedirs("/d")
        done.append(True)

    assert not await run_until_cut(fs2, finishes())
    assert done == [True]


async def test_run_until_cut_raises_other_errors() -> None:
    async def broken() -> None:
        raise RuntimeError("not a power cut")

    with pytest.raises(RuntimeError, match="not a power cut"):
        await run_until_cut(FaultFS(), broken())


# ---- injected faults ------------------------------------------------------------


def test_fail_sync_raises_and_a_later_sync_does_not_save_the_dropped_data() -> None:
    fs = FaultFS()
    fs.makedirs("/d")
    other = write(fs, "/d/other.log", b"o")
    file = write(fs, "/d/seg.wal", b"ab")
    fs.sync_dir("/d")
    fs.fail_sync("*.wal", times=1)
    file.append(b"cd")
    with pytest.raises(OSError, match="Input/output error") as failed:
        file.sync()
    assert failed.value.errno == errno.EIO
    other.append(b"k")
    other.sync()  # not matched
    file.append(b"ef")
    file.sync()  # the failure is used up; this one succeeds...
    assert fs.read_file("/d/seg.wal") == b"abcdef"
    # ...but, as on Linux, what the failed sync held never reached the disk.
    assert fs.read_file("/d/seg.wal", durable=True) == b"ab\0\0ef"
    assert fs.power_cut("drop").read_file("/d/other.log") == b"ok"


def test_fail_sync_with_a_predicate_and_errno_covers_directories_too() -> None:
    fs = FaultFS()
    fs.makedirs("/d")
    write(fs, "/d/f", b"x").close()
    fs.fail_sync(lambda path: path == "/d", errno=errno.ENOSPC)
    for _ in range(2):  # no limit: every time
        with pytest.raises(OSError, match="No space left") as failed:
            fs.sync_dir("/d")
        assert failed.value.errno == errno.ENOSPC
    fs.clear_faults()
    fs.sync_dir("/d")
    assert fs.power_cut("drop").exists("/d/f")


@pytest.mark.parametrize(("partial", "kept"), [(True, b"0123"), (False, b"")])
def test_fail_append_writes_a_prefix_or_nothing(partial: bool, kept: bytes) -> None:
    fs = FaultFS()
    file = write(fs, "/f", b"", sync=False)
    fs.fail_append("/f", partial=partial, times=1)
    with pytest.raises(OSError, match="No space left") as failed:
        file.append(b"01234567")
    assert failed.value.errno == errno.ENOSPC
    assert fs.read_file("/f") == kept
    file.append(b"!")
    assert fs.read_file("/f") == kept + b"!"


def test_slow_sync_delays_matching_syncs() -> None:
    fs = FaultFS()
    file = write(fs, "/slow.wal", b"x", sync=False)
    fs.sync_dir("/")
    fs.slow_sync(0.05, "*.wal", times=1)
    started = time.monotonic()
    file.sync()
    assert time.monotonic() - started >= 0.05
    assert fs.read_file("/slow.wal", durable=True) == b"x"  # slow, but done


# ---- the file-system protocol --------------------------------------------------


def test_modes_are_0600_for_files_and_0700_for_directories() -> None:
    fs = FaultFS()
    fs.makedirs("/a/b")
    write(fs, "/a/b/f", b"x").close()
    assert fs.mode("/a") == fs.mode("/a/b") == 0o700
    assert fs.mode("/a/b/f") == 0o600
    after = fs.power_cut("drop")
    assert after.mode("/a/b") == 0o700


def test_protocol_errors_match_the_real_file_system() -> None:
    fs = FaultFS()
    fs.makedirs("/d/sub")
    reader = write(fs, "/d/f", b"x")
    with pytest.raises(FileExistsError):
        fs.create("/d/f")
    with pytest.raises(FileNotFoundError):
        fs.open("/d/missing")
    with pytest.raises(FileNotFoundError):
        fs.create("/nowhere/f")
    with pytest.raises(IsADirectoryError):
        fs.remove("/d/sub")
    with pytest.raises(FileExistsError):
        fs.makedirs("/d/f")
    with pytest.raises(NotADirectoryError):
        fs.listdir("/d/f")
    read_only = fs.open("/d/f")
    with pytest.raises(OSError, match="Bad file descriptor") as failed:
        read_only.append(b"y")
    assert failed.value.errno == errno.EBADF
    reader.close()
    with pytest.raises(OSError, match="Bad file descriptor") as failed:
        reader.read(0, 1)
    assert failed.value.errno == errno.EBADF
    assert fs.listdir("/d") == ["f", "sub"]
    assert read_only.read(0, 10) == b"x"
    assert read_only.read(5, 10) == b""


def test_open_files_finds_leaked_handles() -> None:
    fs = FaultFS()
    kept = write(fs, "/a", b"x")
    write(fs, "/b", b"x").close()
    reader = fs.open("/b")
    assert fs.open_files() == ["/a", "/b"]
    kept.close()
    reader.close()
    assert fs.open_files() == []


def test_a_removed_file_stays_readable_through_an_open_handle() -> None:
    fs = FaultFS()
    file = write(fs, "/f", b"still here")
    fs.remove("/f")
    assert not fs.exists("/f")
    assert file.read(0, 100) == b"still here"


# ---- real directories ------------------------------------------------------------


def test_materialize_and_from_directory_round_trip(tmp_path: Path) -> None:
    fs = FaultFS()
    fs.makedirs("/state/wal")
    fs.makedirs("/state/empty")
    write(fs, "/state/wal/a", b"synced").close()
    fs.sync_dir("/state/wal")
    unsynced = write(fs, "/state/wal/b", b"only in memory", sync=False)
    unsynced.close()
    fs.materialize(tmp_path / "now", root="/state")
    assert (tmp_path / "now/wal/a").read_bytes() == b"synced"
    assert (tmp_path / "now/wal/b").read_bytes() == b"only in memory"
    assert (tmp_path / "now/empty").is_dir()
    for path in (tmp_path / "now/wal", tmp_path / "now/wal/a", tmp_path / "now/empty"):
        expected = 0o700 if path.is_dir() else 0o600
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
    fs.materialize(tmp_path / "durable", root="/state", durable=True)
    assert sorted(os.listdir(tmp_path / "durable/wal")) == ["a"]

    loaded = FaultFS.from_directory(tmp_path / "now", root="/state")
    assert loaded.walk() == fs.walk()
    assert loaded.walk(durable=True) == loaded.walk()  # what is on disk is durable
    assert loaded.mode("/state/wal/a") == 0o600
    assert loaded.mode("/state/wal") == 0o700
    assert loaded.ops == []


async def test_a_log_cut_mid_append_passes_the_real_verify_command(tmp_path: Path) -> None:
    fs = FaultFS()
    async with await WriteAheadLog.open("/wal", fs=fs) as log:
        written = [await log.append(bytes([i + 1]) * 700) for i in range(8)]
    synced = len(fs.read_file("/wal/0000000000000001.wal", durable=True))
    # Reopening makes the directory (op 0 from here), then the append writes
    # (op 1) and syncs (op 2): cut there, with the record written, not synced.
    fs.cut_at(len(fs.ops) + 2)

    async def append_more() -> None:
        async with await WriteAheadLog.open("/wal", fs=fs) as log:
            await log.append(b"z" * 3000)

    assert await run_until_cut(fs, append_more())
    assert fs.ops[-1] == Op("sync", "/wal/0000000000000001.wal")
    # A disk that kept part of the last record: a torn tail.
    for seed in range(50):
        after = fs.power_cut("sectors", rng=random.Random(seed))
        if synced < len(after.read_file("/wal/0000000000000001.wal")) < synced + 3012:
            break
    else:
        pytest.fail("no seed kept part of the unsynced record")
    after.materialize(tmp_path / "wal", root="/wal")
    result = CliRunner().invoke(main, ["wal", "verify", str(tmp_path / "wal")])
    assert result.exit_code == 0, result.output
    size = sum(p.length for p in written)
    assert result.output.startswith(f"ok: 1 segments, {len(written)} records, {size} bytes")
    assert "torn tail" in result.output
