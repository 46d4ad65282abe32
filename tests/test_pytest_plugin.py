"""The pytest plugin (entry point pytest11), exercised in inner pytest sessions under anyio's
plugin and under pytest-asyncio."""

from __future__ import annotations

import pytest

USER_TESTS = '''
import threading

import pytest

import aioaccel

LEFT = []
{marker}


@pytest.mark.accel(lambda x: x * 2, latency=0.001, fail_at=1, maxsize=2)
async def test_simulated_runner_with_failure_injection(accel_runner):
    assert accel_runner.maxsize == 2
    assert await accel_runner.infer(1) == 2
    with pytest.raises(aioaccel.InferenceError):
        await accel_runner.infer(2)
    assert await accel_runner.infer(3) == 6


async def test_factory_runner_left_open(accel_factory):
    runner = await accel_factory.simulated(lambda x: x + 1, device=True, jitter=1.0)
    assert await runner.infer(1) == 2
    hung = await accel_factory.simulated(hang_at=0, call_timeout=None)
    hung.push_nowait("stuck")  # hangs in the simulated device: teardown must still finish
    LEFT.extend([runner, hung])


def test_the_factory_closed_what_was_left():
    assert LEFT and all(r.closed for r in LEFT)
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


@pytest.mark.parametrize("plugin, marker, options", [
    ("anyio", "pytestmark = pytest.mark.anyio", []),
    ("pytest-asyncio", "", ["-o", "asyncio_mode=auto", "-p", "no:anyio"]),
])
def test_plugin_fixtures_and_markers(pytester: pytest.Pytester, plugin: str, marker: str,
                                     options: list[str]) -> None:
    pytester.makepyfile(test_user=USER_TESTS.replace("{marker}", marker))
    result = pytester.runpytest_subprocess("-rs", "-p", "no:cacheprovider", *options)
    # anyio's plugin runs each async test on asyncio and trio (both installed by the test extra)
    result.assert_outcomes(passed=7 if plugin == "anyio" else 5, skipped=3)
    result.stdout.fnmatch_lines([
        "*SKIPPED*needs memryx: memryx: runtime not installed; install: the MemryX SDK*",
        "*SKIPPED*needs coral*pycoral and libedgetpu*",
        "*SKIPPED*needs openvino:NPU: no 'NPU' device among*CPU*",
    ])


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
