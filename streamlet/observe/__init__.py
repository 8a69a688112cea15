"""Observability: Prometheus metrics, a live status page, JSON status and health.

Off unless asked (``App(http="127.0.0.1:9100")`` or ``streamlet run --http``).
:mod:`~streamlet.observe.status` holds the pure status model,
:mod:`~streamlet.observe.probe` reads the running engine,
:mod:`~streamlet.observe.prometheus` the metrics,
:mod:`~streamlet.observe.monitor` ties them to batches, and
:mod:`~streamlet.observe.web` serves them (aiohttp, in the app's event loop);
:mod:`~streamlet.observe.terminal` prints the same picture for ``streamlet status``.
"""
