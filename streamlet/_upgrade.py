"""What changed in an app since its state directory was made, and whether it may run on it; pure.

A state directory's manifest records what the app was: its sources and, per
handler, the sources it reads, its sink and its keyed state. When the app
changes, :func:`plan_upgrade` compares the two and sorts every change into
*accepted* (the app runs on, and the change is logged) or *refused* (the
app does not start; the message names the change and a safe way to make
it). The batch interval, batch sizes, retries and the like are not in the
manifest: they change freely.

Accepted, because nothing stored means something else afterwards:

* a source added (it starts where its ``start`` says) or removed (its
  positions stay; a batch still pending on it stops the app, naming it);
* a source's partitions changed (new ones start at ``start``, dropped ones
  are no longer read);
* a handler added (it runs from the next batch, including batches re-run
  after a crash) or removed; a handler reading other sources;
* a sink added to, changed on or removed from a handler (a new sink holds no
  batch, so it takes each batch from the next one on);
* keyed state added to a handler (its store starts empty at the last done
  batch), removed (its file is left), or its ``ttl`` changed.

Refused, because the new app would read or write again what the old one did:

* another app name, or a manifest of another format;
* a source that kept its name but reads something else (another topic or
  directory, another mode): its stored positions belong to the old input;
* a source renamed (one removed and one added with the same description):
  positions are stored by name, so the new name would start over;
* a handler renamed (one removed and one added with the same sources and
  sink): exactly-once sinks key what they committed by handler name, so
  under the new name a batch re-run after a crash would be written again.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Upgrade", "plan_upgrade"]

_PARTITIONS = re.compile(r"partitions=(?:all|\d+(?:,\d+)*)")


@dataclass(slots=True)
class Upgrade:
    """The changes between a state directory's manifest and the app."""

    accepted: list[str] = field(default_factory=list)
    """Changes the app may make on this state directory, one sentence each."""
    refused: list[str] = field(default_factory=list)
    """Changes it may not, each with what to do instead."""
    gained_state: set[str] = field(default_factory=set)
    """Handlers that had no keyed state before: their stores start empty."""

    @property
    def changed(self) -> bool:
        return bool(self.accepted or self.refused)


def _identity(description: str) -> str:
    """A source's description without its partitions: what its positions mean."""
    return _PARTITIONS.sub("partitions=*", description)


def plan_upgrade(found: Mapping[str, Any], wanted: Mapping[str, Any]) -> Upgrade:
    """Sort the differences between manifest ``found`` and the app's ``wanted``; pure."""
    upgrade = Upgrade()
    for key in ("format", "version", "app"):
        if found.get(key) != wanted.get(key):
            what = (
                "another app's state directory"
                if key == "app"
                else "a state directory of another streamlet version"
            )
            upgrade.refused.append(
                f"{key}: the state directory has {found.get(key)!r}, the app {wanted.get(key)!r}"
                f" ({what}); use a new state_dir"
            )
    if upgrade.refused:
        return upgrade
    _sources(found.get("sources") or {}, wanted.get("sources") or {}, upgrade)
    _handlers(found.get("handlers") or {}, wanted.get("handlers") or {}, upgrade)
    return upgrade


def _sources(old: Mapping[str, str], new: Mapping[str, str], upgrade: Upgrade) -> None:
    removed = {n: d for n, d in old.items() if n not in new}
    added = {n: d for n, d in new.items() if n not in old}
    for name, description in sorted(added.items()):
        twin = next((o for o, d in sorted(removed.items()) if d == description), None)
        if twin is not None:
            del removed[twin]
            upgrade.refused.append(
                f"source {twin!r} appears renamed to {name!r} ({description}): positions are"
                f" stored by source name, so {name!r} would start over and read again what"
                f" {twin!r} read. Keep the name: app.source(..., name={twin!r})"
            )
            continue
        upgrade.accepted.append(f"source {name!r} added ({description}); it starts at its start")
    for name, description in sorted(removed.items()):
        upgrade.accepted.append(
            f"source {name!r} removed ({description}); its positions are kept in case it returns"
        )
    for name in sorted(set(old) & set(new)):
        before, after = old[name], new[name]
        if before == after:
            continue
        if _identity(before) == _identity(after):
            upgrade.accepted.append(
                f"source {name!r}: partitions changed ({before} -> {after}); new partitions"
                " start at its start, dropped ones are no longer read"
            )
        else:
            upgrade.refused.append(
                f"source {name!r} now reads {after}, not {before}: the positions stored under"
                f" {name!r} belong to the old input. To read the new input, give it a new name"
                " (it starts at its start) and remove the old source, or use a new state_dir"
            )


def _handlers(
    old: Mapping[str, Mapping[str, Any]], new: Mapping[str, Mapping[str, Any]], upgrade: Upgrade
) -> None:
    removed = {n: h for n, h in old.items() if n not in new}
    added = {n: h for n, h in new.items() if n not in old}
    for name, spec in sorted(added.items()):
        twin = next(
            (
                o
                for o, h in sorted(removed.items())
                if h.get("sources") == spec.get("sources") and h.get("sink") == spec.get("sink")
            ),
            None,
        )
        if twin is not None and spec.get("sink") is not None:
            del removed[twin]
            upgrade.refused.append(
                f"handler {twin!r} appears renamed to {name!r} (same sources and sink"
                f" {spec.get('sink')}): exactly-once sinks key what they committed by handler"
                f" name, so under {name!r} a batch run again after a crash would be written"
                f" again. Keep the name on the renamed function: @app.handler(...,"
                f" name={twin!r})"
            )
            continue
        upgrade.accepted.append(
            f"handler {name!r} added (sink {spec.get('sink')}); it runs from the next batch"
        )
        if "state" in spec:
            upgrade.gained_state.add(name)
    for name in sorted(removed):
        upgrade.accepted.append(f"handler {name!r} removed")
    for name in sorted(set(old) & set(new)):
        before, after = old[name], new[name]
        if before.get("sources") != after.get("sources"):
            upgrade.accepted.append(
                f"handler {name!r} now reads {after.get('sources')} (was"
                f" {before.get('sources')}), from the next batch"
            )
        if before.get("sink") != after.get("sink"):
            upgrade.accepted.append(
                f"handler {name!r}: sink {before.get('sink')} -> {after.get('sink')}; a new"
                " sink takes each batch from the next one on"
            )
        if "state" in after and "state" not in before:
            upgrade.gained_state.add(name)
            upgrade.accepted.append(f"handler {name!r} gained keyed state; it starts empty")
        elif "state" in before and "state" not in after:
            upgrade.accepted.append(
                f"handler {name!r} no longer has keyed state; its store file is left in place"
            )
        elif before.get("state") != after.get("state"):
            upgrade.accepted.append(
                f"handler {name!r}: state {before.get('state')} -> {after.get('state')}"
            )
