"""Power cuts at every file operation of whole batch cycles, through the App.

SIGKILL keeps the page cache, so it cannot catch a missing fsync. Here the
App, its tracker log, checkpoints and a FileSink all run on FaultFS; the
power is cut before or after each numbered file operation of a run of six
batches (tracker appends, checkpoint writes and renames, sink part files,
directory syncs), the disk comes back as a power loss could leave it, and a
new App recovers on it. Every batch a listener saw done must still be there,
and in the end every record is in the sink exactly once. (SQLite files meet
the same power cuts through streamlet.testing.sqlite_vfs: the SQLiteSink in
tests/sinks/test_sqlite.py, keyed state in tests/state/test_state_power_cut.py.)

Every operation is cut at, in every mode, so the test does not depend on
which operations a sample happens to pick. In ``"garble"`` mode a cut may
leave stale random bytes in the unsynced tail of the tracker log, which the
log cannot tell from damage: it refuses to open (the fail-safe documented in
:mod:`streamlet.wal.format`). That is accepted only past what was synced,
and then the log is repaired, as an operator would, and must lose nothing
that was reported done.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Callable

import anyio
import pytest

from streamlet.app import App
from streamlet.errors import WALCorruptionError
from streamlet.metrics import BatchInfo
from streamlet.records import Batch
from streamlet.sinks.file import FileSink
from streamlet.sources.sequence import SequenceSource
from streamlet.testing.faultfs import CutMode, FaultFS, run_until_cut
from streamlet.wal import repair

RECORDS = 60


def _app(fs: FaultFS, on_batch: Callable[[BatchInfo], object]) -> App:
    app = App("power", state_dir="/state", batch_interval=0.01, checkpoint_interval=0, fs=fs)
    source = app.source(
        SequenceSource(rate=None, limit=RECORDS, max_rate=1000), name="numbers"
    )  # 10 records a batch: six batches

    @app.handler(source, sink=FileSink("/out", fs=fs))
    async def copy(batch: Batch) -> list[str]:
        return [r.value.decode() for r in batch]

    app.add_listener(on_batch)
    return app


async def _run_to_the_end(fs: FaultFS, done: list[int]) -> None:
    """Serve until every record has been in a batch (counting from this start)."""
    seen = {"records": 0}
    finished = anyio.Event()

    def check() -> None:
        committed = FileSink.read_committed("/out", fs=fs)
        if sum(len(lines) for lines in committed.values()) >= RECORDS:
            finished.set()

    def on_batch(info: BatchInfo) -> None:
        done.append(info.batch_id)
        seen["records"] += info.records
        check()

    app = _app(fs, on_batch)
    async with anyio.create_task_group() as tg:
        await tg.start(app.serve)  # recovery is over when this returns
        check()  # a restart may find every record already in
        with anyio.fail_after(20):
            await finished.wait()
        app.stop()


async def _until_the_cut(fs: FaultFS, done: list[int]) -> None:
    """Run to the end; once the power is gone, whatever it broke is expected."""
    try:
        await _run_to_the_end(fs, done)
    except BaseException:
        if not fs.is_cut:
            raise


def _check(disk: FaultFS, reported: list[int], where: str) -> None:
    committed = FileSink.read_committed("/out", fs=disk)
    missing = [b for b in reported if b not in committed]
    assert missing == [], f"{where}: batches reported done are gone: {missing}"
    values = Counter(line.decode() for lines in committed.values() for line in lines)
    assert values == Counter(str(i) for i in range(RECORDS)), f"{where}: {values}"


async def test_a_clean_run_counts_its_file_operations() -> None:
    fs = FaultFS()
    done: list[int] = []
    await _run_to_the_end(fs, done)
    _check(fs.power_cut("drop"), done, "clean run")
    kinds = Counter(op.name for op in fs.ops)
    assert kinds["sync"] > 10
    assert kinds["sync_dir"] > 5
    assert kinds["rename"] >= 6  # a part file and a checkpoint per batch


async def _ops_of_a_run() -> int:
    fs = FaultFS()
    await _run_to_the_end(fs, [])
    return len(fs.ops)


@pytest.mark.parametrize(("mode", "when"), [("drop", "at"), ("sectors", "after"), ("garble", "at")])
async def test_a_power_cut_at_any_operation_loses_no_done_batch_and_repeats_none(
    mode: CutMode, when: str
) -> None:
    total = await _ops_of_a_run()
    repaired: list[int] = []
    for index in range(total):
        fs = FaultFS()
        (fs.cut_at if when == "at" else fs.cut_after)(index)
        reported: list[int] = []
        cut = await run_until_cut(fs, _until_the_cut(fs, reported))
        assert cut, f"the run ended before operation {index} of {total}"
        disk = fs.power_cut(mode, rng=random.Random(index))
        where = f"power cut {when} operation {index} ({fs.ops[index].name} {fs.ops[index].path})"
        _check_partial(disk, reported, where)
        if await _recover(disk, fs, fail_safe=mode == "garble", where=where):
            repaired.append(index)
        _check(disk, reported, where + ", after recovery")
    # Only random stale bytes can look like damage.
    assert mode == "garble" or repaired == []


async def _recover(disk: FaultFS, cut: FaultFS, *, fail_safe: bool, where: str) -> bool:
    """Run to the end on the post-cut ``disk``; return whether a log had to be repaired first.

    With ``fail_safe``, a log that refuses to open as corrupt is accepted if
    the damage lies past what ``cut`` had synced of that file, and repaired.
    """
    try:
        await _run_to_the_end(disk, [])
        return False
    except BaseException as exc:  # an ExceptionGroup from the app's task group
        error = _only_corruption(exc)
        if error is None or not fail_safe:
            raise
    synced = _synced_size(cut, error.path)
    assert error.offset >= synced, (
        f"{where}: corruption reported at offset {error.offset} of {error.path}, inside the"
        f" {synced} bytes that were synced: {error}"
    )
    repair(os.path.dirname(error.path), fs=disk)
    await _run_to_the_end(disk, [])
    return True


def _only_corruption(exc: BaseException) -> WALCorruptionError | None:
    """The WALCorruptionError ``exc`` is, or the one its groups hold and nothing else."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, WALCorruptionError) else None


def _synced_size(fs: FaultFS, path: str) -> int:
    try:
        return len(fs.read_file(path, durable=True))
    except FileNotFoundError:
        return 0


def _check_partial(disk: FaultFS, reported: list[int], where: str) -> None:
    """Right after the cut: done batches are whole, nothing is doubled."""
    if not disk.exists("/out"):
        assert reported == [], where
        return
    committed = FileSink.read_committed("/out", fs=disk)
    assert [b for b in reported if b not in committed] == [], where
    values = Counter(line.decode() for lines in committed.values() for line in lines)
    assert all(n == 1 for n in values.values()), where
