"""The loop-agnostic layer (aioaccel.core.async_library) on asyncio, uvloop and trio:
waiters, wake-ups from threads, timers, tasks, timeouts, shields."""

from __future__ import annotations

import logging
import threading

import anyio
import anyio.lowlevel
import pytest

from aioaccel.core.async_library import Flag, current_hub, library_name
from aioaccel.pytest_plugin import backends

pytestmark = pytest.mark.anyio


@pytest.fixture(params=backends())
def anyio_backend(request: pytest.FixtureRequest) -> object:
    return request.param


def expected_library(anyio_backend: object) -> str:
    return "trio" if anyio_backend == "trio" else "asyncio"


async def test_the_hub_is_the_running_library(anyio_backend: object) -> None:
    hub = current_hub()
    assert hub.library == library_name() == expected_library(anyio_backend)
    assert (hub.loop is None) == (hub.library == "trio")
    assert not hub.closed()
    caught: list[BaseException] = []
    with anyio.CancelScope() as scope:
        scope.cancel()
        try:
            await anyio.sleep(1)
        except BaseException as exc:
            caught.append(exc)
            raise
    assert scope.cancelled_caught and isinstance(caught[0], hub.cancelled)


def test_outside_a_loop_the_error_says_what_is_needed() -> None:
    assert library_name() is None
    with pytest.raises(RuntimeError, match=r"asyncio.*trio.*anyio"):
        current_hub()


async def test_a_waiter_wakes_its_task_with_a_result_or_an_exception() -> None:
    hub = current_hub()
    fut = hub.create_future()
    got: list[object] = []

    async def wait() -> None:
        got.append(await fut)

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        await anyio.wait_all_tasks_blocked()
        assert not fut.done() and not got
        fut.set_result(7)
    assert got == [7] and fut.done() and fut.result() == 7 and fut.exception() is None

    failing = hub.create_future()
    failing.set_exception(ValueError("boom"))
    with pytest.raises(ValueError, match="boom"):
        await failing
    assert isinstance(failing.exception(), ValueError)


async def test_a_cancelled_awaiting_task_cancels_its_waiter_but_not_a_shielded_one() -> None:
    hub = current_hub()
    fut = hub.create_future()
    with anyio.move_on_after(0.01) as scope:
        await fut
    assert scope.cancelled_caught and fut.cancelled()

    shielded = hub.create_future()
    with anyio.move_on_after(0.01) as scope:
        await hub.shield(shielded)
    assert scope.cancelled_caught and not shielded.done()
    shielded.set_result(None)


async def test_a_thread_wakes_the_loop() -> None:
    hub = current_hub()
    fut = hub.create_future()
    thread = threading.Thread(target=hub.call_soon_threadsafe, args=(fut.set_result, 42))
    with anyio.fail_after(5):
        thread.start()
        assert await fut == 42
    thread.join()


async def test_a_callback_that_raises_is_logged_and_the_loop_goes_on(
        caplog: pytest.LogCaptureFixture, anyio_backend: object) -> None:
    if anyio_backend != "trio":
        pytest.skip("asyncio's loop reports it through its exception handler (conftest)")
    hub = current_hub()
    fut = hub.create_future()

    def boom() -> None:
        raise ValueError("callback bug")

    with caplog.at_level(logging.ERROR, "aioaccel"):
        hub.call_soon_threadsafe(boom)
        hub.call_soon_threadsafe(fut.set_result, "after")
        with anyio.fail_after(5):
            assert await fut == "after"
    assert "callback bug" in caplog.text


async def test_timers_fire_and_cancelled_ones_do_not() -> None:
    hub = current_hub()
    fired = hub.create_future()
    never: list[int] = []
    handle = hub.call_later(0.005, never.append, 1)
    hub.call_later(0.02, fired.set_result, "tick")
    handle.cancel()
    with anyio.fail_after(5):
        assert await fired == "tick"
    assert never == []


async def test_spawned_tasks_run_and_cancel_and_join() -> None:
    hub = current_hub()
    started = Flag()
    steps: list[str] = []

    async def work() -> None:
        started.set()
        try:
            await anyio.sleep(10)
        finally:
            steps.append("cleaned up")

    task = hub.spawn(work(), name="aioaccel-test-task")
    with anyio.fail_after(5):
        await started.wait(hub)
        assert not task.done()
        task.cancel()
        await hub.join(task)
    assert task.done() and steps == ["cleaned up"]


async def test_a_thread_runs_a_coroutine_on_the_loop() -> None:
    hub = current_hub()

    async def answer() -> int:
        await anyio.lowlevel.checkpoint()
        return 42

    async def fail() -> None:
        raise KeyError("nope")

    outcomes: list[object] = []

    def from_thread() -> None:
        outcomes.append(hub.run_threadsafe(answer).result(5))
        try:
            hub.run_threadsafe(fail).result(5)
        except KeyError as exc:
            outcomes.append(exc)

    with anyio.fail_after(10):
        await anyio.to_thread.run_sync(from_thread)
    assert outcomes[0] == 42 and isinstance(outcomes[1], KeyError)


async def test_timeout_wait_and_shielded() -> None:
    hub = current_hub()
    with pytest.raises(TimeoutError):
        async with hub.timeout(0.01):
            await anyio.sleep(5)
    async with hub.timeout(5):
        await anyio.lowlevel.checkpoint()
    async with hub.timeout(None):
        await anyio.lowlevel.checkpoint()

    fut = hub.create_future()
    assert await hub.wait(fut, 0.01) is False and not fut.done()
    hub.call_later(0.005, fut.set_result, None)
    assert await hub.wait(fut, 5) is True

    finished: list[str] = []

    async def cleanup() -> str:
        await anyio.sleep(0.02)
        finished.append("done")
        return "ok"

    with anyio.move_on_after(0.001):
        assert await hub.shielded(cleanup()) == "ok"
    if hub.library == "trio":  # a shielded scope: the caller waited for it
        assert finished == ["done"]
    else:  # asyncio.shield: the caller may leave, the coroutine goes on
        await anyio.sleep(0.05)
        assert finished == ["done"]


async def test_gather_collects_results_in_order_and_exceptions_when_asked() -> None:
    hub = current_hub()

    async def value(v: int, delay: float) -> int:
        await anyio.sleep(delay)
        return v

    async def fail() -> int:
        raise ValueError("one failed")

    assert await hub.gather(value(1, 0.01), value(2, 0.0)) == [1, 2]
    out = await hub.gather(value(1, 0.0), fail(), return_exceptions=True)
    assert out[0] == 1 and isinstance(out[1], ValueError)
    with pytest.raises(ValueError, match="one failed"):
        await hub.gather(value(1, 0.0), fail())


async def test_a_flag_can_be_set_cleared_and_waited_for_with_a_bound() -> None:
    hub = current_hub()
    flag = Flag(True)
    assert await flag.wait(hub) is True
    flag.clear()
    assert await flag.wait(hub, 0.01) is False
    hub.call_later(0.005, flag.set)
    with anyio.fail_after(5):
        assert await flag.wait(hub) is True
    flag.clear()
    with anyio.move_on_after(0.01):
        await flag.wait(hub)
    assert not flag.is_set() and not flag._waiters  # a cancelled wait leaves nothing behind
