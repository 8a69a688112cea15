"""``streamlet run`` and ``streamlet checkpoint show`` as a user runs them: subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import streamlet

APP = """
import streamlet as sl

app = sl.App("tiny", state_dir={state_dir!r}, batch_interval=0.05, checkpoint_interval=0)
numbers = app.source(sl.SequenceSource(rate=200), name="numbers")


@app.handler(numbers)
async def count(batch: sl.Batch) -> list[int]:
    return [len(batch)]
"""


def streamlet_cli(
    cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamlet", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "tinyapp.py").write_text(APP.format(state_dir=str(tmp_path / "state")))
    return tmp_path


def test_every_public_name_is_importable_and_listed() -> None:
    missing = [name for name in streamlet.__all__ if not hasattr(streamlet, name)]
    assert missing == []
    for name in ("App", "Batch", "Record", "Sink", "SequenceSource", "BatchInfo"):
        assert name in streamlet.__all__


def test_run_prints_a_status_line_per_batch_and_stops_after_duration(app_dir: Path) -> None:
    result = streamlet_cli(app_dir, "run", "tinyapp:app", "--duration", "0.6")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("batch ")]
    assert len(lines) >= 3
    assert lines[0].startswith("batch 1: ")
    assert "stopped after batch" in result.stderr


def test_checkpoint_show_names_the_batch_a_crash_left_pending(app_dir: Path) -> None:
    crashed = streamlet_cli(
        app_dir,
        "run",
        "tinyapp:app",
        "--duration",
        "5",
        env={"STREAMLET_CRASH_AT": "after_handler:3"},
    )
    assert crashed.returncode == -9, crashed.stderr
    shown = streamlet_cli(app_dir, "checkpoint", "show", "state", "--json")
    assert shown.returncode == 0, shown.stderr
    view = json.loads(shown.stdout)
    assert view["app"] == "tiny"
    assert view["state"]["last_done"] == 2
    assert [batch["id"] for batch in view["state"]["pending"]] == [3]
    text = streamlet_cli(app_dir, "checkpoint", "show", "state").stdout
    assert "batch 3: numbers[0]" in text

    resumed = streamlet_cli(app_dir, "run", "tinyapp:app", "--duration", "0.2")
    assert resumed.returncode == 0, resumed.stderr
    assert "recovered" in resumed.stdout.splitlines()[0]
    assert resumed.stdout.startswith("batch 3: ")


def test_checkpoint_show_refuses_a_directory_that_is_not_state(tmp_path: Path) -> None:
    result = streamlet_cli(tmp_path, "checkpoint", "show", str(tmp_path))
    assert result.returncode == 1
    assert "not a streamlet state directory" in result.stderr


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("nomodule:app", "cannot import module 'nomodule'"),
        ("tinyapp:nothing", "has no attribute 'nothing'"),
        ("tinyapp:numbers", "not a streamlet.App"),
    ],
)
def test_run_explains_a_bad_target(app_dir: Path, target: str, message: str) -> None:
    result = streamlet_cli(app_dir, "run", target)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.parametrize(
    "module",
    [
        'import streamlet as sl\napp = sl.App("bad name!")\n',
        'import streamlet as sl\ndef app():\n    return sl.App("t", batch_interval=0)\n',
    ],
)
def test_a_setting_refused_while_the_app_is_built_is_one_error_line(
    tmp_path: Path, module: str
) -> None:
    (tmp_path / "badapp.py").write_text(module)
    result = streamlet_cli(tmp_path, "run", "badapp:app")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr


def test_run_rejects_a_bad_interval_with_exit_2(app_dir: Path) -> None:
    result = streamlet_cli(app_dir, "run", "tinyapp:app", "--batch-interval", "-1")
    assert result.returncode == 2
    assert "batch_interval must be a positive number" in result.stderr


def test_run_refuses_a_renamed_source_on_its_state_dir(app_dir: Path) -> None:
    assert streamlet_cli(app_dir, "run", "tinyapp:app", "--duration", "0.1").returncode == 0
    other = textwrap.dedent(APP).replace('name="numbers"', 'name="letters"')
    (app_dir / "otherapp.py").write_text(other.format(state_dir=str(app_dir / "state")))
    result = streamlet_cli(app_dir, "run", "otherapp:app", "--duration", "0.1")
    assert result.returncode == 2
    assert "source 'numbers' appears renamed to 'letters'" in result.stderr
    assert "name='numbers'" in result.stderr


SLOW_APP = """
import os

import anyio
import streamlet as sl

app = sl.App("slow", state_dir={state_dir!r}, batch_interval=0.05)
numbers = app.source(sl.SequenceSource(rate=None, limit=10), name="numbers")


@app.handler(numbers, sink=sl.FileSink({files!r}))
async def crawl(batch: sl.Batch) -> list[int]:
    print("handling", batch.id, flush=True)
    if os.environ.get("SLOW"):
        await anyio.sleep(60)
    return [len(batch)]
"""


def test_a_second_signal_stops_at_once_and_the_batch_runs_again(tmp_path: Path) -> None:
    import signal
    import time

    from streamlet.sinks.file import FileSink

    (tmp_path / "slowapp.py").write_text(
        SLOW_APP.format(state_dir=str(tmp_path / "state"), files=str(tmp_path / "out"))
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "streamlet", "run", "slowapp:app"],
        cwd=tmp_path,
        env={**os.environ, "SLOW": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline().startswith("handling 1")
        worker.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert worker.poll() is None  # graceful: waits for the batch under way
        worker.send_signal(signal.SIGTERM)
        _, stderr = worker.communicate(timeout=10)  # the second one does not wait
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    assert "stopping after the batch under way" in stderr
    assert "again: stopping now" in stderr
    assert FileSink.read_committed(tmp_path / "out") == {}

    again = streamlet_cli(tmp_path, "run", "slowapp:app", "--duration", "0.3")
    assert again.returncode == 0, again.stderr
    assert "recovered" in again.stdout
    assert FileSink.read_committed(tmp_path / "out") == {1: [b"10"]}
