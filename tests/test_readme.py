"""Every command and program in README.md runs as written.

The README's fenced ``sh`` and ``python`` blocks are extracted in order and run for real, with
three honest shortcuts, each checked another way:

* ``python3 -m venv .venv`` runs as written, in a temporary folder (not in the clone, whose
  ``.venv`` may be the very environment running this test, as in CI).
* ``.venv/bin/pip install ... -e ".[extras]"`` is not re-run (minutes, and the network): the
  test checks that each extra exists in pyproject.toml and that the environment running this
  test has every requirement those extras bring, at a version they accept; so the commands
  after it run against what that install gives. ``.venv/bin/X`` then means this environment's
  ``X``.
* ``.venv/bin/python -m pytest`` (the whole suite, which this test is part of) runs with
  ``--collect-only``: it must collect the suite without an error. CI's step 1 (``.ci/run``)
  runs the very same command in full, which the test checks too.

A command ending in ``&`` is a server: it is started on a free port (``--port N``; the port
8000 in later commands and programs becomes N), awaited until it listens, and stopped at the
end. A ``curl`` must answer JSON without an error (``detail``). Python blocks run with
``-W error`` and must print something.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
BIN = Path(sys.executable).parent
RUN_TIMEOUT = 240


def blocks() -> list[tuple[str, str, str]]:
    """(section, language, text) of every fenced block, in order."""
    text = README.read_text()
    found = []
    for match in FENCE.finditer(text):
        heading = re.findall(r"^#+ (.+)$", text[:match.start()], re.MULTILINE)
        found.append((heading[-1] if heading else "", match.group(1), match.group(2)))
    return found


def sections() -> list[str]:
    return list(dict.fromkeys(section for section, lang, _ in blocks() if lang in ("sh", "python")))


# -- pip install: the extras exist, and this environment has what they bring ---------------

def project() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]  # type: ignore[no-any-return]


def requirements_of(extras: list[str]) -> list[Requirement]:
    optional: dict[str, list[str]] = project()["optional-dependencies"]  # type: ignore[assignment]
    found, todo, seen = [], list(extras), set()
    for dependency in project()["dependencies"]:  # type: ignore[attr-defined]
        found.append(Requirement(dependency))
    while todo:
        extra = todo.pop()
        assert extra in optional, f"README installs the extra [{extra}], which pyproject.toml " \
                                  f"does not define (it has {sorted(optional)})"
        if extra in seen:
            continue
        seen.add(extra)
        for line in optional[extra]:
            requirement = Requirement(line)
            if requirement.name == "aioaccel":
                todo.extend(requirement.extras)
            else:
                found.append(requirement)
    return found


def check_pip_install(words: list[str]) -> None:
    assert words[:2] == [".venv/bin/pip", "install"], words
    editable = words[words.index("-e") + 1]
    match = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", editable)
    assert match, f"README installs {editable!r}: expected '.[extras]' from the clone's root"
    environment = default_environment()
    missing = []
    for requirement in requirements_of((match.group(1) or "").split(",") if match.group(1)
                                       else []):
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            missing.append(str(requirement))
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            missing.append(f"{requirement} (installed: {installed})")
    assert not missing, f"{editable} brings {missing}, which this environment lacks"


# -- running the rest -----------------------------------------------------------------------

def split(line: str) -> list[tuple[list[str], str]]:
    """One shell line as (words, what follows: '&&', '&' or '')."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[tuple[list[str], str]] = []
    words: list[str] = []
    for token in lexer:
        if token in ("&&", "&"):
            commands.append((words, token))
            words = []
        else:
            assert not set(token) <= set("|;<>()"), f"unsupported shell syntax in {line!r}"
            words.append(token)
    if words:
        commands.append((words, ""))
    return commands


def local(words: list[str]) -> list[str]:
    """``.venv/bin/X`` -> this environment's X."""
    first = words[0]
    if first.startswith(".venv/bin/"):
        return [str(BIN / first.removeprefix(".venv/bin/")), *words[1:]]
    return words


class Shell:
    """Runs README lines in order in one folder; servers it starts are stopped on close."""

    def __init__(self, cwd: Path, scratch: Path, stack: ExitStack):
        self.cwd = cwd
        self.scratch = scratch
        self.stack = stack
        self.port: int | None = None
        self.ran: list[str] = []

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
            "PYTHONPATH", "")])}

    def ported(self, text: str) -> str:
        if self.port is None:
            return text
        return re.sub(r"(localhost|127\.0\.0\.1):8000\b", rf"\g<1>:{self.port}", text)

    def line(self, line: str) -> None:
        for words, then in split(line):
            words = [self.ported(w) for w in words]
            self.ran.append(shlex.join(words))
            if words[:3] == ["python3", "-m", "venv"]:
                self.run(words, cwd=self.scratch)  # as written: cheap
                assert (self.scratch / words[3] / "bin" / "pip").exists()
            elif words[:2] == [".venv/bin/pip", "install"]:
                check_pip_install(words)
            elif then == "&":
                self.server(local(words))
            else:
                output = self.run(local(words))
                if words[0] == "curl":
                    reply = json.loads(output)
                    assert "detail" not in reply, f"{shlex.join(words)} answered {reply}"

    def run(self, words: list[str], cwd: Path | None = None) -> str:
        if words[-2:] == ["-m", "pytest"]:
            words = [*words, "--collect-only", "-q", "-p", "no:cacheprovider"]
        proc = subprocess.run(words, cwd=cwd or self.cwd, env=self.env(), capture_output=True,
                              text=True, timeout=RUN_TIMEOUT)
        assert proc.returncode == 0, f"{shlex.join(words)}: {proc.stdout[-3000:]}" \
                                     f"{proc.stderr[-3000:]}"
        return proc.stdout

    def server(self, words: list[str]) -> None:
        assert words[1] == "serve", f"only 'aioaccel serve' runs in the background: {words}"
        proc = subprocess.Popen([*words, "--port", "0"], cwd=self.cwd, env=self.env(),
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.stack.callback(stop, proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once it listens (or EOF if it exited)
        found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert found, f"{shlex.join(words)} did not start: {line!r}"
        self.port = int(found.group(1))

    def python(self, code: str) -> None:
        self.ran.append("python -c <block>")
        proc = subprocess.run([sys.executable, "-W", "error", "-c", self.ported(code)],
                              cwd=self.cwd, env=self.env(), capture_output=True, text=True,
                              timeout=RUN_TIMEOUT)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip(), "a program should show what it did"


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


@contextmanager
def shell(cwd: Path, scratch: Path) -> Iterator[Shell]:
    with ExitStack() as stack:
        yield Shell(cwd, scratch, stack)


@pytest.mark.parametrize("section", sections())
def test_readme_section_runs(section: str, tmp_path: Path) -> None:
    """Each section's blocks run in order, in one folder (the clone's root for the quick
    start, whose commands install it; a fresh folder for the others)."""
    cwd = ROOT if section == "Quick start" else tmp_path
    with shell(cwd, tmp_path) as sh:
        for where, lang, text in blocks():
            if where != section:
                continue
            if lang == "sh":
                for line in text.splitlines():
                    if line.strip() and not line.lstrip().startswith("#"):
                        sh.line(line)
            elif lang == "python":
                sh.python(text)
    assert sh.ran, f"section {section!r} ran nothing"


def test_the_quick_start_is_two_commands_and_ci_runs_the_test_one() -> None:
    commands = [line for where, lang, text in blocks() if where == "Quick start" and lang == "sh"
                for line in text.splitlines() if line.strip()]
    assert len(commands) == 2, commands
    assert any("aioaccel demo" in c for c in commands)
    tests = next(c for c in commands if "-m pytest" in c)
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines(), \
        "CI's step 1 is the README's test command, word for word"


def test_every_command_is_in_a_block_the_tests_see() -> None:
    """No indented code blocks: a command there would be skipped by the test above."""
    text = FENCE.sub("", README.read_text())
    indented = [line for line in text.splitlines() if re.match(r"^ {4,}\S", line)]
    assert not indented, f"put these in fenced sh/python blocks: {indented}"
    languages = {lang for _, lang, _ in blocks()}
    assert languages <= {"sh", "python", "text"}, languages


def test_the_extras_the_readme_names_exist() -> None:
    optional = project()["optional-dependencies"]
    named = set(re.findall(r"(?:aioaccel|\.)\[([\w,-]+)\]", README.read_text()))
    for group in named:
        for extra in group.split(","):
            assert extra in optional, f"README names the extra [{extra}]: not in pyproject"  # type: ignore[operator]
