"""The short chaos profile: each scenario breaks a real worker and every record is counted.

Every test runs one scenario of :mod:`streamlet.testing.chaos` on one
pipeline: real ``streamlet run`` processes, real signals, real files damaged
on disk and I/O faults injected through ``STREAMLET_FAULT_FS``. A run passes
when nothing acknowledged was lost, nothing was written twice, per-key order
held, both WALs verify clean, and the scenario's own expectations held (an
I/O fault stops the worker with exit 1 and a clear message, a bit flip is
reported by file and offset, ...). ``STREAMLET_TEST_SEED`` repeats a run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from streamlet.testing.chaos import PROFILES, SCENARIOS, ScenarioResult, run_scenario
from streamlet.testing.kafka import missing_tools

SEED = int(os.environ.get("STREAMLET_TEST_SEED", "20261125"))
SHORT = PROFILES["short"]
REPO_ROOT = Path(__file__).resolve().parents[2]


def _plan_params() -> list[object]:
    params: list[object] = []
    for p in SHORT:
        # Kafka runs start (and kill) a broker of their own, like tests/kafka need Java.
        marks = [pytest.mark.kafka] if p.pipeline.startswith("kafka") else []
        params.append(
            pytest.param(
                p.scenario,
                p.pipeline,
                p.records,
                p.faults,
                marks=marks,
                id=f"{p.scenario}-{p.pipeline}",
            )
        )
    return params


RUNS_AT_ONCE = 2
"""Scenarios run side by side: each mostly waits, on input paced over its faults and
on restarts, so two at once take about half the time on two cores."""

_TEST = "test_scenario_loses_and_repeats_nothing"


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.fixture(scope="module")
def short_profile(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Future[ScenarioResult]]]:
    """Every selected scenario of the short profile, started in the background at once.

    Each test then waits for its own run. The longest (the Kafka ones, with
    a broker of their own) start first.
    """
    selected = {
        item.callspec.id
        for item in request.session.items
        if getattr(item, "originalname", "") == _TEST and hasattr(item, "callspec")
    }
    plans = [p for p in SHORT if f"{p.scenario}-{p.pipeline}" in selected]
    if missing_tools():
        plans = [p for p in plans if not p.pipeline.startswith("kafka")]
    plans.sort(key=lambda p: not p.pipeline.startswith("kafka"))
    env = pytest.MonkeyPatch()
    if "STREAMLET_KAFKA_CACHE" not in os.environ:
        env.setenv("STREAMLET_KAFKA_CACHE", str(REPO_ROOT / ".cache" / "kafka"))
    pool = ThreadPoolExecutor(max_workers=RUNS_AT_ONCE, thread_name_prefix="chaos")
    futures = {
        f"{p.scenario}-{p.pipeline}": pool.submit(
            run_scenario,
            p.scenario,
            p.pipeline,
            records=p.records,
            faults=p.faults,
            seed=SEED,
            workdir=tmp_path_factory.mktemp(f"chaos-{p.scenario}-{p.pipeline}"),
        )
        for p in plans
    }
    try:
        yield futures
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        env.undo()


@pytest.mark.timeout(280)
@pytest.mark.parametrize(("scenario", "pipeline", "records", "faults"), _plan_params())
def test_scenario_loses_and_repeats_nothing(
    short_profile: dict[str, Future[ScenarioResult]],
    scenario: str,
    pipeline: str,
    records: int,
    faults: int,
) -> None:
    if pipeline.startswith("kafka"):
        missing = missing_tools()
        if missing:
            message = f"the Kafka chaos runs need {' and '.join(missing)}"
            if _ci():
                pytest.fail(message, pytrace=False)
            pytest.skip(message)
    result = short_profile[f"{scenario}-{pipeline}"].result(timeout=270)
    assert result.ok, result.describe()
    assert result.fault_count == faults, result.describe()
    assert result.records_in >= records
    for sink, count in result.records_out.items():
        assert count + result.dead_letters // 2 == result.records_in, (sink, result.describe())


def test_the_short_profile_covers_every_scenario() -> None:
    assert {p.scenario for p in SHORT} == set(SCENARIOS)


@pytest.mark.timeout(120)
def test_streamlet_chaos_prints_a_report_and_writes_its_json(tmp_path: Path) -> None:
    output = tmp_path / "report.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "streamlet",
            "chaos",
            "--scenarios",
            "sigkill_random",
            "--pipelines",
            "sequence",
            "--records",
            "900",
            "--faults",
            "2",
            "--seed",
            str(SEED),
            "--workdir",
            str(tmp_path / "work"),
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"seed {SEED}" in done.stdout
    assert "lost 0, duplicated 0" in done.stdout
    line = json.loads(done.stdout.splitlines()[-2])
    report = json.loads(output.read_text())
    assert line["totals"] == report["totals"]
    assert report["totals"]["process_kills"] == 2
    assert report["totals"]["records_in"] == 900
    assert report["runs"][0]["recovery_p50_s"] is not None
    assert not (tmp_path / "work").exists()  # deleted: every run passed
