"""uvicorn's ``Server`` with what ``aioaccel serve`` needs on top."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Generator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import uvicorn

from .app import OpenStreams

__all__ = ["Server"]


class Server(uvicorn.Server):
    """Three changes: the URL is printed once the server listens (so ``--port 0`` is
    usable); SIGTERM/SIGINT set ``stop`` (streams and status feeds then end instead of
    holding the drain) and lead to a graceful shutdown that exits 0, where uvicorn re-raises
    the signal after its shutdown (killing the process with it); and the shutdown lets
    WebSocket streams answer their accepted frames before uvicorn closes the connections."""

    def __init__(self, config: uvicorn.Config, stop: asyncio.Event, models: list[str],
                 streams: OpenStreams | None = None):
        super().__init__(config)
        self.stop = stop
        self.models = models
        self.streams = streams
        #: lines printed after the URL once the server listens (the gRPC address)
        self.announce: list[str] = []

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started and self.servers:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            print(f"aioaccel serve: http://{shown}:{port} serving {', '.join(self.models)}; "
                  f"status page at /, API at /docs", flush=True)
            for line in self.announce:
                print(line, flush=True)

    async def shutdown(self, sockets: Any = None) -> None:
        for server in self.servers:  # stop accepting first (uvicorn's close repeats it)
            server.close()
        self.stop.set()  # also when shutdown was not asked for by a signal
        if self.streams is not None:
            try:
                await asyncio.wait_for(self.streams.wait_closed(),
                                       self.config.timeout_graceful_shutdown)
            except TimeoutError:
                pass  # uvicorn closes what is left
        await super().shutdown(sockets)

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        loop = asyncio.get_running_loop()

        def on_signal(sig: int, frame: FrameType | None) -> None:
            loop.call_soon_threadsafe(self.stop.set)  # safe from a signal handler
            self.handle_exit(sig, frame)

        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, on_signal) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
