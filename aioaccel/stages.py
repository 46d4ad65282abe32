"""What a backend provides: stages.

A pipeline is a list of :class:`StageSpec`. Each spec makes one stage object per worker thread
(``replicas``), *on* that thread, so runtimes that are not thread-safe (LiteRT interpreters) or
are thread-affine get their own instance. There are two kinds of stage:

* :class:`BlockingStage` -- ``run(inputs) -> outputs`` is called on a dedicated worker thread.
  The runtime releases the GIL while it computes, so stages on different threads overlap.
* :class:`DeviceStage` -- the runtime queues work and completes it on *its own* threads
  (OpenVINO ``AsyncInferQueue``, pycoral ``PipelinedModelRunner``, MemryX ``AsyncAccl``).
  A feeder thread calls ``submit``; the runtime calls ``complete`` back, in any order.

Raising :class:`~aioaccel.DeviceError` from a stage breaks the runner; any other exception fails
only the item at hand.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["BlockingStage", "Complete", "DeviceStage", "StageSpec", "made"]

#: ``complete(token, outputs, error)``: what a device stage calls when an item finishes.
#: Exactly one of ``outputs``/``error`` is meaningful; it never raises. An ``error`` that is a
#: :class:`~aioaccel.DeviceError` breaks the runner, and ``token`` may then be None.
Complete = Callable[[object, Any, "BaseException | None"], None]


class BlockingStage(ABC):
    """A stage whose ``run`` blocks its worker thread until the outputs are ready."""

    @abstractmethod
    def run(self, inputs: Any) -> Any:
        """Compute the outputs of one item (called on this stage's worker thread)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the runtime (called on the worker thread, after its last ``run``)."""


class DeviceStage(ABC):
    """A runtime that pipelines internally and reports completions from its own threads."""

    @abstractmethod
    def start(self, complete: Complete) -> None:
        """Open the device; from now on each finished item is reported with ``complete``."""

    @abstractmethod
    def submit(self, token: object, inputs: Any) -> None:
        """Hand one item to the device. May block while the device is full (backpressure).
        ``token.abandoned`` turns True (set on the loop, read it as a hint) when the ``infer``
        waiting for the item is gone: a remote device may cancel or skip its work."""

    def submit_stream(self, token: object, inputs: Any, stream: int) -> None:
        """Like :meth:`submit`, for devices that keep the runner's streams apart (MemryX
        ``stream_idx``): ``stream`` is the index of the runner's stream the item came from
        (0 for plain ``push``/``infer``). Override it instead of ``submit`` to receive it."""
        self.submit(token, inputs)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Finish what was submitted, stop the runtime's threads and release the device."""


@dataclass(frozen=True)
class StageSpec:
    """How to make one pipeline stage.

    ``factory`` is called once per worker thread, on that thread, and returns a
    :class:`BlockingStage`, a :class:`DeviceStage` or a plain callable (a blocking stage).
    A device stage always has one feeder thread: its parallelism is the device's own.
    ``shared``: the factory hands out one object for every replica (a stage given already
    made): it runs on every replica's thread and is closed once, after all of them stopped.
    """

    name: str
    factory: Callable[[], BlockingStage | DeviceStage | Callable[[Any], Any]]
    replicas: int = 1
    device: bool = False
    shared: bool = False


def made(stage: Any) -> Callable[[], Any]:
    """A factory that hands out ``stage``, already made (for ``StageSpec.factory``)."""
    def factory() -> Any:
        return stage
    return factory
