"""What ``async for`` yields: one :class:`Result` per item, in push order."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..errors import InferenceError

__all__ = ["Result"]


class Result:
    """One streamed result, yielded by ``async for`` in push order.

    ``outputs`` raises the item's :class:`~aioaccel.InferenceError` if it failed; check ``ok``
    (or ``error``) to handle failures without an exception.
    """

    __slots__ = ("_outputs", "error", "latency", "seq", "tag")

    def __init__(self, outputs: Any, tag: Any, seq: int, latency: float,
                 error: InferenceError | None):
        self._outputs = outputs
        self.tag = tag
        self.seq = seq
        self.latency = latency  #: seconds from admission to completion
        self.error = error

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def outputs(self) -> Any:
        if self.error is not None:
            raise self.error
        return self._outputs

    def __repr__(self) -> str:
        state = "ok" if self.error is None else f"error={self.error!r}"
        return f"<Result seq={self.seq} tag={self.tag!r} {state} latency={self.latency:.6f}>"
