"""aiohttp: runners opened in the app's ``cleanup_ctx``, and an ``infer`` that answers 503
instead of queueing without bound.

asyncio only (and uvloop): aiohttp is an asyncio library. Under trio, use the runner API
directly (see docs/trio.md).

``pip install 'aioaccel[aiohttp]'``::

    accel = Accel(default=aioaccel.open("model.tflite"), admit_timeout=0.5)
    app = web.Application(client_max_size=accel.max_body)
    accel.setup(app)

    async def infer(request: web.Request) -> web.Response:
        runner = accel.runner()
        inputs = await accel.read_inputs(request, runner)
        return await accel.infer(request, runner, inputs)

The same behaviour as :mod:`aioaccel.integrations.fastapi`: runners open with the app and
close with it, draining admitted requests; 503 with ``Retry-After`` past ``admit_timeout``;
413 over ``max_body``; 408 for a body not received within ``body_timeout``; 422 for bad
input. A client that disconnects while its item waits withdraws it (or its result is
discarded): ``infer`` watches the connection. With ``web.run_app(app,
handler_cancellation=True)`` (or ``AppRunner(app, handler_cancellation=True)``) aiohttp also
cancels the handler at once; without it the watch notices within ``DISCONNECT_POLL`` seconds.
Streaming: ``return await accel.ws(request, runner)`` in a GET handler (or
``app.router.add_get("/stream", accel.ws_handler("default"))``) runs a WebSocket as one of the
runner's streams (protocol: :mod:`.streaming`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
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

need("aiohttp", "aiohttp", "aioaccel.integrations.aiohttp")

from aiohttp import WSMsgType, web  # noqa: E402

if TYPE_CHECKING:
    from ..runner import Runner

__all__ = ["ACCEL", "CLIENT_CLOSED", "DISCONNECT_POLL", "Accel"]

#: seconds between looks at a waiting request's connection (aiohttp has no event for it)
DISCONNECT_POLL = 0.05

#: the statuses ``problem_for`` gives (413 is raised where the body is read)
_ERRORS: dict[int, type[web.HTTPException]] = {
    406: web.HTTPNotAcceptable, 408: web.HTTPRequestTimeout, 422: web.HTTPUnprocessableEntity,
    500: web.HTTPInternalServerError,
    503: web.HTTPServiceUnavailable, 504: web.HTTPGatewayTimeout,
}

#: the handshake refusals of ``Accel.ws``
_REFUSALS: dict[int, type[web.HTTPException]] = {
    400: web.HTTPBadRequest, 403: web.HTTPForbidden, 409: web.HTTPConflict,
    503: web.HTTPServiceUnavailable,
}


class Accel(AccelBase):
    """The runners of one app, opened and closed with it. Keyword arguments name them."""

    def setup(self, app: web.Application) -> None:
        """Open the runners when ``app`` starts and close them (draining) when it stops."""
        app[ACCEL] = self
        app.cleanup_ctx.append(self._context)

    async def _context(self, app: web.Application) -> AsyncIterator[None]:
        async with self._opened():
            yield

    def runner(self, name: str = "default") -> Runner:
        return self._named(name)

    async def read_inputs(self, request: web.Request, runner: Runner) -> Any:
        """The request body as one item's inputs: JSON or ``.npy`` (413 over ``max_body``)."""
        declared = request.content_length
        if declared is not None and declared > self.max_body:
            raise web.HTTPRequestEntityTooLarge(max_size=self.max_body, actual_size=declared)
        body = bytearray()
        try:
            async with asyncio.timeout(self.body_timeout):
                while chunk := await request.content.readany():
                    if len(body) + len(chunk) > self.max_body:
                        raise web.HTTPRequestEntityTooLarge(max_size=self.max_body,
                                                            actual_size=len(body) + len(chunk))
                    body += chunk
        except TimeoutError:
            raise web.HTTPRequestTimeout(
                text=f"request body not received within {self.body_timeout} s") from None
        except ConnectionError:  # the client left mid-body
            log.info("client %s left after sending %d bytes of its body", request.remote,
                     len(body))
            raise web.HTTPBadRequest(text="client closed the connection") from None
        except asyncio.CancelledError:  # handler_cancellation: the same, told by cancelling
            if request.transport is None:
                log.info("client %s left after sending %d bytes of its body", request.remote,
                         len(body))
            raise
        try:
            return await decode_inputs_off_loop(body, request.headers.get("Content-Type"),
                                                runner.inputs)
        except Exception as exc:
            self._raise(exc)

    async def infer(self, request: web.Request, runner: Runner, inputs: Any) -> web.Response:
        """Run ``inputs`` and answer with the outputs (JSON, or ``.npy`` if accepted)."""
        try:
            acceptable(request.headers.get("Accept"))  # a 406 costs the device nothing
        except NotAcceptable as exc:
            self._raise(exc)
        work = await self._infer_while_connected(runner, inputs, _disconnected(request))
        if work is None:
            return web.Response(status=CLIENT_CLOSED)
        try:
            outputs = work.result()
            body, content_type = encode_outputs(outputs, request.headers.get("Accept"))
        except Exception as exc:
            self._raise(exc)
        return web.Response(body=body, content_type=content_type)

    def _raise(self, exc: BaseException) -> NoReturn:
        """The HTTP error for an aioaccel error; anything else propagates as it is (a 500)."""
        problem = problem_for(exc, self.retry_after)
        if problem is None:
            raise exc
        cls = _ERRORS.get(problem.status, web.HTTPInternalServerError)
        raise cls(text=problem.message, headers=dict(problem.headers)) from exc

    async def ws(self, request: web.Request, runner: Runner, *, key: str | None = None,
                 maxsize: int | None = None, stop: asyncio.Event | None = None,
                 results: str | None = None) -> web.WebSocketResponse:
        """A WebSocket handler body: serve the connection as ``runner.stream(key)`` until it
        ends. ``key`` defaults to the ``?stream=`` query parameter, else a fresh one;
        ``results`` (``"json"`` or ``"npy"``) to ``?results=``. A key in use, a bad key or an
        ``Origin`` not in ``allowed_origins`` is refused at the handshake (HTTP 409, 400,
        403) with the reason."""
        try:
            if not origin_allowed(request.headers.get("Origin"), request.headers.get("Host"),
                                  self.allowed_origins):
                raise Refused(403, CLOSE_POLICY, f"origin {request.headers['Origin']!r} is "
                                                 f"not allowed to stream here")
            fmt = result_format(results or request.query.get("results"))
            opened = open_stream(runner, key or request.query.get("stream"), maxsize=maxsize)
        except Refused as refused:
            refusal = _REFUSALS.get(refused.status, web.HTTPBadRequest)
            raise refusal(text=json.dumps({"detail": refused.reason}),
                          content_type="application/json") from None
        websocket = web.WebSocketResponse(max_msg_size=self.max_body)
        try:
            await websocket.prepare(request)
        except BaseException:
            opened.close()  # never used: forgotten at once, its key free
            raise

        async def receive() -> bytes | str | None:
            message = await websocket.receive()
            if message.type in (WSMsgType.BINARY, WSMsgType.TEXT):
                return message.data  # type: ignore[no-any-return]
            return None  # close, closing, closed or error: the client is gone

        async def close(code: int, reason: str) -> None:
            await websocket.close(code=code, message=reason.encode())

        await serve_stream(runner, Socket(receive, websocket.send_str, close,
                                          websocket.send_bytes),
                           stream=opened, maxsize=maxsize, retry_after=self.retry_after,
                           stop=stop, results=fmt)
        return websocket

    def ws_handler(self, name: str = "default", *, maxsize: int | None = None) -> Any:
        """A ready GET handler streaming over a WebSocket to runner ``name``:
        ``app.router.add_get("/stream", accel.ws_handler())``."""
        runner = self._named(name)

        async def handler(request: web.Request) -> web.WebSocketResponse:
            return await self.ws(request, runner, maxsize=maxsize)

        return handler

    def health(self) -> web.Response:
        """200 when every runner is open, else 503; JSON with their state."""
        status, body = self._health()
        return web.json_response(body, status=status)

    def metrics(self) -> web.Response:
        """The runners' Prometheus metrics (needs ``aioaccel[metrics]``)."""
        body, content_type = self._metrics()
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response


async def _disconnected(request: web.Request) -> None:
    """Returns when the client's connection is gone (aiohttp offers no event to await)."""
    while True:
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        await asyncio.sleep(DISCONNECT_POLL)


#: where ``Accel.setup`` puts itself on the app: ``request.app[ACCEL]``
ACCEL = web.AppKey("aioaccel", Accel)
