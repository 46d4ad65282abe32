"""The few event-loop operations the core needs, on whichever async library is running.

aioaccel's core touches the event loop through one :class:`Hub`, chosen once when a runner
opens (:func:`current_hub`), never per item:

* :class:`AsyncioHub` -- asyncio and uvloop (and anyio's asyncio backend). Its hot-path
  members *are* the loop's own bound methods (``loop.create_future``,
  ``loop.call_soon_threadsafe``), so the asyncio path costs what it cost before;
* :class:`TrioHub` -- trio (``trio.run`` and ``anyio.run(..., backend="trio")``). A worker
  thread wakes the run with ``TrioToken.run_sync_soon``; waiters are :class:`TrioFuture`, a
  future with asyncio's interface that parks the awaiting trio task directly
  (``wait_task_rescheduled`` / ``reschedule``); cancellation is trio's (``trio.Cancelled``,
  cancel scopes, ``move_on_after`` / ``fail_after``).

What the core asks of a hub -- the loop side of everything, none of it called per item except
``create_future`` and ``call_soon_threadsafe``:

==========================  ================================================================
``create_future()``          a waiter: ``done``, ``cancelled``, ``set_result``,
                             ``set_exception``, ``result``, ``exception``, ``await``.
                             A task cancelled while awaiting it cancels it (asyncio's rule).
``call_soon_threadsafe``     run a callback on the loop, from any thread (RuntimeError once the
                             loop is gone)
``call_later``               a timer on the loop; ``.cancel()``
``spawn``                    a task owned by the runner, from synchronous loop code
                             (recovery, a pool's member readers); ``cancel`` / ``done`` /
                             ``await hub.join(task)``
``run_threadsafe``           run a coroutine on the loop from another thread; a
                             ``concurrent.futures.Future``
``closed`` / ``running``     from any thread: the loop is closed / still running
``timeout``                  ``async with hub.timeout(s)``: TimeoutError past ``s`` seconds
``wait``                     wait (bounded) for a waiter without cancelling it
``shield`` / ``shielded``    await a waiter / a coroutine that the caller's cancellation
                             must not cut short
``sleep``, ``gather``        as asyncio's
``cancelled``                the exception class cancellation raises here
==========================  ================================================================

Neither trio nor anyio is imported unless the running library is trio.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sys
from collections.abc import Awaitable, Callable, Coroutine, Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

if TYPE_CHECKING:
    import trio

__all__ = ["AsyncioHub", "Flag", "Hub", "TrioFuture", "TrioHub", "Waiter", "current_hub",
           "library_name"]

log = logging.getLogger("aioaccel")

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Waiter(Protocol[T]):
    """What the core uses of a future (``asyncio.Future`` has it; so has :class:`TrioFuture`)."""

    def done(self) -> bool: ...
    def cancelled(self) -> bool: ...
    def cancel(self, msg: Any | None = None) -> bool: ...
    def set_result(self, result: T, /) -> None: ...
    def set_exception(self, exception: type | BaseException, /) -> None: ...
    def result(self) -> T: ...
    def exception(self) -> BaseException | None: ...
    def __await__(self) -> Generator[Any, None, T]: ...


class Cancellable(Protocol):
    def cancel(self) -> Any: ...


class TaskHandle(Protocol):
    """A task spawned with :meth:`Hub.spawn`."""

    def cancel(self) -> Any: ...
    def done(self) -> bool: ...


class Hub(Protocol):
    """The running async library, as the core sees it (see the module doc)."""

    library: str
    cancelled: type[BaseException]
    loop: asyncio.AbstractEventLoop | None  # the asyncio loop; None on trio

    def create_future(self) -> Waiter[Any]: ...
    def call_soon_threadsafe(self, callback: Callable[..., object], *args: Any) -> Any: ...
    def call_soon(self, callback: Callable[..., object], *args: Any) -> Any: ...
    def call_later(self, delay: float, callback: Callable[..., object],
                   *args: Any) -> Cancellable: ...
    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> TaskHandle: ...
    async def join(self, *tasks: TaskHandle) -> None: ...
    def run_threadsafe(self, coro_fn: Callable[[], Coroutine[Any, Any, T]]
                       ) -> concurrent.futures.Future[T]: ...
    def closed(self) -> bool: ...
    def running(self) -> bool: ...
    def timeout(self, seconds: float | None) -> Any: ...
    async def wait(self, waiter: Waiter[Any], seconds: float | None) -> bool: ...
    def shield(self, waiter: Waiter[T]) -> Awaitable[T]: ...
    async def shielded(self, aw: Awaitable[T]) -> T: ...
    async def sleep(self, seconds: float) -> None: ...
    async def gather(self, *aws: Awaitable[Any], return_exceptions: bool = False
                     ) -> list[Any]: ...


def library_name() -> str | None:
    """``"trio"`` or ``"asyncio"`` for the library running the current task, else None."""
    if "trio" in sys.modules and "sniffio" in sys.modules:
        # trio (which needs sniffio) marks its tasks for sniffio; trio's guest mode runs
        # inside an asyncio loop, so trio must be asked first
        import sniffio

        try:
            if sniffio.current_async_library() == "trio":
                return "trio"
        except sniffio.AsyncLibraryNotFoundError:
            pass
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return None
    return "asyncio"


def current_hub() -> Hub:
    """The hub of the running async library (called once per runner, at open)."""
    name = library_name()
    if name == "asyncio":
        return AsyncioHub(asyncio.get_running_loop())
    if name == "trio":
        return TrioHub()
    raise RuntimeError("aioaccel needs a running event loop: call it from asyncio "
                       "(asyncio.run, uvloop), trio (trio.run) or anyio (anyio.run)")


# ---- asyncio ---------------------------------------------------------------------------------
class AsyncioHub:
    """asyncio and uvloop: the loop's own methods, bound once."""

    library = "asyncio"
    cancelled: type[BaseException] = asyncio.CancelledError

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop: asyncio.AbstractEventLoop | None = loop
        # the hot path calls these: the loop's bound methods, no wrapper in between
        self.create_future: Callable[[], Waiter[Any]] = loop.create_future
        self.call_soon_threadsafe: Callable[..., Any] = loop.call_soon_threadsafe
        self.call_soon: Callable[..., Any] = loop.call_soon
        self.call_later: Callable[..., Cancellable] = loop.call_later
        self._loop = loop

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> TaskHandle:
        return self._loop.create_task(coro, name=name)

    async def join(self, *tasks: TaskHandle) -> None:
        pending: list[Any] = list(tasks)
        await asyncio.gather(*pending, return_exceptions=True)

    def run_threadsafe(self, coro_fn: Callable[[], Coroutine[Any, Any, T]]
                       ) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro_fn(), self._loop)

    def closed(self) -> bool:
        return self._loop.is_closed()

    def running(self) -> bool:
        return self._loop.is_running()

    def timeout(self, seconds: float | None) -> asyncio.Timeout:
        return asyncio.timeout(seconds)

    async def wait(self, waiter: Waiter[Any], seconds: float | None) -> bool:
        try:
            await asyncio.wait_for(asyncio.shield(waiter), seconds)
        except TimeoutError:
            return False
        return True

    def shield(self, waiter: Waiter[T]) -> Awaitable[T]:
        return asyncio.shield(waiter)

    async def shielded(self, aw: Awaitable[T]) -> T:
        return await asyncio.shield(aw)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def gather(self, *aws: Awaitable[Any], return_exceptions: bool = False) -> list[Any]:
        return list(await asyncio.gather(*aws, return_exceptions=return_exceptions))


# ---- trio ------------------------------------------------------------------------------------
_PENDING, _FINISHED, _CANCELLED = 0, 1, 2


class TrioFuture(Generic[T]):
    """A future with asyncio's interface for trio tasks (only touched in the trio thread).

    Awaiting it parks the task (``wait_task_rescheduled``) until a result, an exception or a
    cancellation; settling it reschedules every task parked on it. A trio cancellation of the
    one task awaiting it cancels it, as a cancelled asyncio task cancels the future it awaits
    (admission relies on that: a cancelled waiter is skipped, a settled one passes its slot
    on); :meth:`watch` waits without that (``asyncio.shield``).
    """

    __slots__ = ("_callbacks", "_exception", "_result", "_state", "_tasks")

    def __init__(self) -> None:
        self._state = _PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._tasks: list[trio.lowlevel.Task] = []
        self._callbacks: list[Callable[[TrioFuture[T]], object]] | None = None

    def done(self) -> bool:
        return self._state != _PENDING

    def cancelled(self) -> bool:
        return self._state == _CANCELLED

    def set_result(self, result: T, /) -> None:
        if self._state != _PENDING:
            raise asyncio.InvalidStateError(f"{self!r} is already settled")
        self._result = result
        self._state = _FINISHED
        self._settled()

    def set_exception(self, exception: type | BaseException, /) -> None:
        if self._state != _PENDING:
            raise asyncio.InvalidStateError(f"{self!r} is already settled")
        self._exception = exception() if isinstance(exception, type) else exception
        self._state = _FINISHED
        self._settled()

    def cancel(self, msg: Any | None = None) -> bool:
        if self._state != _PENDING:
            return False
        self._state = _CANCELLED
        self._settled()
        return True

    def result(self) -> T:
        if self._state == _CANCELLED:
            raise asyncio.CancelledError
        if self._state == _PENDING:
            raise asyncio.InvalidStateError("the result is not set yet")
        if self._exception is not None:
            raise self._exception
        return self._result  # type: ignore[no-any-return]

    def exception(self) -> BaseException | None:
        if self._state == _CANCELLED:
            raise asyncio.CancelledError
        if self._state == _PENDING:
            raise asyncio.InvalidStateError("the exception is not set yet")
        return self._exception

    def add_done_callback(self, callback: Callable[[TrioFuture[T]], object]) -> None:
        if self._state != _PENDING:
            callback(self)
        elif self._callbacks is None:
            self._callbacks = [callback]
        else:
            self._callbacks.append(callback)

    def _settled(self) -> None:
        if self._tasks:
            from trio.lowlevel import reschedule

            tasks, self._tasks = self._tasks, []
            for task in tasks:
                reschedule(task)
        if self._callbacks:
            callbacks, self._callbacks = self._callbacks, None
            for callback in callbacks:
                callback(self)

    async def _park(self, cancels: bool) -> None:
        from trio.lowlevel import Abort, current_task, wait_task_rescheduled

        task = current_task()
        self._tasks.append(task)

        def abort(_: Any) -> Abort:
            self._tasks.remove(task)
            if cancels and not self._tasks and self._state == _PENDING:
                self._state = _CANCELLED
                self._settled()
            return Abort.SUCCEEDED

        await wait_task_rescheduled(abort)

    def __await__(self) -> Generator[Any, None, T]:
        if self._state == _PENDING:
            yield from self._park(True).__await__()
        return self.result()

    async def watch(self) -> T:
        """Wait for the outcome; a cancellation of the caller leaves the future pending."""
        if self._state == _PENDING:
            await self._park(False)
        return self.result()

    def __repr__(self) -> str:
        state = {_PENDING: "pending", _FINISHED: "finished", _CANCELLED: "cancelled"}
        return f"<TrioFuture {state[self._state]}>"


class _TrioTask:
    """A system task with a cancel scope of its own (trio has no task handles)."""

    __slots__ = ("_end", "_scope")

    def __init__(self, scope: trio.CancelScope):
        self._scope = scope
        self._end: TrioFuture[None] = TrioFuture()

    def cancel(self) -> None:
        self._scope.cancel()

    def done(self) -> bool:
        return self._end.done()


class _TrioTimeout:
    """``async with hub.timeout(s)`` on trio: a ``move_on_after`` that raises TimeoutError."""

    __slots__ = ("_scope",)

    def __init__(self, scope: trio.CancelScope):
        self._scope = scope

    async def __aenter__(self) -> _TrioTimeout:
        self._scope.__enter__()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool:
        suppressed = self._scope.__exit__(exc_type, exc, tb)
        if self._scope.cancelled_caught:
            raise TimeoutError
        return bool(suppressed)


class _Nothing:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc_info: object) -> bool:
        return False


def _guarded(callback: Callable[..., object], args: tuple[Any, ...]) -> None:
    """A callback on the trio run: an exception is logged (an asyncio loop logs it too),
    never raised into trio, which would end the whole run."""
    try:
        callback(*args)
    except Exception:
        log.exception("aioaccel: callback %r raised", callback)


class TrioHub:
    """trio: ``TrioToken.run_sync_soon`` for wake-ups, :class:`TrioFuture` for waiters, system
    tasks for what the runner owns, trio's cancel scopes for timeouts."""

    library = "trio"
    loop: asyncio.AbstractEventLoop | None = None

    def __init__(self) -> None:
        import trio

        self._trio = trio
        self._token = trio.lowlevel.current_trio_token()
        self.cancelled: type[BaseException] = trio.Cancelled
        self.create_future: Callable[[], Waiter[Any]] = TrioFuture
        run_sync_soon = self._token.run_sync_soon

        def call_soon_threadsafe(callback: Callable[..., object], *args: Any) -> None:
            run_sync_soon(_guarded, callback, args)

        self.call_soon_threadsafe = call_soon_threadsafe
        self.call_soon = call_soon_threadsafe

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> TaskHandle:
        handle = _TrioTask(self._trio.CancelScope())

        async def run() -> None:
            try:
                with handle._scope:
                    await coro
            except Exception:
                log.exception("aioaccel: task %s failed", name or coro)
            finally:
                handle._end.set_result(None)

        self._trio.lowlevel.spawn_system_task(run, name=name or repr(coro))
        return handle

    async def join(self, *tasks: TaskHandle) -> None:
        for task in tasks:
            assert isinstance(task, _TrioTask)
            await task._end.watch()

    def call_later(self, delay: float, callback: Callable[..., object],
                   *args: Any) -> Cancellable:
        async def fire() -> None:
            await self._trio.sleep(delay)
            callback(*args)

        return self.spawn(fire(), name=f"aioaccel timer {callback!r}")

    def run_threadsafe(self, coro_fn: Callable[[], Coroutine[Any, Any, T]]
                       ) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        async def run() -> None:
            try:
                result = await coro_fn()
            except BaseException as exc:
                future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
            else:
                future.set_result(result)

        def start() -> None:
            if future.set_running_or_notify_cancel():
                self._trio.lowlevel.spawn_system_task(run, name=f"aioaccel {coro_fn!r}")

        self._token.run_sync_soon(start)  # RunFinishedError (a RuntimeError): the run ended
        return future

    def closed(self) -> bool:
        try:
            self._token.run_sync_soon(_noop)  # the only way to ask a trio run from outside
        except RuntimeError:
            return True
        return False

    def running(self) -> bool:
        return not self.closed()

    def timeout(self, seconds: float | None) -> Any:
        if seconds is None:
            return _Nothing()
        return _TrioTimeout(self._trio.move_on_after(seconds))

    async def wait(self, waiter: Waiter[Any], seconds: float | None) -> bool:
        assert isinstance(waiter, TrioFuture)
        with self._trio.move_on_after(float("inf") if seconds is None else seconds):
            await waiter.watch()
        return waiter.done()

    def shield(self, waiter: Waiter[T]) -> Awaitable[T]:
        assert isinstance(waiter, TrioFuture)
        return waiter.watch()

    async def shielded(self, aw: Awaitable[T]) -> T:
        with self._trio.CancelScope(shield=True):
            result = await aw
        return result

    async def sleep(self, seconds: float) -> None:
        await self._trio.sleep(seconds)

    async def gather(self, *aws: Awaitable[Any], return_exceptions: bool = False) -> list[Any]:
        """Run ``aws`` concurrently (system tasks: no nursery, so an exception comes out as
        itself, as from ``asyncio.gather``). Cancelled, it cancels them."""
        results: list[Any] = [None] * len(aws)
        errors: list[BaseException] = []

        async def one(i: int, aw: Awaitable[Any]) -> None:
            try:
                results[i] = await aw
            except Exception as exc:
                results[i] = exc
                errors.append(exc)

        tasks = [self.spawn(one(i, aw)) for i, aw in enumerate(aws)]
        try:
            await self.join(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        if errors and not return_exceptions:
            raise errors[0]
        return results


def _noop() -> None:
    pass


class Flag:
    """An event that can be cleared, over a hub's waiters (``asyncio.Event`` for both
    libraries; ``trio.Event`` cannot be cleared). Made before the hub is known."""

    __slots__ = ("_set", "_waiters")

    def __init__(self, value: bool = False):
        self._set = value
        self._waiters: list[Waiter[None]] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self, hub: Hub | None = None, seconds: float | None = None) -> bool:
        """Wait until set (True), or ``seconds`` have passed (False); ``hub``: the running
        library's (found when not given)."""
        if self._set:
            return True
        if hub is None:
            hub = current_hub()
        waiter: Waiter[None] = hub.create_future()
        self._waiters.append(waiter)
        try:
            if seconds is None:
                await waiter
                return True
            return await hub.wait(waiter, seconds)
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
