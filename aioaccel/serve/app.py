"""One FastAPI app serving several named runners (what ``aioaccel serve`` runs).

Routes: ``POST /v1/models/{name}/infer``, ``GET /v1/models/{name}`` (specs and state),
``GET /v1/models``, ``WS /v1/models/{name}/stream``, ``GET /healthz``, ``GET /metrics``,
``GET /`` (the live status page), ``GET /v1/status`` and ``GET /v1/status/events``
(Server-Sent Events, one snapshot a second), ``/docs`` (OpenAPI, from local assets:
:mod:`.apidocs`), and the Open Inference Protocol's ``/v2/...`` routes (:mod:`.v2_rest`).
Every request behaviour is :mod:`aioaccel.integrations.fastapi`'s: 503 + Retry-After past
``admit_timeout``, 413 over ``max_body``, 422 for bad input, 406 for an ``Accept`` that refuses
JSON and ``.npy``, a client that disconnects withdraws its item. A WebSocket to an unknown
model is closed with 4404 and the 404's message as its reason.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Collection, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from importlib import resources
from typing import TYPE_CHECKING, Any

from .._optional import need
from ..integrations.http import DEFAULT_MAX_BODY

need("fastapi", "fastapi", "aioaccel serve")

from fastapi import FastAPI, HTTPException, Request, Response, WebSocket  # noqa: E402
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse  # noqa: E402

from ..integrations.fastapi import Accel  # noqa: E402
from ..integrations.streaming import CLOSE_NOT_FOUND, _close_reason  # noqa: E402
from .apidocs import add_offline_docs, swagger_assets  # noqa: E402
from .status import (  # noqa: E402
    HEALTHY,
    StatusFeed,
    StatusHistory,
    model_restarts,
    model_state,
)
from .v2_rest import add_v2_routes  # noqa: E402

if TYPE_CHECKING:
    from ..runner import Runner
    from ..tensors import TensorSpec

__all__ = ["MODEL_NAME", "OpenStreams", "build_app", "describe"]

#: what a model name may look like: it is a URL path segment
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_RESERVED = {"admit_timeout", "retry_after", "max_body", "timeout", "body_timeout",
             "allowed_origins"}  # Accel's keywords


def build_app(runners: Mapping[str, Runner], *, admit_timeout: float = 1.0,
              retry_after: float = 1.0, max_body: int = DEFAULT_MAX_BODY,
              timeout: float | None = None, manage_runners: bool = True,
              stop: asyncio.Event | None = None, status_interval: float = 1.0,
              title: str = "aioaccel serve",
              allowed_origins: Collection[str] | None = None) -> FastAPI:
    """The app for ``runners`` (name -> runner). With ``manage_runners`` its lifespan opens
    them and closes them (draining) on shutdown; without, the caller owns them. ``stop``,
    set when the server begins to shut down, ends WebSocket streams (every accepted frame
    answered) and status feeds, so that connections close instead of holding the drain.
    ``allowed_origins``: browser origins that may open WebSocket streams besides the
    server's own (``["*"]``: any; default: the server's own only)."""
    for name in runners:
        if not MODEL_NAME.fullmatch(name) or name in _RESERVED:
            raise ValueError(f"model name {name!r} cannot be served: use letters, digits, "
                             f"'_', '.', '-' (up to 64), not one of {sorted(_RESERVED)}")
    if not runners:
        raise ValueError("aioaccel serve needs at least one model")
    accel = Accel(admit_timeout=admit_timeout, retry_after=retry_after, max_body=max_body,
                  timeout=timeout, allowed_origins=allowed_origins,
                  **runners)  # type: ignore[arg-type]  # names checked above
    stopping = stop if stop is not None else asyncio.Event()
    streams = OpenStreams()
    # sampled while the app runs, so the status page draws the last minutes when it opens
    history = StatusHistory(accel.runners, interval=status_interval)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_runners:
            async with accel.lifespan(app), history.sampling():
                yield
                stopping.set()
        else:
            app.state.aioaccel = accel
            async with history.sampling():
                yield
                stopping.set()

    from .. import __version__

    offline = swagger_assets() is not None  # else FastAPI's page, whose assets are on a CDN
    app = FastAPI(title=title, version=__version__, lifespan=lifespan,
                  docs_url=None if offline else "/docs", redoc_url=None,
                  description="Models served by aioaccel: request/response over HTTP, "
                              "ordered streaming over WebSocket, a live status page at /.")
    if offline:
        add_offline_docs(app)
    app.state.streams = streams  # the server waits on it before closing connections

    def named(name: str) -> Runner:
        runner = accel.runners.get(name)
        if runner is None:
            raise HTTPException(404, _missing(name, accel.runners))
        return runner

    @app.post("/v1/models/{name}/infer", summary="Run one input through a model")
    async def infer(name: str, request: Request) -> Response:
        runner = named(name)
        inputs = await accel.read_inputs(request, runner)
        return await accel.infer(request, runner, inputs)

    @app.get("/v1/models", summary="The models served")
    async def models() -> dict[str, Any]:
        return {"models": [describe(name, runner) for name, runner in accel.runners.items()]}

    @app.get("/v1/models/{name}", summary="A model's inputs, outputs and state")
    async def model(name: str) -> dict[str, Any]:
        return describe(name, named(name))

    @app.websocket("/v1/models/{name}/stream")
    async def stream(websocket: WebSocket, name: str) -> None:
        runner = accel.runners.get(name)
        if runner is None:  # told as a close reason, which browsers see (a refusal they don't)
            await websocket.accept()
            await websocket.close(CLOSE_NOT_FOUND, _missing(name, accel.runners))
            return
        with streams.open():
            await accel.stream(websocket, runner, stop=stopping)

    @app.get("/healthz", summary="200 while every model is ready, else 503")
    async def healthz() -> Response:
        states = {name: model_state(runner) for name, runner in accel.runners.items()}
        ok = all(state in HEALTHY for state in states.values())
        body = {"ok": ok, "models": {name: {"state": state,
                                            "restarts": model_restarts(accel.runners[name]),
                                            "in_flight": accel.runners[name].stats().in_flight,
                                            "maxsize": accel.runners[name].maxsize}
                                     for name, state in states.items()}}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", summary="Prometheus metrics of every model")
    async def metrics() -> Response:
        response = accel.metrics()
        return Response(bytes(response.body) + v2_requests.exposition(),
                        media_type=response.media_type)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def status_page() -> HTMLResponse:
        return HTMLResponse(_page())

    @app.get("/v1/status", summary="A snapshot of every model's live numbers")
    async def status() -> dict[str, Any]:
        return StatusFeed(accel.runners, history).snapshot()

    @app.get("/v1/status/events", summary="The same snapshot once a second (Server-Sent Events)")
    async def status_events() -> StreamingResponse:
        return StreamingResponse(_events(StatusFeed(accel.runners, history), status_interval,
                                         stopping),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})

    # the Open Inference Protocol (KServe v2): /v2/...; the gRPC server counts here too
    v2_requests = app.state.v2_requests = add_v2_routes(app, accel)
    return app


class OpenStreams:
    """How many WebSocket streams are being served, and a wait for there to be none: on
    shutdown, the server lets streams answer their accepted frames and close with 1001 before
    uvicorn closes whatever connection is left (with 1012, answering nothing more)."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextmanager
    def open(self) -> Iterator[None]:
        self.count += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.count -= 1
            if self.count == 0:
                self._idle.set()

    async def wait_closed(self) -> None:
        await self._idle.wait()


def describe(name: str, runner: Runner) -> dict[str, Any]:
    """A model's specs and state, as ``GET /v1/models/{name}`` answers."""
    def specs(found: list[TensorSpec] | None) -> list[dict[str, Any]] | None:
        if found is None:
            return None
        return [{"name": s.name, "dtype": s.dtype,
                 "shape": None if s.shape is None else list(s.shape)} for s in found]

    stats = runner.stats()
    return {"name": name, "state": model_state(runner), "inputs": specs(runner.inputs),
            "outputs": specs(runner.outputs), "maxsize": runner.maxsize,
            "stages": [{"name": s.name, "kind": s.kind, "workers": s.workers}
                       for s in stats.stages]}


async def _events(feed: StatusFeed, interval: float, stop: asyncio.Event) -> AsyncIterator[str]:
    while True:
        yield f"data: {json.dumps(feed.snapshot())}\n\n"
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except TimeoutError:
            continue
        return  # shutting down: end the feed so the connection closes


def _missing(name: str, runners: Mapping[str, Any]) -> str:
    """The 404's message (also the WebSocket close reason: at most 123 bytes)."""
    text = f"no model named {name[:40]!r}; this server has {sorted(runners)}"
    return _close_reason(text)


def _page() -> str:
    return (resources.files(__package__) / "status.html").read_text(encoding="utf-8")
