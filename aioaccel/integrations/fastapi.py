"""FastAPI: runners opened in the app's lifespan, a dependency that hands one to a handler,
and an ``infer`` that answers 503 instead of queueing without bound.

``pip install 'aioaccel[fastapi]'``::

    accel = Accel(default=aioaccel.open("model.tflite"), admit_timeout=0.5)
    app = FastAPI(lifespan=accel.lifespan)

    @app.post("/infer")
    async def infer(request: Request, runner: Runner = Depends(accel.runner())):
        inputs = await accel.read_inputs(request, runner)
        return await accel.infer(request, runner, inputs)

* **Lifespan.** The runners open when the app starts and close when it stops: ``aclose``
  lets admitted requests finish (up to each runner's ``close_timeout``), so a request that was
  accepted is answered.
* **Overload.** A request waits at most ``admit_timeout`` seconds for space in the runner,
  then gets **503** with ``Retry-After``; memory and latency stay bounded under any load.
* **Client gone.** While a request waits, the handler watches the connection; if the client
  disconnects, the item is withdrawn (or its result discarded) and nothing is sent.
* **Body limit.** Bodies over ``max_body`` bytes get **413** before they are read in full;
  a body not received within ``body_timeout`` seconds gets **408**; a client that leaves
  mid-body is logged in one line (``aioaccel.http`` logger), not with tracebacks.
* Errors: bad input 422, runner broken or closing 503, ``InferTimeout`` 504.
* **Streaming.** ``await accel.stream(websocket, runner)`` in a ``@app.websocket`` route runs
  the connection as one of the runner's streams (protocol: :mod:`.streaming`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, NoReturn

from .._optional import need
from .http import (
    CLIENT_CLOSED,
    AccelBase,
    NotAcceptable,
    acceptable,
    decode_inputs_off_loop,
    encode_outputs,
    log,
    problem_for,
)
from .streaming import (
    CLOSE_POLICY,
    Refused,
    Socket,
    open_stream,
    origin_allowed,
    result_format,
    serve_stream,
)

need("fastapi", "fastapi", "aioaccel.integrations.fastapi")

from fastapi import HTTPException, Request, Response, WebSocket  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from starlette.requests import ClientDisconnect  # noqa: E402

if TYPE_CHECKING:
    from ..runner import Runner

__all__ = ["CLIENT_CLOSED", "Accel", "deny"]



class Accel(AccelBase):
    """The runners of one app, opened and closed with it. Keyword arguments name them."""

    # ---- lifespan and dependency ---------------------------------------------------------
    @asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        """``FastAPI(lifespan=accel.lifespan)``: open every runner; on shutdown drain and close."""
        async with self._opened():
            app.state.aioaccel = self
            yield

    def runner(self, name: str = "default") -> Callable[[], Runner]:
        """A dependency: ``runner: Runner = Depends(accel.runner("default"))``."""
        runner = self._named(name)

        def dependency() -> Runner:
            return runner

        return dependency

    # ---- requests ------------------------------------------------------------------------
    async def read_inputs(self, request: Request, runner: Runner) -> Any:
        """The request body as one item's inputs: JSON or ``.npy`` (413 over ``max_body``)."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise HTTPException(413, f"body of {declared} bytes is over the limit of "
                                     f"{self.max_body} bytes")
        body = bytearray()
        try:
            async with asyncio.timeout(self.body_timeout):
                async for chunk in request.stream():
                    if len(body) + len(chunk) > self.max_body:
                        raise HTTPException(413, f"body is over the limit of {self.max_body} "
                                                 f"bytes")
                    body += chunk
        except TimeoutError:
            raise HTTPException(408, f"request body not received within {self.body_timeout} s"
                                ) from None
        except ClientDisconnect:
            log.info("client %s left after sending %d bytes of its body", _peer(request),
                     len(body))
            raise HTTPException(CLIENT_CLOSED, "client closed the connection") from None
        try:
            return await decode_inputs_off_loop(body, request.headers.get("content-type"),
                                                runner.inputs)
        except Exception as exc:
            self._raise(exc)

    async def infer(self, request: Request, runner: Runner, inputs: Any) -> Response:
        """Run ``inputs`` and answer with the outputs (JSON, or ``.npy`` if accepted)."""
        try:
            acceptable(request.headers.get("accept"))  # a 406 costs the device nothing
        except NotAcceptable as exc:
            self._raise(exc)
        work = await self._infer_while_connected(runner, inputs, _disconnected(request))
        if work is None:
            return Response(status_code=CLIENT_CLOSED)
        error = work.exception()
        if error is not None:
            self._raise(error)
        try:
            body, media_type = encode_outputs(work.result(), request.headers.get("accept"))
        except Exception as exc:
            self._raise(exc)
        return Response(content=body, media_type=media_type)

    def _raise(self, exc: BaseException) -> NoReturn:
        """The HTTP error for an aioaccel error; anything else propagates as it is (a 500)."""
        problem = problem_for(exc, self.retry_after)
        if problem is None:
            raise exc
        raise HTTPException(problem.status, problem.message, dict(problem.headers)) from exc

    # ---- WebSocket streaming -----------------------------------------------------------------
    async def stream(self, websocket: WebSocket, runner: Runner, *, key: str | None = None,
                     maxsize: int | None = None, stop: asyncio.Event | None = None,
                     results: str | None = None) -> int:
        """Accept ``websocket`` and serve it as ``runner.stream(key)`` until it ends; returns
        the frames answered. ``key`` defaults to the ``?stream=`` query parameter, else a fresh
        one; ``results`` (``"json"`` or ``"npy"``) to ``?results=``, else JSON; ``stop`` (set
        on shutdown) ends it gracefully (close code 1001). A key in use, a bad key or an
        ``Origin`` not in ``allowed_origins`` is refused at the handshake (HTTP 409, 400,
        403) with the reason."""
        try:
            if not origin_allowed(websocket.headers.get("origin"),
                                  websocket.headers.get("host"), self.allowed_origins):
                raise Refused(403, CLOSE_POLICY, f"origin {websocket.headers['origin']!r} is "
                                                 f"not allowed to stream here")
            fmt = result_format(results or websocket.query_params.get("results"))
            opened = open_stream(runner, key or websocket.query_params.get("stream"),
                                 maxsize=maxsize)
        except Refused as refused:
            await deny(websocket, refused)
            return 0
        try:
            await websocket.accept()
        except BaseException:
            opened.close()  # never used: forgotten at once, its key free
            raise
        return await serve_stream(runner, _socket(websocket), stream=opened, maxsize=maxsize,
                                  retry_after=self.retry_after, stop=stop, results=fmt)

    # ---- health and metrics ----------------------------------------------------------------
    def health(self) -> Response:
        """200 when every runner is open and not broken, else 503; JSON with their state."""
        status, body = self._health()
        return JSONResponse(body, status_code=status)

    def metrics(self) -> Response:
        """The runners' Prometheus metrics (needs ``aioaccel[metrics]``)."""
        body, content_type = self._metrics()
        return Response(body, media_type=content_type)


def _peer(request: Request) -> str:
    client = request.client
    return f"{client.host}:{client.port}" if client else "?"


async def deny(websocket: WebSocket, refused: Refused) -> None:
    """Refuse a WebSocket handshake with an HTTP status and a JSON reason where the server
    supports it (uvicorn does), else by closing before accepting (a bare 403)."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(
            JSONResponse({"detail": refused.reason}, status_code=refused.status))
    else:
        await websocket.close(refused.code, refused.reason)


def _socket(websocket: WebSocket) -> Socket:
    async def receive() -> bytes | str | None:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return None
        data = message.get("bytes")
        return data if data is not None else message.get("text", "")  # type: ignore[no-any-return]

    async def close(code: int, reason: str) -> None:
        try:
            await websocket.close(code, reason)
        except RuntimeError:  # already closed by the client
            pass

    return Socket(receive, websocket.send_text, close, websocket.send_bytes)


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
