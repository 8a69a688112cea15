"""Pieces every benchmark shares: where results go, units, percentiles, the disk."""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "PERCENTILES",
    "REPO_ROOT",
    "RESULTS",
    "add_output_options",
    "fs_type",
    "ms",
    "output_paths",
    "percentiles",
    "work_directory",
    "write_result",
]

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


def work_directory(requested: str | None, name: str) -> tuple[str, str]:
    """A fresh directory for one run, and its file system type.

    Inside ``requested`` (``--dir``), or else inside the repository: on the
    disk the project lives on, not on a tmpfs where fsync costs nothing
    (printed as a warning if it is one anyway). The caller removes it.
    """
    parent = os.path.abspath(requested) if requested else str(REPO_ROOT)
    os.makedirs(parent, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix=f".bench-{name}-", dir=parent)
    kind = fs_type(workdir)
    if kind in ("tmpfs", "ramfs"):
        print(f"warning: {workdir} is on {kind}; fsync costs nothing there")
    return workdir, kind


def add_output_options(parser: argparse.ArgumentParser, name: str, plot: str) -> None:
    """``--plot`` and ``--json``: where a run's figures go (see :func:`output_paths`)."""
    parser.add_argument(
        "--plot",
        help=f"PNG plot {plot} (default benchmarks/results/{name}.png; with --quick,"
        f" {name}-quick.png in the temporary directory, so that a smoke test leaves the"
        " published figures alone)",
    )
    parser.add_argument(
        "--json",
        help=f"where the JSON result goes too (default benchmarks/results/{name}.json;"
        f" with --quick, {name}-quick.json in the temporary directory)",
    )


def output_paths(args: argparse.Namespace, name: str) -> tuple[str, str]:
    """(plot, json) paths: as given, else published ones, else (--quick) temporary ones."""
    out_dir = Path(tempfile.gettempdir()) if args.quick else RESULTS
    suffix = "-quick" if args.quick else ""
    return (
        args.plot or str(out_dir / f"{name}{suffix}.png"),
        args.json or str(out_dir / f"{name}{suffix}.json"),
    )


def write_result(result: dict[str, Any], json_path: str, plot_path: str) -> None:
    """Write ``result`` to ``json_path``, say where both files are, and print it as one line."""
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w", encoding="utf-8") as out:
        json.dump(result, out, indent=2)
        out.write("\n")
    print(f"\nplot: {plot_path}\njson: {json_path}\n")
    print(json.dumps(result, separators=(",", ":"), ensure_ascii=False))
