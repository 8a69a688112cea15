"""Power cuts at every file operation of the keyed state store, through SQLite's own I/O.

SQLite writes its files itself, so the store runs on FaultFS through a SQLite
VFS (:mod:`streamlet.testing.sqlite_vfs`): every page write, truncate, sync,
delete and directory sync SQLite makes is a numbered FaultFS operation. The
power is cut at each of them in turn, in each of FaultFS's modes, the disk
comes back as a power loss could leave it, and the store must open on it
holding exactly the state after some batch: never one before a commit that
had returned (``synchronous=FULL``), never a mix of two.

The app-level test runs a counting handler whose outputs carry each key's
running count, with its tracker, checkpoints, sink and state all on one
FaultFS, and cuts the power at each operation of the state store and the one
after it (the tracker's ``done``): after recovery every count is exact.
"""

from __future__ import annotations

import contextlib
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable

import anyio
import pytest

import streamlet as sl
from streamlet.app import App
from streamlet.errors import StateError
from streamlet.metrics import BatchInfo
from streamlet.records import Batch
from streamlet.sinks.file import FileSink
from streamlet.sources.sequence import SequenceSource
from streamlet.state import KeyedState
from streamlet.state._store import Changes, StateStore, encode_key
from streamlet.testing.faultfs import CutMode, FaultFS, Op, run_until_cut
from streamlet.testing.sqlite_vfs import FaultVFS

PATH = "/state/h.sqlite"
RECORDS = 40


def _batches() -> list[Changes]:
    """Five batches of writes and deletes; big values span pages, so commits write several."""
    rng = random.Random(7)
    batches = []
    for batch_id in range(1, 6):
        writes = {
            encode_key(f"k{rng.randrange(40)}"): b'"%s"'
            % (b"v%d" % batch_id * rng.randrange(1, 900))
            for _ in range(12)
        }
        deletes = frozenset(encode_key(f"k{rng.randrange(40)}") for _ in range(3)) - set(writes)
        batches.append(Changes(batch_id, float(batch_id), writes, deletes))
    return batches


BATCHES = _batches()


def _model(upto: int) -> dict[bytes, bytes]:
    state: dict[bytes, bytes] = {}
    for changes in BATCHES[:upto]:
        for k in changes.deletes:
            state.pop(k, None)
        state.update(changes.writes)
    return state


async def _open(vfs: FaultVFS) -> StateStore:
    return await StateStore.open(PATH, app="a", handler="h", state_id="s", vfs=vfs.name)


@contextlib.asynccontextmanager
async def _closing(store: StateStore) -> AsyncIterator[StateStore]:
    try:
        yield store
    finally:
        with contextlib.suppress(Exception):  # after a cut, closing may fail to checkpoint
            await store.aclose()


async def _workload(vfs: FaultVFS, returned: list[int]) -> None:
    """Three commits, a close (SQLite checkpoints the WAL into the file), two more commits."""
    async with _closing(await _open(vfs)) as store:
        for changes in BATCHES[:3]:
            await store.commit(changes)
            returned.append(changes.batch_id)
    async with _closing(await _open(vfs)) as store:
        for changes in BATCHES[3:]:
            await store.commit(changes)
            returned.append(changes.batch_id)


async def _until_the_cut(fs: FaultFS, vfs: FaultVFS, returned: list[int]) -> None:
    try:
        await _workload(vfs, returned)
    except StateError:
        if not fs.is_cut:
            raise


def _disk() -> FaultFS:
    fs = FaultFS()
    fs.makedirs("/state")
    return fs


async def _contents(store: StateStore) -> dict[bytes, bytes]:
    keys = list(store.keys(0.0))
    return {k: v for k in keys if (v := store.read(k, 0.0)) is not None}


async def test_the_workload_goes_through_sqlites_file_operations() -> None:
    fs = _disk()
    with FaultVFS(fs) as vfs:
        await _workload(vfs, [])
        kinds = Counter(fs.ops)
        # Page writes to the WAL and, at the checkpoint, to the file itself;
        # their syncs; the WAL's removal and its directory's sync.
        assert kinds[Op("write", PATH + "-wal")] > 10
        assert kinds[Op("write", PATH)] > 3
        assert kinds[Op("sync", PATH + "-wal")] >= 5
        assert kinds[Op("sync_dir", "/state")] >= 1
        assert kinds[Op("remove", PATH + "-wal")] >= 1
        vfs.attach(fs.power_cut("drop"))
        async with _closing(await _open(vfs)) as store:
            assert store.seq == 5
            assert await _contents(store) == _model(5)
        assert vfs.failures == []


@pytest.mark.parametrize(("mode", "when"), [("drop", "at"), ("sectors", "after"), ("garble", "at")])
async def test_a_power_cut_at_any_operation_leaves_the_state_of_one_batch_never_less(
    mode: CutMode, when: str
) -> None:
    counting = _disk()
    with FaultVFS(counting) as vfs:
        await _workload(vfs, [])
    total = len(counting.ops)
    with FaultVFS(_disk()) as vfs:
        for index in range(1, total):  # 0 is the test's own makedirs
            fs = _disk()
            vfs.attach(fs)
            (fs.cut_at if when == "at" else fs.cut_after)(index)
            returned: list[int] = []
            assert await run_until_cut(fs, _until_the_cut(fs, vfs, returned)), index
            await vfs.settle()
            op = fs.ops[index]
            where = f"power cut {when} operation {index} of {total} ({op.name} {op.path})"
            vfs.attach(fs.power_cut(mode, rng=random.Random(index)))
            async with _closing(await _open(vfs)) as store:
                done = max(returned, default=0)
                assert done <= store.seq <= done + 1, f"{where}: seq {store.seq}, returned {done}"
                assert await _contents(store) == _model(store.seq), where


def _counting_app(fs: FaultFS, on_batch: Callable[[BatchInfo], object]) -> App:
    app = App("counts", state_dir="/state", batch_interval=0.01, checkpoint_interval=0, fs=fs)
    numbers = app.source(SequenceSource(rate=None, limit=RECORDS, max_rate=1000), name="numbers")

    @app.handler(numbers, sink=FileSink("/out", fs=fs), state=sl.State(idle=False))
    async def count(batch: Batch, state: KeyedState) -> list[str]:
        outputs = []
        for r in batch:
            key = int(r.value) % 3
            state[key] = state.get(key, 0) + 1
            outputs.append(f"{int(r.value)}:{state[key]}")
        return outputs

    app.add_listener(on_batch)
    return app


def _expected() -> Counter[str]:
    """Each value once, with its key's running count: a count applied twice would inflate it."""
    counts: Counter[int] = Counter()
    out = []
    for value in range(RECORDS):
        counts[value % 3] += 1
        out.append(f"{value}:{counts[value % 3]}")
    return Counter(out)


async def _run_to_the_end(fs: FaultFS, done: list[int]) -> None:
    finished = anyio.Event()

    def check() -> None:
        committed = FileSink.read_committed("/out", fs=fs) if fs.exists("/out") else {}
        if sum(len(lines) for lines in committed.values()) >= RECORDS:
            finished.set()

    def on_batch(info: BatchInfo) -> None:
        done.append(info.batch_id)
        check()

    app = _counting_app(fs, on_batch)
    async with anyio.create_task_group() as tg:
        await tg.start(app.serve)
        check()
        with anyio.fail_after(20):
            await finished.wait()
        app.stop()


async def _until_the_app_is_cut(fs: FaultFS, done: list[int]) -> None:
    try:
        await _run_to_the_end(fs, done)
    except BaseException:
        if not fs.is_cut:
            raise


def _outputs(disk: FaultFS) -> Counter[str]:
    committed = FileSink.read_committed("/out", fs=disk)
    return Counter(line.decode() for lines in committed.values() for line in lines)


async def test_counts_stay_exact_with_a_power_cut_at_each_state_operation() -> None:
    counting = FaultFS()
    with FaultVFS(counting) as vfs:
        await _run_to_the_end(counting, [])
        assert _outputs(counting.power_cut("drop")) == _expected()
    ops = counting.ops
    state = {i for i, op in enumerate(ops) if op.path.startswith("/state/state/")}
    # Each operation of the store, and the one after it (the tracker's done,
    # mostly): a cut between the store's commit and done is the subtle case.
    cuts = sorted(state | {i + 1 for i in state if i + 1 < len(ops)})
    assert len(state) > 20
    landed = 0
    with FaultVFS(FaultFS()) as vfs:
        for n, index in enumerate(cuts):
            mode: CutMode = ("drop", "sectors", "garble")[n % 3]
            fs = FaultFS()
            vfs.attach(fs)
            fs.cut_at(index)
            reported: list[int] = []
            assert await run_until_cut(fs, _until_the_app_is_cut(fs, reported)), index
            await vfs.settle()
            op = fs.ops[index]
            landed += op.path.startswith("/state/state/")
            where = f"power cut at operation {index} ({op.name} {op.path}), {mode}"
            disk = fs.power_cut(mode, rng=random.Random(index))
            vfs.attach(disk)
            await _run_to_the_end(disk, [])
            assert _outputs(disk) == _expected(), where
    # The runs number their operations as the first did: the cuts hit the store.
    assert landed >= 0.8 * len(state), (landed, len(state))
