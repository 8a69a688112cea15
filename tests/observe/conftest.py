"""The monitoring tests' fixtures (defined in support.py)."""

from tests.observe.support import start

__all__ = ["start"]
