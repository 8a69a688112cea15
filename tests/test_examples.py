"""The examples run as their docstrings say."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent


def test_wordcount_runs_and_writes_one_file_per_batch(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    result = subprocess.run(
        [sys.executable, "-m", "streamlet", "run", "examples.wordcount:app", "--duration", "1.6"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": ""},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    batches = [line for line in result.stdout.splitlines() if line.startswith("batch ")]
    assert len(batches) >= 2
    parts = sorted((tmp_path / "out" / "wordcount").glob("part-*.jsonl"))
    assert len(parts) == len(batches)
    counts = [orjson.loads(line) for line in parts[0].read_bytes().splitlines()]
    assert all(isinstance(word, str) and count > 0 for word, count in counts)
    assert sum(count for _, count in counts) >= 100  # 200 sentences/s, 3+ words each


def test_tcp_example_takes_lines_from_streamlet_send(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    source = (tmp_path / "examples" / "tcp_lines.py").read_text()
    (tmp_path / "examples" / "tcp_lines.py").write_text(source.replace("port=9999", "port=0"))
    # Port 0 picks a free port; the test reads it back from the worker's log.
    worker = subprocess.Popen(
        [sys.executable, "-m", "streamlet", "run", "examples.tcp_lines:app", "--duration", "4"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = None
        assert worker.stderr is not None
        for line in worker.stderr:
            if "listening on" in line:
                port = int(line.rsplit(":", 1)[1].split()[0])
                break
        assert port is not None
        (tmp_path / "numbers.txt").write_text("".join(f"{i}\n" for i in range(1, 501)))
        sent = subprocess.run(
            [sys.executable, "-m", "streamlet", "send", "--port", str(port), "numbers.txt"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert sent.returncode == 0, sent.stderr
        assert "500 sent" in sent.stdout
        worker.communicate(timeout=60)
        assert worker.returncode == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    import sqlite3

    with sqlite3.connect(tmp_path / "out" / "tcp_lines.db") as conn:
        rows = conn.execute("SELECT count(*), count(DISTINCT line) FROM lines").fetchone()
    conn.close()
    assert rows == (500, 500)


def test_directory_example_reads_each_file_once_and_moves_it_to_done(tmp_path: Path) -> None:
    import sqlite3

    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.txt").write_text("".join(f"a{i}\n" for i in range(300)))
    (inbox / "skipped.csv").write_text("not matched\n")
    run = ["streamlet", "run", "examples.directory_lines:app", "--duration", "3"]
    worker = subprocess.Popen(
        [sys.executable, "-m", *run],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},
    )
    try:
        # A file that arrives while the worker runs, by rename as the convention asks.
        (inbox / ".b.txt").write_text("".join(f"b{i}\n" for i in range(200)))
        os.rename(inbox / ".b.txt", inbox / "b.txt")
        _, stderr = worker.communicate(timeout=60)
        assert worker.returncode == 0, stderr
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    with sqlite3.connect(tmp_path / "out" / "directory_lines.db") as conn:
        rows = conn.execute(
            "SELECT file, count(*), count(DISTINCT text) FROM lines GROUP BY file ORDER BY file"
        ).fetchall()
    conn.close()
    assert rows == [("a.txt", 300, 300), ("b.txt", 200, 200)]
    assert sorted(os.listdir(inbox / "done")) == ["a.txt", "b.txt"]
    assert (inbox / "skipped.csv").exists()


def test_window_counts_writes_each_window_once_with_every_reading(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    run = [sys.executable, "-m", "streamlet", "run", "examples.window_counts:app"]
    env = {**os.environ, "PYTHONPATH": ""}
    # Killed after some windows closed, then run on: each window once, exact.
    killed = subprocess.run(
        [*run, "--duration", "30", "--batch-interval", "0.1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "STREAMLET_CRASH_AT": "after_sink_commit:25"},
        check=False,
    )
    assert killed.returncode == -9, killed.stderr
    result = subprocess.run(
        [*run, "--duration", "2.5", "--batch-interval", "0.1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rows = [
        orjson.loads(line)
        for part in sorted((tmp_path / "out" / "window_counts").glob("part-*.jsonl"))
        for line in part.read_bytes().splitlines()
    ]
    windows = [(sensor, start) for sensor, start, _, _ in rows]
    assert len(windows) == len(set(windows)), "a window was written twice"
    assert {sensor for sensor, _ in windows} == {"s0", "s1", "s2", "s3", "s4"}
    assert all(end - start == 10.0 for _, start, end, _ in rows)
    # 50 readings a second over 5 sensors: at most 100 per sensor in 10 s (a
    # reading counted twice in a full window would show as 101).
    assert all(0 < n <= 100 for _, _, _, n in rows)
