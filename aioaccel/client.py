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
the order frames were sent. The protocol is described in :mod:`aioaccel.integrations.streaming`.
"""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._optional import need

__all__ = ["Reply", "StreamClient", "connect"]


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
        """The next reply; raises ``StopAsyncIteration`` after the server's end message."""
        if self.ended is not None:
            raise StopAsyncIteration
        message = json.loads(await self._ws.recv())
        if message.get("end") is True:
            self.ended = message
            raise StopAsyncIteration
        if "outputs" in message:
            found = message["outputs"]
            outputs = ({name: np.asarray(v) for name, v in found.items()}
                       if isinstance(found, dict) else np.asarray(found))
            return Reply(message.get("tag"), message.get("seq"), outputs)
        return Reply(message.get("tag"), message.get("seq"), None, message.get("status", 500),
                     message.get("error", "unknown error"))

    async def wait_closed(self) -> int | None:
        """Wait for the server to close the connection; its close code (1000 after every frame
        was answered, 1001 when it shut down, 1008 a protocol error, 1011 the model broke)."""
        await self._ws.wait_closed()
        return self._ws.close_code  # type: ignore[no-any-return]

    def __aiter__(self) -> StreamClient:
        return self

    async def __anext__(self) -> Reply:
        return await self.receive()


@asynccontextmanager
async def connect(url: str, **options: Any) -> AsyncIterator[StreamClient]:
    """Open ``ws://host:port/v1/models/{name}/stream`` (``?stream=KEY`` names the stream);
    other keyword options go to ``websockets.connect``."""
    client = need("websockets.asyncio.client", "client", "aioaccel.client")
    options.setdefault("max_size", 64 * 1024 * 1024)
    async with client.connect(url, **options) as websocket:
        yield StreamClient(websocket)
