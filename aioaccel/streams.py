"""Multi-stream fan-in: many producers (cameras) sharing one runner, each with its own order.

``runner.stream(key)`` returns a :class:`Stream`: its own ``push`` and its own ``async for``,
which yields that stream's results in that stream's push order. All streams share the
runner's capacity (``maxsize``) and its stages.

Fairness: when the runner is full, freed slots go to the streams that are waiting: the highest
``priority`` first, and within a priority in proportion to ``weight`` (equal weights take turns,
FIFO within a stream), so a stream that floods cannot starve the others; ``reserve`` keeps
slots free for a critical stream (see :mod:`aioaccel.core.admission`). A slot stays taken until
its result is consumed; so that one stream's slow consumer cannot hold the whole runner, give
the stream a ``maxsize`` of its own (``runner.stream(key, maxsize=2)``).

Internally every runner has a default lane (plain ``runner.push`` / ``infer`` / ``async for``);
a stream is one more lane (:mod:`aioaccel.core.records`), kept by the runner's
:class:`~aioaccel.core.stream_table.StreamTable`. A closed stream's finished results stop
holding the runner's slots (it cannot grow any more), so streams closed with results unread
never wedge the runner; a stream nobody references is reclaimed once it is idle.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from .stats import StreamStats

if TYPE_CHECKING:
    from .core.records import Lane
    from .core.results import Result

__all__ = ["LaneOps", "Stream", "StreamStats"]


class LaneOps(Protocol):
    """What a :class:`Stream` handle asks of the runner that owns its lane."""

    name: str  #: the runner's name

    def push(self, lane: Lane, inputs: Any, tag: Any) -> Awaitable[int]: ...
    def push_nowait(self, lane: Lane, inputs: Any, tag: Any) -> int: ...
    def next(self, lane: Lane) -> Awaitable[Result]: ...
    def close(self, lane: Lane) -> None: ...
    def withdraw(self, lane: Lane) -> int: ...
    def push_many(self, lane: Lane, inputs: Iterable[Any],
                  tags: Iterable[Any] | None) -> Awaitable[list[int]]: ...
    def results(self, lane: Lane, max_items: int | None) -> AsyncIterator[list[Result]]: ...


class Stream:
    """One producer's view of a shared runner. Get it with ``runner.stream(key)``.

    ``push`` / ``push_nowait`` admit inputs for this stream; ``async for`` yields this stream's
    results (:class:`~aioaccel.Result`) in its push order; ``close()`` ends this stream only.
    ``async with runner.stream(key) as s:`` closes it on exit.
    """

    __slots__ = ("__weakref__", "_lane", "_ops", "_owner")

    def __init__(self, ops: LaneOps, lane: Lane, owner: object = None):
        self._ops = ops
        self._lane = lane
        self._owner = owner  # the runner: alive while its streams are held

    @property
    def key(self) -> Any:
        return self._lane.key

    @property
    def index(self) -> int:
        """A small integer, unique among the runner's open streams (MemryX ``stream_idx``)."""
        return self._lane.index

    @property
    def closed(self) -> bool:
        return self._lane.closed

    async def push(self, inputs: Any, *, tag: Any = None) -> int:
        """Admit one input for this stream; waits for this stream's fair share of space."""
        return await self._ops.push(self._lane, inputs, tag)

    async def push_many(self, inputs: Iterable[Any], tags: Iterable[Any] | None = None
                        ) -> list[int]:
        """Admit many inputs for this stream, in order, as this stream's share of room allows;
        see :meth:`aioaccel.Runner.push_many`."""
        return await self._ops.push_many(self._lane, inputs, tags)

    def results(self, max_items: int | None = None) -> AsyncIterator[list[Result]]:
        """Lists of this stream's ready results (1..``max_items``), in its push order; see
        :meth:`aioaccel.Runner.results`."""
        return self._ops.results(self._lane, max_items)

    def push_nowait(self, inputs: Any, *, tag: Any = None) -> int:
        """Like :meth:`push`, but raise :class:`~aioaccel.WouldBlock` instead of waiting."""
        return self._ops.push_nowait(self._lane, inputs, tag)

    def close(self) -> None:
        """No more input on this stream; its ``async for`` ends after its last result."""
        self._ops.close(self._lane)

    def withdraw(self) -> int:
        """Take back this stream's items that no worker has started (its consumer is gone:
        a camera disconnected). They never show up in ``async for``; they count as withdrawn
        and free their slots. Returns how many were withdrawn."""
        return self._ops.withdraw(self._lane)

    def stats(self) -> StreamStats:
        return self._lane.snapshot()

    def __aiter__(self) -> Stream:
        return self

    def __anext__(self) -> Awaitable[Result]:  # the runner's own, no frame of its own
        return self._ops.next(self._lane)

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        lane = self._lane
        return (f"<Stream {lane.key!r} of {self._ops.name!r} "
                f"{'closed' if lane.closed else 'open'} in_flight={lane.admitted}/{lane.cap}>")
