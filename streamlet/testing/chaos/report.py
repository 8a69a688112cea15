"""The chaos report: each run's outcome, the totals, a readable table and the JSON form.

``streamlet chaos`` prints :meth:`Report.table` and writes
:meth:`Report.to_json` (``"report": "streamlet.chaos"``), which the
published figures in README.md and ``benchmarks/results/chaos-*.json``
come from; the field names are that file's format.
"""

from __future__ import annotations

import json
import os
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PROCESS_KILLS", "Report", "ScenarioResult", "write_report"]


@dataclass
class ScenarioResult:
    """The outcome of one scenario on one pipeline."""

    scenario: str
    pipeline: str
    seed: int
    records_in: int = 0
    records_out: dict[str, int] = field(default_factory=dict)
    dead_letters: int = 0
    """Dead letters written, over both handlers (each failed record once per handler)."""
    lost: int = 0
    duplicated: int = 0
    unexpected: int = 0
    out_of_order: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    recovery: list[float] = field(default_factory=list)
    """Seconds from each restart after a fault to the first batch done."""
    wal_clean: bool = False
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    workdir: str = ""

    @property
    def ok(self) -> bool:
        return (
            not self.problems
            and self.wal_clean
            and self.lost == self.duplicated == self.unexpected == self.out_of_order == 0
        )

    @property
    def fault_count(self) -> int:
        return sum(self.faults.values())

    def describe(self) -> str:
        """A few lines for a failing test or the report."""
        head = (
            f"{self.scenario}/{self.pipeline} seed {self.seed}: {'ok' if self.ok else 'FAILED'};"
            f" faults {self.faults}; in {self.records_in}, out {self.records_out},"
            f" dead letters {self.dead_letters}; lost {self.lost}, duplicated"
            f" {self.duplicated}, unexpected {self.unexpected}, out of order"
            f" {self.out_of_order}; WAL {'clean' if self.wal_clean else 'NOT clean'};"
            f" {self.seconds:.1f}s in {self.workdir}"
        )
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "pipeline": self.pipeline,
            "seed": self.seed,
            "ok": self.ok,
            "records_in": self.records_in,
            "records_out": self.records_out,
            "dead_letters": self.dead_letters,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "unexpected": self.unexpected,
            "out_of_order": self.out_of_order,
            "faults": self.faults,
            "recovery_p50_s": _p50(self.recovery),
            "recovery_max_s": max(self.recovery, default=None),
            "wal_clean": self.wal_clean,
            "seconds": round(self.seconds, 1),
            "problems": self.problems,
        }


PROCESS_KILLS = ("sigkill", "crash_at:")


def _p50(values: Sequence[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


@dataclass
class Report:
    """All runs of a profile, with totals."""

    profile: str
    seed: int
    command: str
    results: list[ScenarioResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def totals(self) -> dict[str, Any]:
        results = self.results
        recovery = [t for r in results for t in r.recovery]
        faults: Counter[str] = Counter()
        for r in results:
            faults.update(r.faults)
        return {
            "scenarios": sorted({r.scenario for r in results}),
            "runs": len(results),
            "faults": sum(faults.values()),
            "process_kills": sum(n for k, n in faults.items() if k.startswith(PROCESS_KILLS)),
            "records_in": sum(r.records_in for r in results),
            "records_out": sum(r.records_out.get("file", 0) for r in results),
            "dead_letters": sum(r.dead_letters for r in results),
            "lost": sum(r.lost for r in results),
            "duplicated": sum(r.duplicated for r in results),
            "unexpected": sum(r.unexpected for r in results),
            "out_of_order": sum(r.out_of_order for r in results),
            "recovery_p50_s": _p50(recovery),
            "recovery_max_s": round(max(recovery), 3) if recovery else None,
            "failed_runs": [f"{r.scenario}/{r.pipeline}" for r in results if not r.ok],
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "report": "streamlet.chaos",
            "profile": self.profile,
            "seed": self.seed,
            "command": self.command,
            "ok": self.ok,
            "seconds": round(self.seconds, 1),
            "totals": self.totals(),
            "runs": [r.to_json() for r in self.results],
        }

    def table(self) -> str:
        """The report as a readable table."""
        rows = [
            (
                "scenario",
                "pipeline",
                "faults",
                "in",
                "out",
                "dead",
                "lost",
                "dup",
                "order",
                "wal",
                "rec p50",
                "rec max",
                "secs",
                "result",
            )
        ]
        for r in self.results:
            rows.append(
                (
                    r.scenario,
                    r.pipeline,
                    str(r.fault_count),
                    str(r.records_in),
                    str(r.records_out.get("file", 0)),
                    str(r.dead_letters),
                    str(r.lost),
                    str(r.duplicated),
                    str(r.out_of_order),
                    "ok" if r.wal_clean else "BAD",
                    _seconds(_p50(r.recovery)),
                    _seconds(max(r.recovery, default=None)),
                    f"{r.seconds:.0f}",
                    "ok" if r.ok else "FAILED",
                )
            )
        t = self.totals()
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append("")
        lines.append(
            f"{t['runs']} runs of {len(t['scenarios'])} scenarios, {t['faults']} faults"
            f" ({t['process_kills']} process kills); {t['records_in']} records in,"
            f" {t['records_out']} out per sink, {t['dead_letters']} dead letters (both"
            " handlers);"
            f" lost {t['lost']}, duplicated {t['duplicated']}, out of order"
            f" {t['out_of_order']}; recovery p50 {_seconds(t['recovery_p50_s'])},"
            f" max {_seconds(t['recovery_max_s'])}; {self.seconds:.0f}s; seed {self.seed}:"
            f" {'PASS' if self.ok else 'FAIL'}"
        )
        for r in self.results:
            if not r.ok:
                lines.append(r.describe())
        return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def write_report(report: Report, path: str | os.PathLike[str]) -> None:
    """Write the report's JSON to ``path`` (directories created)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(report.to_json(), indent=2) + "\n")
