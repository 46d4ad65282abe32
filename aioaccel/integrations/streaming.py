"""WebSocket streaming, shared by both integrations: frames in, results out in the order sent.

One connection is one :class:`~aioaccel.Stream` of the runner (``runner.stream(key)``), so
several cameras sharing a model get the streams' fair admission. The protocol:

* **Frames** (client to server): a binary message is one ``.npy`` array (its dtype must be
  the model's); a text message is JSON ``{"tag": T, "inputs": ...}`` with ``inputs`` as in an
  HTTP body (a nested list, or ``{input name: nested list}``). A binary frame's tag is its
  index on the connection (0, 1, ...) unless a text header ``{"tag": T}`` (no ``inputs``)
  came just before it. Text is strict JSON: ``NaN`` and ``Infinity`` are refused.
* **Results** (server to client), one per frame, in the order the frames were sent. As JSON
  (the default): one text message ``{"tag": T, "seq": n, "outputs": {name: nested list}}``.
  As ``.npy`` (dtype and shape exactly): a text message ``{"tag": T, "seq": n, "npy": [name,
  ...]}`` and then one binary ``.npy`` message per name, in that order (``[null]`` for a
  model whose output has no name). The client picks at connect (``?results=npy``) and may
  change it per frame (``"results": "npy"`` or ``"json"`` in the frame's text message or in
  the header before a binary frame). A frame that failed is always text:
  ``{"tag": T, "status": 422, "error": "..."}`` (bad input: 422; the model failed: 500).
* **End**: the client sends ``{"end": true}``; the server answers every frame still pending,
  sends ``{"end": true, "frames": N}`` and closes with 1000. A server shutting down reads no
  more frames, answers every frame it read (one it was admitting included) and does the same,
  with close code 1001.
* **Backpressure**: while the stream is full the server does not read the socket, so the
  client's ``send`` waits (TCP flow control) instead of the server buffering without bound.
  Likewise a client that stops reading results stalls the stream, then its own sends.
* **Disconnect**: the frames the device has not started are withdrawn; results of the ones
  it has are dropped; the stream and its key are released.
* **Keys**: ``?stream=KEY`` names the stream (1 to 128 printable characters, not starting
  with ``ws-``); a key in use is refused at the handshake (HTTP 409). A connection without
  one gets ``ws-`` and 16 random hex digits, which no client can name.
* **Origins**: browsers send ``Origin``; by default only pages of the server's own origin (and
  clients that send no ``Origin``, which are not browsers) may connect, so a page elsewhere
  cannot stream through a visitor's browser. ``allowed_origins`` widens it (``["*"]``: any).

The framework glue (:meth:`aioaccel.integrations.fastapi.Accel.stream`,
:meth:`aioaccel.integrations.aiohttp.Accel.ws`) adapts its WebSocket to :class:`Socket`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..errors import AccelError, InputError
from .bodies import encode_npy
from .http import NPY, decode_inputs, encode_outputs, problem_for

if TYPE_CHECKING:
    from ..runner import Runner
    from ..streams import Stream

__all__ = ["ANONYMOUS_PREFIX", "CLOSE_ERROR", "CLOSE_GOING_AWAY", "CLOSE_NORMAL",
           "CLOSE_NOT_FOUND", "CLOSE_POLICY", "RESULT_FORMATS", "Refused", "Socket",
           "open_stream", "origin_allowed", "result_format", "serve_stream"]

log = logging.getLogger("aioaccel.streaming")

CLOSE_NORMAL = 1000        #: every frame answered
CLOSE_GOING_AWAY = 1001    #: the server is shutting down (every accepted frame answered)
CLOSE_POLICY = 1008        #: the client broke the protocol
CLOSE_ERROR = 1011         #: the runner broke
CLOSE_NOT_FOUND = 4404     #: no such model (HTTP's 404, in the application's close codes)

#: what the server's own stream keys start with (a client's ``?stream=`` may not)
ANONYMOUS_PREFIX = "ws-"
#: how results may be sent: JSON text, or .npy binary messages after a text header
RESULT_FORMATS = ("json", "npy")
_MAX_KEY = 128
#: JSON bigger than this (bytes) is parsed or written on a thread, not on the event loop
_OFF_LOOP = 256 * 1024


@dataclass
class Socket:
    """What the streaming loop needs from a framework's WebSocket.

    ``receive`` returns the next message (``bytes`` or ``str``), or None once the client has
    gone; ``send`` sends one text message; ``close`` closes with a code and reason;
    ``send_bytes`` sends one binary message (without it, results are always JSON).
    """

    receive: Callable[[], Awaitable[bytes | str | None]]
    send: Callable[[str], Awaitable[None]]
    close: Callable[[int, str], Awaitable[None]]
    send_bytes: Callable[[bytes], Awaitable[None]] | None = None


class Refused(Exception):
    """A connection the server will not serve: ``status`` for a handshake refusal (HTTP),
    ``code`` for a close after accepting, ``reason`` for both (at most 123 bytes)."""

    def __init__(self, status: int, code: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.code = code
        self.reason = _close_reason(reason)


class _Gone(Exception):
    """The client disconnected."""


@dataclass(frozen=True)
class _Failed:
    tag: Any
    status: int
    message: str


@dataclass(frozen=True)
class _Result:
    """A reply slot: the stream's next result, sent in ``fmt``."""

    fmt: str


_JSON_RESULT, _NPY_RESULT = _Result("json"), _Result("npy")
_END = object()      # no more frames
_STOPPED = object()  # the server is shutting down: read no more


def _close_reason(text: str) -> str:
    """A WebSocket close reason is at most 123 bytes of UTF-8."""
    data = text.encode()
    return text if len(data) <= 123 else data[:120].decode(errors="ignore") + "..."


def result_format(requested: str | None) -> str:
    """The connection's result format from ``?results=`` (default JSON); raises
    :class:`Refused` for anything else."""
    if requested is None or requested == "":
        return "json"
    if requested not in RESULT_FORMATS:
        raise Refused(400, CLOSE_POLICY, f"results={requested[:40]!r}: use one of "
                                         f"{', '.join(RESULT_FORMATS)}")
    return requested


def origin_allowed(origin: str | None, host: str | None,
                   allowed: Collection[str] | None) -> bool:
    """Whether a WebSocket handshake's ``Origin`` may connect: any origin in ``allowed``
    (``"*"``: all); by default (None) none but the server's own (``Origin``'s host and port
    equal to ``Host``). A handshake without ``Origin`` is not a browser's, and is allowed."""
    if origin is None:
        return True
    if allowed is not None and ("*" in allowed or origin.rstrip("/") in
                                {a.rstrip("/") for a in allowed}):
        return True
    if host is None or origin == "null":
        return False
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or parts.hostname is None:
        return False
    default = 443 if parts.scheme == "https" else 80
    shown = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    candidates = {f"{shown}:{port or default}"} | ({shown} if port in (None, default) else set())
    return host.lower() in candidates


def open_stream(runner: Runner, requested: str | None = None, *,
                maxsize: int | None = None) -> Stream:
    """The stream of a new connection: ``requested`` (the client's ``?stream=``) or a fresh
    anonymous key. Raises :class:`Refused` for a bad key or one in use (409)."""
    if requested:
        if (len(requested) > _MAX_KEY or not requested.isprintable()
                or requested.startswith(ANONYMOUS_PREFIX)):
            raise Refused(400, CLOSE_POLICY,
                          f"stream key {requested[:40]!r}: use 1 to {_MAX_KEY} printable "
                          f"characters, not starting with {ANONYMOUS_PREFIX!r} (the server's "
                          f"own keys)")
        key = requested
    else:  # unguessable, and in a namespace clients cannot name: nobody can take it over
        key = f"{ANONYMOUS_PREFIX}{secrets.token_hex(8)}"
    if any(s.key == key for s in runner.streams()):
        raise Refused(409, CLOSE_POLICY, f"stream {key!r} is already in use")
    try:
        return runner.stream(key, maxsize=maxsize)
    except (ValueError, RuntimeError) as exc:
        raise Refused(503 if isinstance(exc, RuntimeError) else 409, CLOSE_POLICY,
                      str(exc)) from None


async def serve_stream(runner: Runner, socket: Socket, *, key: Any = None,
                       maxsize: int | None = None, retry_after: float = 1.0,
                       stop: asyncio.Event | None = None, stream: Stream | None = None,
                       results: str = "json") -> int:
    """Run one WebSocket connection as ``runner.stream(key)``; returns the frames answered.

    ``stream``, from :func:`open_stream` before the handshake was accepted, is used as it is;
    else the stream is opened here (a refusal closes with 1008). ``results`` is the
    connection's result format. ``stop`` (set when the server shuts down) ends the connection
    gracefully: no more frames are read, the ones read are answered, then it closes with 1001.
    """
    if stream is None:
        try:
            stream = open_stream(runner, key, maxsize=maxsize)
        except Refused as refused:
            await socket.close(refused.code, refused.reason)
            return 0
    if socket.send_bytes is None:
        results = "json"
    # one entry per frame, in order; bounded so that a client sending only bad frames (which
    # take no slot in the stream) is paced by the socket like everyone else
    replies: asyncio.Queue[Any] = asyncio.Queue(maxsize=2 * (maxsize or runner.maxsize))
    reader = asyncio.ensure_future(_read(runner, stream, socket, replies, stop, results))
    writer = asyncio.ensure_future(_write(stream, socket, replies))
    answered = 0
    try:
        # the reader ends at {"end": true} or on shutdown, having queued every frame it read;
        # the writer then answers them all (it ends early only if the client went away)
        await asyncio.wait((reader, writer), return_when=asyncio.FIRST_COMPLETED)
        if reader.done() and reader.exception() is not None:
            raise reader.exception()  # type: ignore[misc]
        answered = await writer
        code = CLOSE_GOING_AWAY if stop is not None and stop.is_set() else CLOSE_NORMAL
        try:
            await socket.send(json.dumps({"end": True, "frames": answered}))
            await socket.close(code, "")
        except Exception:  # the client left before the end message: nothing to tell it
            pass
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
        for task in (reader, writer):
            if not task.done():
                task.cancel()
        await asyncio.gather(reader, writer, return_exceptions=True)
        await _abandon(stream)
    return answered


class _Interruptible:
    """Lets a shutdown interrupt the reader while, and only while, it waits for a message.

    Cancelling the wait loses nothing (a message that had arrived stays in the framework's
    queue, unread, and the connection is closing); a frame already read is still pushed and
    answered. No task per frame: the per-frame cost is two attribute writes."""

    def __init__(self, stop: asyncio.Event | None):
        self.receiving = False
        self.interrupted = False
        self.task: asyncio.Task[Any] | None = None
        self._watch = asyncio.ensure_future(stop.wait()) if stop is not None else None
        if self._watch is not None:
            self._watch.add_done_callback(self._on_stop)

    @property
    def stopped(self) -> bool:
        return self._watch is not None and self._watch.done() and not self._watch.cancelled()

    def _on_stop(self, watch: asyncio.Future[Any]) -> None:
        if watch.cancelled() or self.task is None or self.task.done():
            return
        if self.receiving:
            self.interrupted = True
            self.task.cancel()

    async def receive(self, socket: Socket) -> Any:
        """The next message, or ``_STOPPED`` once the server is shutting down."""
        if self.stopped:
            return _STOPPED
        self.receiving = True
        try:
            return await socket.receive()
        except asyncio.CancelledError:
            task = self.task
            if self.interrupted and task is not None and task.uncancel() == 0:
                return _STOPPED  # our own interruption, nobody else's: stop reading
            raise
        finally:
            self.receiving = False

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()


def _strict(name: str) -> Any:
    raise InputError(f"text frame holds {name}, which is not JSON (RFC 8259): send numbers")


def _format(frame: Mapping[str, Any], default: str) -> str:
    fmt = frame.get("results", default)
    if fmt not in RESULT_FORMATS:
        raise InputError(f'"results": {fmt!r}: use one of {", ".join(RESULT_FORMATS)}')
    return fmt  # type: ignore[no-any-return]


async def _read(runner: Runner, stream: Stream, socket: Socket, replies: asyncio.Queue[Any],
                stop: asyncio.Event | None, results: str) -> None:
    reading = _Interruptible(stop)
    reading.task = asyncio.current_task()
    try:
        await _read_frames(runner, stream, socket, replies, reading, results)
    finally:
        reading.close()


async def _read_frames(runner: Runner, stream: Stream, socket: Socket,
                       replies: asyncio.Queue[Any], reading: _Interruptible,
                       results: str) -> None:
    index = 0
    header: dict[str, Any] | None = None  # the text header before a binary frame
    binary_ok = socket.send_bytes is not None
    while True:
        message = await reading.receive(socket)
        if message is None:
            raise _Gone
        if message is _STOPPED:
            await replies.put(_END)
            return
        tag: Any = index
        fmt = results
        try:
            if isinstance(message, bytes):
                if header is not None:
                    tag = header.get("tag", index)
                    fmt = _format(header, results)
                    header = None
                inputs = decode_inputs(message, NPY, runner.inputs)
            else:
                frame = await _parse(message)
                if frame.get("end") is True:
                    stream.close()
                    await replies.put(_END)
                    return
                tag = frame.get("tag", index)
                fmt = _format(frame, results)
                if "inputs" not in frame:
                    if "tag" not in frame and "results" not in frame:
                        raise InputError('a text frame needs "inputs" (or "tag" / "results" '
                                         'before a binary frame, or "end": true)')
                    header = frame
                    continue
                body = json.dumps(frame["inputs"]).encode()
                if len(body) > _OFF_LOOP:
                    inputs = await asyncio.to_thread(decode_inputs, body, "application/json",
                                                     runner.inputs)
                else:
                    inputs = decode_inputs(body, "application/json", runner.inputs)
        except InputError as exc:
            index += 1
            await replies.put(_Failed(_jsonable_tag(tag, index - 1), 422, str(exc)))
            continue
        except RecursionError:
            index += 1
            await replies.put(_Failed(index - 1, 422, "frame is nested too deeply"))
            continue
        except Exception as exc:  # a bug decoding one frame: answered, the stream goes on
            index += 1
            await replies.put(_Failed(index - 1, 500, f"internal error (error id "
                                                     f"{_logged(exc)})"))
            continue
        index += 1
        try:
            await stream.push(inputs, tag=tag)  # waits while the stream is full: no reading
        except InputError as exc:  # the model's input check
            await replies.put(_Failed(tag, 422, str(exc)))
            continue
        await replies.put(_NPY_RESULT if fmt == "npy" and binary_ok else _JSON_RESULT)


async def _parse(message: str) -> dict[str, Any]:
    try:
        frame = (json.loads(message, parse_constant=_strict) if len(message) <= _OFF_LOOP
                 else await asyncio.to_thread(json.loads, message, parse_constant=_strict))
    except RecursionError:
        raise InputError("text frame is nested too deeply") from None
    except ValueError as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"text frame is not JSON ({exc}); send "
                         f'{{"tag": ..., "inputs": ...}} or a binary .npy') from None
    if not isinstance(frame, dict):
        raise InputError('a text frame must be a JSON object: {"tag": ..., "inputs": ...}, '
                         '{"tag": ...} before a binary frame, or {"end": true}')
    return frame


def _jsonable_tag(tag: Any, index: int) -> Any:
    """A tag that can be echoed (it came from strict JSON or is an index; this is a guard)."""
    try:
        json.dumps(tag, allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        return index
    return tag


def _logged(exc: BaseException) -> str:
    error_id = uuid.uuid4().hex[:12]
    log.error("error id %s: decoding a frame failed", error_id, exc_info=exc)
    return error_id


def _nbytes(outputs: Any) -> int:
    if isinstance(outputs, dict):
        return sum(getattr(v, "nbytes", 0) for v in outputs.values())
    return int(getattr(outputs, "nbytes", 0))


async def _write(stream: Stream, socket: Socket, replies: asyncio.Queue[Any]) -> int:
    answered = 0
    while True:
        entry = await replies.get()
        if entry is _END:
            return answered
        binary: list[bytes] = []
        if isinstance(entry, _Failed):
            text = json.dumps({"tag": entry.tag, "status": entry.status,
                               "error": entry.message})
        else:
            result = await anext(stream)
            head = {"tag": result.tag, "seq": result.seq}
            if not result.ok:
                text = json.dumps({**head, "status": 500,
                                   "error": f"inference failed: {result.error}"})
            elif entry.fmt == "npy":
                names, binary = await _npy_messages(result.outputs)
                text = json.dumps({**head, "npy": names})
            else:
                if _nbytes(result.outputs) > _OFF_LOOP:  # JSON of big arrays takes long
                    body, _ = await asyncio.to_thread(encode_outputs, result.outputs, None)
                else:
                    body, _ = encode_outputs(result.outputs, None)  # b'{"outputs": ...}'
                text = json.dumps(head)[:-1] + ", " + body.decode()[1:]
        try:
            await socket.send(text)
            for data in binary:
                await socket.send_bytes(data)  # type: ignore[misc]  # npy only with it
        except Exception:  # whatever the framework raises for a closed connection
            raise _Gone from None
        answered += 1


async def _npy_messages(outputs: Any) -> tuple[list[str | None], list[bytes]]:
    """(names, one .npy message per name) of one result's outputs."""
    items: list[tuple[str | None, Any]] = (
        [(str(k), v) for k, v in outputs.items()] if isinstance(outputs, Mapping)
        else [(None, outputs)])
    if _nbytes(outputs) > _OFF_LOOP:
        data = await asyncio.to_thread(lambda: [encode_npy(v) for _, v in items])
    else:
        data = [encode_npy(v) for _, v in items]
    return [name for name, _ in items], data


#: drains of abandoned streams that outlived a cancelled connection handler
_draining: set[asyncio.Future[None]] = set()


async def _abandon(stream: Stream) -> None:
    """The connection is over: withdraw what the device has not started, drop the rest. The
    stream is forgotten (its key free) once the last of them is back and consumed; if this
    handler is cancelled meanwhile, the drain goes on without it."""
    stream.withdraw()
    stream.close()
    drain = asyncio.ensure_future(_drain(stream))
    _draining.add(drain)
    drain.add_done_callback(_draining.discard)
    await asyncio.shield(drain)


async def _drain(stream: Stream) -> None:
    try:
        async for _ in stream:  # results of items already on the device: consumed, dropped
            pass
    except AccelError:
        pass  # the runner broke or closed: its items were failed, nothing is left to free
