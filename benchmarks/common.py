"""Pieces every benchmark shares: where results go, units, percentiles, the disk."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

__all__ = ["PERCENTILES", "REPO_ROOT", "RESULTS", "fs_type", "ms", "percentiles"]

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "results"

PERCENTILES = (("p50", 0.50), ("p95", 0.95), ("p99", 0.99), ("max", 1.0))


def ms(seconds: float) -> float:
    """Seconds as milliseconds, rounded to 0.1 ms for tables and JSON."""
    return round(seconds * 1e3, 1)


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """Nearest-rank percentiles of ``values`` (not empty)."""
    ordered = sorted(values)
    count = len(ordered)
    return {name: ordered[max(0, math.ceil(q * count) - 1)] for name, q in PERCENTILES}


def fs_type(path: str) -> str:
    """The file system type holding ``path`` (from /proc/self/mounts), or "?"."""
    best, kind = "", "?"
    try:
        with open("/proc/self/mounts", encoding="utf-8") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1].replace("\\040", " ")
                inside = path == point or path.startswith(point.rstrip("/") + "/")
                if inside and len(point) > len(best):
                    best, kind = point, fields[2]
    except OSError:
        pass
    return kind
