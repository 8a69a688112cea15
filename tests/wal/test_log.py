"""WriteAheadLog: appends, group commit, reads, replay, rolls, cleaning, failures."""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import random
import re
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamlet.errors import (
    ConfigError,
    RecordTooLargeError,
    WALClosedError,
    WALError,
    WALFailedError,
)
from streamlet.fs import File, OsFileSystem
from streamlet.wal import Durability, Position, WriteAheadLog
from streamlet.wal.format import SEGMENT_HEADER_SIZE, segment_name


class CountingFile:
    """A file that counts its syncs and can be told to fail them."""

    def __init__(self, inner: File, owner: CountingFs) -> None:
        self._inner = inner
        self._owner = owner

    @property
    def path(self) -> str:
        return self._inner.path

    def append(self, data: bytes) -> None:
        self._owner.appends += 1
        self._inner.append(data)

    def read(self, offset: int, size: int) -> bytes:
        return self._inner.read(offset, size)

    def size(self) -> int:
        return self._inner.size()

    def sync(self) -> None:
        if self._owner.fail_sync:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        self._inner.sync()
        self._owner.syncs += 1
        self._owner.sync_times.append(time.monotonic())
        self._owner.synced.set()

    def truncate(self, size: int) -> None:
        self._inner.truncate(size)

    def close(self) -> None:
        self._inner.close()


class CountingFs(OsFileSystem):
    """The real file system, counting file syncs; ``fail_sync`` makes them fail with EIO."""

    def __init__(self) -> None:
        self.syncs = 0
        self.sync_times: list[float] = []
        self.synced = threading.Event()
        self.appends = 0
        self.fail_sync = False

    def create(self, path: str) -> File:
        return CountingFile(super().create(path), self)

    def open(self, path: str, *, writable: bool = False) -> File:
        return CountingFile(super().open(path, writable=writable), self)


class GatedFile(CountingFile):
    """A counting file whose syncs wait at its file system's gate."""

    def __init__(self, inner: File, owner: GatedFs) -> None:
        super().__init__(inner, owner)
        self._gated = owner

    def sync(self) -> None:
        self._gated.held.set()
        assert self._gated.gate.wait(10), "the test never opened the gate"
        super().sync()


class GatedFs(CountingFs):
    """A counting file system whose file syncs wait while ``gate`` is clear.

    ``held`` is set when a sync reaches the gate: the writer thread is then
    busy, and appends made meanwhile gather for the next group.
    """

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.held = threading.Event()

    def create(self, path: str) -> File:
        return GatedFile(OsFileSystem.create(self, path), self)

    def open(self, path: str, *, writable: bool = False) -> File:
        return GatedFile(OsFileSystem.open(self, path, writable=writable), self)

    async def hold_writer(self, log: WriteAheadLog) -> asyncio.Task[Position]:
        """Close the gate and start an append; return once its sync waits at the gate."""
        self.gate.clear()
        self.held.clear()
        task = asyncio.create_task(log.append(b"holds the writer"))
        assert await anyio.to_thread.run_sync(self.held.wait, 5), "no sync reached the gate"
        return task


async def replay_all(
    log: WriteAheadLog, start: Position | None = None
) -> list[tuple[Position, bytes]]:
    return [item async for item in log.replay(start)]


@pytest.fixture
def umask_zero() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# ---- the main property ------------------------------------------------------

operation = st.one_of(
    st.tuples(st.just("append"), st.binary(max_size=300)),
    st.tuples(st.just("many"), st.lists(st.binary(max_size=120), max_size=12)),
    st.tuples(st.just("reopen"), st.none()),
    st.tuples(st.just("roll"), st.none()),
)


@given(
    operations=st.lists(operation, min_size=1, max_size=25),
    segment_size=st.sampled_from([64, 150, 400, 4096]),
)
@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
def test_records_come_back_byte_for_byte_across_rolls_and_reopens(
    operations: list[tuple[str, object]], segment_size: int
) -> None:
    async def scenario(directory: str) -> None:
        written: list[tuple[Position, bytes]] = []

        async def open_log() -> WriteAheadLog:
            return await WriteAheadLog.open(directory, segment_size=segment_size)

        log = await open_log()
        try:
            for kind, arg in operations:
                if kind == "append":
                    assert isinstance(arg, bytes)
                    written.append((await log.append(arg), arg))
                elif kind == "many":
                    assert isinstance(arg, list)
                    positions = await log.append_many(arg)
                    written += zip(positions, arg, strict=True)
                elif kind == "roll":
                    before = log.last_segment
                    await log.roll()
                    assert log.last_segment == before + 1
                else:
                    await log.aclose()
                    log = await open_log()
            positions = [p for p, _ in written]
            assert positions == sorted(positions)
            assert len(set(positions)) == len(positions)
            for position, record in written:
                assert position.length == len(record)
                assert await log.read(position) == record
            assert await replay_all(log) == written
        finally:
            await log.aclose()
        log = await open_log()
        try:
            assert await replay_all(log) == written
            if written:
                middle = len(written) // 2
                assert await replay_all(log, written[middle][0]) == written[middle:]
        finally:
            await log.aclose()

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(os.path.join(tmp, "wal")))


# ---- group commit -------------------------------------------------------------


async def test_concurrent_appends_share_syncs_and_are_all_durable(tmp_path: Path) -> None:
    fs = CountingFs()
    log = await WriteAheadLog.open(tmp_path / "wal", fs=fs)
    fs.syncs = 0
    records = [f"record {i}".encode() * (i % 7 + 1) for i in range(64)]
    positions = await asyncio.gather(*(log.append(r) for r in records))
    syncs = fs.syncs
    await log.aclose()
    assert 1 <= syncs < len(records), f"{syncs} syncs for {len(records)} appends"

    log = await WriteAheadLog.open(tmp_path / "wal")
    try:
        assert await replay_all(log) == sorted(zip(positions, records, strict=True))
    finally:
        await log.aclose()


async def test_appends_made_while_a_group_syncs_are_written_with_one_write(
    tmp_path: Path,
) -> None:
    fs = GatedFs()
    async with await WriteAheadLog.open(tmp_path / "wal", fs=fs) as log:
        holder = await fs.hold_writer(log)
        fs.syncs = fs.appends = 0
        records = [bytes([i]) * (i + 1) for i in range(60)]
        tasks = [asyncio.create_task(log.append(r)) for r in records[:40]]
        await anyio.wait_all_tasks_blocked()  # these are queued; more come later
        tasks += [asyncio.create_task(log.append(r)) for r in records[40:]]
        await anyio.wait_all_tasks_blocked()
        fs.gate.set()
        positions = await asyncio.gather(*tasks)
        await holder
        assert (fs.appends, fs.syncs) == (1, 2)  # the held group's sync, then theirs
        for position, following, record in zip(positions, positions[1:], records, strict=False):
            assert following.offset == position.offset + 12 + len(record)
        assert (await replay_all(log))[1:] == list(zip(positions, records, strict=True))


async def test_mixed_calls_made_while_a_group_syncs_keep_call_order(tmp_path: Path) -> None:
    fs = GatedFs()
    async with await WriteAheadLog.open(
        tmp_path / "wal", fs=fs, segment_size=600, max_group_bytes=300
    ) as log:
        holder = await fs.hold_writer(log)
        calls: list[tuple[str, list[bytes]]] = [
            ("append", [b"a" * 40]),
            ("many", [b"b" * 30, b"c" * 10]),
            ("roll", []),
            ("append", [b"d" * 200]),
            ("append", [b"e" * 200]),  # past max_group_bytes: a chunk of its own
            ("many", [bytes([i]) * 100 for i in range(8)]),  # larger than a segment: spread
            ("append", [b"f"]),
            ("append", [b"g" * 700]),  # larger than a segment: alone in one
            ("append", [b"h" * 5]),
            ("roll", []),
            ("roll", []),
            ("many", [b"i" * 50] * 3),
            ("append", [b"j" * 7]),
        ]

        async def call(kind: str, records: list[bytes]) -> list[Position]:
            if kind == "append":
                return [await log.append(records[0])]
            if kind == "many":
                return list(await log.append_many(records))
            await log.roll()
            return []

        tasks = [asyncio.create_task(call(kind, records)) for kind, records in calls[:7]]
        await anyio.wait_all_tasks_blocked()
        tasks += [asyncio.create_task(call(kind, records)) for kind, records in calls[7:]]
        await anyio.wait_all_tasks_blocked()
        fs.gate.set()
        results = await asyncio.gather(*tasks)
        await holder
        positions = [p for result in results for p in result]
        records = [r for _, rs in calls for r in rs]
        assert positions == sorted(positions)
        assert len(set(positions)) == len(positions)
        assert results[3][0].segment == results[1][0].segment + 1  # the roll came between
        assert results[7][0].offset == SEGMENT_HEADER_SIZE
        assert results[11][0].segment == results[8][0].segment + 2  # two rolls
        assert (await replay_all(log))[1:] == list(zip(positions, records, strict=True))


@pytest.mark.parametrize("durability", ["none", "always"])
async def test_many_tasks_mixing_calls_are_replayed_in_call_order(
    tmp_path: Path, durability: str
) -> None:
    """The writer thread takes chunks while the loop adds to them: nothing is lost or moved."""
    rng = random.Random(7)
    calls: list[tuple[list[bytes], asyncio.Future[list[Position]]]] = []  # in call order

    async def worker(log: WriteAheadLog, seed: int) -> None:
        choose = random.Random(seed)
        for _ in range(60):
            kind = choose.random()
            done: asyncio.Future[list[Position]] = asyncio.get_running_loop().create_future()
            if kind < 0.75:
                record = rng.randbytes(choose.choice([0, 1, 50, 300, 2000]))
                calls.append(([record], done))  # in the same step as the call
                done.set_result([await log.append(record)])
            elif kind < 0.95:
                records = [rng.randbytes(choose.choice([10, 500])) for _ in range(3)]
                calls.append((records, done))
                done.set_result(list(await log.append_many(records)))
            else:
                calls.append(([], done))
                await log.roll()
                done.set_result([])
            if choose.random() < 0.2:
                await asyncio.sleep(0)

    async with await WriteAheadLog.open(
        tmp_path / "wal", durability=durability, segment_size=8192, max_group_bytes=3000
    ) as log:
        await asyncio.gather(*(worker(log, seed) for seed in range(24)))
    expected = [
        (position, record)
        for records, done in calls
        for position, record in zip(done.result(), records, strict=True)
    ]
    async with await WriteAheadLog.open(tmp_path / "wal") as log:
        assert await replay_all(log) == expected


async def test_append_many_is_one_group(tmp_path: Path) -> None:
    fs = CountingFs()
    async with await WriteAheadLog.open(tmp_path / "wal", fs=fs) as log:
        fs.syncs = fs.appends = 0
        positions = await log.append_many([b"a" * 10, b"b" * 20, b"c" * 30])
        assert (fs.appends, fs.syncs) == (1, 1)
        assert [p.length for p in positions] == [10, 20, 30]
        assert positions[1].offset == positions[0].offset + 12 + 10
        assert await log.append_many([]) == []


async def test_a_large_append_many_returns_its_positions_after_the_sync(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fs = CountingFs()
    async with await WriteAheadLog.open(tmp_path / "wal", fs=fs) as log:
        records = [i.to_bytes(4, "little") * (i % 5) for i in range(3000)]
        fs.syncs = 0
        positions = await log.append_many(records)
        assert fs.syncs == 1
        assert positions == sorted(positions)
        assert await replay_all(log) == list(zip(positions, records, strict=True))
        fs.fail_sync = True
        with pytest.raises(WALFailedError):
            await log.append_many(records)
    gc.collect()  # a future holding an exception nobody retrieved would be logged now
    assert not [r for r in caplog.records if r.name == "asyncio"]


async def test_a_cancelled_large_append_many_is_still_written(tmp_path: Path) -> None:
    async with await WriteAheadLog.open(tmp_path / "wal") as log:
        records = [bytes([i % 256]) * 20 for i in range(2000)]
        task = asyncio.create_task(log.append_many(records))
        await asyncio.sleep(0)  # one step: queued, not yet written, when it is cancelled
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        after = await log.append(b"after")
    async with await WriteAheadLog.open(tmp_path / "wal") as log:
        replayed = await replay_all(log)
    assert [r for _, r in replayed] == [*records, b"after"]
    assert replayed[-1][0] == after


async def test_append_many_larger_than_a_segment_spreads_whole_records(tmp_path: Path) -> None:
    async with await WriteAheadLog.open(tmp_path / "wal", segment_size=200) as log:
        records = [bytes([i]) * 50 for i in range(10)]
        positions = await log.append_many(records)
        assert len({p.segment for p in positions}) > 1
        for position in positions:
            assert position.offset + 12 + position.length <= 200
        assert await replay_all(log) == list(zip(positions, records, strict=True))


async def test_a_record_larger_than_a_segment_goes_alone(tmp_path: Path) -> None:
    async with await WriteAheadLog.open(tmp_path / "wal", segment_size=100) as log:
        small = await log.append(b"s")
        big = await log.append(b"B" * 500)
        after = await log.append(b"t")
        assert small.segment < big.segment < after.segment
        assert big.offset == SEGMENT_HEADER_SIZE
        assert await log.read(big) == b"B" * 500


async def test_a_cancelled_append_does_not_corrupt_its_group(tmp_path: Path) -> None:
    async with await WriteAheadLog.open(tmp_path / "wal") as log:
        tasks = [asyncio.create_task(log.append(bytes([i]) * 100)) for i in range(40)]
        await anyio.wait_all_tasks_blocked()
        for task in tasks[::3]:
            task.cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        last = await log.append(b"after")
    async with await WriteAheadLog.open(tmp_path / "wal") as log:
        replayed = dict(await replay_all(log))
    for i, result in enumerate(done):
        if isinstance(result, Position):
            assert replayed[result] == bytes([i]) * 100
        else:
            assert isinstance(result, asyncio.CancelledError)
    assert replayed[last] == b"after"


# ---- limits and settings ------------------------------------------------------


async def test_record_too_large_names_size_limit_and_setting(tmp_path: Path) -> None:
    async with await WriteAheadLog.open(tmp_path / "wal", max_record_size=100) as log:
        with pytest.raises(RecordTooLargeError, match=r"101 bytes.*limit of 100.*max_record_size"):
            await log.append(b"x" * 101)
        with pytest.raises(RecordTooLargeError, match=r"record 1 of the group is 150 bytes"):
            await log.append_many([b"ok", b"y" * 150])
        assert await log.append(b"x" * 100) == Position(1, SEGMENT_HEADER_SIZE, 100)
        assert len(await replay_all(log)) == 1


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("durability", "sometimes", "durability='sometimes' is not one of 'always', 'interval'"),
        ("sync_interval", 0, "sync_interval=0 must be a positive"),
        ("sync_interval", float("nan"), "sync_interval=nan"),
        ("segment_size", 10, "segment_size=10 is out of range"),
        ("max_record_size", 2**31, "max_record_size=2147483648 is out of range"),
        ("max_record_size", 0, "max_record_size=0 is out of range"),
        ("max_group_bytes", "big", "max_group_bytes='big' must be an integer"),
    ],
)
async def test_bad_settings_are_config_errors(
    tmp_path: Path, setting: str, value: object, message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        await WriteAheadLog.open(tmp_path / "wal", **{setting: value})  # type: ignore[arg-type]
    assert not (tmp_path / "wal").exists()


# ---- files, directory, lock ---------------------------------------------------


@pytest.mark.usefixtures("umask_zero")
async def test_files_are_0600_and_directories_0700(tmp_path: Path) -> None:
    directory = tmp_path / "state" / "wal"
    async with await WriteAheadLog.open(directory, segment_size=100) as log:
        await log.append(b"x" * 80)
        await log.append(b"y" * 80)
    for path in (tmp_path / "state", directory):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    names = sorted(p.name for p in directory.iterdir())
    assert names == [segment_name(1), segment_name(2), "LOCK"]
    for name in names:
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600, name


async def test_a_second_open_of_the_same_directory_fails_clearly(tmp_path: Path) -> None:
    async with await WriteAheadLog.open(tmp_path / "wal"):
        with pytest.raises(WALError, match=r"already open") as info:
            await WriteAheadLog.open(tmp_path / "wal")
        assert str(tmp_path / "wal") in str(info.value)
    # Closing released the lock.
    log = await WriteAheadLog.open(tmp_path / "wal")
    await log.aclose()


# ---- reading and replaying ----------------------------------------------------


async def test_read_checks_the_position(tmp_path: Path) -> None:
    async with await WriteAheadLog.open(tmp_path / "wal") as log:
        position = await log.append(b"hello")
        assert await log.read(position) == b"hello"
        with pytest.raises(WALError, match="does not match"):
            await log.read(position._replace(length=3))
        with pytest.raises(WALError, match="outside what was written"):
            await log.read(position._replace(offset=position.offset + 1000))
        with pytest.raises(WALError, match="outside what was written"):
            await log.read(Position(9, SEGMENT_HEADER_SIZE, 1))


async def test_replay_from_a_position_is_inclusive(tmp_path: Path) -> None:
    async with await WriteAheadLog.open(tmp_path / "wal", segment_size=120) as log:
        positions = [await log.append(bytes([i]) * 30) for i in range(10)]
        tail = await replay_all(log, positions[4])
        assert [p for p, _ in tail] == positions[4:]
        with pytest.raises(WALError, match="not from this log"):
            await replay_all(log, positions[4]._replace(length=7))


async def test_replay_sees_records_appended_during_it(tmp_path: Path) -> None:
    async with await WriteAheadLog.open(tmp_path / "wal", segment_size=100) as log:
        first = await log.append(b"a" * 40)
        seen = []
        async for position, record in log.replay():
            seen.append(record)
            if position == first:
                await log.append(b"b" * 40)
                await log.append(b"c" * 40)
        assert seen == [b"a" * 40, b"b" * 40, b"c" * 40]


# ---- rolling and cleaning -----------------------------------------------------


async def test_clean_deletes_only_whole_earlier_segments(tmp_path: Path) -> None:
    directory = tmp_path / "wal"
    async with await WriteAheadLog.open(directory, segment_size=100) as log:
        positions = [await log.append(bytes([i]) * 40) for i in range(12)]
        segments = sorted({p.segment for p in positions})
        assert len(segments) >= 4
        keep = next(p for p in positions if p.segment == segments[2])
        assert await log.clean(keep) == 2
        assert log.first_segment == segments[2]
        on_disk = sorted(p.name for p in directory.iterdir() if p.suffix == ".wal")
        assert on_disk == [segment_name(s) for s in segments[2:]]
        replayed = await replay_all(log)
        assert [p for p, _ in replayed] == [p for p in positions if p.segment >= segments[2]]
        with pytest.raises(WALError, match="was cleaned"):
            await log.read(positions[0])
        with pytest.raises(WALError, match="was cleaned"):
            await replay_all(log, positions[0])
        assert await log.clean(keep) == 0
        # The segment appends go to is never deleted.
        assert await log.clean(Position(log.last_segment, 99, 0)) == len(segments) - 3
        assert log.first_segment == log.last_segment
        with pytest.raises(WALError, match="ends in segment"):
            await log.clean(Position(log.last_segment + 5, 32, 0))
    async with await WriteAheadLog.open(directory, segment_size=100) as log:
        assert log.first_segment == segments[-1]
        assert [p for p, _ in await replay_all(log)] == [
            p for p in positions if p.segment == segments[-1]
        ]


async def test_clean_closes_cached_read_handles(tmp_path: Path) -> None:
    async with await WriteAheadLog.open(tmp_path / "wal", segment_size=100) as log:
        old = await log.append(b"x" * 60)
        await log.read(old)  # caches a read handle of segment 1
        await log.roll()
        new = await log.append(b"y")
        assert await log.clean(new) == 1
        assert not (tmp_path / "wal" / segment_name(1)).exists()


async def test_roll_starts_a_new_segment(tmp_path: Path) -> None:
    async with await WriteAheadLog.open(tmp_path / "wal") as log:
        a = await log.append(b"a")
        await log.roll()
        b = await log.append(b"b")
        assert (a.segment, b.segment) == (1, 2)
        assert b.offset == SEGMENT_HEADER_SIZE


# ---- durability modes ---------------------------------------------------------


async def test_interval_durability_syncs_at_most_every_interval(tmp_path: Path) -> None:
    fs = CountingFs()
    log = await WriteAheadLog.open(
        tmp_path / "wal", durability="interval", sync_interval=0.2, fs=fs
    )
    assert log.durability is Durability.INTERVAL
    fs.syncs = 0
    started = time.monotonic()
    positions = [await log.append(bytes([i])) for i in range(50)]
    assert fs.syncs <= (time.monotonic() - started) / 0.2 + 1
    appended = time.monotonic()
    # No more appends: once the interval runs out, what was written gets synced.
    while not any(t > appended for t in fs.sync_times):
        assert await anyio.to_thread.run_sync(fs.synced.wait, 5), "no sync within 5s"
        fs.synced.clear()
    await log.aclose()
    async with await WriteAheadLog.open(tmp_path / "wal") as log:
        assert [p for p, _ in await replay_all(log)] == positions


async def test_none_durability_never_syncs_appends_but_aclose_does(tmp_path: Path) -> None:
    fs = CountingFs()
    log = await WriteAheadLog.open(tmp_path / "wal", durability=Durability.NONE, fs=fs)
    fs.syncs = 0
    positions = await asyncio.gather(*(log.append(bytes([i])) for i in range(20)))
    assert await log.read(positions[-1]) == bytes([19])
    assert fs.syncs == 0
    await log.aclose()
    assert fs.syncs == 1
    async with await WriteAheadLog.open(tmp_path / "wal") as log:
        assert len(await replay_all(log)) == 20


# ---- failure and closing ------------------------------------------------------


async def test_a_failed_fsync_fails_the_group_and_every_later_append(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fs = CountingFs()
    log = await WriteAheadLog.open(tmp_path / "wal", fs=fs)
    good = await log.append(b"before")
    fs.fail_sync = True
    results = await asyncio.gather(
        *(log.append(bytes([i]) * 10) for i in range(8)), return_exceptions=True
    )
    assert all(isinstance(r, WALFailedError) for r in results), results
    error = results[0]
    assert isinstance(error, WALFailedError)
    assert isinstance(error.__cause__, OSError)
    assert error.__cause__.errno == errno.EIO
    message = str(error)
    assert str(tmp_path / "wal") in message
    assert "Input/output error" in message
    assert "last successful sync" in message
    assert "restart" in message
    assert log.failed is error.__cause__

    fs.fail_sync = False  # a later success must not revive the log
    with pytest.raises(WALFailedError):
        await log.append(b"later")
    with pytest.raises(WALFailedError):
        await log.append_many([b"later"])
    with pytest.raises(WALFailedError):
        await log.roll()
    assert await log.read(good) == b"before"
    await log.aclose()  # quiet: the failure was already reported
    gc.collect()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "failed" in errors[0].getMessage()


async def test_a_failed_fsync_on_close_is_raised_once(tmp_path: Path) -> None:
    fs = CountingFs()
    log = await WriteAheadLog.open(tmp_path / "wal", durability="none", fs=fs)
    await log.append(b"unsynced")
    fs.fail_sync = True
    with pytest.raises(WALFailedError):
        await log.aclose()
    await log.aclose()
    assert isinstance(log.failed, OSError)


async def test_aclose_is_idempotent_and_closes_for_good(tmp_path: Path) -> None:
    log = await WriteAheadLog.open(tmp_path / "wal")
    position = await log.append(b"x")
    pending = asyncio.create_task(log.append(b"queued before close"))
    await anyio.wait_all_tasks_blocked()
    await asyncio.gather(log.aclose(), log.aclose())
    await log.aclose()
    assert isinstance(await pending, Position)  # flushed by aclose
    with pytest.raises(WALClosedError):
        await log.append(b"y")
    with pytest.raises(WALClosedError):
        await log.append_many([b"y"])
    with pytest.raises(WALClosedError):
        await log.read(position)
    with pytest.raises(WALClosedError):
        await replay_all(log)
    with pytest.raises(WALClosedError):
        await log.roll()


# ---- the event loop never waits on the disk -----------------------------------

BLOCKING = (
    "close", "fchmod", "fdatasync", "fstat", "fsync", "ftruncate", "listdir", "mkdir",
    "open", "pread", "replace", "stat", "unlink", "write",
)  # fmt: skip


async def test_no_file_system_call_runs_on_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop_thread = threading.current_thread()
    calls: list[str] = []

    def guarded(name: str, real: Callable[..., object]) -> Callable[..., object]:
        def call(*args: object, **kwargs: object) -> object:
            if threading.current_thread() is loop_thread:
                calls.append(name)
            return real(*args, **kwargs)

        return call

    await anyio.to_thread.run_sync(lambda: None)  # anyio's own first-use setup
    for name in BLOCKING:
        monkeypatch.setattr(os, name, guarded(name, getattr(os, name)))
    log = await WriteAheadLog.open(tmp_path / "wal", segment_size=200)
    positions = [await log.append(bytes([i]) * 50) for i in range(10)]
    positions += await log.append_many([b"m" * 50] * 5)
    await log.roll()
    assert await log.read(positions[0]) == bytes([0]) * 50
    assert len(await replay_all(log)) == 15
    assert await log.clean(positions[-1]) > 0
    await log.aclose()
    monkeypatch.undo()
    assert calls == []


async def test_stats_count_bytes_fsyncs_appends_and_segments(tmp_path: Path) -> None:
    from streamlet.wal.format import FRAME_HEADER_SIZE

    wal = await WriteAheadLog.open(str(tmp_path / "w"), segment_size=4096)
    try:
        await wal.append(b"x" * 100)
        await wal.append_many([b"y" * 10] * 5)
        stats = wal.stats()
        assert stats.appended_bytes == 100 + 50 + 6 * FRAME_HEADER_SIZE
        assert stats.append.count == 2  # one per call, as the callers waited
        assert stats.fsync.count >= 1  # durability "always": each group commit synced
        assert stats.fsync.cumulative()[-1] == (float("inf"), stats.fsync.count)
        assert stats.segments == 1
        for _ in range(40):  # over the 4 KiB segment size: more segments
            await wal.append(b"z" * 200)
        assert wal.stats().segments > 1
    finally:
        await wal.aclose()
