"""Reading back what a chaos run left: the sinks' outputs and ``streamlet wal verify``'s verdict.

Kept apart from :mod:`streamlet.testing.chaos.checks` so that the checks
stay pure: this module does the file, database and process I/O and hands
them an :class:`~streamlet.testing.chaos.checks.Outputs`.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

from streamlet.sinks.file import FileSink
from streamlet.testing.chaos.checks import Outputs
from streamlet.testing.chaos.inputs import Pipeline

__all__ = ["read_outputs", "wal_verify"]


def read_outputs(pipeline: Pipeline) -> Outputs:
    """Read both sinks and the dead-letter sink of ``pipeline`` (blocking)."""
    parts = FileSink.read_committed(pipeline.files) if pipeline.files.exists() else {}
    in_files = [line.decode() for _, lines in sorted(parts.items()) for line in lines]
    in_db: list[str] = []
    db_batches: set[int] = set()
    commit_times: list[float] = []
    if pipeline.db.exists():
        conn = sqlite3.connect(f"file:{pipeline.db}?mode=ro", uri=True)
        try:
            in_db = [v for (v,) in conn.execute("SELECT v FROM seen ORDER BY rowid")]
            for batch_id, when in conn.execute(
                "SELECT batch_id, committed_at FROM streamlet_batches WHERE handler = 'to_db'"
            ):
                db_batches.add(int(batch_id))
                commit_times.append(float(when))
        finally:
            conn.close()
    dead: dict[str, list[str]] = {"to_files": [], "to_db": []}
    errors: Counter[str] = Counter()
    if pipeline.dead.exists():
        for _, lines in sorted(FileSink.read_committed(pipeline.dead).items()):
            for line in lines:
                letter = json.loads(line)
                dead.setdefault(letter["handler"], []).append(
                    base64.b64decode(letter["value"]).decode()
                )
                errors[str(letter["error"]).partition(":")[0]] += 1
    by_sink = {"file": in_files, "sqlite": in_db, **pipeline.extra_outputs()}
    return Outputs(by_sink, dead, errors, set(parts), db_batches, commit_times)


def wal_verify(log_dir: Path) -> tuple[bool, str]:
    """Run ``streamlet wal verify`` on a log directory: (clean, its output)."""
    done = subprocess.run(
        [sys.executable, "-m", "streamlet", "wal", "verify", str(log_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done.returncode == 0, (done.stdout + done.stderr).strip()
