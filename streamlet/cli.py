"""The ``streamlet`` command line.

Each subcommand group is a thin shell over a module that does the work and
can be called from Python too; this module parses arguments, prints, and maps
errors to exit codes (0 ok, 1 the thing checked is bad, 2 usage).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

import click

import streamlet
from streamlet import _faults as fault_hooks

if TYPE_CHECKING:
    from streamlet.wal.tools import VerifyReport


@click.group()
@click.version_option(streamlet.__version__, prog_name="streamlet")
def main() -> None:
    """streamlet: micro-batch streaming with a write-ahead log and exactly-once output."""


_LOG_DIR = click.Path(exists=True, file_okay=False, readable=True, path_type=str)


@main.group()
def wal() -> None:
    """Check, list and repair write-ahead logs.

    verify and dump only read, so they may run beside a running app (verify
    then says its result is a snapshot); repair refuses a log an app has open.
    """


def _unreadable(directory: str, exc: OSError) -> click.exceptions.Exit:
    """Exit 2 for a directory that cannot be read: that is a usage problem, not a bad log."""
    click.echo(f"error: cannot read the write-ahead log in {directory}: {exc}", err=True)
    return click.exceptions.Exit(2)


def _holds_segments(directory: str) -> bool:
    from streamlet.wal.format import parse_segment_name

    return any(parse_segment_name(name) is not None for name in os.listdir(directory))


def _no_segments(directory: str) -> click.exceptions.Exit:
    """Exit 2 for a directory without segments, pointing at the logs of a state directory."""
    from streamlet._state import is_state_directory

    message = f"error: {directory} holds no write-ahead log segments (*.wal)"
    if is_state_directory(directory):
        logs = ", ".join(
            os.path.join(directory, name)
            for name in ("tracker", "data")
            if os.path.isdir(os.path.join(directory, name))
        )
        message += f"; it is an app's state directory: name one of its logs ({logs})"
    click.echo(message, err=True)
    return click.exceptions.Exit(2)


def _log_lines(report: VerifyReport) -> tuple[bool, list[str]]:
    """Whether one log is sound, and the lines saying so (the first without indentation)."""
    summary = f"{report.segments} segments, {report.records} records, {report.bytes} bytes"
    lines: list[str] = []
    if report.problem is not None:
        problem = report.problem
        lines.append(f"corrupt: {problem.path} at offset {problem.offset}: {problem.reason}")
        lines.append(f"  readable before it: {summary}")
        stop = "stop the app, then " if report.live else ""
        lines.append(f"  to cut the log there, {stop}run: streamlet wal repair {report.directory}")
    else:
        lines.append(f"ok: {summary}")
    if report.torn_tail is not None:
        torn = report.torn_tail
        why = (
            "an append in progress: the log is open"
            if report.live
            else "an unfinished write from a crash; cut off when the log is next opened"
        )
        lines.append(
            f"  torn tail: {torn.dropped} bytes at {torn.path} offset {torn.offset} ({why})"
        )
    for temp in report.temp_files:
        why = (
            "a segment being created, or the leftover of a crash"
            if report.live
            else "deleted when the log is next opened"
        )
        lines.append(f"  leftover {temp} ({why})")
    return report.ok, lines


_LIVE_NOTE = (
    "note: {what} is in use by a running app (it holds the lock {lock}), so this is a"
    " snapshot of files that were changing while they were read: what was written since is"
    " not checked. Stop the app for a definitive check."
)


@wal.command("verify")
@click.argument("directory", metavar="DIR", type=_LOG_DIR)
def wal_verify(directory: str) -> None:
    """Check every segment and record; exit 1 if any is bad.

    DIR is one write-ahead log directory, or an app's state directory (the
    one holding app.json, tracker/, data/ and checkpoints/): then the tracker
    log, the data WAL and every checkpoint are checked and each is reported.
    Safe beside a running app, whose logs are then checked as a snapshot (a
    torn tail there is an append in progress, not damage).
    """
    from streamlet.wal.log import LOCK_NAME
    from streamlet.wal.tools import verify

    try:
        if not _holds_segments(directory):
            from streamlet._state import is_state_directory

            if is_state_directory(directory):
                _verify_state(directory)
                return
            raise _no_segments(directory)
        report = verify(directory)
    except OSError as exc:
        raise _unreadable(directory, exc) from exc
    ok, lines = _log_lines(report)
    for line in lines:
        click.echo(line)
    if report.live:
        lock = os.path.join(report.directory, LOCK_NAME)
        click.echo(_LIVE_NOTE.format(what="the log", lock=lock))
    if not ok:
        raise click.exceptions.Exit(1)


def _verify_state(directory: str) -> None:
    """``wal verify`` of a state directory: every log and checkpoint, one report each."""
    from streamlet._state import verify_state
    from streamlet._statedir import LOCK

    check = verify_state(directory)
    click.echo(f"state directory {check.directory}")
    for name, report in (("tracker", check.tracker), ("data", check.data)):
        if report is None:
            missing = "no receivers" if name == "data" else "no batch run yet"
            click.echo(f"  {name}: none ({missing})")
            continue
        _, lines = _log_lines(report)
        click.echo(f"  {name}: {lines[0]}")
        for line in lines[1:]:
            click.echo(f"  {line}")
    if not check.checkpoints:
        click.echo("  checkpoints: none yet")
    readable = [c for c in check.checkpoints if c.ok]
    for checkpoint in check.checkpoints:
        name = os.path.basename(checkpoint.path)
        if checkpoint.ok:
            click.echo(f"  {name}: ok (batch {checkpoint.batch_id})")
            continue
        click.echo(f"  {name}: bad: {checkpoint.error}")
        if not readable:
            advice = (
                "no checkpoint is usable, so the app cannot recover: restore the state"
                " directory from a backup, or move it away to start from scratch (its"
                " batches would run again)"
            )
        elif readable[0].batch_id > checkpoint.batch_id:
            advice = (
                f"the app recovers from {os.path.basename(readable[0].path)}, but cannot"
                " fall back to this one"
            )
        else:
            advice = (
                f"the app skips it and recovers from {os.path.basename(readable[0].path)}"
                " and the tracker log after it"
            )
        click.echo(f"    {advice}")
    if check.live:
        click.echo(
            _LIVE_NOTE.format(what="the state directory", lock=os.path.join(check.directory, LOCK))
            + " (Checkpoints were not matched against the tracker log.)"
        )
    if not check.ok:
        raise click.exceptions.Exit(1)


@wal.command("dump")
@click.argument("directory", metavar="DIR", type=_LOG_DIR)
def wal_dump(directory: str) -> None:
    """Print one JSON line per record: segment, offset, length, crc_ok, head (hex)."""
    import orjson

    from streamlet.wal.log import Problem
    from streamlet.wal.tools import dump, verify

    def report(problem: Problem) -> None:
        click.echo(
            f"stopped reading {problem.path} at offset {problem.offset}: {problem.reason}",
            err=True,
        )

    try:
        for record in dump(directory, on_problem=report):
            click.echo(orjson.dumps(record))  # bytes go to the binary stream as they are
        # The exit status says whether the log is intact, as verify judges
        # it: a torn tail stops the listing but is not damage.
        intact = verify(directory).ok
    except BrokenPipeError:
        # The reader went away (`... | head`): stop quietly, and keep the
        # interpreter's final flush from failing on the closed pipe too.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    except OSError as exc:
        raise _unreadable(directory, exc) from exc
    if not intact:
        raise click.exceptions.Exit(1)


@wal.command("repair")
@click.argument("directory", metavar="DIR", type=_LOG_DIR)
@click.option("--yes", is_flag=True, help="Repair without asking for confirmation.")
def wal_repair(directory: str, yes: bool) -> None:
    """Cut the log at its first bad record, keeping a .broken copy of each changed file.

    Refused (exit 2) while a running app has the log open: stop the app
    first. The log stays locked from the first read to the last change,
    while you are asked too, so what you confirm is what is done.
    """
    from streamlet.errors import WALError
    from streamlet.wal.tools import RepairResult, repair

    def confirm(plan: RepairResult) -> bool:
        assert plan.problem is not None
        problem = plan.problem
        click.echo(f"first bad record: {problem.path} at offset {problem.offset}: {problem.reason}")
        if plan.truncated is not None:
            click.echo(f"  will cut {plan.truncated[0]} to {plan.truncated[1]} bytes")
        if plan.recreated is not None:
            click.echo(f"  will replace {plan.recreated} by an empty segment")
        for path in plan.removed:
            click.echo(f"  will remove {path}")
        click.echo(
            f"  lost: {plan.lost_records} readable records ({plan.lost_bytes} bytes) after the"
            " cut; a .broken copy of each changed file is kept"
        )
        return yes or click.confirm("Repair the log?", default=False)

    try:
        if not _holds_segments(directory):
            raise _no_segments(directory)
        done = repair(directory, confirm=confirm)
    except OSError as exc:
        raise _unreadable(directory, exc) from exc
    except WALError as exc:  # in use
        click.echo(f"error: {exc}", err=True)
        raise click.exceptions.Exit(2) from exc
    if done.problem is None:
        message = f"nothing to repair in {done.directory}"
        if done.torn_tail is not None:
            torn = done.torn_tail
            message += (
                f" (a torn tail of {torn.dropped} bytes at {torn.path} offset {torn.offset} "
                f"is cut off when the log is next opened)"
            )
        click.echo(message)
        return
    if not done.applied:
        click.echo("declined; nothing was changed")
        raise click.exceptions.Exit(1)
    click.echo(f"repaired {done.directory}; copies kept:")
    for backup in done.backups:
        click.echo(f"  {backup}")


def _load_app(target: str) -> streamlet.App:
    """Import ``module:attribute`` (attribute defaults to ``app``) from the current directory."""
    import importlib

    module_name, _, attribute = target.partition(":")
    attribute = attribute or "app"
    if not module_name:
        raise click.UsageError(
            f"expected MODULE:APP such as examples.wordcount:app, not {target!r}"
        )
    # Like `python -m`, resolve the user's modules from the working directory.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except streamlet.ConfigError as exc:  # the app's settings, checked as it is built
        click.echo(f"error: {exc}", err=True)
        raise click.exceptions.Exit(2) from exc
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise click.UsageError(
                f"cannot import module {module_name!r} from {os.getcwd()}: {exc};"
                " run from the directory that holds it or fix the name"
            ) from exc
        raise
    try:
        app = getattr(module, attribute)
    except AttributeError:
        raise click.UsageError(
            f"module {module_name!r} has no attribute {attribute!r}; name the App object"
            f" as {module_name}:<name>"
        ) from None
    if callable(app) and not isinstance(app, streamlet.App):
        try:
            app = app()
        except streamlet.ConfigError as exc:
            click.echo(f"error: {exc}", err=True)
            raise click.exceptions.Exit(2) from exc
    if not isinstance(app, streamlet.App):
        raise click.UsageError(
            f"{target} is a {type(app).__name__}, not a streamlet.App (or a function returning one)"
        )
    return app


@main.command("run")
@click.argument("target", metavar="MODULE:APP")
@click.option("--state-dir", type=click.Path(file_okay=False), help="Override the app's state_dir.")
@click.option("--batch-interval", type=float, help="Override the batch interval (seconds).")
@click.option("--duration", type=float, help="Stop gracefully after this many seconds.")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
)
@click.option("--quiet", is_flag=True, help="Do not print a status line per batch.")
@click.option(
    "--http",
    metavar="HOST:PORT",
    help="Serve the live status page, /metrics (Prometheus), /api/status and /healthz here"
    " (e.g. 127.0.0.1:9100; read-only; see SECURITY.md before binding beyond loopback).",
)
@click.option(
    "--group",
    metavar="NAME",
    help="Run as one of many workers sharing the app's Kafka partitions through this"
    " consumer group (each worker with its own --state-dir).",
)
@click.option("--worker", metavar="NAME", help="This worker's name in the group.")
def run(
    target: str,
    state_dir: str | None,
    batch_interval: float | None,
    duration: float | None,
    log_level: str,
    quiet: bool,
    http: str | None,
    group: str | None,
    worker: str | None,
) -> None:
    """Run an app until Ctrl-C / SIGTERM (graceful; twice: at once) or --duration.

    A restart on the same state directory re-runs the batches that were in
    flight, with the same input, before it goes on.
    """
    import logging

    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        # Test hooks, only when the environment asks (see streamlet._faults).
        fault_hooks.check_environment()
        fault_hooks.install_clock()
    except streamlet.ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    app = _load_app(target)
    if duration is not None and not duration > 0:
        raise click.BadParameter(f"must be a positive number of seconds, not {duration}")
    try:
        app.configure(
            state_dir=state_dir,
            batch_interval=batch_interval,
            http=http,
            group=group,
            worker=worker,
        )
    except streamlet.ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    if not quiet:
        app.add_listener(lambda info: click.echo(info.status_line()))
    try:
        app.run(duration=duration)
    except streamlet.ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        raise click.exceptions.Exit(2) from exc
    except streamlet.StreamletError as exc:
        click.echo(f"error: {exc}", err=True)
        raise click.exceptions.Exit(1) from exc


@main.command("status")
@click.argument("url", metavar="URL")
@click.option("--json", "as_json", is_flag=True, help="Print the status document as JSON.")
@click.option(
    "--watch",
    type=click.FloatRange(min=0.2),
    metavar="SECONDS",
    help="Redraw every SECONDS until Ctrl-C.",
)
def status(url: str, as_json: bool, watch: float | None) -> None:
    """Print a running worker's status: rates, delays, lag, sinks and the last errors.

    URL is where the worker serves its page (``streamlet run --http``), for
    example http://127.0.0.1:9100. For a server without a browser.
    """
    import time

    import orjson

    from streamlet.observe.terminal import fetch_status, render

    while True:
        try:
            document = fetch_status(url)
        except streamlet.StreamletError as exc:
            click.echo(f"error: {exc}", err=True)
            raise click.exceptions.Exit(1) from exc
        if as_json:
            click.echo(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())
        else:
            if watch is not None:
                click.clear()
            click.echo(render(document))
        if watch is None:
            return
        time.sleep(watch)


@main.command("group")
@click.argument("group")
@click.option(
    "--bootstrap-servers",
    required=True,
    metavar="HOST:PORT[,...]",
    help="The Kafka cluster the app's workers use.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the view as one JSON object.")
def group_command(group: str, bootstrap_servers: str, as_json: bool) -> None:
    """Show a group-mode app's workers, the tasks each owns, and each partition's lag.

    Read-only: asks Kafka, touches no worker. The lag is the partition's end
    (last stable offset) minus what the workers committed to the group after
    their batches.
    """
    import dataclasses

    import anyio
    import orjson

    from streamlet.kafka._group import describe_group, render_group

    try:
        view = anyio.run(describe_group, group, bootstrap_servers.split(","))
    except streamlet.StreamletError as exc:
        click.echo(f"error: {exc}", err=True)
        raise click.exceptions.Exit(1) from exc
    if as_json:
        click.echo(orjson.dumps(dataclasses.asdict(view), option=orjson.OPT_INDENT_2).decode())
    else:
        click.echo(render_group(view))


@main.group()
def checkpoint() -> None:
    """Look at an app's state directory (read-only; safe beside a running app)."""


@checkpoint.command("show")
@click.argument("directory", metavar="DIR", type=_LOG_DIR)
@click.option("--json", "as_json", is_flag=True, help="Print the state as one JSON object.")
def checkpoint_show(directory: str, as_json: bool) -> None:
    """Print the newest checkpoint plus the tracker events after it, as recovery sees them."""
    import orjson

    from streamlet._state import read_state

    with _reading_state_dir(directory):
        view = read_state(directory)
    if as_json:
        click.echo(orjson.dumps(view.to_json(), option=orjson.OPT_INDENT_2).decode())
    else:
        click.echo(view.describe())


@contextlib.contextmanager
def _reading_state_dir(directory: str) -> Iterator[None]:
    """The read-only tools' errors as one line: exit 2 if unreadable, 1 if refused."""
    try:
        yield
    except OSError as exc:
        click.echo(f"error: cannot read the state directory {directory}: {exc}", err=True)
        raise click.exceptions.Exit(2) from exc
    except streamlet.StreamletError as exc:
        click.echo(f"error: {exc}", err=True)
        raise click.exceptions.Exit(1) from exc


@main.group("state")
def state_group() -> None:
    """Look at handlers' keyed state (read-only; safe beside a running app)."""


@state_group.command("show")
@click.argument("directory", metavar="STATE_DIR", type=_LOG_DIR)
@click.option("--handler", metavar="NAME", help="Show only this handler's state.")
@click.option(
    "--key",
    metavar="K",
    help="Show this key's value; K is looked up as text, as its UTF-8 bytes and as an"
    " integer (if it is one), and the output says which matched. Exit 1 if none does.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="How many keys to list per handler, in key order.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def state_show(
    directory: str, handler: str | None, key: str | None, limit: int, as_json: bool
) -> None:
    """Print each handler's keyed state as of its last committed batch: keys, values, times.

    STATE_DIR is the app's state directory. Each store is read read-only in
    one transaction, so what is printed is the state after one batch (the
    "as of batch" line), even while the app runs. Times are batch times in
    UTC; a ttl counts from a key's "touched" time. In group mode a worker's
    state directory holds its copy of each task it holds or held, shown per
    task with the changelog offset it is up to; the changelog topic holds
    the state itself.
    """
    import orjson

    from streamlet.state._show import key_candidates, open_state_dir, read_store

    with _reading_state_dir(directory):
        found = open_state_dir(directory)
        views = [
            read_store(name, path, ttl=found.ttl(name), limit=limit, key=key, task=task)
            for name, task, path in found.select(handler)
        ]
    if as_json:
        document = {
            "directory": found.directory,
            "app": found.app,
            "handlers": [view.to_json() for view in views],
        }
        click.echo(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())
    else:
        click.echo(f"state directory {found.directory} (app {found.app!r})")
        for view in views:
            click.echo(view.describe())
    if key is not None and not any(view.entries for view in views):
        where = f"handler {handler!r}" if handler is not None else "any handler's state"
        types = ", ".join(type(candidate).__name__ for candidate in key_candidates(key))
        click.echo(
            f"error: key {key!r} is not in {where} (looked up as {types});"
            " run without --key to list the keys",
            err=True,
        )
        raise click.exceptions.Exit(1)


@main.command("send")
@click.argument(
    "file",
    metavar="[FILE|-]",
    default="-",
    type=click.Path(exists=True, dir_okay=False, allow_dash=True, path_type=str),
)
@click.option("--host", default="127.0.0.1", show_default=True, help="The TcpSource's address.")
@click.option("--port", type=click.IntRange(1, 65535), required=True, help="The TcpSource's port.")
@click.option(
    "--client-id",
    help="Names this sender for the server's duplicate filter: lines the server already holds"
    " as durable for it are skipped. Default for a FILE: an id naming this host, the file's"
    " path, device and inode and its first lines, so sending the same file again, or after"
    " lines were appended to it, skips what is durable, while a file rewritten with other first"
    " lines, or replaced by another file, at that path is sent in full; for stdin (or a pipe):"
    " a new random id.",
)
@click.option(
    "--no-resume",
    is_flag=True,
    help="Send every line, under a new random client id, even if the file was sent before.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds to keep trying to reach the server, at the start and after a lost"
    " connection, before giving up.",
)
def send(
    file: str, host: str, port: int, client_id: str | None, no_resume: bool, timeout: float
) -> None:
    """Send each line of FILE (or stdin) to a TcpSource and wait until all are durable.

    Line i is sent with sequence number i, and lines the server already
    holds as durable for the client id are skipped (the output says how
    many). Running the command again on the same file, unchanged or with
    lines appended, sends only the lines the server does not have yet; a
    file rewritten with other first lines, or replaced by another file, at
    the same path is sent in full. Exits 1 if the server cannot be reached
    or refuses a line, or if it holds more lines for the client id than the
    input has.
    """
    import io
    import socket
    import stat
    import uuid
    from typing import cast

    import anyio

    from streamlet.sources.tcp import check_client_id
    from streamlet.tcp import (
        FILE_PREFIX_BYTES,
        ClientError,
        FileClientId,
        SendSummary,
        choose_client_id,
        file_client_ids,
        send_stream,
    )

    if client_id is not None:
        if no_resume:
            raise click.UsageError(
                "--no-resume sends under a new client id; give --client-id to resume under"
                " that id, or --no-resume, not both"
            )
        try:
            check_client_id(client_id)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--client-id") from exc
    what = "stdin" if file == "-" else file
    chosen: str | None = client_id
    picked: FileClientId | None = None

    async def go(stream: io.BufferedIOBase, candidates: list[FileClientId]) -> SendSummary:
        nonlocal chosen, picked
        if chosen is None:
            picked = await choose_client_id(candidates, host, port, connect_timeout=timeout)
            chosen = picked.client_id
        return await send_stream(stream, host, port, chosen, connect_timeout=timeout)

    try:
        with click.open_file(file, "rb") as opened:
            stream = cast(io.BufferedIOBase, opened)
            candidates: list[FileClientId] = []
            if file == "-" or not stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
                # A stream read once: nothing to recognise it by the next time.
                if chosen is None:
                    chosen = f"{'stdin' if file == '-' else 'stream'}-{uuid.uuid4().hex[:16]}"
            elif no_resume:
                chosen = f"new-{uuid.uuid4().hex[:16]}"
            elif chosen is None:
                info = os.fstat(stream.fileno())
                prefix = stream.read(FILE_PREFIX_BYTES)
                stream.seek(0)
                candidates = file_client_ids(
                    prefix,
                    host=socket.gethostname(),
                    path=os.path.realpath(file),
                    device=info.st_dev,
                    inode=info.st_ino,
                )
            summary = anyio.run(go, stream, candidates)
    except ClientError as exc:
        click.echo(f"error: {exc}", err=True)
        raise click.exceptions.Exit(1) from exc
    except KeyboardInterrupt:
        if chosen is None:
            click.echo("interrupted before any line was sent", err=True)
        else:
            click.echo(
                "interrupted: lines not yet acknowledged may not be durable; to send them, run"
                f" streamlet send again with --client-id {chosen} (and without --no-resume):"
                " lines already durable are skipped",
                err=True,
            )
        raise click.exceptions.Exit(130) from None
    click.echo(
        f"{summary.lines} lines: {summary.sent} sent, {summary.skipped} skipped as already"
        f" durable; acknowledged through seq {summary.acked} (client id {chosen})"
    )
    if client_id is None:
        again = "pass --no-resume"
    else:
        again = "give another --client-id, or --no-resume instead of --client-id"
    if summary.resumed_at > summary.lines:
        click.echo(
            f"error: the server already holds {summary.resumed_at} lines durably for client id"
            f" {chosen}, more than the {summary.lines} of {what}: {what} is not what was sent"
            f" under this id before, or it was cut short, and none of its lines were sent; to"
            f" send them, {again}",
            err=True,
        )
        raise click.exceptions.Exit(1)
    if summary.skipped:
        if picked is None:
            why = "sent before under this id"
        elif picked.lines:
            why = f"sent before from this file: same path, inode and first {picked.lines} line(s)"
        else:
            why = (
                f"sent before from this file: same path, inode and first {FILE_PREFIX_BYTES} bytes"
            )
        click.echo(
            f"{summary.skipped} line(s) skipped: the server already holds lines 1 to"
            f" {summary.skipped} durably for client id {chosen} ({why}); to send them again,"
            f" {again}"
        )


@main.command("chaos")
@click.option(
    "--profile",
    type=click.Choice(["short", "long"]),
    default="short",
    show_default=True,
    help="short: the CI profile (minutes); long: 1,000,000+ records and 200+ process kills.",
)
@click.option("--records", type=click.IntRange(min=1), help="Input records of every run.")
@click.option("--faults", type=click.IntRange(min=1), help="Faults injected in every run.")
@click.option("--seed", type=int, help="Seed of every random choice (default: a new one).")
@click.option("--scenarios", help="Comma-separated scenarios to run (default: all of the profile).")
@click.option(
    "--pipelines",
    help="Comma-separated pipelines to keep: sequence, tcp, kafka, kafka-receiver (default: all).",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=str),
    help="Where runs keep their state and outputs (default: a temp dir, deleted if all pass).",
)
@click.option("--keep", is_flag=True, help="Keep the working directory even if all runs pass.")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=str),
    help="Write the JSON report here (default: benchmarks/results/chaos-<profile>.json).",
)
def chaos(
    profile: str,
    records: int | None,
    faults: int | None,
    seed: int | None,
    scenarios: str | None,
    pipelines: str | None,
    workdir: str | None,
    keep: bool,
    output: str | None,
) -> None:
    """Break a real worker on purpose, over and over, and count every record.

    Runs the chaos scenarios (SIGKILL, SIGTERM, crash points, slow and
    failing fsyncs, a full disk, torn and corrupted logs, failing handlers,
    clock jumps) against real `streamlet run` processes, then prints a
    reliability report: faults injected, records in and out, lost,
    duplicated, recovery times, and one JSON line. Exits 1 if any run broke
    a guarantee. See streamlet.testing.chaos.
    """
    import shlex

    import orjson

    from streamlet.testing.chaos import run_profile, write_report

    given = sys.argv[1:]
    command = shlex.join(["streamlet", "chaos", *(given[1:] if given[:1] == ["chaos"] else given)])
    try:
        report = run_profile(
            profile,
            records=records,
            faults=faults,
            seed=seed,
            scenarios=[s for s in (scenarios or "").split(",") if s] or None,
            pipelines=[p for p in (pipelines or "").split(",") if p] or None,
            workdir=workdir,
            keep=keep,
            command=command,
            echo=click.echo,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(report.table())
    path = output or os.path.join("benchmarks", "results", f"chaos-{profile}.json")
    write_report(report, path)
    click.echo(orjson.dumps({**report.to_json(), "runs": len(report.results)}).decode())
    click.echo(f"report written to {path}")
    if not report.ok:
        raise click.exceptions.Exit(1)
