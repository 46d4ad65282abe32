"""Every async test (modules set ``pytestmark = pytest.mark.anyio``) runs under the default
asyncio loop and under uvloop (modules that override ``anyio_backend`` with
``aioaccel.pytest_plugin.backends()`` run under trio too), with a timeout, and
fails if a loop callback raised unnoticed or if an aioaccel thread outlived it."""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
import time

import pytest

from aioaccel.core.async_library import library_name

#: a hang guard only: generous, as an async test that deploys to Ray Serve spent 29 s in the
#: deploy alone on a loaded 2-core machine (the waits a test proves bounded bound themselves)
ASYNC_TEST_TIMEOUT = 120.0

LOOPS = [pytest.param(("asyncio", {"use_uvloop": False}), id="asyncio")]
try:
    import uvloop  # noqa: F401

    LOOPS.append(pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"))
except ImportError:  # pragma: no cover - uvloop is part of the test extra
    pass


@pytest.fixture(params=LOOPS)
def anyio_backend(request: pytest.FixtureRequest) -> object:
    return request.param


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function):  # type: ignore[no-untyped-def]
    test = pyfuncitem.obj
    if inspect.iscoroutinefunction(test):

        @functools.wraps(test)
        async def guarded(*args: object, **kwargs: object) -> None:
            if library_name() == "trio":  # a callback that raises ends the trio run itself
                import trio

                with trio.fail_after(ASYNC_TEST_TIMEOUT):
                    await test(*args, **kwargs)
                return
            loop = asyncio.get_running_loop()
            errors: list[dict[str, object]] = []
            previous = loop.get_exception_handler()
            loop.set_exception_handler(lambda _loop, context: errors.append(context))
            try:
                async with asyncio.timeout(ASYNC_TEST_TIMEOUT):
                    await test(*args, **kwargs)
            finally:
                loop.set_exception_handler(previous)
            assert not errors, f"loop callbacks raised unnoticed: {errors}"

        pyfuncitem.obj = guarded
    return (yield)


@pytest.fixture(autouse=True)
def no_thread_left():  # type: ignore[no-untyped-def]
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5.0
    extra = [t for t in threading.enumerate() if t not in before and t.name.startswith("aioaccel-")]
    for t in extra:
        t.join(max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in extra if t.is_alive()]
    assert not alive, f"threads left behind: {alive}"
