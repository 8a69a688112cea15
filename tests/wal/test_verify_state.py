"""``streamlet wal verify STATE_DIR``: every log and checkpoint of an app's state directory."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import anyio
import orjson
import pytest
from click.testing import CliRunner

from streamlet._checkpoint import list_checkpoints
from streamlet._state import verify_state
from streamlet.app import App
from streamlet.cli import main
from streamlet.fs import OsFileSystem
from streamlet.records import Batch, Record
from streamlet.sinks.base import Sink
from streamlet.sources.receiver import Receiver, ReceiverContext
from streamlet.wal import Position
from streamlet.wal.format import FRAME_HEADER_SIZE, segment_name
from streamlet.wal.tools import read_records

RECORDS = 200


class Numbers(Receiver):
    """Stores 1..limit, ten a store, and waits until each store is durable."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.all_durable = anyio.Event()

    async def run(self, context: ReceiverContext) -> None:
        for start in range(1, self.limit + 1, 10):
            chunk = [Record(str(n).encode()) for n in range(start, start + 10)]
            await (await context.store(chunk, acks={"n": start + 9})).wait()
        self.all_durable.set()
        await context.stopping.wait()


class DiscardSink(Sink):
    async def commit(self, batch: Batch, outputs: Sequence[object]) -> bool:
        return True


async def _fill(state: Path) -> None:
    app = App(
        "verify",
        state_dir=state,
        batch_interval=0.02,
        block_interval=0.01,
        checkpoint_interval=0,
        tracker_segment_bytes=44,  # the least: one event a segment, and the log is cleaned
    )
    receiver = Numbers(RECORDS)
    source = app.source(receiver, name="numbers")

    @app.handler(source, sink=DiscardSink())
    async def count(batch: Batch) -> list[int]:
        return [len(batch)]

    async with anyio.create_task_group() as tg:
        await tg.start(app.serve)
        with anyio.fail_after(30):
            await receiver.all_durable.wait()
        await anyio.sleep(0.1)
        app.stop()


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    state = tmp_path_factory.mktemp("filled") / "state"
    anyio.run(_fill, state)
    return state


@pytest.fixture
def state(filled: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "state"
    shutil.copytree(filled, copy)
    return copy


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def checkpoints(state: Path) -> list[tuple[int, Path, Position]]:
    """(batch id, path, last event) of the state directory's checkpoints, newest first."""
    found = []
    for batch_id, path in list_checkpoints(OsFileSystem(), str(state / "checkpoints")):
        body = orjson.loads(Path(path).read_bytes().split(b"\n", 1)[1])
        found.append((batch_id, Path(path), Position(*body["last_event"])))
    return found


def tracker_segments(state: Path) -> list[int]:
    return sorted(int(p.name.split(".")[0]) for p in (state / "tracker").glob("*.wal"))


def flip_a_payload_byte(log: Path, position: Position) -> None:
    path = log / segment_name(position.segment)
    data = bytearray(path.read_bytes())
    data[position.offset + FRAME_HEADER_SIZE] ^= 0x20
    path.write_bytes(bytes(data))


def test_verify_checks_every_log_and_checkpoint_of_a_state_directory(state: Path) -> None:
    found = checkpoints(state)
    assert len(found) == 2
    assert tracker_segments(state)[0] > 1  # cleaned: what the checkpoints need is checked
    code, out, err = run("wal", "verify", str(state))
    assert code == 0, out + err
    lines = out.splitlines()
    assert lines[0] == f"state directory {state}"
    assert lines[1].startswith("  tracker: ok: ")
    assert lines[2].startswith("  data: ok: ")
    assert lines[3:] == [f"  {path.name}: ok (batch {batch_id})" for batch_id, path, _ in found]
    check = verify_state(state)
    assert check.ok
    assert not check.live
    assert check.data is not None
    assert check.data.records > 0


@pytest.mark.parametrize("which", ["newest", "older"])
def test_a_damaged_checkpoint_fails_the_check_and_says_what_recovery_does(
    state: Path, which: str
) -> None:
    (newest_id, newest, _), (older_id, older, _) = checkpoints(state)
    bad = newest if which == "newest" else older
    data = bytearray(bad.read_bytes())
    data[-2] ^= 0x01
    bad.write_bytes(bytes(data))
    code, out, _ = run("wal", "verify", str(state))
    assert code == 1
    assert "  tracker: ok: " in out
    assert "  data: ok: " in out
    assert f"  {bad.name}: bad: checkpoint {bad}: body fails its CRC32C check" in out
    if which == "newest":
        assert f"  {older.name}: ok (batch {older_id})" in out
        assert f"the app skips it and recovers from {older.name}" in out
    else:
        assert f"  {newest.name}: ok (batch {newest_id})" in out
        assert f"the app recovers from {newest.name}, but cannot fall back to this one" in out


def test_no_readable_checkpoint_says_the_app_cannot_recover(state: Path) -> None:
    for _, path, _ in checkpoints(state):
        path.write_bytes(b"garbage")
    code, out, _ = run("wal", "verify", str(state))
    assert code == 1
    assert out.count(": bad: ") == 2
    assert "no checkpoint is usable, so the app cannot recover" in out


@pytest.mark.parametrize("log", ["tracker", "data"])
def test_damage_in_either_log_fails_the_check_with_the_repair_to_run(state: Path, log: str) -> None:
    first, _ = next(read_records(state / log))
    flip_a_payload_byte(state / log, first)
    code, out, _ = run("wal", "verify", str(state))
    assert code == 1
    path = state / log / segment_name(first.segment)
    assert f"  {log}: corrupt: {path} at offset {first.offset}: " in out
    assert f"to cut the log there, run: streamlet wal repair {state / log}" in out
    other = "data" if log == "tracker" else "tracker"
    assert f"  {other}: ok: " in out
    assert out.count(": ok (batch ") == 2


def test_a_checkpoint_whose_events_were_cleaned_fails_the_check(state: Path) -> None:
    # A clean that went too far (past the older checkpoint): recovery could
    # not fall back to it if the newest became unreadable.
    (_, newest, newest_event), (_, older, older_event) = checkpoints(state)
    assert older_event.segment < newest_event.segment
    for seq in tracker_segments(state):
        if seq <= older_event.segment:
            (state / "tracker" / segment_name(seq)).unlink()
    code, out, _ = run("wal", "verify", str(state))
    assert code == 1
    assert "  tracker: ok: " in out
    assert f"  {newest.name}: ok" in out
    assert (
        f"  {older.name}: bad: checkpoint {older} holds tracker events up to segment"
        f" {older_event.segment}, but the tracker log begins at segment {older_event.segment + 1}"
    ) in out


def test_a_repair_that_cut_the_tracker_log_below_a_checkpoint_fails_the_check(
    state: Path,
) -> None:
    # The log loses events the newest checkpoint holds: events logged after a
    # restart would take their positions and be skipped by the next recovery.
    (_, newest, event), (_, older, _) = checkpoints(state)
    flip_a_payload_byte(state / "tracker", event)
    code, out, err = run("wal", "repair", "--yes", str(state / "tracker"))
    assert code == 0, out + err
    code, out, _ = run("wal", "verify", str(state))
    assert code == 1
    assert "  tracker: ok: " in out
    assert f"  {older.name}: ok" in out
    assert (
        f"  {newest.name}: bad: checkpoint {newest} holds tracker events up to"
        f" {tuple(event)} (segment, offset, length), past the end of the tracker log"
    ) in out


def test_a_directory_that_is_neither_a_log_nor_a_state_directory(tmp_path: Path) -> None:
    code, _, err = run("wal", "verify", str(tmp_path))
    assert code == 2
    assert "holds no write-ahead log segments" in err


APP = """
import streamlet as sl

app = sl.App("live", state_dir="state", batch_interval=0.05, checkpoint_interval=0)
numbers = app.source(sl.SequenceSource(rate=200), name="numbers")


@app.handler(numbers)
async def count(batch: sl.Batch) -> list[int]:
    return [len(batch)]
"""


def streamlet(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamlet", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_running_app_state_is_verified_as_a_snapshot_and_its_logs_are_not_repaired(
    tmp_path: Path,
) -> None:
    (tmp_path / "liveapp.py").write_text(APP)
    state = tmp_path / "state"
    worker = subprocess.Popen(
        [sys.executable, "-m", "streamlet", "run", "liveapp:app", "--quiet"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while len(list((state / "checkpoints").glob("checkpoint-*.json"))) < 2:
            assert worker.poll() is None, worker.communicate()[1]
            assert time.monotonic() < deadline, "the app wrote no checkpoints"
            time.sleep(0.05)

        verified = streamlet(tmp_path, "wal", "verify", "state")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert "  tracker: ok: " in verified.stdout
        assert "note: the state directory is in use by a running app" in verified.stdout
        assert "snapshot" in verified.stdout

        repaired = streamlet(tmp_path, "wal", "repair", "--yes", "state/tracker")
        assert repaired.returncode == 2
        assert "it is in use" in repaired.stderr
        assert "Stop the app first" in repaired.stderr
        assert not list((state / "tracker").glob("*.broken"))
    finally:
        worker.send_signal(signal.SIGTERM)
        _, stderr = worker.communicate(timeout=30)
    assert worker.returncode == 0, stderr

    after = streamlet(tmp_path, "wal", "verify", "state")
    assert after.returncode == 0, after.stdout + after.stderr
    assert "note:" not in after.stdout
    assert os.path.isdir(state / "tracker")
