"""One exception tree for everything aioaccel raises.

::

    AccelError
     ├── InferenceError      one item failed; later items still flow (.seq, .tag, cause chained)
     ├── InputError          bad input, rejected before it reached the runtime (also ValueError)
     ├── ModelLoadError      a runtime cannot read or convert a model file (also ValueError)
     ├── DeviceError         fatal: the runner is broken, every waiter gets it
     │    └── DeviceTimeout  a runtime call hung past ``call_timeout``
     ├── InferTimeout        ``infer(..., timeout=)`` ran out (also TimeoutError)
     ├── RunnerClosed        the runner no longer accepts input / was closed with items pending
     ├── WouldBlock          ``push_nowait`` on a full runner
     └── BackendUnavailable  a runtime is not installed (the message says what to install)

Native errors are translated at the boundary with ``raise ... from exc``, so the runtime's own
exception is always available as ``__cause__``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AccelError",
    "BackendUnavailable",
    "DeviceError",
    "DeviceTimeout",
    "InferTimeout",
    "InferenceError",
    "InputError",
    "ModelLoadError",
    "RunnerClosed",
    "WouldBlock",
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


class ModelLoadError(AccelError, ValueError):
    """A runtime cannot read or convert a model file: the message names the file, the runtime
    and its reason; the runtime's exception is ``__cause__``."""


class DeviceError(AccelError):
    """A fatal failure: the device or runtime is gone and the runner is broken."""


class DeviceTimeout(DeviceError):
    """A runtime call ran past ``call_timeout``; the runner is broken."""


class InferTimeout(AccelError, TimeoutError):
    """``infer`` did not get its result within ``timeout``; the item was withdrawn or discarded."""


class RunnerClosed(AccelError):
    """The runner was closed: no more input, or it closed with this item still pending."""


class WouldBlock(AccelError):
    """``push_nowait`` found the runner full (``maxsize`` items admitted and not consumed)."""


class BackendUnavailable(AccelError, ImportError):
    """The runtime a backend needs is not installed; the message says what to install."""
