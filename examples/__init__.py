"""Example apps: run one with ``streamlet run examples.<name>:app``."""
