"""What both web integrations share: bodies to inputs, outputs to bodies, errors to statuses.

Bodies:

* ``application/json``: ``{"inputs": ...}`` or the bare value, where the value is one nested
  list (a one-input model) or an object ``{input name: nested list}``. JSON has no dtypes, so
  lists become arrays of the model's input dtype (from the runner's input spec).
* ``application/x-npy`` (or ``application/octet-stream``): one ``.npy`` array, loaded with
  ``allow_pickle=False``; its dtype must be the model's (no silent casts).

Responses are JSON (``{"outputs": {name: nested list}}``) unless the client prefers
``application/x-npy`` (a single output) in ``Accept``, weights (``;q=``) honoured
(:mod:`.negotiation`; a header that refuses both gets 406 before the model runs). JSON out
is strict (RFC 8259): NaN and infinities in outputs are written as ``null``.

Hostile bodies get a 4xx, never a 500 (see :mod:`.bodies`): bodies are read within
``body_timeout`` seconds (else 408), bodies over ``OFF_LOOP_BYTES`` are decoded on a thread so
that the loop keeps answering, and a runtime failure answers a generic message with an error id
that the server log repeats with the detail.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Collection, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import (
    AccelError,
    DeviceError,
    InferenceError,
    InferTimeout,
    InputError,
    RunnerClosed,
    WouldBlock,
)
from . import bodies
from .negotiation import NotAcceptable, acceptable

if TYPE_CHECKING:
    from ..runner import Runner

__all__ = [
    "CLIENT_CLOSED",
    "DEFAULT_BODY_TIMEOUT",
    "DEFAULT_MAX_BODY",
    "NPY",
    "OFF_LOOP_BYTES",
    "HTTPProblem",
    "NotAcceptable",
    "acceptable",
    "decode_inputs",
    "decode_inputs_off_loop",
    "encode_outputs",
    "problem_for",
]

NPY = bodies.NPY
#: status logged for a request whose client went away (nginx's convention; never sent)
CLIENT_CLOSED = 499
#: request body cap (bytes) unless the app sets its own
DEFAULT_MAX_BODY = 16 * 1024 * 1024
#: seconds a client has to send its whole body (else 408) unless the app sets its own
DEFAULT_BODY_TIMEOUT = 30.0
#: bodies larger than this are decoded on a thread, not on the event loop
OFF_LOOP_BYTES = 64 * 1024

log = logging.getLogger("aioaccel.http")


@dataclass(frozen=True)
class HTTPProblem:
    """An HTTP answer for an error: status, message, extra headers."""

    status: int
    message: str
    headers: Mapping[str, str]


class AccelBase:
    """What both frameworks' ``Accel`` share: the named runners, their settings, opening and
    closing them together, health and metrics. Keyword arguments name the runners."""

    def __init__(self, *, admit_timeout: float = 1.0, retry_after: float = 1.0,
                 max_body: int = DEFAULT_MAX_BODY, timeout: float | None = None,
                 body_timeout: float = DEFAULT_BODY_TIMEOUT,
                 allowed_origins: Collection[str] | None = None, **runners: Runner):
        if not runners:
            raise ValueError("Accel needs at least one runner, e.g. Accel(default=aioaccel."
                             "open(...))")
        self.runners = runners
        self.admit_timeout = admit_timeout
        self.retry_after = retry_after
        self.max_body = max_body
        self.timeout = timeout
        #: seconds a client has to send its whole request body; then 408
        self.body_timeout = body_timeout
        #: browser origins allowed to open WebSocket streams besides the server's own
        #: (``["*"]``: any; None: the server's own only); see :mod:`.streaming`
        if isinstance(allowed_origins, str):
            raise TypeError("allowed_origins takes a list of origins, e.g. "
                            "['https://example.com'], not a string")
        self.allowed_origins = None if allowed_origins is None else tuple(allowed_origins)
        self._collector: Any = None

    @asynccontextmanager
    async def _opened(self) -> AsyncIterator[None]:
        """Open every runner; on exit close them all (``aclose`` drains what was admitted)."""
        async with AsyncExitStack() as stack:
            for runner in self.runners.values():
                await stack.enter_async_context(runner)
            yield

    def _named(self, name: str) -> Runner:
        try:
            return self.runners[name]
        except KeyError:
            raise KeyError(f"no runner named {name!r}; this Accel has "
                           f"{sorted(self.runners)}") from None

    async def _infer_while_connected(self, runner: Runner, inputs: Any,
                                     gone: Awaitable[None]) -> asyncio.Future[Any] | None:
        """Run ``inputs``; the finished ``infer`` task, or None if ``gone`` (the client
        disconnected) came first, in which case the item was withdrawn (or its result will be
        discarded)."""
        work = asyncio.ensure_future(runner.infer(inputs, timeout=self.timeout,
                                                  admit_timeout=self.admit_timeout))
        watch = asyncio.ensure_future(gone)
        try:
            await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not work.done():  # the client left (or we were cancelled): withdraw the item
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        return None if work.cancelled() else work

    def _health(self) -> tuple[int, dict[str, Any]]:
        """(status, body): 200 when every runner is ready, else 503 with each one's state
        (starting, recovering, broken, closed) under ``models`` (the word ``aioaccel serve``
        uses too)."""
        state = {}
        for name, r in self.runners.items():
            health = r.health()
            state[name] = {"open": health.state == "ready", "state": health.state,
                           "restarts": health.restarts, "in_flight": r.stats().in_flight,
                           "maxsize": r.maxsize}
        ok = all(s["open"] for s in state.values())
        return (200 if ok else 503), {"ok": ok, "models": state}

    def _metrics(self) -> tuple[bytes, str]:
        """(body, content type) of the runners' Prometheus metrics (``aioaccel[metrics]``)."""
        from ..metrics import RunnerCollector

        if self._collector is None:
            self._collector = RunnerCollector(*self.runners.values(), registry=None)
        body, content_type = self._collector.exposition()
        return body, content_type


def problem_for(exc: BaseException, retry_after: float) -> HTTPProblem | None:
    """The HTTP answer for an aioaccel error, or None for anything else (a bug: 500).

    Runtime failures (``InferenceError``, ``DeviceError``, other aioaccel errors) answer a
    generic message with an error id; the detail, which may name server paths, is logged with
    that id instead of being sent."""
    retry = {"Retry-After": str(max(1, round(retry_after)))}
    if isinstance(exc, WouldBlock):
        return HTTPProblem(503, f"overloaded: {exc}", retry)
    if isinstance(exc, NotAcceptable):
        return HTTPProblem(406, str(exc), {})
    if isinstance(exc, InputError):
        return HTTPProblem(422, str(exc), {})
    if isinstance(exc, InferTimeout):
        return HTTPProblem(504, str(exc), {})
    if isinstance(exc, RunnerClosed):
        return HTTPProblem(503, f"shutting down: {exc}", retry)
    if isinstance(exc, DeviceError):
        return HTTPProblem(503, f"accelerator unavailable (error id {_logged(exc)})", retry)
    if isinstance(exc, InferenceError):
        return HTTPProblem(500, f"inference failed (error id {_logged(exc)})", {})
    if isinstance(exc, AccelError):
        return HTTPProblem(500, f"internal error (error id {_logged(exc)})", {})
    return None


def _logged(exc: BaseException) -> str:
    """Log ``exc`` with a new error id (the client gets the id, not the detail)."""
    error_id = uuid.uuid4().hex[:12]
    cause = exc.__cause__
    log.error("error id %s: %s%s", error_id, exc,
              f" (caused by {type(cause).__name__}: {cause})" if cause is not None else "")
    return error_id


def decode_inputs(body: bytes | bytearray, content_type: str | None, specs: Any) -> Any:
    """One item's inputs from a request body (raises InputError with what was wrong)."""
    kind = (content_type or "application/json").split(";")[0].strip().lower()
    if kind in (NPY, "application/octet-stream"):
        return bodies.decode_npy(body)
    if kind != "application/json":
        raise InputError(f"unsupported Content-Type {kind!r}: send application/json or {NPY}")
    return bodies.decode_json(body, specs)


async def decode_inputs_off_loop(body: bytes | bytearray, content_type: str | None,
                                 specs: Any) -> Any:
    """``decode_inputs``, on a thread for bodies over ``OFF_LOOP_BYTES`` (the loop keeps
    answering other requests meanwhile)."""
    if len(body) <= OFF_LOOP_BYTES:
        return decode_inputs(body, content_type, specs)
    return await asyncio.to_thread(decode_inputs, body, content_type, specs)


def encode_outputs(outputs: Any, accept: str | None) -> tuple[bytes, str]:
    """(body, content type) of one item's outputs (JSON with NaN/inf as null, or ``.npy``)."""
    return bodies.encode_outputs(outputs, accept)
