"""A pytest fixture for the test kit: ``streamlet_harness``.

Load it in your ``conftest.py``::

    pytest_plugins = ["streamlet.testing.pytest_plugin"]

and take it in an async test (run on asyncio: pytest-asyncio or anyio's
plugin)::

    async def test_counts(streamlet_harness):
        harness = streamlet_harness(app)
        harness.feed("lines", ["a b", "b"])
        await harness.until_idle()
        assert harness.outputs("count_words") == [["a", 1], ["b", 2]]

The fixture is a factory, so one test may run several apps (or one app
twice); every harness it made is closed when the test ends, which removes
its temporary files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from streamlet.app import App
from streamlet.testing.harness import AppHarness

__all__ = ["streamlet_harness"]


@pytest.fixture
def streamlet_harness() -> Iterator[Callable[..., AppHarness]]:
    """``streamlet_harness(app, **options)``: an :class:`AppHarness`, closed after the test."""
    made: list[AppHarness] = []

    def make(app: App, **options: Any) -> AppHarness:
        harness = AppHarness(app, **options)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()
