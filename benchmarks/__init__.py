"""Benchmarks: scripts that print a table and one JSON line, each beside its baseline.

Run one as a module from the repository root, e.g. ``python -m benchmarks.wal``.
"""
