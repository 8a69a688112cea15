"""Two WAL steps that the power-loss tests do not pin down on their own.

Recovery cuts a torn tail off, then fsyncs the file. Without that fsync the
cut lives in the page cache only: on a real disk a power cut may then keep
the old, longer size with new appends written over the start of the torn
frame, so that stale bytes of that frame follow the new records and the
next recovery takes them for corruption. FaultFS reports what is durable
directly, so the missing fsync shows without needing that disk.

A failed fsync fails the log for good: later appends are refused at once.
Without the refusal they would be queued for a writer that has stopped and
wait forever (the broader test in test_power_loss.py then only ends at the
test timeout).
"""

from __future__ import annotations

import errno
import logging

import anyio
import pytest

from streamlet.errors import WALFailedError
from streamlet.testing.faultfs import FaultFS
from streamlet.wal import WriteAheadLog
from streamlet.wal.format import encode_frame

DIRECTORY = "/state/wal"
SEGMENT = f"{DIRECTORY}/0000000000000001.wal"


async def test_the_cut_of_a_torn_tail_is_durable_once_the_log_is_open(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fs = FaultFS()
    async with await WriteAheadLog.open(DIRECTORY, fs=fs) as log:
        await log.append(b"a" * 100)
    intact = fs.read_file(SEGMENT, durable=True)
    # What a power cut in the middle of an append can leave: the first
    # sector of a longer frame, on disk.
    file = fs.open(SEGMENT, writable=True)
    file.append(encode_frame(b"b" * 2000)[:512])
    file.sync()
    file.close()

    caplog.set_level(logging.WARNING, logger="streamlet.wal")
    log = await WriteAheadLog.open(DIRECTORY, fs=fs)
    try:
        assert "torn tail of 512 bytes" in caplog.text
        assert fs.read_file(SEGMENT) == intact
        # Before anything else is written or synced: what the disk holds.
        assert fs.read_file(SEGMENT, durable=True) == intact
        assert [payload async for _, payload in log.replay()] == [b"a" * 100]
    finally:
        await log.aclose()


async def test_after_a_failed_fsync_every_append_is_refused_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.CRITICAL, logger="streamlet.wal")
    fs = FaultFS()
    log = await WriteAheadLog.open(DIRECTORY, fs=fs)
    try:
        await log.append(b"kept")
        fs.fail_sync("*.wal", errno=errno.EIO, times=1)
        with pytest.raises(WALFailedError):
            await log.append(b"lost")
        syncs = sum(op.name == "sync" for op in fs.ops)
        # The injected error is used up: a retried fsync would succeed now.
        with anyio.fail_after(5):
            for attempt in (log.append(b"x"), log.append_many([b"y"]), log.roll()):
                with pytest.raises(WALFailedError):
                    await attempt
        assert sum(op.name == "sync" for op in fs.ops) == syncs
    finally:
        await log.aclose()
