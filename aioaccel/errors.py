"""One exception tree for everything aioaccel raises.

Every error aioaccel raises to its callers is defined here and exported as ``aioaccel.<Name>``
(the modules that raise them re-export them where they used to live: ``aioaccel.pool.MemberLost``
is ``aioaccel.MemberLost``). ``except aioaccel.AccelError`` catches all of them::

    AccelError
     ├── InferenceError      one item failed; later items still flow (.seq, .tag, cause chained)
     ├── InputError          bad input, rejected before it reached the runtime (also ValueError)
     │    └── NotAcceptable  the web integrations: no answer type the client's Accept takes (406)
     ├── DeviceError         fatal: the runner is broken, every waiter gets it
     │    └── DeviceTimeout  a runtime call hung past ``call_timeout``
     ├── MemberLost          a pool member broke holding the item, and its ``retries`` ran out
     ├── RemoteError         Ray: an item failed on the remote replica (the cause as text)
     ├── InferTimeout        ``infer(..., timeout=)`` ran out (also TimeoutError)
     ├── RunnerClosed        the runner no longer accepts input / was closed with items pending
     ├── WouldBlock          no room: ``push_nowait`` on a full runner, ``admit_timeout`` ran out
     ├── OpenError           a backend load or stage factory failed (cause chained)
     │    ├── OpenTimeout    opening (load, stages, warm-up) ran past ``open_timeout``
     │    ├── BatchingUnsupported  ``batch=`` asked of a model or runtime that cannot batch
     │    │                        (also ValueError)
     │    └── ModelLoadError a runtime cannot read or convert a model file (also ValueError)
     │         └── ModelNotFound  no such model file, or an IR without its .bin
     │                            (also FileNotFoundError)
     ├── BackendUnavailable  a runtime is not installed (the message says what to install;
     │                       also ImportError)
     ├── DeployError         Ray: ``deploy`` could not bring the application up (also RuntimeError)
     │    └── NotEnoughResources  the cluster cannot hold the replicas asked for
     ├── StreamRefused       the stream client: the server refused the stream (also ConnectionError)
     └── StreamClosed        the stream client: the server closed the stream (also ConnectionError)

Native errors are translated at the boundary with ``raise ... from exc``, so the runtime's own
exception is always available as ``__cause__``. Outside the tree, as in Python itself: a wrong
argument to aioaccel's own functions (an option out of range, a wrong type) raises
``ValueError`` / ``TypeError`` naming the argument, and ``StopAsyncIteration`` ends iteration.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AccelError",
    "BackendUnavailable",
    "BatchingUnsupported",
    "DeployError",
    "DeviceError",
    "DeviceTimeout",
    "InferTimeout",
    "InferenceError",
    "InputError",
    "MemberLost",
    "ModelLoadError",
    "ModelNotFound",
    "NotAcceptable",
    "NotEnoughResources",
    "OpenError",
    "OpenTimeout",
    "RemoteError",
    "RunnerClosed",
    "StreamClosed",
    "StreamRefused",
    "WouldBlock",
    "copy_for_waiter",
    "device_error",
    "inference_error",
    "open_error",
]


class AccelError(Exception):
    """Base of every error aioaccel raises."""


class InferenceError(AccelError):
    """One item failed in a stage; the runner and every other item carry on.

    ``seq`` and ``tag`` identify the item; ``stage`` names the stage that failed; the runtime's
    exception is ``__cause__``.
    """

    def __init__(self, message: str, *, seq: int, tag: Any = None, stage: str | None = None):
        super().__init__(message)
        self.seq = seq
        self.tag = tag
        self.stage = stage


class InputError(AccelError, ValueError):
    """The input does not match the model's input spec; nothing reached the runtime."""


class NotAcceptable(InputError):
    """The web integrations: the request's ``Accept`` refuses every type the answer can take
    (answered 406)."""


class DeviceError(AccelError):
    """A fatal failure: the device or runtime is gone and the runner is broken."""


class DeviceTimeout(DeviceError):
    """A runtime call ran past ``call_timeout``; the runner is broken."""


class MemberLost(AccelError):
    """A pool member broke while it held the item, and the item's ``retries`` were used up
    (the member's error is ``__cause__``)."""


class RemoteError(AccelError):
    """Ray: an item failed on the remote side; the message carries the remote cause as text
    (the remote exception object itself does not cross the wire)."""


class InferTimeout(AccelError, TimeoutError):
    """``infer`` did not get its result within ``timeout``; the item was withdrawn or discarded."""


class RunnerClosed(AccelError):
    """The runner was closed: no more input, or it closed with this item still pending."""


class WouldBlock(AccelError):
    """No room: ``push_nowait`` found the runner full (``maxsize`` items admitted and not
    consumed), or a call's ``admit_timeout`` ran out while it waited for room."""


class BackendUnavailable(AccelError, ImportError):
    """The runtime a backend needs is not installed; the message says what to install."""


class DeployError(AccelError, RuntimeError):
    """Ray: ``deploy`` could not bring the application up (a replica failed to open its
    runner, for instance); the message carries Serve's reason and nothing is left deployed."""


class NotEnoughResources(DeployError):
    """Ray: ``deploy`` asked for more replicas than the cluster's nodes can hold, or the
    replicas were not running within ``deploy_timeout`` (waiting for resources, usually)."""


class StreamRefused(AccelError, ConnectionError):
    """The stream client: the server refused the stream at the handshake: ``status`` (409 a
    key in use, 400 a bad key or option, 403 an origin not allowed) and its ``reason``."""

    def __init__(self, status: int, reason: str):
        super().__init__(f"stream refused ({status}): {reason}")
        self.status = status
        self.reason = reason


class StreamClosed(AccelError, ConnectionError):
    """The stream client: the server closed the stream before its end message: ``code``
    (4404 no such model, 1008 a protocol error, 1011 the model broke) and its ``reason``."""

    def __init__(self, code: int | None, reason: str):
        super().__init__(f"stream closed by the server ({code}): {reason or 'no reason given'}")
        self.code = code
        self.reason = reason


class OpenError(AccelError):
    """Opening a runner failed: a backend's load or a stage factory raised. The original
    exception is ``__cause__``; for the common built-in types (``ValueError``, ``OSError``,
    ``RuntimeError``, ...) the error is also an instance of that type."""


class OpenTimeout(OpenError, TimeoutError):
    """Opening a model (an open, the reopen of a restart, a reload) did not finish within
    ``open_timeout``: the message says which step (loading, making the stages, the warm-up)."""


class BatchingUnsupported(OpenError, ValueError):
    """``batch=`` was asked of a model or runtime that cannot run a batch along axis 0
    (raised at open)."""


class ModelLoadError(OpenError, ValueError):
    """A runtime cannot read or convert a model file: the message names the file, the runtime
    and its reason; the runtime's exception is ``__cause__``."""


class ModelNotFound(ModelLoadError, FileNotFoundError):
    """The model file (or a file it needs, such as an OpenVINO IR's ``.bin``) does not exist."""


# ---- translation at the boundary -------------------------------------------------------------
# Every native or thread error that reaches a caller goes through one of these, so the rules
# (what passes unchanged, what is wrapped, how the cause is chained) live in one place.

_NOT_MIXED = (StopIteration, StopAsyncIteration, GeneratorExit)
_open_error_types: dict[type[BaseException], type[OpenError]] = {}


def _open_error_type(cause: BaseException) -> type[OpenError]:
    """OpenError, mixed with the nearest built-in exception type of ``cause`` so that
    ``except FileNotFoundError`` still catches a missing model file."""
    for base in type(cause).__mro__:
        if base.__module__ == "builtins" and issubclass(base, Exception):
            break
    else:
        return OpenError
    if base is Exception or issubclass(base, _NOT_MIXED):
        return OpenError
    mixed = _open_error_types.get(base)
    if mixed is None:
        try:
            mixed = type(f"OpenError[{base.__name__}]", (OpenError, base), {"__module__": __name__})
        except TypeError:  # an incompatible built-in layout: plain OpenError
            mixed = OpenError
        _open_error_types[base] = mixed
    return mixed


def open_error(cause: BaseException, what: str) -> AccelError:
    """The error ``open()`` raises for ``cause`` (raised while ``what``): aioaccel errors pass
    unchanged, anything else (of any type, even ``StopIteration``) becomes an OpenError."""
    if isinstance(cause, AccelError):
        return cause
    err = _open_error_type(cause)(f"{what} failed: {cause!r}" if not str(cause)
                                  else f"{what} failed: {cause}")
    err.__cause__ = cause
    return err


def device_error(cause: BaseException, what: str) -> DeviceError:
    """A fatal failure of ``what`` (a stage, a device) as the DeviceError every waiter gets."""
    if isinstance(cause, DeviceError):
        return cause
    err = DeviceError(f"{what} failed fatally: {cause!r}")
    err.__cause__ = cause
    return err


def inference_error(cause: BaseException, *, seq: int, tag: Any, stage: str) -> InferenceError:
    """One item's failure in ``stage``, with the runtime's exception chained."""
    err = InferenceError(f"item {seq} (tag={tag!r}) failed in stage {stage!r}: {cause!r}",
                         seq=seq, tag=tag, stage=stage)
    err.__cause__ = cause
    return err


def copy_for_waiter(base: AccelError) -> AccelError:
    """A fresh instance of ``base`` for one waiter (one instance raised in many tasks tangles
    their tracebacks). Built without calling ``__init__``, which a subclass may have changed,
    so it cannot fail; the original is the copy's ``__cause__`` when it had none."""
    cls = type(base)
    try:
        err = cls.__new__(cls, *base.args)
        err.__dict__.update(vars(base))
        err.args = base.args
    except Exception:  # an exotic type: fall back to the tree's own classes
        err = (DeviceError if isinstance(base, DeviceError) else AccelError)(str(base))
    err.__cause__ = base.__cause__ or base
    return err
