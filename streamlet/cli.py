"""The ``streamlet`` command line.

Each subcommand group is a thin shell over a module that does the work and
can be called from Python too; this module parses arguments, prints, and maps
errors to exit codes (0 ok, 1 the thing checked is bad, 2 usage).
"""

from __future__ import annotations

import click

import streamlet


@click.group()
@click.version_option(streamlet.__version__, prog_name="streamlet")
def main() -> None:
    """streamlet: micro-batch streaming with a write-ahead log and exactly-once output."""
