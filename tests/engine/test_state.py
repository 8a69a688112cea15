"""The read-only view of a state directory, beside a live app and after a crash."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from streamlet._state import is_state_directory, read_state
from streamlet.errors import StreamletError
from tests.engine.test_app import ListSink, _counting_app


async def test_the_view_matches_what_the_app_did_and_changes_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    app = _counting_app(state, ListSink(), limit=30, checkpoint_interval=0)
    done = anyio.Event()
    views = []

    def look(info: object) -> None:
        # Beside the live app: read-only, no lock taken, nothing written.
        views.append(read_state(state))
        done.set()

    app.add_listener(look)
    async with anyio.create_task_group() as tg:
        tg.start_soon(app.serve)
        with anyio.fail_after(20):
            await done.wait()
        app.stop()
    assert views[0].manifest is not None
    assert views[0].manifest["app"] == "t"
    before = sorted((p.name, p.stat().st_size) for p in state.rglob("*") if p.is_file())
    view = read_state(state)
    after = sorted((p.name, p.stat().st_size) for p in state.rglob("*") if p.is_file())
    assert before == after
    assert view.state.last_done >= 1
    assert view.state.pending == []
    assert view.to_json()["state"]["last_done"] == view.state.last_done
    assert "seq" in view.describe()
    assert is_state_directory(state)


def test_a_directory_that_is_no_state_directory_is_named(tmp_path: Path) -> None:
    assert not is_state_directory(tmp_path)
    with pytest.raises(StreamletError, match="is not a streamlet state directory"):
        read_state(tmp_path)
