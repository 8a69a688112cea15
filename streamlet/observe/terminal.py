"""``streamlet status``: the status page's picture as one screen of text.

:func:`render` is pure (a status document in, lines out), so what an
operator sees over SSH is tested without a terminal; :func:`fetch_status`
is the one network call, with the standard library (no browser needed).
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from streamlet.errors import StreamletError

__all__ = ["fetch_status", "render"]


def fetch_status(url: str, *, timeout: float = 5.0) -> dict[str, Any]:
    """GET ``<url>/api/status``.

    Raises:
        StreamletError: the worker cannot be reached or did not answer a status.
    """
    base = url if "://" in url else f"http://{url}"
    target = base.rstrip("/") + "/api/status"
    if not target.startswith(("http://", "https://")):
        raise StreamletError(f"{url!r} is not an http:// address of a worker's status page")
    try:
        with urllib.request.urlopen(target, timeout=timeout) as response:  # noqa: S310 - checked
            body = response.read()
    except urllib.error.HTTPError as exc:
        raise StreamletError(f"{target} answered {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StreamletError(
            f"cannot reach {target}: {reason}. Is the worker running with --http on that address?"
        ) from exc
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise StreamletError(f"{target} did not answer JSON: is it a streamlet worker?") from exc
    if not isinstance(document, dict) or "app" not in document:
        raise StreamletError(f"{target} did not answer a streamlet status")
    return document


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    value = seconds * 1000
    return f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _limit(per_second: float | None) -> str:
    """A backpressure rate limit; None: not limited."""
    return "-" if per_second is None else f"{per_second:,.0f}/s"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    cells = [[str(c) for c in header], *[["-" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]


def render(status: Mapping[str, Any], *, errors: int = 5) -> str:
    """One screen: health, rates and delays, lag, receivers, sinks and the last errors."""
    if status.get("state") == "starting":
        return f"{status.get('app')}: starting"
    health = "ok" if status.get("healthy", True) else "STALLED"
    age = status.get("checkpoint_age")
    checkpoint = "no checkpoint yet" if age is None else f"checkpoint {_age(age)} ago"
    lines = [
        f"{status['app']}: {status['state']}, {health}; last batch {status['last_done']},"
        f" {len(status['pending'])} pending; up {_age(status['uptime'])}; {checkpoint}",
    ]
    group = status.get("group")
    if group:
        pause = group.get("last_pause")
        lines.append(
            f"group {group['group']!r} as worker {group['worker']!r}: tasks"
            f" {group['tasks'] or 'none'}, {group['rebalances']} rebalance(s)"
            + (f", last paused batches {_age(pause)}" if pause is not None else "")
        )
    rates = status.get("rates") or {}
    rate = rates.get("input_per_second")
    lines.append(
        f"input {'-' if rate is None else f'{rate:,.0f}'} records/s;"
        f" scheduling {_ms(rates.get('scheduling_delay'))},"
        f" processing {_ms(rates.get('processing_time'))},"
        f" total {_ms(rates.get('total_delay'))}"
        f" (interval {_ms(status['batch_interval'])}, last 20 batches)"
    )
    if status["sources"]:
        lines.append("")
        rows = [
            (
                s["name"],
                s["kind"],
                p["partition"],
                p["position"],
                p["latest"],
                p["lag"],
                _limit(s["rate_limit"]),
            )
            for s in status["sources"]
            for p in s["partitions"]
        ]
        lines += _table(("source", "kind", "part", "position", "latest", "lag", "limit"), rows)
    if status["receivers"]:
        lines.append("")
        lines += _table(
            ("receiver", "kind", "blocks", "records", "rate limit"),
            [
                (
                    r["name"],
                    r["kind"],
                    r["pending_blocks"],
                    r["pending_records"],
                    _limit(r["rate_limit"]),
                )
                for r in status["receivers"]
            ],
        )
    if status["sinks"]:
        lines.append("")
        lines += _table(
            ("handler", "sink", "guarantee"),
            [(s["handler"], s["sink"], s["guarantee"]) for s in status["sinks"]],
        )
    recent = list(status.get("errors") or [])[-errors:]
    lines.append("")
    if recent:
        lines.append("last errors:")
        for e in reversed(recent):
            tail = " (dead-lettered)" if e.get("dead_lettered") else ""
            lines.append(f"  batch {e['batch']} handler {e['handler']}: {e['error']}{tail}")
    else:
        lines.append("no errors in the retained batches")
    return "\n".join(lines)
