"""The security promises of SECURITY.md, checked."""

from __future__ import annotations

import ast
import os
import stat
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest

import streamlet
from streamlet.app import App
from streamlet.errors import ConfigError
from streamlet.metrics import BatchInfo
from streamlet.records import Batch, Record
from streamlet.sinks.file import FileSink
from streamlet.sinks.sqlite import SQLiteSink
from streamlet.sources.receiver import Receiver, ReceiverContext
from streamlet.sources.sequence import SequenceSource

PACKAGE = Path(streamlet.__file__).parent
FORBIDDEN_MODULES = {"pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle"}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_pickle_eval_or_exec_anywhere_in_streamlet() -> None:
    offences: list[str] = []
    for path in _sources():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.module or "").split(".")[0]]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                if node.func.id in FORBIDDEN_CALLS:
                    offences.append(f"{path}:{node.lineno}: {node.func.id}()")
                continue
            else:
                continue
            offences.extend(
                f"{path}:{node.lineno}: import {name}"
                for name in names
                if name in FORBIDDEN_MODULES
            )
    assert len(_sources()) > 20  # the walk really saw the package
    assert offences == []


class _Some(Receiver):
    async def run(self, context: ReceiverContext) -> None:
        await context.store([Record(b"secret")], acks={"n": 1})
        await context.stopping.wait()


async def test_every_file_and_directory_streamlet_creates_is_owner_only(tmp_path: Path) -> None:
    old = os.umask(0)  # the most permissive umask: modes must be set explicitly
    try:
        app = App("sec", state_dir=tmp_path / "state", batch_interval=0.02, checkpoint_interval=0)
        seq = app.source(SequenceSource(rate=None, limit=10), name="seq")
        received = app.source(_Some(), name="received")

        @app.handler([seq, received], sink=FileSink(tmp_path / "files"))
        async def to_files(batch: Batch) -> list[bytes]:
            return [r.value for r in batch]

        @app.handler(
            seq,
            sink=SQLiteSink(
                tmp_path / "db" / "out.db",
                lambda conn, batch, outputs: conn.executemany(
                    "INSERT INTO t VALUES (?)", [(o,) for o in outputs]
                ),
                table_ddl="CREATE TABLE IF NOT EXISTS t (v BLOB)",
            ),
        )
        async def to_db(batch: Batch) -> list[bytes]:
            return [r.value for r in batch]

        seen = {"records": 0}
        all_in = anyio.Event()

        def on_batch(info: BatchInfo) -> None:
            seen["records"] += info.records
            if seen["records"] >= 11:  # 10 from seq, 1 received
                all_in.set()

        app.add_listener(on_batch)
        async with anyio.create_task_group() as tg:
            await tg.start(app.serve)
            with anyio.fail_after(20):
                await all_in.wait()
            app.stop()
    finally:
        os.umask(old)
    checked = 0
    for root in (tmp_path / "state", tmp_path / "files", tmp_path / "db"):
        for path in [root, *root.rglob("*")]:
            mode = stat.S_IMODE(path.lstat().st_mode)
            expected = 0o700 if path.is_dir() else 0o600
            assert mode == expected, f"{path} has mode {mode:o}, expected {expected:o}"
            checked += 1
    names = {p.name for p in (tmp_path / "state").rglob("*")}
    assert {"app.json", "tracker", "data", "checkpoints"} <= names
    assert checked > 10


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777])
async def test_a_state_dir_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, mode)
    app = App("sec", state_dir=state)
    app.handler(app.source(SequenceSource(rate=None, limit=1), name="s"))(_noop)
    with pytest.raises(ConfigError, match="writable by other users"):
        await app.serve()


async def _noop(batch: Batch) -> Sequence[object]:
    return []
