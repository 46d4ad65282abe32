"""One exception tree (issue 20 item 8): every error aioaccel raises to its callers is defined
in ``aioaccel.errors``, drawn in that module's docstring where it really sits, and exported
as ``aioaccel.<Name>``.

The package is walked: every exception class it defines (found in the source, at any depth)
and every class a ``raise`` statement names is either in the tree or listed below as internal,
with the reason it never reaches a caller.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path
from types import ModuleType

import pytest

import aioaccel
import aioaccel.errors as errors

PACKAGE = Path(aioaccel.__file__).parent

#: exception classes that never reach a caller of aioaccel: what becomes of each
INTERNAL = {
    "aioaccel.pool_policies.NoMember": "a routing signal, caught by the pool's dispatcher",
    "aioaccel.serve.v2_infer.UnknownModel": "the serve app answers it 404 / NOT_FOUND",
    "aioaccel.serve.command.UsageError": "the serve command exits with status 2 and its text",
    "aioaccel.serve.v2_rest._BodyProblem": "private: answered 400 by the REST handler",
    "aioaccel.serve.v2_rest._ClientLeft": "private: the client went away, nobody to tell",
    "aioaccel.integrations.streaming.Refused": "the stream server sends it as a close code "
                                               "(the client raises StreamRefused/StreamClosed)",
    "aioaccel.integrations.streaming._Gone": "private: the client disconnected",
    "aioaccel.core.stage_threads._Stopped": "private: a worker's stop signal",
    "aioaccel.core.supervision._NeverRaised": "private: an except clause that matches nothing",
    "aioaccel.backends.openvino_legacy.LegacyRequestFailed":
        "plays the native request's failure: the __cause__ of the InferenceError callers get",
    "aioaccel.testing.SimulatedFailure": "a simulator's stand-in for a runtime's own error, "
                                         "which aioaccel translates",
    "aioaccel.testing.coral.SimulatedAbort": "a simulator's stand-in for libcoral's abort",
}

SKIP_MODULES = {"aioaccel.__main__"}  # importing it runs the command line


def modules() -> list[ModuleType]:
    names = ["aioaccel"] + [m.name for m in pkgutil.walk_packages(aioaccel.__path__, "aioaccel.")]
    return [importlib.import_module(n) for n in sorted(names) if n not in SKIP_MODULES]


def source_of(module: ModuleType) -> ast.Module:
    return ast.parse(Path(module.__file__ or "").read_text())


def exception_classes() -> dict[str, type[BaseException]]:
    """Every exception class the package's source defines, by qualified name."""
    found: dict[str, type[BaseException]] = {}
    for module in modules():
        for node in ast.walk(source_of(module)):
            if not isinstance(node, ast.ClassDef):
                continue
            cls = getattr(module, node.name, None)
            if isinstance(cls, type) and cls.__module__ == module.__name__:
                if issubclass(cls, BaseException):
                    found[f"{module.__name__}.{node.name}"] = cls
                continue
            # not reachable as a module attribute (nested): its bases must not be exceptions
            bases = {ast.unparse(b).rsplit(".", 1)[-1] for b in node.bases}
            assert not any(re.search(r"(Error|Exception|Exit|Interrupt)$", b) for b in bases), (
                f"{module.__name__}: nested exception class {node.name} is hidden from the "
                f"tree; define it in aioaccel.errors")
    return found


def raised_classes() -> dict[str, type[BaseException]]:
    """Every aioaccel exception class the source raises (``raise X``) or makes (``X(...)``:
    handed to a waiter, set on a future)."""
    found: dict[str, type[BaseException]] = {}
    for module in modules():
        for node in ast.walk(source_of(module)):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Name):
                target: ast.expr = node.exc
            elif isinstance(node, ast.Call):
                target = node.func
            else:
                continue
            if not isinstance(target, ast.Name):
                continue
            cls = getattr(module, target.id, None)
            if (isinstance(cls, type) and issubclass(cls, BaseException)
                    and cls.__module__.startswith("aioaccel")):
                found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return found


def tree_drawing() -> dict[str, str | None]:
    """The docstring's tree: each drawn name -> the name drawn as its parent (the nearest
    name above it drawn further left)."""
    parents: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []  # (column, name) of the current branch
    for line in (errors.__doc__ or "").splitlines():
        match = re.match(r"^    [ │]*(?:[├└]── )?([A-Z]\w+)", line)
        if not match:
            continue  # prose, or the continuation of a node's description
        column, name = match.start(1), match.group(1)
        while stack and stack[-1][0] >= column:
            stack.pop()
        parents[name] = stack[-1][1] if stack else None
        stack.append((column, name))
    return parents


def tree_classes() -> dict[str, type[BaseException]]:
    return {name: getattr(errors, name) for name in errors.__all__
            if isinstance(getattr(errors, name), type)}


def test_the_docstring_draws_every_class_where_it_sits() -> None:
    drawn = tree_drawing()
    classes = tree_classes()
    assert set(drawn) == set(classes), (
        f"drawn but not defined: {sorted(set(drawn) - set(classes))}; defined but not drawn: "
        f"{sorted(set(classes) - set(drawn))}")
    for name, parent in drawn.items():
        cls = classes[name]
        if parent is None:
            assert cls is errors.AccelError
        else:
            assert classes[parent] in cls.__bases__, f"{name} is drawn under {parent}"


def test_every_exception_the_package_defines_is_in_the_tree_or_internal() -> None:
    tree = set(tree_classes().values())
    defined = exception_classes()
    for name in INTERNAL:
        assert name in defined, f"INTERNAL lists {name}, which the package no longer defines"
    strays = {name for name, cls in defined.items() if cls not in tree and name not in INTERNAL}
    assert not strays, f"exceptions outside the tree in aioaccel.errors: {sorted(strays)}"
    for name, cls in defined.items():
        if issubclass(cls, errors.AccelError):
            assert cls.__module__ == "aioaccel.errors", f"{name} derives from AccelError"


def test_every_exception_the_package_raises_is_in_the_tree_or_internal() -> None:
    tree = set(tree_classes().values())
    raised = raised_classes()
    assert errors.MemberLost in raised.values() and errors.RemoteError in raised.values()
    strays = {name for name, cls in raised.items() if cls not in tree and name not in INTERNAL}
    assert not strays, f"raised, but not in aioaccel.errors' tree: {sorted(strays)}"


def test_every_class_of_the_tree_is_exported_at_the_top() -> None:
    for name, cls in tree_classes().items():
        assert name in aioaccel.__all__ and getattr(aioaccel, name) is cls, name
        assert issubclass(cls, errors.AccelError)


@pytest.mark.parametrize(("module", "name"), [
    ("aioaccel.batching", "BatchingUnsupported"),
    ("aioaccel.pool", "MemberLost"),
    ("aioaccel.integrations.ray", "RemoteError"),
    ("aioaccel.integrations.ray", "DeployError"),
    ("aioaccel.integrations.ray", "NotEnoughResources"),
    ("aioaccel.client", "StreamRefused"),
    ("aioaccel.client", "StreamClosed"),
    ("aioaccel.integrations.negotiation", "NotAcceptable"),
])
def test_the_old_homes_give_the_same_class(module: str, name: str) -> None:
    assert getattr(importlib.import_module(module), name) is getattr(errors, name)


def test_the_builtin_bases_are_kept() -> None:
    # code written against the old homes caught these by their builtin types
    assert issubclass(errors.BatchingUnsupported, ValueError)
    assert issubclass(errors.DeployError, RuntimeError)
    assert issubclass(errors.StreamRefused, ConnectionError)
    assert issubclass(errors.StreamClosed, ConnectionError)
    assert issubclass(errors.NotAcceptable, errors.InputError)
    refused = errors.StreamRefused(409, "key in use")
    assert (refused.status, refused.reason) == (409, "key in use") and "409" in str(refused)
