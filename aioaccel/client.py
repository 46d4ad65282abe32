"""A minimal client for ``aioaccel serve``'s WebSocket stream (``pip install
'aioaccel[client]'``, which is the ``websockets`` package)::

    from aioaccel.client import connect

    async with connect("ws://127.0.0.1:8000/v1/models/model/stream") as stream:
        for i, frame in enumerate(frames):
            await stream.send(frame, tag=i)      # waits while the server is full
        await stream.end()                       # no more frames
        async for reply in stream:               # in the order sent, until the server's end
            print(reply.tag, reply.outputs["output"].shape)

Sending and receiving can run in two tasks (a camera loop and a consumer); results come in
the order frames were sent. Results come as ``.npy`` by default (``results="npy"``): each
output keeps its dtype and shape exactly (``results="json"`` asks for nested lists). A stream
key in use, a bad key or an origin the server does not allow is refused at connect
(:class:`StreamRefused`); a model the server does not have, at the first ``receive``
(:class:`StreamClosed`, with the server's reason). The protocol is described in
:mod:`aioaccel.integrations.streaming`.
"""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

from ._optional import need
from .errors import StreamClosed, StreamRefused

__all__ = ["RESULT_FORMATS", "Reply", "StreamClient", "StreamClosed", "StreamRefused", "connect"]

#: how the client may ask for results: ``.npy`` (exact dtype and shape) or JSON lists
RESULT_FORMATS = ("npy", "json")


@dataclass(frozen=True)
class Reply:
    """The server's answer to one frame."""

    tag: Any
    seq: int | None
    #: ``{output name: array}`` (an array for a model whose outputs have no names); None when
    #: the frame failed
    outputs: dict[str, np.ndarray] | np.ndarray | None
    status: int = 200                        #: 422 bad input, 500 the model failed
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class StreamClient:
    """One open stream; made by :func:`connect`."""

    def __init__(self, websocket: Any):
        self._ws = websocket
        self.frames = 0            #: frames sent
        self.ended: dict[str, Any] | None = None  #: the server's end message, once received

    async def send(self, frame: Any, *, tag: Any = None, as_json: bool = False) -> None:
        """Send one frame: an array goes as binary ``.npy`` (or JSON with ``as_json``), a
        ``{name: array}`` dict as JSON. Waits while the server is not reading (its stream is
        full)."""
        if isinstance(frame, dict) or as_json:
            inputs = ({name: np.asarray(v).tolist() for name, v in frame.items()}
                      if isinstance(frame, dict) else np.asarray(frame).tolist())
            message: dict[str, Any] = {"inputs": inputs}
            if tag is not None:
                message["tag"] = tag
            await self._ws.send(json.dumps(message))
        else:
            if tag is not None:
                await self._ws.send(json.dumps({"tag": tag}))
            buffer = io.BytesIO()
            np.save(buffer, np.asarray(frame), allow_pickle=False)
            await self._ws.send(buffer.getvalue())
        self.frames += 1

    async def send_raw(self, message: str | bytes) -> None:
        """Send one message as it is (for protocol extensions and tests)."""
        await self._ws.send(message)

    async def end(self) -> None:
        """No more frames: the server answers the pending ones, then sends its end."""
        await self._ws.send(json.dumps({"end": True}))

    async def receive(self) -> Reply:
        """The next reply; raises ``StopAsyncIteration`` after the server's end message and
        :class:`StreamClosed` if the server closed the stream without one."""
        if self.ended is not None:
            raise StopAsyncIteration
        message = json.loads(await self._recv())
        if message.get("end") is True:
            self.ended = message
            raise StopAsyncIteration
        tag, seq = message.get("tag"), message.get("seq")
        if "npy" in message:  # one binary .npy message per output follows
            names = message["npy"]
            arrays = [_load_npy(await self._recv(binary=True)) for _ in names]
            if names == [None]:
                return Reply(tag, seq, arrays[0])
            return Reply(tag, seq, dict(zip(names, arrays, strict=True)))
        if "outputs" in message:
            found = message["outputs"]
            outputs = ({name: np.asarray(v) for name, v in found.items()}
                       if isinstance(found, dict) else np.asarray(found))
            return Reply(tag, seq, outputs)
        return Reply(tag, seq, None, message.get("status", 500),
                     message.get("error", "unknown error"))

    async def _recv(self, *, binary: bool = False) -> Any:
        closed = need("websockets.exceptions", "client", "aioaccel.client").ConnectionClosed
        try:
            message = await self._ws.recv()
        except closed as exc:
            received = exc.rcvd
            raise StreamClosed(received.code if received else None,
                               received.reason if received else "") from None
        if binary and not isinstance(message, bytes):
            raise StreamClosed(None, f"expected a binary .npy result, got text {message[:80]!r}")
        return message

    async def wait_closed(self) -> int | None:
        """Wait for the server to close the connection; its close code (1000 after every frame
        was answered, 1001 when it shut down, 1008 a protocol error, 1011 the model broke)."""
        await self._ws.wait_closed()
        return self._ws.close_code  # type: ignore[no-any-return]

    def __aiter__(self) -> StreamClient:
        return self

    async def __anext__(self) -> Reply:
        return await self.receive()


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)  # type: ignore[no-any-return]


def _with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update({k: v for k, v in params.items() if k not in query})
    return urlunsplit(parts._replace(query=urlencode(query)))


@asynccontextmanager
async def connect(url: str, *, results: str = "npy",
                  **options: Any) -> AsyncIterator[StreamClient]:
    """Open ``ws://host:port/v1/models/{name}/stream`` (``?stream=KEY`` names the stream);
    ``results`` is how replies come (``"npy"``: arrays of the model's dtype and shape;
    ``"json"``: nested lists); other keyword options go to ``websockets.connect``. Raises
    :class:`StreamRefused` when the server refuses the stream (a key in use: 409)."""
    if results not in RESULT_FORMATS:
        raise ValueError(f"results={results!r}: use one of {', '.join(RESULT_FORMATS)}")
    client = need("websockets.asyncio.client", "client", "aioaccel.client")
    invalid = need("websockets.exceptions", "client", "aioaccel.client").InvalidStatus
    options.setdefault("max_size", 64 * 1024 * 1024)
    try:
        websocket = await client.connect(_with_query(url, results=results), **options)
    except invalid as exc:
        response = exc.response
        raise StreamRefused(response.status_code, _detail(response.body)) from None
    async with websocket:
        yield StreamClient(websocket)


def _detail(body: bytes | None) -> str:
    """The reason in a refusal's body (``{"detail": ...}``), else the body's text."""
    text = (body or b"").decode(errors="replace")
    try:
        found = json.loads(text)
    except ValueError:
        return text[:200]
    return str(found.get("detail", text))[:200] if isinstance(found, dict) else text[:200]
