"""A pytest plugin for testing services built on aioaccel, without hardware.

Installed with aioaccel (entry point ``pytest11``), so it is active in every test session:

* ``accel_runner`` -- an opened runner over a simulated accelerator (identity, 1 ms), closed
  after the test. Configure it with ``@pytest.mark.accel(fn, latency=..., fail_at=...,
  maxsize=...)``. Request it from an async test; it works unchanged under pytest-asyncio
  (strict mode: ``@pytest.mark.asyncio``; auto mode; any ``loop_scope``, loop factories such
  as uvloop) and under anyio's plugin (``@pytest.mark.anyio``, any ``anyio_backend``).
* ``accel_factory`` -- makes runners and closes, at teardown, every one the test left open.
  ``accel_factory.simulated(fn, latency=..., fail_at=..., device=False, **open_options)``
  gives a runner over a :class:`~aioaccel.testing.SimulatedStage` (or, with
  ``device=True``, a :class:`~aioaccel.testing.SimulatedDevice`);
  ``accel_factory.open(target, **options)`` any runner. Open them in the test
  (``async with runner:`` or ``await runner``); it works under any async test plugin, on
  asyncio, uvloop and trio.
* ``backends("asyncio", "uvloop", "trio")`` -- ``anyio_backend`` parameters for anyio's pytest
  plugin, so a suite's own async tests run on each library aioaccel supports (one not
  installed is skipped, saying what to install). In a ``conftest.py``::

      @pytest.fixture(params=aioaccel.pytest_plugin.backends())
      def anyio_backend(request):
          return request.param

  or, without touching the suite, ``pytest --accel-backends=asyncio,uvloop,trio`` (or the ini
  option ``accel_backends``) runs every test that uses ``anyio_backend`` on those.
* ``@pytest.mark.hardware("coral")`` (or ``"memryx"``, ``"openvino:GPU"``, ``"litert"`` ...)
  skips the test, with the reason and what to install, unless :func:`aioaccel.devices`
  reports such a device. Without arguments the marker only labels the test.

How ``accel_runner`` works under every async plugin: it is a plain (sync) fixture that asks
each known async test plugin, in turn, whether that plugin runs the current test
(:data:`ASYNC_PLUGINS`), and then requests that plugin's own async fixture, so the runner is
opened and closed by the plugin, on the test's own event loop. No plugin module is imported
unless it is active. Supporting another plugin is one more :class:`AsyncPlugin` in the list.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import pytest

import aioaccel
from aioaccel.testing import SimulatedDevice, SimulatedStage

__all__ = ["ASYNC_PLUGINS", "BACKENDS", "AsyncPlugin", "RunnerFactory", "backends",
           "hardware_missing"]

#: name -> (anyio_backend value, module it needs, what to install)
BACKENDS: dict[str, tuple[Any, str, str]] = {
    "asyncio": (("asyncio", {"use_uvloop": False}), "asyncio", "nothing"),
    "uvloop": (("asyncio", {"use_uvloop": True}), "uvloop", "pip install uvloop"),
    "trio": ("trio", "trio", "pip install 'aioaccel[trio]'"),
}


def backends(*names: str) -> list[Any]:
    """``anyio_backend`` parameters (``pytest.param``, ids ``asyncio``, ``uvloop``, ``trio``)
    for ``names`` (default: all three). A library that is not installed gives a parameter
    that skips, naming what to install."""
    import importlib.util

    chosen = names or tuple(BACKENDS)
    params = []
    for name in chosen:
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}: expected one of {sorted(BACKENDS)}")
        value, module, install = BACKENDS[name]
        marks: list[pytest.MarkDecorator] = []
        if importlib.util.find_spec(module) is None:
            marks.append(pytest.mark.skip(reason=f"{name} is not installed: {install}"))
        params.append(pytest.param(value, id=name, marks=marks))
    return params


class RunnerFactory:
    """Makes runners for one test and closes the ones left open (see the module doc)."""

    def __init__(self) -> None:
        self.runners: list[aioaccel.Runner] = []

    def open(self, target: Any, **options: Any) -> aioaccel.Runner:
        runner = aioaccel.open(target, **options)
        self.runners.append(runner)
        return runner

    def simulated(self, fn: Callable[[Any], Any] | None = None, *, latency: float = 0.001,
                  jitter: float = 0.0, fail_at: Any = None, fail_if: Any = None,
                  fatal_at: Any = None, hang_at: Any = None, device: bool = False,
                  capacity: int = 4, seed: int | None = None,
                  **options: Any) -> aioaccel.Runner:
        faults = {"latency": latency, "jitter": jitter, "fail_at": fail_at, "fail_if": fail_if,
                  "fatal_at": fatal_at, "hang_at": hang_at, "seed": seed}
        stage: Any = (SimulatedDevice(fn, capacity=capacity, **faults) if device
                      else SimulatedStage(fn, **faults))
        runner = self.open(stage, **options)
        runner.simulator = stage  # type: ignore[attr-defined]  # for release() and counters
        return runner

    def close_all(self) -> None:
        """Close what the test left open: through its loop if that still exists, else stop the
        threads directly."""
        for runner in self.runners:
            if runner.closed and runner.stats().in_flight == 0 and not runner.threads_alive:
                continue
            simulator = getattr(runner, "simulator", None)
            if simulator is not None:
                simulator.release()  # a hung simulated call must not hold the teardown
            loop = runner._sup.loop  # the loop it was opened on
            if loop is not None and not loop.is_closed() and not loop.is_running():
                loop.run_until_complete(runner.aclose(timeout=5))
            else:
                runner.stop_now()
        self.runners.clear()


def hardware_missing(spec: str) -> str | None:
    """Why a test needing ``spec`` ("coral", "memryx", "openvino:GPU", ...) cannot run here,
    or None when a matching device is available."""
    backend, _, device = spec.partition(":")
    found = [d for d in aioaccel.devices() if d.backend == backend]
    if not found:
        known = sorted({d.backend for d in aioaccel.devices()})
        return f"unknown hardware {spec!r}: expected one of {known}, optionally ':DEVICE'"
    ready = [d for d in found if d.available and (not device or d.device == device)]
    if ready:
        return None
    missing = [d for d in found if not d.available]
    hint = f"; install: {missing[0].install}" if missing and missing[0].install else ""
    what = missing[0].description if missing else f"no {device!r} device among " \
        f"{[d.device for d in found]}"
    return f"needs {spec}: {what}{hint}"


def pytest_addoption(parser: pytest.Parser) -> None:
    help_ = ("run every test that uses anyio_backend on these libraries, comma-separated: "
             "asyncio, uvloop, trio")
    parser.addoption("--accel-backends", dest="accel_backends", default=None, help=help_)
    parser.addini("accel_backends", help_, default="")


def _chosen_backends(config: pytest.Config) -> list[str]:
    raw = config.getoption("accel_backends", default=None) or config.getini("accel_backends")
    text = raw if isinstance(raw, str) else ",".join(raw)
    return [name for name in text.replace(" ", ",").split(",") if name]


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # A parametrize mark takes precedence over the anyio_backend fixture (anyio's own, or a
    # conftest's), so --accel-backends works whatever the suite defines.
    names = _chosen_backends(metafunc.config)
    if not names or "anyio_backend" not in metafunc.fixturenames:
        return
    if any("anyio_backend" in str(mark.args[0] if mark.args else "")
           for mark in metafunc.definition.iter_markers("parametrize")):
        return  # the test chose its own
    metafunc.definition.add_marker(pytest.mark.parametrize("anyio_backend", backends(*names)))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "hardware(spec): needs a device, e.g. 'coral', 'memryx', 'openvino:GPU'; "
        "skipped with the reason when it is missing")
    config.addinivalue_line(
        "markers", "accel(fn=None, **options): configures the accel_runner fixture")
    for plugin in ASYNC_PLUGINS:
        if plugin.active(config):
            plugin.register(config)


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in item.iter_markers("hardware"):
        for spec in marker.args:
            reason = hardware_missing(str(spec))
            if reason is not None:
                pytest.skip(reason)


@pytest.fixture
def accel_factory() -> Iterator[RunnerFactory]:
    """Runners for this test; every one left open is closed at teardown."""
    factory = RunnerFactory()
    try:
        yield factory
    finally:
        factory.close_all()


def _runner_from_marker(request: pytest.FixtureRequest) -> aioaccel.Runner:
    """The unopened runner ``@pytest.mark.accel(...)`` describes (identity, 1 ms without)."""
    marker = request.node.get_closest_marker("accel")
    args = marker.args if marker else ()
    options = dict(marker.kwargs) if marker else {}
    try:
        return RunnerFactory().simulated(*args, **options)
    except TypeError as exc:
        raise pytest.UsageError(
            f"@pytest.mark.accel{args!r}{options!r} on {request.node.nodeid}: {exc}; it takes "
            f"the arguments of accel_factory.simulated (fn, latency=, jitter=, fail_at=, "
            f"fail_if=, fatal_at=, hang_at=, device=, capacity=, seed=, and aioaccel.open's "
            f"options such as maxsize=)") from None


@dataclass(frozen=True)
class AsyncPlugin:
    """An async test plugin ``accel_runner`` can run under.

    ``active(config)``: the plugin is loaded in this session. ``runs(request)``: it runs the
    requesting test (its event loop is the one the runner must live on). ``fixture(request)``:
    the name of the async fixture, registered by ``register(config)``, that opens the runner
    through the plugin's own machinery.
    """

    name: str
    active: Callable[[pytest.Config], bool]
    runs: Callable[[pytest.FixtureRequest], bool]
    fixture: Callable[[pytest.FixtureRequest], str]
    register: Callable[[pytest.Config], None]


# -- anyio's pytest plugin: a test marked ``anyio`` requests ``anyio_backend``; anyio runs
#    every async fixture of such a test on the backend it names (asyncio, uvloop, trio).

@pytest.fixture(name="_accel_runner_anyio")
async def _accel_runner_anyio(request: pytest.FixtureRequest) -> AsyncIterator[aioaccel.Runner]:
    import anyio  # active, since anyio's plugin runs this test

    runner = _runner_from_marker(request)
    try:
        async with runner:
            yield runner
    finally:
        with anyio.CancelScope(shield=True):  # a cancelled test still closes the runner
            await runner.aclose()


def _anyio_runs(request: pytest.FixtureRequest) -> bool:
    return "anyio_backend" in request.fixturenames


def _register_nothing(config: pytest.Config) -> None:
    """anyio's fixture is defined in this module: it needs no import of anyio to exist."""


# -- pytest-asyncio: a test it runs is one of its own items (strict mode: marked ``asyncio``;
#    auto mode: every async test), on the loop of its ``loop_scope``. An async fixture shares
#    that loop only when its own loop_scope is the same, so there is one fixture per scope.

_LoopScope = Literal["function", "class", "module", "package", "session"]
_LOOP_SCOPES: tuple[_LoopScope, ...] = ("function", "class", "module", "package", "session")


def _asyncio_runs(request: pytest.FixtureRequest) -> bool:
    import pytest_asyncio

    return bool(pytest_asyncio.is_async_test(request.node))


def _asyncio_fixture(request: pytest.FixtureRequest) -> str:
    marker = request.node.get_closest_marker("asyncio")
    kwargs = marker.kwargs if marker is not None else {}
    scope = kwargs.get("loop_scope") or kwargs.get("scope")
    if scope is None:
        with contextlib.suppress(ValueError):  # the option is pytest-asyncio >= 0.26's
            scope = request.config.getini("asyncio_default_test_loop_scope")
    return f"_accel_runner_asyncio_{scope or 'function'}"


def _register_asyncio(config: pytest.Config) -> None:
    import pytest_asyncio

    fixtures = {}
    for scope in _LOOP_SCOPES:
        async def opened(request: pytest.FixtureRequest) -> AsyncIterator[aioaccel.Runner]:
            runner = _runner_from_marker(request)
            try:
                async with runner:
                    yield runner
            finally:  # a cancelled test still closes the runner
                await asyncio.shield(runner.aclose())

        fixtures[f"_accel_runner_asyncio_{scope}"] = pytest_asyncio.fixture(
            opened, loop_scope=scope, name=f"_accel_runner_asyncio_{scope}")
    # a module holds them as plain functions (pytest binds a class's fixtures as methods)
    holder = ModuleType("aioaccel.pytest_plugin.asyncio_fixtures")
    holder.__dict__.update(fixtures)
    config.pluginmanager.register(holder, "aioaccel-asyncio-fixtures")


#: the async test plugins ``accel_runner`` works under, asked in this order
ASYNC_PLUGINS: list[AsyncPlugin] = [
    AsyncPlugin("anyio", lambda config: config.pluginmanager.has_plugin("anyio"),
                _anyio_runs, lambda request: "_accel_runner_anyio", _register_nothing),
    AsyncPlugin("pytest-asyncio", lambda config: config.pluginmanager.has_plugin("asyncio"),
                _asyncio_runs, _asyncio_fixture, _register_asyncio),
]


@pytest.fixture
def accel_runner(request: pytest.FixtureRequest) -> aioaccel.Runner:
    """An opened runner over a simulated accelerator; ``@pytest.mark.accel(...)`` sets it up.
    Opened on the test's event loop by whichever async plugin runs the test."""
    for plugin in ASYNC_PLUGINS:
        if plugin.active(request.config) and plugin.runs(request):
            runner: aioaccel.Runner = request.getfixturevalue(plugin.fixture(request))
            return runner
    active = [p.name for p in ASYNC_PLUGINS if p.active(request.config)]
    pytest.fail(
        f"accel_runner needs an async test run by an async test plugin, and no plugin runs "
        f"{request.node.nodeid} (active plugins: {active or 'none'}): mark it "
        f"@pytest.mark.asyncio (pytest-asyncio; or set asyncio_mode = \"auto\") or "
        f"@pytest.mark.anyio (anyio); install one with pip install pytest-asyncio. A sync "
        f"test can use accel_factory instead.", pytrace=False)
