"""``aioaccel serve --grpc-port``: the gRPC server beside uvicorn, in the same event loop.

It starts before uvicorn binds (so it answers once the URL is printed) and stops accepting
when ``stop`` is set (SIGTERM/SIGINT), letting calls in flight finish within
``--drain-timeout`` while the runners are still open; leaving the context stops it for good.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..runner import Runner
    from .v2_metrics import V2Requests

__all__ = ["start_grpc"]


@asynccontextmanager
async def start_grpc(runners: Mapping[str, Runner], args: argparse.Namespace,
                     stop: asyncio.Event, requests: V2Requests | None = None
                     ) -> AsyncIterator[list[str]]:
    """Serve gRPC while inside; yields the lines to print once the server listens."""
    from .. import __version__
    from ..integrations.http import DEFAULT_MAX_BODY
    from .v2_grpc import V2GrpcServer

    server = V2GrpcServer(runners, admit_timeout=args.admit_timeout, stop=stop,
                          max_message=DEFAULT_MAX_BODY, version=__version__,
                          requests=requests)
    port = await server.start(args.host, args.grpc_port)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    drain = float(args.drain_timeout)

    async def stop_on_signal() -> None:
        await stop.wait()
        await server.stop_serving(drain)

    stopper = asyncio.ensure_future(stop_on_signal())
    try:
        yield [f"aioaccel serve: grpc://{shown}:{port} (Open Inference Protocol, "
               f"inference.GRPCInferenceService)"]
    finally:
        stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(stopper), drain + 1)
        except TimeoutError:
            pass
        stopper.cancel()
        await server.stop_serving(0)
