"""How each chaos scenario breaks the worker: signals, crash points, disk faults, damaged logs.

Each function here is a scenario's ``inject``: given a
:class:`~streamlet.testing.chaos.run.Run`, it starts workers, injects
``run.faults_wanted`` faults of its kind (SIGKILL or SIGTERM at random
moments, ``STREAMLET_CRASH_AT`` at each commit step, slow or failing
fsyncs and a full disk through ``STREAMLET_FAULT_FS``, a torn tail or a
flipped bit in a WAL segment, clock jumps through ``STREAMLET_FAULT_CLOCK``,
a broker kill), checks what the worker must do right then (exit 1 with a
clear message, name the damaged file and offset, ...) and leaves no worker
running. The data-level checks at the end are the run's.
:mod:`streamlet.testing.chaos.scenarios` names and registers them.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from streamlet.testing.chaos.checks import Outputs, batch_id_gaps
from streamlet.testing.chaos.readback import read_outputs, wal_verify

if TYPE_CHECKING:
    from streamlet.testing.chaos.run import Run

__all__ = [
    "bitflip",
    "broker_kill",
    "clock_jump",
    "dead_letter",
    "enospc",
    "fsync_eio",
    "sigkill_random",
    "sigkill_steps",
    "sigterm_random",
    "slow_fsync",
    "torn_tail",
    "verify_clock",
]


def _kill_loop(run: Run, sig: int, env: Mapping[str, str] | None = None) -> None:
    kind = "sigkill" if sig == signal.SIGKILL else "sigterm"
    for _ in range(run.faults_wanted):
        worker = run.start(env)
        if sig == signal.SIGKILL:
            run.pause(worker)
        else:  # before its signal handler is up, SIGTERM is not graceful: wait for a batch
            run.pause(worker, early=0.0)
        run.kill(worker, sig)
        run.fault(kind)
        if run.result.problems:
            return
        if sig == signal.SIGTERM:
            state = run.state()
            leftover = [a.id for a in state.pending]
            blocks = sum(len(b) for b in state.blocks.values())
            if leftover or blocks:
                run.problem(
                    f"after a graceful stop, batches {leftover} are pending and {blocks}"
                    " blocks unallocated"
                )
                return


def sigkill_random(run: Run) -> None:
    """SIGKILL at a random moment, mostly after a batch: recovery re-runs what was in flight."""
    _kill_loop(run, signal.SIGKILL)


def sigterm_random(run: Run) -> None:
    """SIGTERM once the handler is up: exit 0 with no batch pending and no block unallocated."""
    _kill_loop(run, signal.SIGTERM)


def sigkill_steps(run: Run) -> None:
    """SIGKILL at each named commit step in turn; a FileSink part exists exactly when the step is
    past the sink commit.
    """
    from streamlet._faults import POINTS

    # The chaos pipeline keeps no keyed state: its batches never reach that step.
    points = [p for p in POINTS if p != "after_state_commit"]
    for index in range(run.faults_wanted):
        point = points[index % len(points)]
        target = run.state().next_batch_id + run.rng.randint(0, 2)
        worker = run.start({"STREAMLET_CRASH_AT": f"{point}:{target}"})
        if (
            run.expect_exit(worker, -signal.SIGKILL, f"crash at {point} of batch {target}", 90)
            is None
        ):
            return
        run.note_recovery(worker)
        run.fault(f"crash_at:{point}")
        committed = point in ("after_sink_commit", "before_done", "after_done")
        part = run.pipeline.files / f"part-{target:012d}.jsonl"
        if part.exists() != committed:
            run.problem(
                f"killed at {point} of batch {target}, but its FileSink part"
                f" {'exists' if part.exists() else 'is missing'}"
            )
        if run.result.problems:
            return


def slow_fsync(run: Run) -> None:
    """Slow every fsync (the first time past the WAL's 1 s warning): batches still commit, no
    faster than the delay.
    """
    for index in range(run.faults_wanted):
        if index == 0:
            # Slower than the WAL's slow-fsync warning (1 s), on the tracker log only.
            delay, where = 1100, f"{run.pipeline.state}/tracker/*"
        else:
            delay, where = run.rng.choice((20, 50, 100, 200)), "*"
        worker = run.start({"STREAMLET_FAULT_FS": f"slow_fsync:{delay}:{where}"})
        if not worker.wait_batches(1, run.timeout):
            run.problem(f"with fsync slowed by {delay} ms no batch was done")
        run.note_recovery(worker)
        time.sleep(run.rng.uniform(0.05, 1.0))
        run.kill(worker)
        run.fault("slow_fsync")
        # A batch's commit logs "done" in the tracker: at least one slow fsync.
        commits = [ms for _, _, _, ms in worker.batches]
        if commits and min(commits) < delay:
            run.problem(f"fsync slowed by {delay} ms, yet a batch committed in {min(commits)} ms")
        if index == 0 and "took" not in worker.stderr():
            run.problem("a 1.1 s fsync was not reported as slow by the WAL")
        if run.result.problems:
            return


def _io_targets(run: Run) -> list[tuple[str, str, dict[str, tuple[int, int]]]]:
    """(what, glob, per fault kind the range of its amount) for each place I/O fails."""
    state, files = run.pipeline.state, run.pipeline.files
    targets = [
        ("tracker WAL", f"{state}/tracker/*", {"fsync_eio": (2, 20), "enospc": (100, 1500)}),
        ("checkpoint", f"{state}/checkpoints/*", {"fsync_eio": (0, 2), "enospc": (0, 600)}),
        ("FileSink output", f"{files}/*", {"fsync_eio": (1, 8), "enospc": (50, 2000)}),
    ]
    if run.pipeline.receiver:
        data = ("data WAL", f"{state}/data/*", {"fsync_eio": (1, 15), "enospc": (200, 5000)})
        targets.insert(0, data)
    return targets


def _io_fault(run: Run, kind: str, message: str) -> None:
    targets = _io_targets(run)
    for index in range(run.faults_wanted):
        what, pattern, amounts = targets[index % len(targets)]
        spec = f"{kind}:{pattern}:{run.rng.randint(*amounts[kind])}"
        if not run.input_left():
            run.problem(f"input ran out before the {kind} fault on the {what}")
            return
        worker = run.start({"STREAMLET_FAULT_FS": spec})
        code = run.expect_exit(worker, 1, f"{kind} on the {what} ({spec})", run.timeout)
        run.fault(f"{kind}:{what}")
        stderr = worker.stderr()
        if code is not None and message not in stderr:
            run.problem(f"{kind} on the {what}: no {message!r} in the worker's log:\n{stderr}")
        elif code is not None and not re.search(r"^error: ", stderr, re.MULTILINE):
            run.problem(f"{kind} on the {what}: the worker did not say 'error:':\n{stderr}")
        if run.result.problems:
            return
        # The fault cleared: a worker without it recovers and goes on.
        worker = run.start()
        if not worker.wait_batches(1, run.timeout):
            run.problem(f"after the {kind} fault on the {what} cleared, no batch was done")
        run.note_recovery(worker)
        run.kill(worker, signal.SIGTERM)
        if run.result.problems:
            return


def fsync_eio(run: Run) -> None:
    """fsync fails with EIO on one file kind at a time: the worker exits 1 naming it, then a clean
    worker recovers.
    """
    _io_fault(run, "fsync_eio", os.strerror(5))


def enospc(run: Run) -> None:
    """Writes fail with ENOSPC on one file kind at a time: exit 1 naming it, then a clean worker
    recovers.
    """
    _io_fault(run, "enospc", os.strerror(28))


def _segments(log_dir: Path) -> list[Path]:
    return sorted(log_dir.glob("*.wal"))


def torn_tail(run: Run) -> None:
    """Append part of a frame to the last segment after a kill: recovery cuts it off and says so."""
    from streamlet.wal.format import encode_frame

    logs = ["tracker", "data"] if run.pipeline.receiver else ["tracker"]
    for index in range(run.faults_wanted):
        worker = run.start()
        run.pause(worker)
        run.kill(worker)
        if run.result.problems:
            return
        log_dir = run.pipeline.state / logs[index % len(logs)]
        last = _segments(log_dir)[-1]
        frame = encode_frame(b'{"e":"done","id":999999999}' + bytes(run.rng.randrange(64)))
        cut = run.rng.randint(13, len(frame) - 1)  # a whole header, part of the payload
        with last.open("ab") as stream:
            stream.write(frame[:cut])
        run.fault(f"torn_tail:{log_dir.name}")
        worker = run.start()
        if not worker.wait_batches(1, run.timeout):
            run.problem(f"after a torn tail in {last}, no batch was done:\n{worker.stderr()}")
        run.note_recovery(worker)
        if worker.alive():
            run.kill(worker, signal.SIGTERM)
        if "torn tail" not in worker.stderr() or str(last) not in worker.stderr():
            run.problem(f"the torn tail of {last} was not reported")
        if run.result.problems:
            return


async def _roll(log_dir: Path) -> None:
    from streamlet.wal import WriteAheadLog

    log = await WriteAheadLog.open(log_dir)
    try:
        await log.roll()
    finally:
        await log.aclose()


def _flip_target(run: Run, log_name: str) -> tuple[Path, int, int] | None:
    """A record recovery will read, in a sealed segment: (segment path, frame offset, length)."""
    from streamlet._checkpoint import load_latest
    from streamlet.fs import OsFileSystem
    from streamlet.wal.format import segment_name
    from streamlet.wal.tools import read_records

    log_dir = run.pipeline.state / log_name
    last_seq = int(_segments(log_dir)[-1].stem)
    if log_name == "data":
        state = run.state()
        refs = [b for a in state.pending for b in a.blocks]
        refs += [b for blocks in state.blocks.values() for b in blocks]
        candidates = [(r.segment, r.offset, r.length) for r in refs]
    else:
        checkpoint = load_latest(OsFileSystem(), str(run.pipeline.state / "checkpoints"))
        after = (0, 0)
        if checkpoint is not None and checkpoint.body.get("last_event"):
            after = tuple(checkpoint.body["last_event"][:2])
        candidates = [p for p, _ in read_records(log_dir) if tuple(p[:2]) >= after]
    candidates = [c for c in candidates if c[0] < last_seq and c[2] > 0]
    if not candidates:
        return None
    segment, offset, length = run.rng.choice(candidates)
    return log_dir / segment_name(segment), offset, length


def bitflip(run: Run) -> None:
    """Flip a bit in a record recovery reads from a sealed segment: the worker refuses to start,
    naming file and offset.
    """
    from streamlet.wal.format import FRAME_HEADER_SIZE

    logs = ["tracker", "data"] if run.pipeline.receiver else ["tracker"]
    for index in range(run.faults_wanted):
        wanted = logs[index % len(logs)]
        if wanted == "data":
            # Killed right after an allocation, so recovery must read that batch's blocks.
            batch = run.state().next_batch_id + 1
            worker = run.start({"STREAMLET_CRASH_AT": f"after_allocate:{batch}"})
            run.expect_exit(worker, -signal.SIGKILL, f"crash after allocating {batch}", 90)
        else:
            worker = run.start()
            run.pause(worker, early=0.0)
            run.kill(worker)
        run.note_recovery(worker)
        if run.result.problems:
            return
        target = None
        for log_name in [wanted, *(name for name in logs if name != wanted)]:
            # Sealed as when a segment fills up, so the record sits in an older segment.
            anyio.run(_roll, run.pipeline.state / log_name)
            target = _flip_target(run, log_name)
            if target is not None:
                break
        if target is None:
            run.problem("no record that recovery reads was found to damage")
            return
        path, frame, length = target
        at = frame + FRAME_HEADER_SIZE + run.rng.randrange(length)
        bit = 1 << run.rng.randrange(8)
        with path.open("r+b") as stream:
            stream.seek(at)
            original = stream.read(1)
            stream.seek(at)
            stream.write(bytes([original[0] ^ bit]))
        run.fault(f"bitflip:{path.parent.name}")
        before = read_outputs(run.pipeline)
        worker = run.start()
        code = run.expect_exit(worker, 1, f"a bit flip in {path} at {at}", run.timeout)
        named = f"{path}: corrupt at offset {frame}"
        if code is not None and named not in worker.stderr():
            run.problem(f"the worker did not name {named!r}:\n{worker.stderr()[-1500:]}")
        after = read_outputs(run.pipeline)
        if after.file_batches != before.file_batches or after.db_batches != before.db_batches:
            run.problem("a batch was committed from a log with a bit flip")
        if path.parent.name == "tracker":
            ok, text = wal_verify(path.parent)
            if ok or f"{path} at offset {frame}:" not in text:
                run.problem(f"streamlet wal verify did not report {path} at {frame}: {text}")
        if not path.exists():
            run.problem(f"{path}, damaged, was deleted by a worker that should have refused it")
            return
        with path.open("r+b") as stream:  # the operator restores the damaged byte
            stream.seek(at)
            stream.write(original)
        if run.result.problems:
            return


def dead_letter(run: Run) -> None:
    """SIGKILLs while poisoned handlers raise and hang: dead letters stay exactly-once across
    restarts.
    """
    _kill_loop(run, signal.SIGKILL)


def clock_jump(run: Run) -> None:
    """The wall clock jumps back, then ahead, while the worker runs (checked by
    :func:`verify_clock`).
    """
    for _ in range(run.faults_wanted):
        back = -run.rng.uniform(600, 7200)
        ahead = run.rng.uniform(3600, 86400)
        first = run.rng.uniform(0.2, 1.0)
        spec = f"{back:.0f}@{first:.2f};{ahead:.0f}@{first + run.rng.uniform(0.3, 1.0):.2f}"
        worker = run.start({"STREAMLET_FAULT_CLOCK": spec})
        if not worker.wait_batches(1, run.timeout):
            run.problem(f"with the clock jumping ({spec}) no batch was done")
        run.note_recovery(worker)
        time.sleep(run.rng.uniform(1.5, 2.5))  # both jumps happen while it runs
        run.kill(worker)
        run.fault("clock_jump")
        if run.result.problems:
            return


def broker_kill(run: Run) -> None:
    """SIGKILL the broker under a running worker and restart it: the worker goes on, or fails
    loudly and a new one does.
    """
    broker = getattr(run.pipeline, "broker", None)
    if broker is None:
        run.problem(f"pipeline {run.pipeline.name} has no broker to kill")
        return
    worker = run.start()
    try:
        for _ in range(run.faults_wanted):
            if not worker.wait_batches(len(worker.batches) + 1, run.timeout):
                run.problem(f"no batch was done before the broker kill:\n{worker.stderr()[-1500:]}")
                return
            run.note_recovery(worker)
            time.sleep(run.rng.uniform(0.05, 1.0))
            moving = run.input_left()
            broker.kill()
            run.fault("broker_kill")
            time.sleep(run.rng.uniform(0.5, 4.0))
            broker.start(timeout=180)
            back = time.monotonic()
            if not worker.alive():
                # Failing loudly while the broker is gone is allowed; hanging is not.
                code = worker.wait(10)
                if code != 1 or "error: " not in worker.stderr():
                    run.problem(f"the worker died with {code} without an error line")
                    return
                worker = run.start()
            done = len(worker.batches)
            if not moving:
                run.problem("the input ran out before the broker kill: give the run more records")
                return
            if not worker.wait_batches(done + 1, run.timeout * 2):
                tail = worker.stderr()[-1500:]
                run.problem(f"no batch was done after the broker came back:\n{tail}")
                return
            run.note_recovery(worker, since=back)
    finally:
        if worker.alive():
            run.kill(worker, signal.SIGTERM)
        else:
            worker.wait(10)


def verify_clock(run: Run, outputs: Outputs) -> None:
    """After clock jumps, batch ids stay dense and some commit carried a jumped time (so the fault
    took).
    """
    gaps = batch_id_gaps(outputs.file_batches)
    if gaps:
        run.problem(f"batch ids are not dense after clock jumps: missing {gaps}")
    now = time.time()
    jumped = [t for t in outputs.db_commit_times if abs(t - now) > 500]
    if not jumped:
        run.problem("no batch was committed under a jumped clock: the fault did not take")
