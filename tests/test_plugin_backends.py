"""The pytest plugin's backend parameter: a suite's own async tests on asyncio, uvloop and trio
(``backends()`` for a conftest, ``--accel-backends`` / ``accel_backends`` without one)."""

from __future__ import annotations

import pytest

from aioaccel.pytest_plugin import backends

USER_TESTS = '''
import sniffio
import pytest

import aioaccel

pytestmark = pytest.mark.anyio
SEEN = []


async def test_a_runner_on_this_library(anyio_backend):
    async with aioaccel.open(lambda x: x + 1) as runner:
        assert await runner.infer(1) == 2
    SEEN.append(sniffio.current_async_library())


async def test_the_fixture_runner_too(accel_runner):
    assert await accel_runner.infer(5) == 5


def test_zz_each_library_ran():
    print("SEEN", sorted(SEEN))
'''

CONFTEST = '''
import pytest

from aioaccel.pytest_plugin import backends


@pytest.fixture(params=backends())
def anyio_backend(request):
    return request.param
'''


def test_a_conftest_with_backends_runs_each_test_on_the_three(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-v", "-s", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=7)
    result.stdout.fnmatch_lines([
        "*test_a_runner_on_this_library?asyncio? PASSED*",
        "*test_a_runner_on_this_library?uvloop? PASSED*",
        "*test_a_runner_on_this_library?trio? PASSED*",
        "*test_the_fixture_runner_too?trio? PASSED*",
        "*SEEN ?'asyncio', 'asyncio', 'trio'?*",
    ])


@pytest.mark.parametrize("how", [["--accel-backends=asyncio,trio"],
                                 ["-o", "accel_backends=asyncio trio"]],
                         ids=["option", "ini"])
def test_the_option_runs_a_suite_on_the_libraries_it_names(pytester: pytest.Pytester,
                                                           how: list[str]) -> None:
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-v", "-s", "-p", "no:cacheprovider", *how)
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines([
        "*test_a_runner_on_this_library?asyncio? PASSED*",
        "*test_a_runner_on_this_library?trio? PASSED*",
        "*SEEN ?'asyncio', 'trio'?*",
    ])
    result.stdout.no_fnmatch_line("*uvloop*")


def test_an_unknown_backend_name_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown backend 'curio'.*asyncio.*trio.*uvloop"):
        backends("curio")


def test_a_library_that_is_not_installed_skips_saying_what_to_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "trio" else real(name, *a))
    asyncio_param, trio_param = backends("asyncio", "trio")
    assert not asyncio_param.marks
    assert trio_param.id == "trio" and trio_param.values == ("trio",)
    (mark,) = trio_param.marks
    assert mark.name == "skip" and "pip install 'aioaccel[trio]'" in mark.kwargs["reason"]
