"""A chaos run: one scenario on one pipeline, and a profile of such runs.

:class:`Run` is what a scenario's ``inject`` works through: it starts
workers, times their recovery, counts faults and records broken
expectations; then :meth:`Run.finish` lets a last worker take every record
through, stops it gracefully and checks the outputs and the logs.
:func:`run_scenario` runs one scenario; :func:`run_profile` a profile's
runs, each with a seed derived from the profile's, into a
:class:`~streamlet.testing.chaos.report.Report`.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from streamlet._tracker import TrackerState
from streamlet.testing.chaos.checks import (
    Outputs,
    check_sink,
    dead_letter_problems,
    sinks_apart,
)
from streamlet.testing.chaos.inputs import Pipeline
from streamlet.testing.chaos.process import Worker
from streamlet.testing.chaos.readback import read_outputs, wal_verify
from streamlet.testing.chaos.report import Report, ScenarioResult
from streamlet.testing.chaos.scenarios import PIPELINES, PROFILES, SCENARIOS, Plan, Scenario

__all__ = ["Run", "run_profile", "run_scenario"]


class Run:
    """One scenario on one pipeline: starts workers, counts faults, checks the end.

    Scenario functions use :meth:`start`, :meth:`pause`, :meth:`fault` and
    :meth:`problem`; :meth:`finish` (called by the harness) runs the worker
    until every record is through, stops it gracefully and checks.
    """

    def __init__(
        self,
        scenario: Scenario,
        pipeline: Pipeline,
        *,
        faults: int,
        seed: int,
        timeout: float,
    ) -> None:
        self.scenario = scenario
        self.pipeline = pipeline
        self.faults_wanted = faults
        self.rng = random.Random(seed)
        self.timeout = timeout
        self.result = ScenarioResult(
            scenario.name, pipeline.name, seed, workdir=str(pipeline.workdir)
        )
        self.log = pipeline.workdir / "worker.log"
        self._after_fault = False
        self.workers: list[Worker] = []
        pipeline.uptime = self.uptime

    # Used by scenarios.

    def start(self, env: Mapping[str, str] | None = None) -> Worker:
        """Start a worker (with fault hooks in ``env``)."""
        worker = Worker(
            self.pipeline.workdir, config=self.pipeline.config_path, env=env or {}, log=self.log
        )
        self.workers.append(worker)
        return worker

    def uptime(self) -> float:
        """Seconds workers of this run have been running, in all."""
        return sum(w.uptime() for w in list(self.workers))

    def note_recovery(self, worker: Worker, since: float | None = None) -> None:
        """Record the worker's recovery time if it follows a fault.

        That is from its start (or from ``since``, when the fault was not a
        restart) to its first batch done.
        """
        took = worker.first_batch_after if since is None else worker.first_batch_since(since)
        if took is not None and self._after_fault:
            self.result.recovery.append(took)
            self._after_fault = False

    def fault(self, kind: str) -> None:
        """Count one injected fault of ``kind``."""
        self.result.faults[kind] = self.result.faults.get(kind, 0) + 1
        self._after_fault = True

    def problem(self, text: str) -> None:
        """Record a broken expectation (the run fails)."""
        self.result.problems.append(text)

    def pause(self, worker: Worker, *, early: float = 0.15, longest: float = 1.5) -> None:
        """Wait a random moment to strike: usually after the first batch, sometimes before."""
        if self.rng.random() < early:
            time.sleep(self.rng.uniform(0.0, 1.0))
            return
        worker.wait_batches(1, self.timeout)
        self.note_recovery(worker)
        time.sleep(self.rng.uniform(0.05, longest))

    def state(self) -> TrackerState:
        """The tracker state as recovery would rebuild it (read-only)."""
        from streamlet._state import read_state

        if not (self.pipeline.state / "tracker").exists():
            return TrackerState()  # the first worker has not started yet
        return read_state(str(self.pipeline.state)).state

    def input_left(self) -> bool:
        """Whether records are still to come (faults landing now meet moving data)."""
        try:
            return not self.pipeline.consumed(self.state())
        except Exception:
            return True

    def expect_exit(self, worker: Worker, code: int, what: str, timeout: float) -> int | None:
        """Wait for the worker to exit; record a problem unless it exits with ``code``."""
        got = worker.wait(timeout)
        if got is None:
            worker.stop()
            self.problem(f"{what}: the worker did not exit within {timeout:.0f}s")
        elif got != code:
            tail = worker.stderr()[-1500:]
            self.problem(f"{what}: the worker exited with {got}, not {code}:\n{tail}")
        return got

    def kill(self, worker: Worker, sig: int = signal.SIGKILL) -> None:
        """Signal the worker and reap it; it must not have died on its own before."""
        if not worker.alive():
            code = worker.wait(10)
            tail = worker.stderr()[-1500:]
            self.problem(f"the worker exited on its own ({code}) before the fault:\n{tail}")
            return
        if sig == signal.SIGTERM and not worker.wait_ready(self.timeout):
            self.problem(f"the worker never armed its SIGTERM handler:\n{worker.stderr()[-1500:]}")
        worker.signal(sig)
        expected = -sig if sig == signal.SIGKILL else 0
        self.expect_exit(worker, expected, f"after {signal.Signals(sig).name}", self.timeout)

    # Used by the harness.

    def finish(self) -> None:
        """Run the worker until all input is through, stop it gracefully, check everything."""
        pipeline = self.pipeline
        deadline = time.monotonic() + self.timeout * 4
        worker = self.start()
        try:
            while time.monotonic() < deadline:
                if not worker.alive():
                    break
                if pipeline.input_error() is not None:
                    break
                try:
                    if pipeline.consumed(self.state()):
                        break
                except Exception as exc:
                    self.problem(f"the state directory cannot be read: {exc}")
                    break
                worker.wait_batches(len(worker.batches) + 1, 0.5)
            self.note_recovery(worker)
            if worker.alive():
                self.kill(worker, signal.SIGTERM)
            else:
                code = worker.wait(10)
                self.problem(f"the final worker exited with {code}:\n{worker.stderr()[-1500:]}")
        finally:
            if worker.alive():
                worker.stop()
            pipeline.stop_input()
        if pipeline.input_error():
            self.problem(str(pipeline.input_error()))
        if not pipeline.input_done():
            self.problem("not all input was acknowledged before the deadline")
        self.check()

    def check(self) -> None:
        """Compare the sinks with the input and verify the logs."""
        pipeline, result = self.pipeline, self.result
        expected = pipeline.expected()
        result.records_in = sum(len(r) for r in expected.values())
        outputs = read_outputs(pipeline)
        result.dead_letters = sum(len(v) for v in outputs.dead.values())
        for sink, handler in pipeline.sinks:
            check = check_sink(expected, outputs.by_sink[sink], outputs.dead.get(handler, []))
            result.records_out[sink] = check.out
            result.lost += check.lost
            result.duplicated += check.duplicated
            result.unexpected += check.unexpected
            result.out_of_order += check.out_of_order
            if check.examples:
                self.problem(f"{sink}: {'; '.join(check.examples)}")
        only = sinks_apart(outputs)
        if only:
            self.problem(f"the two sinks committed different batches: {only}")
        if pipeline.dead_letter:
            self.check_dead_letters(outputs, expected)
        self.scenario.verify(self, outputs)
        clean = True
        for name in ("tracker", "data"):
            log_dir = pipeline.state / name
            if name == "data" and not pipeline.receiver:
                continue
            ok, text = wal_verify(log_dir)
            if not ok:
                clean = False
                self.problem(f"streamlet wal verify {log_dir}: {text}")
        result.wal_clean = clean

    def check_dead_letters(self, outputs: Outputs, expected: Mapping[str, range]) -> None:
        for text in dead_letter_problems(outputs, expected):
            self.problem(text)


def run_scenario(
    scenario: str,
    pipeline: str,
    *,
    records: int,
    faults: int,
    seed: int,
    workdir: str | os.PathLike[str],
    pace: float | None = None,
    timeout: float = 60.0,
) -> ScenarioResult:
    """Run one scenario on one pipeline in ``workdir`` (created; must be new or empty).

    Args:
        scenario: a name in :data:`SCENARIOS`.
        pipeline: a name in :data:`PIPELINES`.
        records: input records in all.
        faults: faults to inject.
        seed: seeds every random choice of the run.
        workdir: where the worker's configuration, its state and its outputs go.
        pace: seconds of worker uptime the input is spread over (default:
            about as long as the faults take).
        timeout: seconds any one wait for the worker may take.
    """
    chosen = SCENARIOS[scenario]
    if pipeline not in chosen.pipelines:
        raise ValueError(f"scenario {scenario!r} does not apply to pipeline {pipeline!r}")
    path = Path(workdir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    if pace is None:
        pace = max(3.0, faults * chosen.uptime_per_fault)
    pipe = PIPELINES[pipeline](path, records=records, pace=pace, dead_letter=chosen.dead_letter)
    run = Run(chosen, pipe, faults=faults, seed=seed, timeout=timeout)
    started = time.monotonic()
    try:
        pipe.write_config()
        pipe.start_input()
        chosen.inject(run)
        run.finish()
    finally:
        pipe.stop_input()
        pipe.close()
        run.result.seconds = time.monotonic() - started
    return run.result


def run_profile(
    profile: str = "short",
    *,
    records: int | None = None,
    faults: int | None = None,
    seed: int | None = None,
    scenarios: Sequence[str] | None = None,
    pipelines: Sequence[str] | None = None,
    workdir: str | os.PathLike[str] | None = None,
    keep: bool = False,
    command: str = "",
    echo: Callable[[str], object] = print,
) -> Report:
    """Run a profile's plans (filtered, resized) and return the report.

    ``records`` and ``faults`` replace every plan's sizes; ``scenarios`` and
    ``pipelines`` keep only those; a scenario not in the profile is run on
    each of its pipelines. The working directory is deleted afterwards
    unless a run failed or ``keep`` is set.
    """
    if seed is None:
        seed = random.SystemRandom().randrange(1, 2**31)
    plans = list(PROFILES[profile])
    if scenarios:
        unknown = [s for s in scenarios if s not in SCENARIOS]
        if unknown:
            raise ValueError(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}")
        listed = {p.scenario for p in plans}
        plans = [p for p in plans if p.scenario in scenarios]
        base = PROFILES[profile][0]
        for name in scenarios:
            if name not in listed:
                plans += [
                    Plan(name, pipe, base.records, base.faults)
                    for pipe in SCENARIOS[name].pipelines
                ]
    if pipelines:
        plans = [p for p in plans if p.pipeline in pipelines]
    if any(p.pipeline.startswith("kafka") for p in plans):
        from streamlet.testing.kafka import missing_tools

        missing = missing_tools()
        if missing:
            echo(f"chaos: skipping the Kafka pipelines: they need {' and '.join(missing)}")
            plans = [p for p in plans if not p.pipeline.startswith("kafka")]
    root = (
        Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="streamlet-chaos-"))
    )
    report = Report(profile, seed, command)
    echo(f"chaos: profile {profile}, seed {seed}, {len(plans)} runs, in {root}")
    started = time.monotonic()
    for plan in plans:
        size = records if records is not None else plan.records
        count = faults if faults is not None else plan.faults
        run_seed = _derive(seed, plan.scenario, plan.pipeline)
        result = run_scenario(
            plan.scenario,
            plan.pipeline,
            records=size,
            faults=count,
            seed=run_seed,
            workdir=root / f"{plan.scenario}-{plan.pipeline}",
        )
        report.results.append(result)
        echo(result.describe())
    report.seconds = time.monotonic() - started
    if report.ok and not keep:
        shutil.rmtree(root, ignore_errors=True)
    return report


def _derive(seed: int, *names: str) -> int:
    digest = hashlib.sha256(":".join([str(seed), *names]).encode()).digest()
    return int.from_bytes(digest[:4], "big")
