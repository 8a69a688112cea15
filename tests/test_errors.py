"""The error tree: exported, and ``retriable`` said by class, never set on an instance."""

from __future__ import annotations

import ast
from pathlib import Path

import streamlet
import streamlet.errors as errors
from streamlet._retry import is_retriable

PACKAGE = Path(streamlet.__file__).parent


def test_every_error_is_a_streamlet_error_exported_at_the_top() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.StreamletError), name
        assert getattr(streamlet, name) is cls, f"{name} is not exported by streamlet"


def test_the_classes_that_may_pass_say_so() -> None:
    may_pass = {n for n in errors.__all__ if getattr(errors, n).__dict__.get("retriable") is True}
    assert may_pass == {"SinkUnavailableError", "SourceUnavailableError", "UnreachableError"}
    assert is_retriable(errors.SinkUnavailableError("down"))
    assert not is_retriable(errors.SinkError("refused"))
    assert is_retriable(ConnectionError("not ours: may pass"))


def test_no_module_sets_retriable_on_an_instance() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if (
                        isinstance(target, ast.Attribute)
                        and target.attr == "retriable"
                        and not (isinstance(target.value, ast.Name) and target.value.id == "cls")
                    ):
                        offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert offenders == []
