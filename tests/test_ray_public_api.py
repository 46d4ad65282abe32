"""Ray Serve is reached through its public API only (issue 20 item 8), with aioaccel's own
bounds on the waits the public API leaves unbounded.

No cluster here: the source is read for private names, and the bounded deploy runs against a
stand-in for ``ray.serve`` whose ``run`` succeeds, fails, or waits forever (as it does for
replicas that never find resources). tests/test_ray.py runs the same code on a real cluster.
"""

from __future__ import annotations

import ast
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import aioaccel
from aioaccel.integrations import ray as aray

PACKAGE = Path(aioaccel.__file__).parent


def private_ray_uses(source: str) -> list[str]:
    """Private names of Ray a module reaches: ``serve._run``, ``ray.serve._private...``,
    ``from ray.serve.context import _get_global_client``, ``_blocking=`` keywords."""
    tree = ast.parse(source)
    ray_names = {"ray", "serve"}  # names bound to Ray's modules (``serve = _serve()`` too)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            ray_names |= {(a.asname or a.name).split(".")[0] for a in node.names
                          if a.name.split(".")[0] == "ray"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ray"):
            ray_names |= {a.asname or a.name for a in node.names}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "ray":
            parts = (node.module or "").split(".") + [a.name for a in node.names]
            found += [f"line {node.lineno}: from {node.module} import {p}" for p in parts
                      if p.startswith("_")]
        elif isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] == "ray"
                      and any(p.startswith("_") for p in a.name.split("."))]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not (
                node.attr.startswith("__") and node.attr.endswith("__")):
            root: ast.expr = node.value
            while isinstance(root, ast.Attribute | ast.Call):
                root = root.value if isinstance(root, ast.Attribute) else root.func
            if isinstance(root, ast.Name) and root.id in ray_names:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Call):
            func = node.func
            while isinstance(func, ast.Attribute):
                func = func.value
            if isinstance(func, ast.Name) and func.id in ray_names:
                found += [f"line {node.lineno}: {k.arg}=" for k in node.keywords
                          if k.arg and k.arg.startswith("_")]
    return found


def test_the_finder_sees_private_uses() -> None:
    source = ("from ray.serve.context import _get_global_client\nimport ray._private.x\n"
              "def f(serve):\n    serve._run(app, _blocking=False)\n"
              "    serve.delete('x', _blocking=False)\n    ray.serve._private.api\n")
    assert len(private_ray_uses(source)) == 6
    assert private_ray_uses("serve.run(app, blocking=False)\nserve.delete('x')\n"
                            "ray.get_runtime_context().get_node_id()\n") == []


def test_no_module_reaches_a_private_name_of_ray() -> None:
    found = {str(path.relative_to(PACKAGE)): uses for path in sorted(PACKAGE.rglob("*.py"))
             if (uses := private_ray_uses(path.read_text()))}
    assert found == {}
    assert "serve.run(" in (PACKAGE / "integrations" / "ray.py").read_text()  # what it uses


# ---- the bounded deploy ----------------------------------------------------------------
class FakeServe:
    """``ray.serve``'s public run / status / delete / get_app_handle, for one application."""

    def __init__(self, run: str, delete_hangs: bool = False):
        self.behaviour = run
        self.status_name = "NOT_STARTED"
        self.message = ""
        self.deleted = threading.Event()
        self.delete_hangs = delete_hangs
        self.release = threading.Event()

    def run(self, app: Any, *, name: str, route_prefix: Any, blocking: bool) -> Any:
        assert blocking is False and route_prefix is None
        if self.behaviour == "bad app":
            raise TypeError("`serve.run` expects an `Application`")
        self.status_name = "DEPLOYING"
        if self.behaviour == "runs":
            self.status_name = "RUNNING"
            return f"handle of {name}"
        if self.behaviour == "fails":
            self.status_name, self.message = "DEPLOY_FAILED", "replica raised: no-such.onnx"
            raise RuntimeError(f"Deploying application {name} failed: {self.message}")
        self.deleted.wait()  # "pending": replicas that never get resources wait forever
        raise RuntimeError(f"Waiting for application {name} to be RUNNING, but application "
                           f"doesn't exist.")

    def status(self) -> Any:
        app = SimpleNamespace(status=f"ApplicationStatus.{self.status_name}",
                              message=self.message, deployments={})
        return SimpleNamespace(applications={} if self.deleted.is_set() else {"app": app})

    def delete(self, name: str) -> None:
        if self.delete_hangs:
            self.release.wait(30)
        self.deleted.set()

    def get_app_handle(self, name: str) -> Any:
        return f"handle of {name}"


_before: set[threading.Thread] = set()


@pytest.fixture(autouse=True)
def _threads_before() -> None:
    """The threads alive before the test: a real deploy of an earlier test (tests/test_ray.py,
    same process) may leave its abandoned ``ray-serve-run-*`` thread behind; it is not this
    test's."""
    _before.clear()
    _before.update(threading.enumerate())


def deploy_threads(timeout: float = 5.0) -> list[str]:
    """This test's deploy helper threads still alive after ``timeout`` seconds."""
    threads = [t for t in threading.enumerate()
               if t.name.startswith("ray-serve-") and t not in _before]
    for thread in threads:
        thread.join(timeout)
    return [t.name for t in threads if t.is_alive()]


def test_a_running_application_gives_its_handle() -> None:
    assert aray._run_bounded(FakeServe("runs"), object(), "app", 5.0) == "handle of app"
    assert deploy_threads() == []


def test_replicas_that_never_start_are_refused_at_the_deadline_and_deleted() -> None:
    serve = FakeServe("pending")
    started = time.monotonic()
    with pytest.raises(aioaccel.NotEnoughResources, match="was not running after 0.3 s"):
        aray._run_bounded(serve, object(), "app", 0.3)
    assert 0.3 <= time.monotonic() - started < 3.0
    assert serve.deleted.is_set()
    assert deploy_threads() == []  # serve.run's wait ended with the deletion


@pytest.mark.parametrize("how", ["fails", "bad app"])
def test_a_failed_deploy_says_why_and_deletes_what_it_started(how: str) -> None:
    serve = FakeServe(how)
    with pytest.raises(aioaccel.DeployError, match="failed to deploy") as failed:
        aray._run_bounded(serve, object(), "app", 5.0)
    assert isinstance(failed.value.__cause__, RuntimeError | TypeError)
    assert ("no-such.onnx" if how == "fails" else "Application") in str(failed.value)
    assert serve.deleted.is_set()
    assert deploy_threads() == []


def test_a_slow_deletion_does_not_hold_the_error() -> None:
    serve = FakeServe("pending", delete_hangs=True)
    started = time.monotonic()
    try:
        with pytest.raises(aioaccel.NotEnoughResources):
            aray._run_bounded(serve, object(), "app", 0.2)
        assert time.monotonic() - started < 2.0
        assert not serve.deleted.is_set()  # still deleting, on its own thread
    finally:
        serve.release.set()
    assert deploy_threads() == []  # both end once Serve is done
