"""What both web integrations share: bodies to inputs, outputs to bodies, errors to statuses.

Bodies:

* ``application/json``: ``{"inputs": ...}`` or the bare value, where the value is one nested
  list (a one-input model) or an object ``{input name: nested list}``. JSON has no dtypes, so
  lists become arrays of the model's input dtype (from the runner's input spec).
* ``application/x-npy`` (or ``application/octet-stream``): one ``.npy`` array, loaded with
  ``allow_pickle=False``; its dtype must be the model's (no silent casts).

Responses are JSON (``{"outputs": {name: nested list}}``) unless the client asks for
``application/x-npy`` (a single output) in ``Accept``.
"""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import (
    AccelError,
    DeviceError,
    InferenceError,
    InferTimeout,
    InputError,
    RunnerClosed,
    WouldBlock,
)

if TYPE_CHECKING:
    from ..runner import Runner

__all__ = [
    "DEFAULT_MAX_BODY",
    "NPY",
    "HTTPProblem",
    "decode_inputs",
    "encode_outputs",
    "problem_for",
]

NPY = "application/x-npy"
#: request body cap (bytes) unless the app sets its own
DEFAULT_MAX_BODY = 16 * 1024 * 1024


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
                 **runners: Runner):
        if not runners:
            raise ValueError("Accel needs at least one runner, e.g. Accel(default=aioaccel."
                             "open(...))")
        self.runners = runners
        self.admit_timeout = admit_timeout
        self.retry_after = retry_after
        self.max_body = max_body
        self.timeout = timeout
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

    def _health(self) -> tuple[int, dict[str, Any]]:
        """(status, body): 200 when every runner is open, else 503."""
        state = {name: {"open": not r.closed, "in_flight": r.stats().in_flight,
                        "maxsize": r.maxsize} for name, r in self.runners.items()}
        ok = all(s["open"] for s in state.values())
        return (200 if ok else 503), {"ok": ok, "runners": state}

    def _metrics(self) -> tuple[bytes, str]:
        """(body, content type) of the runners' Prometheus metrics (``aioaccel[metrics]``)."""
        from ..metrics import RunnerCollector

        if self._collector is None:
            self._collector = RunnerCollector(*self.runners.values(), registry=None)
        body, content_type = self._collector.exposition()
        return body, content_type


def problem_for(exc: BaseException, retry_after: float) -> HTTPProblem | None:
    """The HTTP answer for an aioaccel error, or None for anything else (a bug: 500)."""
    retry = {"Retry-After": str(max(1, round(retry_after)))}
    if isinstance(exc, WouldBlock):
        return HTTPProblem(503, f"overloaded: {exc}", retry)
    if isinstance(exc, InputError):
        return HTTPProblem(422, str(exc), {})
    if isinstance(exc, InferTimeout):
        return HTTPProblem(504, str(exc), {})
    if isinstance(exc, RunnerClosed):
        return HTTPProblem(503, f"shutting down: {exc}", retry)
    if isinstance(exc, DeviceError):
        return HTTPProblem(503, f"accelerator unavailable: {exc}", retry)
    if isinstance(exc, InferenceError):
        return HTTPProblem(500, f"inference failed: {exc}", {})
    if isinstance(exc, AccelError):
        return HTTPProblem(500, str(exc), {})
    return None


def _dtype_of(specs: Any, name: str | None) -> Any:
    if not specs:
        return None
    for spec in specs:
        if name is None or spec.name == name:
            return np.dtype(spec.dtype)
    return None


def decode_inputs(body: bytes, content_type: str | None, specs: Any) -> Any:
    """One item's inputs from a request body (raises InputError with what was wrong)."""
    kind = (content_type or "application/json").split(";")[0].strip().lower()
    if kind in (NPY, "application/octet-stream"):
        try:
            return np.load(io.BytesIO(body), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(f"body is not a .npy array ({exc}); send np.save() output "
                             f"with Content-Type: {NPY}") from None
    if kind != "application/json":
        raise InputError(f"unsupported Content-Type {kind!r}: send application/json or {NPY}")
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"body is not JSON: {exc}") from None
    if isinstance(value, dict) and "inputs" in value:
        value = value["inputs"]
    try:
        if isinstance(value, dict):
            return {str(k): np.asarray(v, dtype=_dtype_of(specs, str(k)))
                    for k, v in value.items()}
        if isinstance(value, list):
            return np.asarray(value, dtype=_dtype_of(specs, None))
    except (ValueError, TypeError) as exc:
        raise InputError(f"JSON inputs are not numeric arrays: {exc}") from None
    raise InputError('JSON body must be a nested list, {"input name": nested list}, or '
                     '{"inputs": ...}')


def encode_outputs(outputs: Any, accept: str | None) -> tuple[bytes, str]:
    """(body, content type) of one item's outputs."""
    wants_npy = NPY in (accept or "")
    if wants_npy:
        array = outputs
        if isinstance(outputs, Mapping):
            if len(outputs) != 1:
                raise InputError(f"Accept: {NPY} needs a one-output model; this one has "
                                 f"{sorted(outputs)}: ask for application/json")
            array = next(iter(outputs.values()))
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(array), allow_pickle=False)
        return buffer.getvalue(), NPY
    return json.dumps({"outputs": _jsonable(outputs)}).encode(), "application/json"


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value
