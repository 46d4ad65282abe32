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
    """Four changes: the URL is printed once the server listens (so ``--port 0`` is
    usable); SIGTERM/SIGINT set ``stop`` (streams and status feeds then end instead of
    holding the drain) and lead to a graceful shutdown that exits 0, where uvicorn re-raises
    the signal after its shutdown (killing the process with it); the shutdown lets
    WebSocket streams answer their accepted frames before uvicorn closes the connections;
    and a second signal (SIGINT or SIGTERM) sets ``forced``: nothing more is waited for."""

    def __init__(self, config: uvicorn.Config, stop: asyncio.Event, models: list[str],
                 streams: OpenStreams | None = None):
        super().__init__(config)
        self.stop = stop
        self.models = models
        self.streams = streams
        #: set by a second SIGINT or SIGTERM: stop waiting for anything, exit now
        self.forced = asyncio.Event()
        #: lines printed after the URL once the server listens (the gRPC address)
        self.announce: list[str] = []

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started and self.servers:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            loop = "uvloop" if type(asyncio.get_running_loop()).__module__.startswith(
                "uvloop") else "asyncio"
            print(f"aioaccel serve: http://{shown}:{port} serving {', '.join(self.models)} "
                  f"on {loop}; status page at /, API at /docs", flush=True)
            for line in self.announce:
                print(line, flush=True)

    async def shutdown(self, sockets: Any = None) -> None:
        for server in self.servers:  # stop accepting first (uvicorn's close repeats it)
            server.close()
        self.stop.set()  # also when shutdown was not asked for by a signal
        if self.streams is not None and not self.forced.is_set():
            closed = asyncio.ensure_future(self.streams.wait_closed())
            forced = asyncio.ensure_future(self.forced.wait())
            try:  # uvicorn closes what is left after the timeout
                await asyncio.wait((closed, forced), timeout=self.config.timeout_graceful_shutdown,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                closed.cancel()
                forced.cancel()
        await super().shutdown(sockets)
        if self.force_exit and getattr(self, "lifespan", None) is not None:
            # uvicorn skips the app's shutdown when forced, and the lifespan task is then
            # cancelled at exit with a traceback; ours only ends the streams: quick
            try:
                await asyncio.wait_for(self.lifespan.shutdown(), 1.0)
            except TimeoutError:
                pass

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        loop = asyncio.get_running_loop()

        def on_signal(sig: int, frame: FrameType | None) -> None:
            if self.should_exit:  # the second signal: uvicorn gives up waiting, and so do we
                self.force_exit = True
                loop.call_soon_threadsafe(self.forced.set)
            loop.call_soon_threadsafe(self.stop.set)  # safe from a signal handler
            self.handle_exit(sig, frame)

        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, on_signal) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
