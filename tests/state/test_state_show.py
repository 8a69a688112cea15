"""``streamlet state show``: handlers' keyed state from outside, read-only, beside a live app."""

from __future__ import annotations

import asyncio
import datetime
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner, Result

import streamlet as sl
from streamlet._state import read_state
from streamlet.cli import main
from streamlet.sinks.file import FileSink
from streamlet.state._store import StateStore, encode_key

RECORDS = 50
KEYS = 5


def _count_app(state_dir: Path, out: Path, *, limit: int | None, rate: float | None) -> str:
    """A counting app's source: per key, records in all, a str and an int key "7"."""
    return f"""
import streamlet as sl
from streamlet.sinks.file import FileSink

app = sl.App("counter", state_dir={str(state_dir)!r}, batch_interval=0.05)
numbers = app.source(
    sl.SequenceSource(rate={rate!r}, limit={limit!r}, key=lambda p, o: b"k%d" % (o % {KEYS})),
    name="numbers",
)


@app.handler(numbers, sink=FileSink({str(out)!r}), state=sl.State(ttl=3600))
async def count(batch, state):
    for r in batch:
        state[r.key] = state.get(r.key, 0) + 1
    state["records"] = state.get("records", 0) + len(batch)
    state["7"] = "seven as text"
    state[7] = {{"batch": batch.id}}
    return [len(batch)]
"""


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The state directory of a counting app that ran through its input and stopped."""
    root = tmp_path_factory.mktemp("stopped")
    source = _count_app(root / "state", root / "out", limit=RECORDS, rate=None)
    namespace: dict[str, Any] = {}
    exec(compile(source, "counter.py", "exec"), namespace)  # noqa: S102 - our own app
    app: sl.App = namespace["app"]
    asyncio.run(app.serve(duration=0.6))
    return root / "state"


@pytest.fixture
def copy(stopped: Path, tmp_path: Path) -> Path:
    """A copy of the stopped app's state directory, to damage."""
    return Path(shutil.copytree(stopped, tmp_path / "state"))


def show(*args: str) -> Result:
    return CliRunner().invoke(main, ["state", "show", *args])


def document(*args: str) -> dict[str, Any]:
    result = show(*args, "--json")
    assert result.exit_code == 0, result.output
    parsed: dict[str, Any] = orjson.loads(result.stdout)
    return parsed


def _files(directory: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in directory.rglob("*")
    }


def test_every_key_is_listed_with_its_type_value_and_touched_time(stopped: Path) -> None:
    result = show(str(stopped))
    assert result.exit_code == 0, result.output
    seq = read_state(stopped).state.last_done
    assert f"handler 'count': {stopped / 'state' / 'count.sqlite'}" in result.stdout
    assert f"as of batch {seq}; {KEYS + 3} keys; ttl: 3600 s after touched" in result.stdout
    for i in range(KEYS):
        assert f"  b'k{i}' (bytes) = {RECORDS // KEYS}, touched 20" in result.stdout
    assert "  'records' (str) = 50, touched" in result.stdout
    assert f'  7 (int) = {{"batch":{seq}}}, touched' in result.stdout


def test_the_json_document_holds_a_committed_batch_and_iso_utc_times(stopped: Path) -> None:
    doc = document(str(stopped))
    assert doc["app"] == "counter"
    (handler,) = doc["handlers"]
    assert handler["seq"] == read_state(stopped).state.last_done
    assert handler["keys"] == KEYS + 3
    assert handler["ttl"] == 3600
    entries = {(e["key"], e["key_type"]): e for e in handler["entries"]}
    assert sum(entries[(f"k{i}", "bytes")]["value"] for i in range(KEYS)) == RECORDS
    assert entries[("7", "str")]["value"] == "seven as text"
    assert entries[(7, "int")]["value"] == {"batch": handler["seq"]}
    touched = entries[("records", "str")]["touched"]
    assert touched.endswith("Z")
    when = datetime.datetime.fromisoformat(touched)
    assert when.utcoffset() == datetime.timedelta(0)
    assert abs(when.timestamp() - time.time()) < 60


def test_limit_lists_the_first_keys_in_key_order_and_says_how_many_there_are(
    stopped: Path,
) -> None:
    result = show(str(stopped), "--limit", "2")
    assert result.exit_code == 0, result.output
    assert "b'k1'" in result.stdout
    assert "b'k2'" not in result.stdout
    assert f"(the first 2 of {KEYS + 3} keys in key order; --limit N for more)" in result.stdout
    assert [e["key"] for e in document(str(stopped), "--limit", "2")["handlers"][0]["entries"]] == [
        "k0",
        "k1",
    ]


def test_a_key_is_looked_up_as_text_bytes_and_integer_and_the_match_is_named(
    stopped: Path,
) -> None:
    result = show(str(stopped), "--key", "k3")
    assert result.exit_code == 0, result.output
    assert "key 'k3': found as bytes" in result.stdout
    assert f"b'k3' (bytes) = {RECORDS // KEYS}" in result.stdout
    result = show(str(stopped), "--key", "7", "--handler", "count")
    assert result.exit_code == 0, result.output
    assert "key '7': found as str and int" in result.stdout
    (handler,) = document(str(stopped), "--key", "7")["handlers"]
    assert handler["lookup"] == {"key": "7", "found": True}
    assert [e["key_type"] for e in handler["entries"]] == ["str", "int"]


def test_an_absent_key_is_exit_status_1_with_a_message(stopped: Path) -> None:
    result = show(str(stopped), "--key", "nope")
    assert result.exit_code == 1
    assert "key 'nope': not found (as str, bytes)" in result.stdout
    assert result.stderr == (
        "error: key 'nope' is not in any handler's state (looked up as str, bytes);"
        " run without --key to list the keys\n"
    )
    assert show(str(stopped), "--key", "12").stderr.startswith(
        "error: key '12' is not in any handler's state (looked up as str, bytes, int)"
    )


def test_reading_a_stopped_apps_store_creates_and_changes_nothing(stopped: Path) -> None:
    before = _files(stopped)
    for args in ([], ["--key", "7"], ["--json"]):
        assert show(str(stopped), *args).exit_code == 0
    assert _files(stopped) == before  # no -wal, no -shm, no lock taken


def test_a_directory_without_a_manifest_is_not_a_state_directory(
    stopped: Path, tmp_path: Path
) -> None:
    result = show(str(tmp_path))
    assert result.exit_code == 1
    assert result.stderr == (
        f"error: {tmp_path} is not a streamlet state directory (no app.json); pass the"
        " app's state_dir (default .streamlet/<app name>)\n"
    )
    result = show(str(stopped / "state"))
    assert result.exit_code == 1
    assert f"this is the state/ folder of one: pass {stopped}" in result.stderr


def test_a_state_directory_without_keyed_state_names_its_handlers(copy: Path) -> None:
    shutil.rmtree(copy / "state")
    result = show(str(copy))
    assert result.exit_code == 1
    assert result.stderr.startswith(
        f"error: {copy} holds no keyed state yet (no {copy / 'state'}/*.sqlite), though"
        " handler(s) count have state=: the app has not started since"
    )
    manifest = orjson.loads((copy / "app.json").read_bytes())
    manifest["handlers"] = {
        "parse": {"sources": ["numbers"], "sink": None},
        "store": {"sources": ["numbers"], "sink": None},
    }
    (copy / "app.json").write_bytes(orjson.dumps(manifest))
    result = show(str(copy))
    assert result.exit_code == 1
    assert result.stderr.startswith(
        f"error: {copy} holds no keyed state: none of its handlers (parse, store, per"
        " app.json) was registered with state="
    )
    assert "\n" not in result.stderr.rstrip("\n")


def test_an_unknown_handler_is_refused_with_the_known_ones(stopped: Path) -> None:
    result = show(str(stopped), "--handler", "nope")
    assert result.exit_code == 1
    assert result.stderr == f"error: {stopped} has no handler 'nope'; handlers with state: count\n"


def test_a_damaged_store_is_one_error_line_not_a_traceback(copy: Path) -> None:
    (copy / "state" / "count.sqlite").write_bytes(b"this is not a database, " * 200)
    result = show(str(copy))
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stderr.startswith(
        f"error: state store {copy / 'state' / 'count.sqlite'} cannot be read: file is not a"
        " database. The file is damaged or is not a state store"
    )
    assert result.stderr.count("\n") == 1


async def _task_store(state_dir: Path, task: int, keys: dict[str, int], offset: int) -> Path:
    """A group-mode worker's copy of one task's state, as a restore from the changelog leaves it."""
    path = state_dir / "state" / "count.tasks" / f"t{task}.sqlite"
    path.parent.mkdir(parents=True, exist_ok=True)
    store = await StateStore.open(
        str(path), app="counter", handler="count", state_id="", ttl=3600, task=task
    )
    try:
        writes = {encode_key(k): (orjson.dumps(v), 1.7e9) for k, v in keys.items()}
        await store.replay(writes, set(), offset, time.time())
    finally:
        await store.aclose()
    return path


async def test_a_group_workers_task_stores_are_shown_per_task_with_their_changelog_offset(
    copy: Path,
) -> None:
    (copy / "state" / "count.sqlite").unlink()  # a group-mode worker has only task stores
    first = await _task_store(copy, 0, {"a": 1, "b": 2}, 17)
    third = await _task_store(copy, 2, {"c": 3}, 5)
    (first.parent / "t1.sqlite.bad-1700000000").write_bytes(b"set aside")  # not a store

    result = show(str(copy))
    assert result.exit_code == 0, result.output
    assert f"handler 'count', task 0: {first}" in result.stdout
    assert f"handler 'count', task 2: {third}" in result.stdout
    assert "bad-" not in result.stdout
    assert "up to changelog offset 17" in result.stdout
    assert "  'b' (str) = 2, touched" in result.stdout

    found = document(str(copy), "--key", "c")
    assert [
        (h["task"], h["changelog_offset"], h["lookup"]["found"]) for h in found["handlers"]
    ] == [
        (0, 17, False),
        (2, 5, True),
    ]
    assert show(str(copy), "--key", "zzz").exit_code == 1

    # A store copied over another task's file is named, not shown as that task.
    shutil.copy(third, first)
    result = show(str(copy))
    assert result.exit_code == 1
    assert f"state store {first} holds task 2, not task 0" in result.stderr


# -- beside a running app --------------------------------------------------------------


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path, Path]]:
    """A counting app running in its own process: (process, state dir, FileSink dir)."""
    (tmp_path / "live_counter.py").write_text(
        _count_app(tmp_path / "state", tmp_path / "out", limit=None, rate=4000.0)
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "streamlet", "run", "live_counter:app", "--quiet", "--duration=4"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield worker, tmp_path / "state", tmp_path / "out"
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.communicate(timeout=30)


def test_reads_beside_a_running_app_each_see_one_committed_batch(
    live: tuple[subprocess.Popen[str], Path, Path],
) -> None:
    worker, state_dir, out = live
    store = state_dir / "state" / "count.sqlite"
    deadline = time.monotonic() + 20
    while not (store.exists() and (out.exists() and FileSink.read_committed(out))):
        assert worker.poll() is None, worker.communicate()[1]
        assert time.monotonic() < deadline, "the app committed no batch"
        time.sleep(0.05)
    seen: list[int] = []
    while worker.poll() is None and len(seen) < 12:
        doc = document(str(state_dir), "--limit", "100")
        (handler,) = doc["handlers"]
        seq = handler["seq"]
        counts = {e["key"]: e["value"] for e in handler["entries"] if e["key_type"] == "bytes"}
        # Before the store's first commit (the sinks commit first) it is empty.
        records = next((e["value"] for e in handler["entries"] if e["key"] == "records"), 0)
        # The sinks commit a batch before its state: batches 1..seq are all there.
        outputs = FileSink.read_committed(out)
        in_batches = sum(int(lines[0]) for batch, lines in outputs.items() if batch <= seq)
        assert sum(counts.values()) == records == in_batches, (seq, counts, records, in_batches)
        assert not seen or seq >= seen[-1]
        seen.append(seq)
        lookup = show(str(state_dir), "--key", "records")
        assert lookup.exit_code == 0, lookup.output
        time.sleep(0.15)
    assert len(set(seen)) >= 3, f"the reads did not see the app moving on: {seen}"
    _, stderr = worker.communicate(timeout=30)
    assert worker.returncode == 0, stderr  # the reads did not disturb it


def test_the_state_command_is_listed_in_help() -> None:
    result = CliRunner().invoke(main, ["--help"])
    (line,) = [line for line in result.output.splitlines() if line.split()[:1] == ["state"]]
    assert line.split(None, 1)[1].startswith("Look at handlers' keyed state (read-only;")
