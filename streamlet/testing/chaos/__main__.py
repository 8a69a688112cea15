"""``python -m streamlet.testing.chaos``: the same as ``streamlet chaos``."""

from streamlet.cli import chaos

chaos(prog_name="python -m streamlet.testing.chaos")
