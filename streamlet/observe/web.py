"""The worker's HTTP endpoints: the live page, metrics, status, batches, events, health.

Served by aiohttp inside the app's own event loop (no thread, no second
process): a scrape or a page reads the monitor between batches, never while
one of its steps runs. aiohttp does the HTTP parsing and its limits (8 KiB
request lines and header fields, 128 headers), rather than a parser of our own.

Safe by default: off unless asked (``App(http=...)``, ``streamlet run
--http``), bound to loopback unless told otherwise (another address logs a
warning), read-only (GET and HEAD only; nothing changes the app), no record
data in any response, and the page's assets ship inside the package (no CDN).
See SECURITY.md.
"""

from __future__ import annotations

import asyncio
import logging
from importlib import resources
from typing import Any

import orjson
from aiohttp import web

from streamlet.errors import ConfigError
from streamlet.observe.address import is_loopback
from streamlet.observe.monitor import Monitor
from streamlet.observe.status import health, status_document

__all__ = ["HttpServer"]

log = logging.getLogger(__name__)

_ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
_KEEPALIVE = 15.0
"""Seconds between comments on an idle event stream (keeps proxies from closing it)."""
_MAX_BATCHES = 1000


class HttpServer:
    """The monitor's endpoints on one address, in the running event loop.

    Args:
        monitor: what is served.
        host: the address to bind (loopback unless the user chose another).
        port: the port (0: any free one; see :attr:`port` once started).
    """

    def __init__(self, monitor: Monitor, host: str, port: int) -> None:
        self.monitor = monitor
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    async def start(self) -> None:
        """Bind and serve; returns once the port is open.

        Raises:
            ConfigError: the address cannot be bound (in use, not local).
        """
        if not is_loopback(self.host):
            log.warning(
                "the status page and metrics are served on %s, which is not loopback:"
                " anyone who can reach it sees the app's figures (no record data)."
                " Put it behind a proxy with authentication, or bind 127.0.0.1",
                self.host,
            )
        app = web.Application()
        app.on_response_prepare.append(_security_headers)
        app.router.add_get("/", self._page)
        app.router.add_get("/static/{name}", self._asset)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._health)
        app.router.add_get("/api/status", self._status)
        app.router.add_get("/api/batches", self._batches)
        app.router.add_get("/api/events", self._events)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(
                f"cannot serve the status page on {self.host}:{self.port}: {exc.strerror or exc}."
                " Choose another address with --http (or App(http=...)), or port 0 for any"
                " free one"
            ) from exc
        self._runner = runner
        for address in runner.addresses:
            if isinstance(address, tuple):
                self.port = int(address[1])
                break
        log.info("status page on %s (metrics on %smetrics)", self.url, self.url)

    async def aclose(self) -> None:
        """End event streams and stop serving."""
        self._closing.set()
        self.monitor.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- endpoints --------------------------------------------------------------

    async def _page(self, request: web.Request) -> web.StreamResponse:
        return _asset_response("index.html")

    async def _asset(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in _ASSETS:
            raise web.HTTPNotFound(text=f"no asset {name!r}")
        return _asset_response(name)

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        body, content_type = self.monitor.metrics.exposition(request.headers.get("Accept"))
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    async def _health(self, request: web.Request) -> web.StreamResponse:
        snapshot = self.monitor.snapshot()
        if snapshot is None:
            return _json({"status": "starting", "state": "starting"})
        ok, document = health(snapshot)
        return _json(document, status=200 if ok else 503)

    async def _status(self, request: web.Request) -> web.StreamResponse:
        snapshot = self.monitor.snapshot()
        if snapshot is None:
            return _json({"app": self.monitor.app, "state": "starting"})
        return _json(status_document(snapshot, self.monitor.batches))

    async def _batches(self, request: web.Request) -> web.StreamResponse:
        try:
            after = int(request.query.get("after", "-1"))
            limit = min(int(request.query.get("limit", str(_MAX_BATCHES))), _MAX_BATCHES)
        except ValueError:
            raise web.HTTPBadRequest(text="after and limit must be integers") from None
        return _json({"batches": self.monitor.batches.after(after, limit)})

    async def _events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: one ``batch`` event per batch done, as it is done."""
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)
        queue = self.monitor.subscribe()
        try:
            await response.write(b"retry: 1000\n\n")
            while not self._closing.is_set():
                try:
                    document = await asyncio.wait_for(queue.get(), _KEEPALIVE)
                except TimeoutError:
                    await response.write(b": keepalive\n\n")
                    continue
                if document is None:
                    break
                await response.write(b"event: batch\ndata: " + orjson.dumps(document) + b"\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.monitor.unsubscribe(queue)
        return response


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Added to every response, errors included, just before its headers go out."""
    for name, value in _HEADERS.items():
        response.headers.setdefault(name, value)


def _json(document: Any, *, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(document, option=orjson.OPT_NON_STR_KEYS),
        status=status,
        content_type="application/json",
    )


def _asset_response(name: str) -> web.Response:
    body = resources.files("streamlet.observe").joinpath("page", name).read_bytes()
    response = web.Response(body=body)
    response.headers["Content-Type"] = _ASSETS[name]
    return response
