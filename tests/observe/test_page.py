"""The live page in a real headless Chromium against a running worker.

Needs Debian's ``chromium`` (``scripts/test`` installs it when it can) and
the ``playwright`` package (a dev dependency) to drive it; playwright's own
browser download is never used. Set ``STREAMLET_TEST_CHROMIUM`` to use
another Chromium. Outside CI a missing browser skips these tests with what
to install; under ``CI=true`` it fails them. The screenshot is written to
``test-artifacts/status-page.png`` (or ``$STREAMLET_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import os
import shutil
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.observe.support import MARKER

REPO_ROOT = Path(__file__).resolve().parents[2]
BROWSER_ENV = "STREAMLET_TEST_CHROMIUM"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(f"the page tests need a browser under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = os.environ.get(BROWSER_ENV) or shutil.which("chromium")
    if not executable:
        _unavailable(
            "no Chromium: install Debian's chromium (apt-get install chromium; scripts/test"
            f" does it when run as root) or set {BROWSER_ENV}"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is missing: pip install -e '.[dev]'")
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=executable, args=ARGS)
        try:
            yield launched
        finally:
            launched.close()


def _within(seconds: float, done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, f"not within {seconds} s"
        time.sleep(0.05)


def _artifact(name: str) -> Path:
    directory = Path(os.environ.get("STREAMLET_TEST_ARTIFACTS", REPO_ROOT / "test-artifacts"))
    directory.mkdir(parents=True, exist_ok=True)
    return directory / name


def test_the_page_shows_batches_live_and_needs_nothing_but_the_worker(
    start: Any, browser: Any
) -> None:
    worker = start("--http", "127.0.0.1:0", OBSERVED_RECORDS="100000000", OBSERVED_FAIL_EVERY="7")
    assert worker.url, worker.log()
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems: list[str] = []
    outside: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))

    def only_the_worker(route: Any) -> None:
        host = urllib.parse.urlsplit(route.request.url).hostname
        if host in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_the_worker)
    page.goto(worker.url)

    # Polled from Python through locators: the page's CSP forbids the
    # string evaluation that wait_for_function would need (and the page
    # must work under that CSP, so it is not bypassed).
    def points(row: str) -> int:
        return int(page.locator(f"#row-{row} .timeline svg").get_attribute("data-points") or 0)

    for row in ("input", "scheduling", "processing", "total"):
        _within(30, lambda row=row: points(row) >= 20)  # type: ignore[misc]
    # Live: the newest batch shown advances while we watch, without a reload.
    first = int(page.inner_text("#last-batch"))
    _within(5, lambda: int(page.inner_text("#last-batch")) >= first + 3)
    assert page.inner_text("#state") == "running"
    assert "numbers" in page.inner_text("#sources")
    assert "exactly-once" in page.inner_text("#sinks")
    _within(10, lambda: "is not to my taste" in page.inner_text("#errors"))

    page.click("#batches tbody tr")
    detail = page.inner_text("#batch-detail")
    assert "Offset ranges" in detail
    assert "numbers" in detail
    assert "Handlers" in detail

    page.screenshot(path=str(_artifact("status-page.png")), full_page=True)
    assert MARKER not in page.content()
    assert problems == []
    assert outside == []
