"""WebSocket streaming, shared by both integrations: frames in, results out in the order sent.

One connection is one :class:`~aioaccel.Stream` of the runner (``runner.stream(key)``), so
several cameras sharing a model get the streams' fair admission. The protocol:

* **Frames** (client to server): a binary message is one ``.npy`` array (its dtype must be
  the model's); a text message is JSON ``{"tag": T, "inputs": ...}`` with ``inputs`` as in an
  HTTP body (a nested list, or ``{input name: nested list}``). A binary frame's tag is its
  index on the connection (0, 1, ...) unless a text message ``{"tag": T}`` (no ``inputs``)
  came just before it.
* **Results** (server to client), one text message per frame, in the order the frames were
  sent: ``{"tag": T, "seq": n, "outputs": {name: nested list}}``, or
  ``{"tag": T, "status": 422, "error": "..."}`` for a frame that failed (bad input: 422, the
  item failed in the model: 500).
* **End**: the client sends ``{"end": true}``; the server answers every frame still pending,
  sends ``{"end": true, "frames": N}`` and closes with 1000. A server shutting down does the
  same, with close code 1001.
* **Backpressure**: while the stream is full the server does not read the socket, so the
  client's ``send`` waits (TCP flow control) instead of the server buffering without bound.
  Likewise a client that stops reading results stalls the stream, then its own sends.
* **Disconnect**: the frames the device has not started are withdrawn; results of the ones
  it has are dropped.

The framework glue (:meth:`aioaccel.integrations.fastapi.Accel.stream`,
:meth:`aioaccel.integrations.aiohttp.Accel.ws`) adapts its WebSocket to :class:`Socket`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from itertools import count
from typing import TYPE_CHECKING, Any

from ..errors import AccelError, InputError
from .http import NPY, decode_inputs, encode_outputs, problem_for

if TYPE_CHECKING:
    from ..runner import Runner
    from ..streams import Stream

__all__ = ["CLOSE_ERROR", "CLOSE_GOING_AWAY", "CLOSE_NORMAL", "CLOSE_POLICY", "Socket",
           "serve_stream"]

log = logging.getLogger("aioaccel.streaming")

CLOSE_NORMAL = 1000        #: every frame answered
CLOSE_GOING_AWAY = 1001    #: the server is shutting down (every accepted frame answered)
CLOSE_POLICY = 1008        #: the client broke the protocol (e.g. a stream key in use)
CLOSE_ERROR = 1011         #: the runner broke

_keys = count()


@dataclass
class Socket:
    """What the streaming loop needs from a framework's WebSocket.

    ``receive`` returns the next message (``bytes`` or ``str``), or None once the client has
    gone; ``send`` sends one text message; ``close`` closes with a code and reason.
    """

    receive: Callable[[], Awaitable[bytes | str | None]]
    send: Callable[[str], Awaitable[None]]
    close: Callable[[int, str], Awaitable[None]]


class _Gone(Exception):
    """The client disconnected."""


@dataclass(frozen=True)
class _Failed:
    tag: Any
    status: int
    message: str


_RESULT = object()   # a reply slot: the stream's next result
#: JSON bigger than this (bytes) is parsed or written on a thread, not on the event loop
_OFF_LOOP = 256 * 1024


def _nbytes(outputs: Any) -> int:
    if isinstance(outputs, dict):
        return sum(getattr(v, "nbytes", 0) for v in outputs.values())
    return int(getattr(outputs, "nbytes", 0))
_END = object()      # no more frames


def _stream_key(requested: str | None = None) -> str:
    """The stream key of a new connection: the client's ``?stream=`` or a fresh one."""
    return requested if requested else f"ws-{next(_keys)}"


async def serve_stream(runner: Runner, socket: Socket, *, key: Any = None,
                       maxsize: int | None = None, retry_after: float = 1.0,
                       stop: asyncio.Event | None = None) -> int:
    """Run one WebSocket connection as ``runner.stream(key)``; returns the frames answered.

    ``stop`` (set when the server shuts down) ends the connection gracefully: no more frames
    are read, the accepted ones are answered, then it closes with 1001.
    """
    key = _stream_key(key)
    if any(s.key == key for s in runner.streams()):
        await socket.close(CLOSE_POLICY, f"stream {key!r} is already in use")
        return 0
    try:
        stream = runner.stream(key, maxsize=maxsize)
    except (ValueError, RuntimeError) as exc:
        await socket.close(CLOSE_POLICY, str(exc)[:120])
        return 0
    # one entry per frame, in order; bounded so that a client sending only bad frames (which
    # take no slot in the stream) is paced by the socket like everyone else
    replies: asyncio.Queue[Any] = asyncio.Queue(maxsize=2 * (maxsize or runner.maxsize))
    reader = asyncio.ensure_future(_read(runner, stream, socket, replies, retry_after))
    writer = asyncio.ensure_future(_write(stream, socket, replies))
    stopping = asyncio.ensure_future(stop.wait()) if stop is not None else None
    answered = 0
    try:
        waiting = {reader, writer} | ({stopping} if stopping else set())
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if stopping in done and not reader.done():   # shutting down: read no more
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            await replies.put(_END)
        elif reader.done() and reader.exception() is not None:
            raise reader.exception()  # type: ignore[misc]
        answered = await writer  # every frame read so far gets its reply
        code = CLOSE_GOING_AWAY if stopping is not None and stopping.done() else CLOSE_NORMAL
        await socket.send(json.dumps({"end": True, "frames": answered}))
        await socket.close(code, "")
    except _Gone:
        pass
    except AccelError as exc:  # the runner broke or closed under us
        problem = problem_for(exc, retry_after)
        try:
            await socket.send(json.dumps({"status": problem.status if problem else 500,
                                          "error": problem.message if problem else str(exc)}))
            await socket.close(CLOSE_ERROR, "runner unavailable")
        except Exception:
            pass
    finally:
        for task in (reader, writer, stopping):
            if task is not None and not task.done():
                task.cancel()
        await asyncio.gather(reader, writer, *([stopping] if stopping else []),
                             return_exceptions=True)
        await _abandon(runner, stream)
    return answered


async def _read(runner: Runner, stream: Stream, socket: Socket, replies: asyncio.Queue[Any],
                retry_after: float) -> None:
    index = 0
    next_tag: Any = None
    tagged = False
    while True:
        message = await socket.receive()
        if message is None:
            raise _Gone
        tag: Any = index
        try:
            if isinstance(message, bytes):
                if tagged:
                    tag, tagged = next_tag, False
                inputs = decode_inputs(message, NPY, runner.inputs)
            else:
                try:
                    frame = (json.loads(message) if len(message) <= _OFF_LOOP
                             else await asyncio.to_thread(json.loads, message))
                except ValueError as exc:
                    raise InputError(f"text frame is not JSON ({exc}); send "
                                     f'{{"tag": ..., "inputs": ...}} or a binary .npy') from None
                if not isinstance(frame, dict):
                    raise InputError('a text frame must be a JSON object: {"tag": ..., '
                                     '"inputs": ...}, {"tag": ...} before a binary frame, '
                                     'or {"end": true}')
                if frame.get("end") is True:
                    stream.close()
                    await replies.put(_END)
                    return
                if "inputs" not in frame:
                    if "tag" not in frame:
                        raise InputError('a text frame needs "inputs" (or "tag" before a '
                                         'binary frame, or "end": true)')
                    next_tag, tagged = frame["tag"], True
                    continue
                tag = frame.get("tag", index)
                body = json.dumps(frame["inputs"]).encode()
                if len(body) > _OFF_LOOP:
                    inputs = await asyncio.to_thread(decode_inputs, body, "application/json",
                                                     runner.inputs)
                else:
                    inputs = decode_inputs(body, "application/json", runner.inputs)
        except InputError as exc:
            index += 1
            await replies.put(_Failed(tag, 422, str(exc)))
            continue
        index += 1
        try:
            await stream.push(inputs, tag=tag)  # waits while the stream is full: no reading
        except InputError as exc:  # the model's input check
            await replies.put(_Failed(tag, 422, str(exc)))
            continue
        await replies.put(_RESULT)


async def _write(stream: Stream, socket: Socket, replies: asyncio.Queue[Any]) -> int:
    answered = 0
    while True:
        entry = await replies.get()
        if entry is _END:
            return answered
        if isinstance(entry, _Failed):
            text = json.dumps({"tag": entry.tag, "status": entry.status,
                               "error": entry.message})
        else:
            result = await anext(stream)
            head = json.dumps({"tag": result.tag, "seq": result.seq})
            if result.ok:
                if _nbytes(result.outputs) > _OFF_LOOP:  # JSON of big arrays takes long
                    body, _ = await asyncio.to_thread(encode_outputs, result.outputs, None)
                else:
                    body, _ = encode_outputs(result.outputs, None)  # b'{"outputs": ...}'
                text = head[:-1] + ", " + body.decode()[1:]
            else:
                text = head[:-1] + ", " + json.dumps(
                    {"status": 500, "error": f"inference failed: {result.error}"})[1:]
        try:
            await socket.send(text)
        except Exception:  # whatever the framework raises for a closed connection
            raise _Gone from None
        answered += 1


async def _abandon(runner: Runner, stream: Stream) -> None:
    """The connection is over: withdraw what the device has not started, drop the rest."""
    stream.withdraw()
    stream.close()
    try:
        async for _ in stream:  # results of items already on the device: consumed, dropped
            pass
    except AccelError:
        pass  # the runner broke or closed: its items were failed, nothing is left to free


