"""The user docs hold: the public API has docstrings, links resolve, guide snippets run."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from types import ModuleType

import anyio
import pytest

import streamlet
from streamlet.app import App

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "guide"
PAGES = sorted(GUIDE.glob("*.md"))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
SNIPPET = re.compile(r"```python\n(.*?)```", flags=re.DOTALL)
FRAGMENT = "# A fragment"


def _public_objects() -> dict[str, object]:
    """Classes and functions of ``streamlet.__all__``, and of the modules it lists."""
    found: dict[str, object] = {}
    for name in streamlet.__all__:
        obj = getattr(streamlet, name)
        if isinstance(obj, ModuleType):
            for inner in getattr(obj, "__all__", ()):
                found[f"{name}.{inner}"] = getattr(obj, inner)
        else:
            found[name] = obj
    return {n: o for n, o in found.items() if inspect.isclass(o) or inspect.isfunction(o)}


def _public_methods(cls: type) -> dict[str, object]:
    """Methods and properties of ``cls`` not starting with ``_`` that streamlet defines."""
    methods: dict[str, object] = {}
    for name in dir(cls):
        if name.startswith("_"):
            continue
        owner = next((k for k in cls.__mro__ if name in vars(k)), None)
        if owner is None or not owner.__module__.startswith("streamlet"):
            continue
        raw = vars(owner)[name]
        if isinstance(raw, (staticmethod, classmethod, property)) or inspect.isfunction(raw):
            methods[name] = getattr(cls, name)
    return methods


def test_the_public_api_has_docstrings() -> None:
    missing: list[str] = []
    for name, obj in sorted(_public_objects().items()):
        if not inspect.getdoc(obj):
            missing.append(name)
        if inspect.isclass(obj) and obj.__module__.startswith("streamlet"):
            for method, member in sorted(_public_methods(obj).items()):
                # getdoc: a docstring inherited from a base class counts.
                if not inspect.getdoc(member):
                    missing.append(f"{name}.{method}")
    assert not missing, f"public objects without a docstring: {', '.join(missing)}"


def _relative_links(page: Path) -> list[str]:
    links = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL, or an anchor in the same page
        links.append(target.split("#", 1)[0])
    return links


@pytest.mark.parametrize("page", [*PAGES, ROOT / "README.md"], ids=lambda p: p.name)
def test_relative_links_point_to_existing_files(page: Path) -> None:
    broken = [t for t in _relative_links(page) if not (page.parent / t).exists()]
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {', '.join(broken)}"


def test_the_guide_has_its_pages() -> None:
    names = {p.name for p in PAGES}
    assert {"index.md", "sources.md", "sinks.md", "failures.md", "batching.md"} <= names
    assert "operating.md" in names
    index = (GUIDE / "index.md").read_text()
    missing = [n for n in sorted(names - {"index.md"}) if f"({n})" not in index]
    assert not missing, f"docs/guide/index.md does not link {', '.join(missing)}"


SNIPPETS = [
    (page, code)
    for page in PAGES
    for code in SNIPPET.findall(page.read_text())
    if not code.startswith(FRAGMENT)
]


def test_the_guide_has_runnable_snippets() -> None:
    assert SNIPPETS


@pytest.mark.parametrize(
    ("page", "snippet"), SNIPPETS, ids=[f"{p.stem}-{i}" for i, (p, _) in enumerate(SNIPPETS)]
)
async def test_a_guide_snippet_runs(
    page: Path, snippet: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "guide_snippet"}
    exec(compile(snippet, str(page), "exec"), namespace)  # noqa: S102 - our own docs
    app = namespace.get("app")
    if isinstance(app, App):
        with anyio.fail_after(30):
            await app.serve(duration=1.5)
