"""Every Python snippet of the README runs as printed."""

from __future__ import annotations

import re
from pathlib import Path

import anyio
import pytest

from streamlet.app import App
from streamlet.sinks.file import FileSink

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_readme_has_python_snippets() -> None:
    assert SNIPPETS


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"snippet-{i}" for i in range(len(SNIPPETS))])
async def test_a_readme_snippet_runs(
    snippet: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "readme_snippet"}
    exec(compile(snippet, str(README), "exec"), namespace)  # noqa: S102 - our own README
    app = namespace.get("app")
    if not isinstance(app, App):
        return
    with anyio.fail_after(30):
        await app.serve(duration=1.5)
    # Every handler with a FileSink wrote at least one batch.
    for handler in app._handlers:
        if isinstance(handler.sink, FileSink):
            assert FileSink.read_committed(handler.sink.directory)


def test_the_readme_snippets_pass_mypy_strict(tmp_path: Path) -> None:
    """What a user copies from the README type-checks as the library is typed."""
    from mypy import api

    files = []
    for index, snippet in enumerate(SNIPPETS):
        path = tmp_path / f"readme_snippet_{index}.py"
        path.write_text(snippet)
        files.append(str(path))
    out, err, status = api.run(["--strict", "--no-incremental", *files])
    assert status == 0, out + err
