"""One Open Inference Protocol request through a runner, for the REST and the gRPC server.

* A request with several rows for a model that takes one row per call is one bulk submission
  of its rows (:func:`submit_rows`); with ``--batch`` the runner's batcher groups them with
  other clients' items. A model with a dynamic batch dimension takes the rows as one item.
* ``"priority"`` (a request parameter, an integer; aioaccel's convention: higher is served
  first, 0 is the default) runs the request as a stream of that priority
  (``runner.stream(key, priority=...)``): when the runner is full, freed slots go to it first.
* Cancellation (the client went away) withdraws the request's items that no worker has taken;
  a row that fails cancels the request's other rows.
* Errors map to the protocol's statuses in :func:`problem`: bad input 400, overload or a model
  not ready 503 with ``Retry-After``, a runtime failure 500 with an error id (the detail is
  logged, not sent).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import InferTimeout, InputError, RunnerClosed, WouldBlock
from ..integrations.http import problem_for
from .v2_tensors import InferRequest, join_rows, name_outputs, split_rows

if TYPE_CHECKING:
    import numpy as np

    from ..runner import Runner

__all__ = ["Problem", "UnknownModel", "problem", "run_request", "submit_rows"]

_stream_ids = itertools.count()


class UnknownModel(LookupError):
    """No model of that name (or version) is served: 404 / ``NOT_FOUND``."""


@dataclass(frozen=True)
class Problem:
    """A protocol error: HTTP status (the gRPC server maps it to a code), message, headers."""

    status: int
    message: str
    headers: dict[str, str]


def problem(exc: BaseException, retry_after: float) -> Problem | None:
    """The answer for an error, or None for anything else (a bug: logged, generic 500)."""
    if isinstance(exc, UnknownModel):
        return Problem(404, exc.args[0] if exc.args else "unknown model", {})
    if isinstance(exc, InputError):
        return Problem(400, str(exc), {})
    found = problem_for(exc, retry_after)
    if found is None:
        return None
    return Problem(400 if found.status == 422 else found.status, found.message,
                   dict(found.headers))


async def run_request(runner: Runner, request: InferRequest, *,
                      timeout: float | None,  # noqa: ASYNC109 - also the request's own
                      admit_timeout: float | None) -> dict[str, np.ndarray]:
    """The request's outputs by name (rows joined back when it was split)."""
    priority = request.priority()
    wanted = request.timeout()
    if wanted is not None:
        timeout = wanted if timeout is None else min(timeout, wanted)
    rows = split_rows(request.inputs, runner.inputs)
    items: list[Any] = rows if rows is not None else [request.inputs]
    if runner.inputs is None and len(request.inputs) == 1:
        # a model without an input spec (a Python callable) takes its one input as it is
        items = [next(iter(item.values())) for item in items]
    try:
        async with asyncio.timeout(timeout):
            if priority:
                results = await _prioritized(runner, items, priority, admit_timeout)
            else:
                results = await submit_rows(runner, items, admit_timeout=admit_timeout)
    except TimeoutError as exc:
        if isinstance(exc, WouldBlock | InferTimeout):
            raise
        raise InferTimeout(f"no result within {timeout} s from model {runner.name!r}"
                           ) from None
    named = [name_outputs(result, runner.outputs) for result in results]
    return join_rows(named) if rows is not None else named[0]


async def submit_rows(runner: Runner, items: Sequence[Any], *,
                      admit_timeout: float | None) -> list[Any]:
    """Every item's outputs, in order, submitted together; the first failure cancels the rest
    (their items are withdrawn) and is raised.

    ``runner.infer_many`` (one admission for the whole request) takes over here where the core
    has it; until then each row is an ``infer`` of its own, all awaited together, which the
    batcher groups all the same."""
    if len(items) == 1:
        return [await runner.infer(items[0], admit_timeout=admit_timeout)]
    tasks: list[asyncio.Task[Any]] = []
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(runner.infer(item, admit_timeout=admit_timeout))
                     for item in items]
    except BaseExceptionGroup as group_error:
        raise _first(group_error) from None
    return [task.result() for task in tasks]


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error a request answers with, from the errors of its rows: bad input first (it is
    the client's to fix), then whatever came."""
    leaves = list(_leaves(group))
    for leaf in leaves:
        if isinstance(leaf, InputError):
            return leaf
    return leaves[0]


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


async def _prioritized(runner: Runner, items: Sequence[Any], priority: int,
                       admit_timeout: float | None) -> list[Any]:
    """The items through a stream of their own with ``priority``; withdrawn if cancelled."""
    try:
        stream = runner.stream(("aioaccel-v2", next(_stream_ids)), priority=priority)
    except ValueError as exc:  # a runner with a stream limit (MemryX), or a bad priority
        raise InputError(f"parameter 'priority' cannot be served: {exc}") from None
    except RuntimeError as exc:  # not open
        raise RunnerClosed(str(exc)) from None
    try:
        for item in items:
            try:
                async with asyncio.timeout(admit_timeout):
                    await stream.push(item)
            except TimeoutError as exc:
                if isinstance(exc, WouldBlock | InferTimeout):
                    raise
                raise WouldBlock(f"model {runner.name!r} stayed full for {admit_timeout} s"
                                 ) from None
        stream.close()
        results = []
        async for result in stream:
            results.append(result.outputs)  # raises the item's InferenceError
            if len(results) == len(items):
                break
        return results
    except BaseException:
        stream.withdraw()
        raise
    finally:
        stream.close()
