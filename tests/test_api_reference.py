"""The API reference shows what applications call (issue 20 item 8); backend-author helpers
are on their own page (docs/backend-api.md).

Read from the pages' ``:::`` directives, and checked on the built site (the ids mkdocstrings
gives each rendered name) when the docs extra is installed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import aioaccel
import aioaccel.errors as errors
from aioaccel.core.loop_bridge import Receiver

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"

#: what applications call on a runner: each must be on the reference page
RUNNER_API = ["push", "push_nowait", "push_many", "infer", "infer_many", "results", "stream",
              "streams", "close", "aclose", "reload", "state", "health", "stats", "info",
              "inputs", "outputs", "maxsize", "closed"]
#: backend-author helpers: on the backend page, never on the reference page
HELPERS = [
    "aioaccel.Model", "aioaccel.stages.made", "aioaccel.available_backends",
    "aioaccel.errors.open_error", "aioaccel.errors.device_error",
    "aioaccel.errors.inference_error", "aioaccel.errors.copy_for_waiter",
    "aioaccel.batching.backend_batch", "aioaccel.batching.refuse_batch",
    "aioaccel.batching.require_batch_axis", "aioaccel.batching.batched_specs",
    "aioaccel.batching.batched_model", "aioaccel.batching.load_model",
    "aioaccel.batching.calibrate", "aioaccel.batching.join", "aioaccel.batching.split",
    "aioaccel.integrations.streaming.serve_stream", "aioaccel.integrations.negotiation.acceptable",
]
#: runner plumbing no page may show as the runner's API
PLUMBING = ["stop_now", "threads_alive", *(n for n in dir(Receiver) if n.startswith("on_"))]


def directives(page: str) -> dict[str, list[str] | None]:
    """``::: name`` -> the members its options list (None: the default, everything public)."""
    found: dict[str, list[str] | None] = {}
    current = None
    in_members = False
    for line in (DOCS / page).read_text().splitlines():
        if line.startswith("::: "):
            current = line[4:].strip()
            found[current] = None
            in_members = False
        elif current and re.match(r"^\s+members:\s*$", line):
            found[current] = []
            in_members = True
        elif current and in_members and (item := re.match(r"^\s+- (\S+)\s*$", line)):
            found[current].append(item.group(1))  # type: ignore[union-attr]
        elif not line.startswith(" "):
            current, in_members = (None if line.strip() else current), False
    return found


def rendered(page: str) -> set[str]:
    """The names a page's directives render, as far as the directives say."""
    names = set()
    for name, members in directives(page).items():
        names.add(name)
        names |= {f"{name}.{m}" for m in members or ()}
    return names


def test_the_reference_lists_what_users_call() -> None:
    names = rendered("reference.md")
    assert {f"aioaccel.Runner.{m}" for m in RUNNER_API} <= names
    assert {"aioaccel.open", "aioaccel.pool.pool", "aioaccel.devices.devices",
            "aioaccel.State", "aioaccel.Restart", "aioaccel.Pool", "aioaccel.MemberStats",
            "aioaccel.integrations.ray.connect", "aioaccel.integrations.ray.deploy"} <= names
    tree = [n for n in errors.__all__ if isinstance(getattr(errors, n), type)]
    assert {f"aioaccel.errors.{n}" for n in tree} <= names


def test_the_reference_shows_no_backend_helper_and_the_backend_page_shows_them() -> None:
    reference, backend = rendered("reference.md"), rendered("backend-api.md")
    assert not set(HELPERS) & reference
    helper_modules = {"aioaccel.batching", "aioaccel.integrations.streaming",
                      "aioaccel.integrations.negotiation"}
    assert not helper_modules & reference  # a whole module of helpers, rendered by default
    assert directives("reference.md")["aioaccel.errors"] is not None  # the tree, no helpers
    assert directives("reference.md")["aioaccel.Runner"] is not None  # no plumbing
    missing = [h for h in HELPERS if h not in backend
               and h.rsplit(".", 1)[0] not in directives("backend-api.md")]
    assert not missing, missing


def test_the_backend_page_is_in_the_site_navigation() -> None:
    assert "backend-api.md" in (ROOT / "mkdocs.yml").read_text()


def test_no_runner_plumbing_is_public() -> None:
    for cls in (aioaccel.Runner, aioaccel.Pool):
        public = {n for n in dir(cls) if not n.startswith("_")}
        assert not public & set(PLUMBING) - {"stop_now", "threads_alive"}, cls
        assert not any(n.startswith("on_") for n in public), cls
    for name in PLUMBING:
        assert f"aioaccel.Runner.{name}" not in rendered("reference.md")


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("mkdocs", "mkdocstrings")),
                    reason="needs the docs extra: pip install -e '.[docs]'")
def test_the_built_pages_render_exactly_that(tmp_path: Path) -> None:
    site = tmp_path / "site"
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir",
         str(site)], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1",
             "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    assert built.returncode == 0, built.stderr[-3000:]

    def ids(page: str) -> set[str]:
        html = (site / page / "index.html").read_text()
        return set(re.findall(r'id="(aioaccel[\w.]*)"', html))

    reference, backend = ids("reference"), ids("backend-api")
    assert {f"aioaccel.Runner.{m}" for m in RUNNER_API} <= reference
    shown_helpers = {i for i in reference if i in HELPERS or i.startswith(
        ("aioaccel.batching.", "aioaccel.integrations.streaming."))}
    assert not shown_helpers
    assert not {i for i in reference if i.rsplit(".", 1)[-1] in PLUMBING}
    assert set(HELPERS) <= backend
