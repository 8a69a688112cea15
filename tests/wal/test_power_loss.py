"""The WAL under power cuts: a cut at every file-system operation of a workload.

A scripted workload (single, concurrent and grouped appends, rolls, a group
spread over segments, a clean, a reopen) runs on a FaultFS once to count its
operations, then once per operation with the power cut just before it and
once with it cut just after. Each post-cut disk, as each power-cut mode and
several seeds leave it, is opened with the real recovery code, which must not
raise, and must replay every record whose append returned before the cut,
intact, at its position and in order. A second cut during that recovery, and
I/O errors, are covered too.
"""

from __future__ import annotations

import asyncio
import copy
import errno
import itertools
import logging
import random
import struct
from dataclasses import dataclass, field

import pytest

from streamlet.errors import WALCorruptionError, WALFailedError
from streamlet.testing.faultfs import CutMode, FaultFS, PowerCut, run_until_cut
from streamlet.wal import Durability, Position, WriteAheadLog, repair
from streamlet.wal.format import (
    FRAME_HEADER_SIZE,
    SECTOR_SIZE,
    SEGMENT_HEADER_SIZE,
    crc32c,
    encode_frame,
)

DIRECTORY = "/state/wal"
SEGMENT_SIZE = 8192
EPOCH = 100_000  # each run of appends on one disk numbers its records from a new multiple
# The first record ends 5 bytes before a sector boundary, so the header of
# the second straddles it: a power cut can keep one of its sectors and not
# the other.
FIRST = SECTOR_SIZE - 5 - SEGMENT_HEADER_SIZE - FRAME_HEADER_SIZE
_HEAD = struct.Struct("<II")  # seq, size


def record(seq: int, size: int) -> bytes:
    """Record ``seq``: its number and size, then bytes that only it has."""
    return _HEAD.pack(seq, size) + random.Random(seq).randbytes(size - _HEAD.size)


def decode(payload: bytes) -> int:
    """The seq of an intact record; fails the test if the payload is not one."""
    seq, size = _HEAD.unpack_from(payload)
    assert payload == record(seq, size), f"record {seq} came back damaged"
    return seq


@dataclass
class Workload:
    """One run of the scripted workload: what it appended, and what the log acknowledged."""

    durability: Durability = Durability.ALWAYS
    acked: dict[int, Position] = field(default_factory=dict)
    """seq -> position, for every append that returned."""
    released: int | None = None
    """Segments before this one were passed to clean() (they may be gone)."""
    next_seq: int = 0

    def new(self, size: int) -> tuple[int, bytes]:
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        return seq, record(seq, size)

    async def append(self, log: WriteAheadLog, size: int) -> None:
        seq, data = self.new(size)
        self.acked[seq] = await log.append(data)

    async def append_many(self, log: WriteAheadLog, sizes: list[int]) -> None:
        items = [self.new(size) for size in sizes]
        positions = await log.append_many([data for _, data in items])
        for (seq, _), position in zip(items, positions, strict=True):
            self.acked[seq] = position

    async def open(self, fs: FaultFS) -> WriteAheadLog:
        return await WriteAheadLog.open(
            DIRECTORY, fs=fs, durability=self.durability, segment_size=SEGMENT_SIZE
        )

    async def run(self, fs: FaultFS) -> None:
        async with await self.open(fs) as log:
            await self.append(log, FIRST)
            await self.append(log, 700)
            await asyncio.gather(*(self.append(log, size) for size in (40, 300, 8, 120)))
            await self.append_many(log, [200, 8, 90, 333])
            await log.roll()
            await log.roll()  # the segment just started is sealed empty
            await self.append_many(log, [8] * 300)  # a large group of equal records
            await self.append_many(log, [2500] * 4)  # more than a segment: spread over two
            await asyncio.gather(
                self.append(log, 64), self.append_many(log, [128, 256]), self.append(log, 512)
            )
            up_to = self.acked[self.next_seq - 1]
            self.released = up_to.segment
            await log.clean(up_to)
        async with await self.open(fs) as log:
            await self.append(log, 1000)
            await asyncio.gather(self.append(log, 30), self.append_many(log, [31, 32]))

    async def resume(self, fs: FaultFS) -> None:
        """After a cut: recover, and append a little more (numbered from the next epoch)."""
        self.next_seq = (self.next_seq // EPOCH + 1) * EPOCH
        async with await self.open(fs) as log:
            await self.append(log, 600)
            await self.append_many(log, [20, 21])


async def check_recovery(fs: FaultFS, workload: Workload, context: str) -> None:
    """Open the log on a post-cut disk and check that no acknowledged record is lost."""
    async with await WriteAheadLog.open(DIRECTORY, fs=fs, segment_size=SEGMENT_SIZE) as log:
        replayed = [(position, decode(payload)) async for position, payload in log.replay()]
        seqs = [seq for _, seq in replayed]
        for before, after in itertools.pairwise(seqs):
            # In order and gap-free, but for records lost before the next run.
            assert after == before + 1 or after // EPOCH > before // EPOCH, (
                f"{context}: records replayed out of order or with a gap: {seqs}"
            )
        found = {seq: position for position, seq in replayed}
        for seq, position in workload.acked.items():
            if workload.released is not None and position.segment < workload.released:
                continue  # released by clean(): may be gone, and if not, is checked above
            assert found.get(seq) == position, (
                f"{context}: acknowledged record {seq} at {position} was not replayed "
                f"(replayed {seqs})"
            )
        # The recovered log takes appends, and keeps them across a reopen.
        extra = record(workload.next_seq, 50)
        position = await log.append(extra)
    async with await WriteAheadLog.open(DIRECTORY, fs=fs, segment_size=SEGMENT_SIZE) as log:
        after = [item async for item in log.replay()]
    assert after[-1] == (position, extra), f"{context}: an append after recovery was lost"
    assert [(p, decode(d)) for p, d in after[:-1]] == replayed, context


# Seeds per mode; "drop" keeps exactly the durable state, so one run says all.
MODES: list[tuple[CutMode, bool, int]] = [
    ("drop", False, 1),
    ("sectors", False, 8),
    ("garble", False, 12),  # lost sectors read back as zeros, as the WAL format assumes
    ("garble", True, 4),  # ... or as random bytes
]


async def check_every_mode(cut: FaultFS, workload: Workload, context: str) -> None:
    for mode, random_bytes, seeds in MODES:
        for seed in range(seeds):
            after = cut.power_cut(mode, rng=random.Random(seed), random_bytes=random_bytes)
            where = f"{context}, power_cut({mode!r}, seed={seed}, random_bytes={random_bytes})"
            error: WALCorruptionError | None = None
            try:
                await check_recovery(after, workload, where)
            except WALCorruptionError as caught:
                if not random_bytes:
                    raise AssertionError(f"{where}: recovery failed: {caught}") from caught
                error = caught
            if error is not None:
                # Stale random bytes after a crash look like corruption and
                # stop the log (the format's fail-safe choice), but only past
                # what was synced; repair then cuts them off.
                synced = synced_size(cut, error.path)
                assert error.offset >= synced, (
                    f"{where}: corruption reported at offset {error.offset} of {error.path}, "
                    f"inside the {synced} bytes that were synced: {error}"
                )
                repair(DIRECTORY, fs=after)
                await check_recovery(after, workload, where + ", after repair")


def synced_size(fs: FaultFS, path: str) -> int:
    try:
        return len(fs.read_file(path, durable=True))
    except FileNotFoundError:
        return 0


async def count_ops(durability: Durability) -> list[str]:
    fs = FaultFS()
    workload = Workload(durability)
    assert not await run_until_cut(fs, workload.run(fs))
    assert fs.open_files() == [], "the workload leaked file handles"
    assert workload.acked.keys() == set(range(workload.next_seq))
    return [f"{op.name} {op.path}" for op in fs.ops]


@pytest.fixture(autouse=True)
def quiet_wal_logs(caplog: pytest.LogCaptureFixture) -> None:
    # Hundreds of crashed flushers and torn tails would otherwise be logged.
    caplog.set_level(logging.CRITICAL, logger="streamlet.wal")


@pytest.mark.parametrize("where", ["before", "after"])
async def test_acknowledged_records_survive_a_power_cut_at_every_operation(where: str) -> None:
    ops = await count_ops(Durability.ALWAYS)
    assert len(ops) > 50, ops  # the workload reaches what it is meant to
    for name in ("append", "sync", "rename", "sync_dir", "remove", "create", "makedirs"):
        assert any(op.startswith(name + " ") for op in ops), f"the workload never does {name}"
    for index, op in enumerate(ops):
        fs = FaultFS()
        if where == "before":
            fs.cut_at(index)
        else:
            fs.cut_after(index)
        workload = Workload()
        assert await run_until_cut(fs, workload.run(fs)), f"no cut {where} op {index}: {op}"
        assert fs.cut_index == index
        await check_every_mode(fs, workload, f"cut {where} op {index} ({op})")


async def test_after_a_clean_run_every_record_survives_every_mode() -> None:
    fs = FaultFS()
    workload = Workload()
    assert not await run_until_cut(fs, workload.run(fs))
    await check_every_mode(fs, workload, "no cut")
    # aclose synced everything: a drop cut loses nothing that reads can see.
    assert fs.power_cut("drop").walk() == fs.walk()


@pytest.mark.parametrize("durability", [Durability.NONE, Durability.INTERVAL])
async def test_without_fsync_per_append_recovery_still_opens(durability: Durability) -> None:
    # Acknowledged records may be lost here, but the log's structure may
    # not: recovery opens and replays an intact, gap-free run of records.
    ops = await count_ops(durability)
    cuts = 0
    for index in range(len(ops)):
        fs = FaultFS()
        fs.cut_at(index)
        workload = Workload(durability)
        # With "interval" the number of syncs depends on timing: a faster run
        # than the counted one may end before the last few cut points.
        cuts += await run_until_cut(fs, workload.run(fs))
        workload.acked.clear()  # nothing is promised
        for mode in ("sectors", "garble"):
            after = fs.power_cut(mode, rng=random.Random(index), random_bytes=False)
            await check_recovery(after, workload, f"{durability}: cut before op {index}, {mode}")
    assert cuts >= len(ops) - 5, f"only {cuts} of {len(ops)} runs reached their cut point"


async def test_a_header_across_a_sector_boundary_half_written_is_a_torn_tail() -> None:
    # Record 0 ends 5 bytes before a sector boundary and is synced; record 1
    # is written but not synced when the power goes. The disk kept the new
    # content of the sector after the boundary, but not of the one before it,
    # which still holds record 0 and then zeros: record 1's header is 5 zero
    # bytes followed by its real last 7.
    fs = FaultFS()
    workload = Workload()
    log = await workload.open(fs)
    await workload.append(log, FIRST)
    fs.cut_at(len(fs.ops) + 1)  # the sync of the next append
    assert await run_until_cut(fs, workload.append(log, 700))
    with pytest.raises(PowerCut):
        await log.aclose()
    segment = f"{DIRECTORY}/0000000000000001.wal"
    synced, written = fs.read_file(segment, durable=True), fs.read_file(segment)
    boundary = len(synced) + 5
    assert boundary % SECTOR_SIZE == 0
    on_disk = synced + bytes(5) + written[boundary:]
    after = FaultFS()
    after.makedirs(DIRECTORY)
    file = after.create(segment)
    file.append(on_disk)
    file.sync()
    file.close()
    after.sync_dir(DIRECTORY)
    assert list(workload.acked) == [0]
    await check_recovery(after, workload, "header across a sector boundary")
    assert after.read_file(segment)[: len(synced)] == synced


def test_five_header_bytes_of_a_valid_frame_are_never_within_one_bit_of_zero() -> None:
    # The rule above must not take a bit flip for a tear: with five or more
    # header bytes before the boundary, those hold the length and the low
    # byte of its length check, which together always have two bits set.
    assert encode_frame(b"ab")[4:8] == struct.pack("<I", crc32c(struct.pack("<I", 2)))
    for length in [0] + [1 << i for i in range(31)]:
        check = crc32c(struct.pack("<I", length))
        assert bin(length).count("1") + bin(check & 0xFF).count("1") >= 2, length


async def test_a_second_cut_during_recovery_loses_nothing_acknowledged() -> None:
    # Recovery changes the disk too (removes debris, cuts a torn tail off):
    # the power may go again while it does, or while appends follow it.
    ops = await count_ops(Durability.ALWAYS)
    checked = 0
    for index in range(0, len(ops), 3):
        cut = FaultFS()
        cut.cut_at(index)
        first = Workload()
        assert await run_until_cut(cut, first.run(cut))
        for mode in ("sectors", "garble"):
            rng = random.Random(index)
            seed = rng.getrandbits(32)
            counted = copy.deepcopy(first)
            fs = cut.power_cut(mode, rng=random.Random(seed), random_bytes=False)
            assert not await run_until_cut(fs, counted.resume(fs))
            for second in range(len(fs.ops)):
                # The same post-cut disk again (same seed), cut at another op.
                fs = cut.power_cut(mode, rng=random.Random(seed), random_bytes=False)
                fs.cut_at(second)
                workload = copy.deepcopy(first)
                assert await run_until_cut(fs, workload.resume(fs))
                context = f"cut before op {index} ({ops[index]}), {mode}, then before op {second}"
                await check_recovery(fs.power_cut("sectors", rng=rng), workload, context)
                checked += 1
    assert checked > 100


# ---- I/O errors -----------------------------------------------------------------


async def test_an_fsync_error_fails_the_log_for_good_and_loses_nothing_acknowledged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="streamlet.wal")
    fs = FaultFS()
    workload = Workload()
    log = await workload.open(fs)
    for size in (100, 600, 30):
        await workload.append(log, size)
    good = dict(workload.acked)
    fs.fail_sync("*.wal", errno=errno.EIO, times=1)
    results = await asyncio.gather(
        *(workload.append(log, 50) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, WALFailedError) for r in results), results
    assert isinstance(log.failed, OSError)
    assert log.failed.errno == errno.EIO
    # The injected failure is used up, so a sync would succeed now; the log
    # must not try one: what the failed sync held is not on disk.
    for attempt in (workload.append(log, 10), workload.append_many(log, [10]), log.roll()):
        with pytest.raises(WALFailedError):
            await attempt
    syncs = sum(op.name == "sync" for op in fs.ops)
    await log.aclose()
    assert sum(op.name == "sync" for op in fs.ops) == syncs, "aclose synced a failed log"
    assert workload.acked == good
    assert fs.open_files() == []
    for mode in ("drop", "sectors"):
        await check_recovery(fs.power_cut(mode), workload, f"after fsync EIO, {mode}")


async def test_a_failed_write_fails_the_log_and_its_torn_tail_is_cut_on_reopen() -> None:
    fs = FaultFS()
    workload = Workload()
    log = await workload.open(fs)
    for size in (100, 600):
        await workload.append(log, size)
    fs.fail_append("*.wal", errno=errno.ENOSPC, partial=True, times=1)
    with pytest.raises(WALFailedError) as failed:
        await workload.append(log, 400)
    assert isinstance(failed.value.__cause__, OSError)
    assert failed.value.__cause__.errno == errno.ENOSPC
    with pytest.raises(WALFailedError):
        await workload.append(log, 10)
    await log.aclose()
    last = workload.acked[1]
    end = last.offset + FRAME_HEADER_SIZE + last.length
    half_a_frame = (FRAME_HEADER_SIZE + 400) // 2
    assert len(fs.read_file(f"{DIRECTORY}/0000000000000001.wal")) == end + half_a_frame
    # Process restart on the same disk: the half frame is cut off, and the
    # log goes on from the acknowledged records.
    await check_recovery(fs, workload, "after ENOSPC, restart")
