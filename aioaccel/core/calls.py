"""``infer`` with a deadline: the runner's ``infer`` runs its common call (no ``timeout``, no
``admit_timeout``) inline, with no inner coroutine; a call with either bound comes here."""

from __future__ import annotations

from typing import Any

from ..errors import AccelError, InferTimeout, WouldBlock

__all__ = ["infer_bounded"]

#: the runner (typed loosely: this module must not import the runner)
Runner = Any


async def infer_bounded(runner: Runner, inputs: Any, timeout: float | None,  # noqa: ASYNC109
                        admit_timeout: float | None) -> Any:
    if timeout is None:
        return await _infer(runner, inputs, admit_timeout)
    try:
        async with runner._opened_hub().timeout(timeout):
            return await _infer(runner, inputs, admit_timeout)
    except TimeoutError as exc:
        if isinstance(exc, AccelError):
            raise
        raise InferTimeout(f"no result within {timeout} s from runner {runner.name!r}") from None


async def _infer(runner: Runner, inputs: Any, admit_timeout: float | None) -> Any:
    lane = runner._lane
    sup = runner._sup
    sup.check_accepting(lane)
    prepare = sup.prepare
    if prepare is not None:
        inputs = prepare(inputs)
    if admit_timeout is None:
        await runner._admit(lane)
    else:
        try:
            async with runner._opened_hub().timeout(admit_timeout):
                await runner._admit(lane)
        except TimeoutError as exc:
            if isinstance(exc, AccelError):
                raise
            raise WouldBlock(f"runner {runner.name!r} stayed full for {admit_timeout} s "
                             f"(maxsize={runner._maxsize}, {len(lane.waiters)} waiting)"
                             ) from None
    future = sup.new_future()
    ticket = runner._enqueue(lane, inputs, None, future)
    try:
        return await future
    except sup.cancelled:
        runner._done.give_up(ticket)
        raise
