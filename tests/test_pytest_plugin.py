"""The pytest plugin (entry point pytest11), exercised in inner pytest sessions: under anyio's
plugin (asyncio, uvloop, trio where aioaccel runs on it) and under pytest-asyncio for real
(strict mode, auto mode, a wider loop_scope, uvloop through its loop factories)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# {mark} is the line that hands an async test to the plugin under test ("" in auto modes);
# {loop} is the event loop class's module the test must run on (the runner lives there too).
USER_TESTS = '''
import asyncio
import threading

import pytest

import aioaccel

LEFT = []


def running_loop_module():
    try:
        return type(asyncio.get_running_loop()).__module__.split(".")[0]
    except RuntimeError:  # not asyncio (trio)
        return "trio"


{mark}
@pytest.mark.accel(lambda x: x * 2, latency=0.001, fail_at=1, maxsize=2)
async def test_simulated_runner_with_failure_injection(accel_runner):
    assert running_loop_module() == "{loop}"
    assert not accel_runner.closed and accel_runner.maxsize == 2
    assert await accel_runner.infer(1) == 2
    with pytest.raises(aioaccel.InferenceError):
        await accel_runner.infer(2)
    assert await accel_runner.infer(3) == 6
    LEFT.append(accel_runner)


{mark}
async def test_default_runner_is_an_identity_stream(accel_runner):
    for i in range(5):
        await accel_runner.push(i, tag=f"t{{i}}")
    accel_runner.close()
    assert [(r.tag, r.outputs) async for r in accel_runner] == [
        (f"t{{i}}", i) for i in range(5)]
    LEFT.append(accel_runner)


{mark}
async def test_factory_runner_left_open(accel_factory):
    runner = await accel_factory.simulated(lambda x: x + 1, device=True, jitter=1.0)
    assert await runner.infer(1) == 2
    hung = await accel_factory.simulated(hang_at=0, call_timeout=None)
    hung.push_nowait("stuck")  # hangs in the simulated device: teardown must still finish
    LEFT.extend([runner, hung])


def test_the_fixtures_closed_what_was_left():
    assert len(LEFT) >= 4 and all(r.closed for r in LEFT)
    assert not [t for t in threading.enumerate() if t.name.startswith("aioaccel-")]


@pytest.mark.hardware("memryx")
def test_needs_an_mx3():
    raise AssertionError("ran without an MX3")


@pytest.mark.hardware("coral")
def test_needs_an_edge_tpu():
    raise AssertionError("ran without an Edge TPU")


@pytest.mark.hardware("litert")
def test_needs_the_litert_cpu_runtime():
    pass


@pytest.mark.hardware("openvino:CPU")
def test_needs_openvino_on_the_cpu():
    pass


@pytest.mark.hardware("openvino:NPU")
def test_needs_an_npu():
    raise AssertionError("ran without an NPU")
'''

ANYIO_BACKENDS = '''
import pytest

@pytest.fixture(params={params!r})
def anyio_backend(request):
    return request.param
'''

UVLOOP_FACTORY = '''
import uvloop

def pytest_asyncio_loop_factories(config, item):
    return {"uvloop": uvloop.new_event_loop}
'''

ASYNCIO_INI = ["-o", "asyncio_default_fixture_loop_scope=function"]  # as users set it
STRICT = ["-o", "asyncio_mode=strict", *ASYNCIO_INI, "-p", "no:anyio"]
AUTO = ["-o", "asyncio_mode=auto", *ASYNCIO_INI, "-p", "no:anyio"]
# the plugins load from their entry points (as in a user's session); the others are disabled
ANYIO = ["-p", "no:asyncio"]
SKIPPED_LINES = [
    "*SKIPPED*needs memryx: memryx: runtime not installed; install: the MemryX SDK*",
    "*SKIPPED*needs coral*pycoral and libedgetpu*",
    "*SKIPPED*needs openvino:NPU: no 'NPU' device among*CPU*",
]


def run_user_tests(pytester: pytest.Pytester, mark: str, loop: str, options: list[str],
                   conftest: str | None = None, runs: int = 1) -> pytest.RunResult:
    pytester.makepyfile(test_user=USER_TESTS.format(mark=mark, loop=loop))
    if conftest is not None:
        pytester.makeconftest(conftest)
    result = pytester.runpytest_subprocess("-rs", "-p", "no:cacheprovider",
                                           "-W", "error", *options)
    result.assert_outcomes(passed=3 * runs + 3, skipped=3)
    result.stdout.fnmatch_lines(SKIPPED_LINES)
    return result


@pytest.mark.parametrize("mark, options", [
    ('@pytest.mark.asyncio', STRICT),
    ('@pytest.mark.asyncio(loop_scope="module")', STRICT),  # the runner shares that loop
    ("", AUTO),
    ("", [*AUTO, "-o", "asyncio_default_test_loop_scope=module"]),
], ids=["strict", "strict-module-loop", "auto", "auto-module-loop"])
def test_under_pytest_asyncio(pytester: pytest.Pytester, mark: str,
                              options: list[str]) -> None:
    result = run_user_tests(pytester, mark, "asyncio", options)
    result.stdout.fnmatch_lines(["*asyncio: mode=*"])  # pytest-asyncio's header: it ran


def test_under_pytest_asyncio_with_uvloop(pytester: pytest.Pytester) -> None:
    pytest.importorskip("uvloop")
    run_user_tests(pytester, "@pytest.mark.asyncio", "uvloop", STRICT, conftest=UVLOOP_FACTORY)


def test_under_anyio_on_asyncio(pytester: pytest.Pytester) -> None:
    backends = ANYIO_BACKENDS.format(params=["asyncio"])
    run_user_tests(pytester, "@pytest.mark.anyio", "asyncio", ANYIO, conftest=backends)


def test_under_anyio_with_uvloop(pytester: pytest.Pytester) -> None:
    pytest.importorskip("uvloop")
    backends = ANYIO_BACKENDS.format(params=[("asyncio", {"use_uvloop": True})])
    run_user_tests(pytester, "@pytest.mark.anyio", "uvloop", ANYIO, conftest=backends)


def test_under_anyio_when_pytest_asyncio_is_loaded_too(pytester: pytest.Pytester) -> None:
    """Both plugins in one session (strict mode, as in this repository): anyio's test."""
    backends = ANYIO_BACKENDS.format(params=["asyncio"])
    result = run_user_tests(pytester, "@pytest.mark.anyio", "asyncio",
                   ["-o", "asyncio_mode=strict", *ASYNCIO_INI],
                   conftest=backends)
    result.stdout.fnmatch_lines(["plugins:*anyio-*"])
    result.stdout.fnmatch_lines(["plugins:*asyncio-*"])


TRIO_PROBE = """
import trio

import aioaccel
from aioaccel.testing import SimulatedStage


async def probe():
    async with aioaccel.open(SimulatedStage(latency=0)) as runner:
        assert await runner.infer(1) == 1

trio.run(probe)
"""


def _aioaccel_runs_on_trio() -> str | None:
    """Why aioaccel cannot run under trio here (None when it can): in a child process, so
    that a runner a failed attempt leaves behind cannot warn in this one."""
    pytest.importorskip("trio")
    proc = subprocess.run([sys.executable, "-c", TRIO_PROBE], capture_output=True, text=True,
                          timeout=60)
    if proc.returncode == 0:
        return None
    last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return f"aioaccel does not run under trio yet (issue 24): {last}"


def test_under_anyio_on_trio(pytester: pytest.Pytester) -> None:
    reason = _aioaccel_runs_on_trio()
    if reason is not None:
        pytest.skip(reason)
    backends = ANYIO_BACKENDS.format(params=["trio"])
    run_user_tests(pytester, "@pytest.mark.anyio", "trio", ANYIO, conftest=backends)


NO_PLUGIN_RUNS_IT = '''
import pytest

async def test_forgot_the_marker(accel_runner):
    pass

def test_sync(accel_runner):
    pass
'''


@pytest.mark.parametrize("options", [STRICT, ANYIO, ["-p", "no:asyncio", "-p", "no:anyio"]],
                         ids=["strict", "anyio", "no-plugin"])
def test_an_unmarked_async_test_is_told_what_to_do(pytester: pytest.Pytester,
                                                   options: list[str]) -> None:
    pytester.makepyfile(test_user=NO_PLUGIN_RUNS_IT)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *options)
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines([
        "*accel_runner needs an async test run by an async test plugin*test_forgot_the_marker*"
        "@pytest.mark.asyncio*@pytest.mark.anyio*accel_factory*"])
    assert "Traceback" not in result.stdout.str()


def test_a_bad_accel_marker_names_what_it_takes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user='''
import pytest

@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.accel(latncy=0.1)
async def test_x(accel_runner):
    pass
''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *ANYIO)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*OpenError*the function backend takes no options, got latncy*"])


def test_unknown_hardware_names_the_known_backends(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user='''
import pytest

@pytest.mark.hardware("tpu9000")
def test_x():
    pass
''')
    result = pytester.runpytest_subprocess("-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*unknown hardware 'tpu9000': expected one of*coral*"])
