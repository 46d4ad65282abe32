"""The Open Inference Protocol (KServe v2) over REST, on the ``aioaccel serve`` FastAPI app.

Routes: ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2`` (server metadata),
``GET /v2/models/{name}[/versions/{version}]`` (model metadata),
``GET /v2/models/{name}[/versions/{version}]/ready``,
``POST /v2/models/{name}[/versions/{version}]/infer``. Bodies are JSON tensors or Triton's
binary tensor extension (``Inference-Header-Content-Length``; what ``tritonclient.http``
sends by default), gzip or deflate encoded if the client says so. Errors answer the protocol's
``{"error": "..."}``: 400 bad request, 404 unknown model, 413 body too large, 503 not ready or
overloaded (with ``Retry-After``), 504 past the ``timeout``; never a stack trace. A client that
disconnects while its request waits withdraws its items.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import zlib
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from ..errors import InputError, RunnerClosed
from ..integrations.http import CLIENT_CLOSED, OFF_LOOP_BYTES
from .status import HEALTHY, model_state
from .v2_infer import UnknownModel, problem, run_request
from .v2_metrics import V2Requests
from .v2_tensors import VERSION, decode_rest, encode_rest, tensor_metadata

if TYPE_CHECKING:
    from ..integrations.fastapi import Accel
    from ..runner import Runner

__all__ = ["EXTENSIONS", "SERVER_NAME", "V2Infer", "V2InferFastPath", "add_v2_routes",
           "model_metadata", "platform_of"]

log = logging.getLogger("aioaccel.v2")

SERVER_NAME = "aioaccel"
#: the protocol extensions served (Triton's names)
EXTENSIONS = ["binary_tensor_data", "parameters"]
_PLATFORMS = {"onnx": "onnxruntime_onnx", "openvino": "openvino", "openvino-legacy": "openvino",
              "litert": "tensorflow_lite", "tflite": "tensorflow_lite", "coral": "edgetpu",
              "memryx": "memryx"}


def platform_of(runner: Runner) -> str:
    """The model's platform as Triton names it (``onnxruntime_onnx``, ``openvino``, ...)."""
    backend = str(runner.info.get("backend", "python"))
    return _PLATFORMS.get(backend, backend)


def model_metadata(name: str, runner: Runner) -> dict[str, Any]:
    """``GET /v2/models/{name}``: name, versions, platform, inputs and outputs."""
    return {"name": name, "versions": [VERSION], "platform": platform_of(runner),
            "inputs": [tensor_metadata(s) for s in runner.inputs or ()],
            "outputs": [tensor_metadata(s) for s in runner.outputs or ()]}


def add_v2_routes(app: FastAPI, accel: Accel) -> V2Requests:
    """Mount the protocol's routes on ``app`` for ``accel``'s runners; returns the request
    counter (``/metrics`` appends it; the gRPC server counts into it too)."""
    from .. import __version__

    def find(name: str, version: str | None = None) -> Runner:
        runner = accel.runners.get(name)
        if runner is None:
            raise UnknownModel(f"unknown model {name!r}; this server has "
                               f"{sorted(accel.runners)}")
        if version not in (None, "", VERSION):
            raise UnknownModel(f"model {name!r} has no version {version!r}; it serves "
                               f"version {VERSION}")
        return runner

    def error(exc: BaseException) -> Response:
        found = problem(exc, accel.retry_after)
        if found is None:  # a bug: the detail goes to the log, not to the client
            log.exception("v2 request failed", exc_info=exc)
            return JSONResponse({"error": "internal error"}, status_code=500)
        return JSONResponse({"error": found.message}, status_code=found.status,
                            headers=found.headers)

    def ready(runner: Runner) -> bool:
        return model_state(runner) in HEALTHY

    @app.get("/v2/health/live", summary="Open Inference Protocol: the server is live")
    async def live() -> Response:
        return JSONResponse({"live": True})

    @app.get("/v2/health/ready", summary="Open Inference Protocol: every model is ready")
    async def server_ready() -> Response:
        ok = all(ready(r) for r in accel.runners.values())
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503,
                            headers=None if ok else _retry(accel.retry_after))

    @app.get("/v2", summary="Open Inference Protocol: server metadata")
    async def server_metadata() -> Response:
        return JSONResponse({"name": SERVER_NAME, "version": __version__,
                             "extensions": EXTENSIONS})

    async def metadata(name: str, version: str | None = None) -> Response:
        try:
            return JSONResponse(model_metadata(name, find(name, version)))
        except UnknownModel as exc:
            return error(exc)

    async def model_ready(name: str, version: str | None = None) -> Response:
        try:
            runner = find(name, version)
        except UnknownModel as exc:
            return error(exc)
        ok = ready(runner)
        return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503,
                            headers=None if ok else _retry(accel.retry_after))

    infer = V2Infer(accel, V2Requests(accel.runners))

    async def infer_route(name: str, request: Request, version: str | None = None
                          ) -> Response:
        # Reached only without the fast path below (it answers these paths first); here so
        # that /docs lists the route.
        status, headers, content = await infer.answer(name, version, request.headers,
                                                      request.receive)
        return Response(content, status_code=status, headers=headers)

    for path, endpoint in (("/v2/models/{name}", metadata),
                           ("/v2/models/{name}/versions/{version}", metadata),
                           ("/v2/models/{name}/ready", model_ready),
                           ("/v2/models/{name}/versions/{version}/ready", model_ready)):
        app.add_api_route(path, endpoint, methods=["GET"],
                          summary="Open Inference Protocol: model "
                                  + ("readiness" if endpoint is model_ready else "metadata"))
    for path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        app.add_api_route(path, infer_route, methods=["POST"],
                          summary="Open Inference Protocol: run a request (JSON or binary "
                                  "tensors)")
    app.add_middleware(V2InferFastPath, infer=infer)
    return infer.requests


def _retry(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, round(seconds)))}


class _BodyProblem(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class _ClientLeft(Exception):
    """The client disconnected: nothing is sent."""


#: ``POST`` paths the fast path answers: (name, version or None)
_INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
Receive = Callable[[], Awaitable[Mapping[str, Any]]]
Send = Callable[[Mapping[str, Any]], Awaitable[None]]


class V2Infer:
    """``POST /v2/models/{name}[/versions/{version}]/infer`` on raw ASGI messages: read the
    body (bounded in size and time), decode it (on a thread when large), run it while watching
    for the client to leave, encode the answer."""

    def __init__(self, accel: Accel, requests: V2Requests | None = None):
        self.accel = accel
        self.requests = requests if requests is not None else V2Requests(accel.runners)

    async def answer(self, name: str, version: str | None, headers: Mapping[str, str],
                     receive: Receive) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body); status 499 (never sent) when the client left."""
        found = await self._answer(name, version, headers, receive)
        self.requests.count("rest", name, found[0])
        return found

    async def _answer(self, name: str, version: str | None, headers: Mapping[str, str],
                      receive: Receive) -> tuple[int, dict[str, str], bytes]:
        accel = self.accel
        try:
            runner = accel.runners.get(name)
            if runner is None:
                raise UnknownModel(f"unknown model {name!r}; this server has "
                                   f"{sorted(accel.runners)}")
            if version not in (None, "", VERSION):
                raise UnknownModel(f"model {name!r} has no version {version!r}; it serves "
                                   f"version {VERSION}")
            if model_state(runner) not in HEALTHY:
                raise RunnerClosed(f"model {name!r} is {model_state(runner)}, not ready")
            body = await _read_body(receive, headers, accel.max_body, accel.body_timeout)
            decoded = await _decode(body, headers, runner)
            work = asyncio.ensure_future(run_request(
                runner, decoded, timeout=accel.timeout, admit_timeout=accel.admit_timeout))
            await _finished_while_connected(work, receive)
            content, header_length = encode_rest(name, decoded, work.result())
        except _ClientLeft:
            return CLIENT_CLOSED, {}, b""
        except _BodyProblem as exc:
            return exc.status, _JSON, _error_body(exc.message)
        except Exception as exc:
            found = problem(exc, accel.retry_after)
            if found is None:  # a bug: the detail goes to the log, not to the client
                log.exception("v2 request failed", exc_info=exc)
                return 500, _JSON, _error_body("internal error")
            return found.status, {**_JSON, **found.headers}, _error_body(found.message)
        if header_length is None:
            return 200, _JSON, content
        return 200, {"content-type": "application/octet-stream",
                     "inference-header-content-length": str(header_length)}, content


_JSON = {"content-type": "application/json"}


def _error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


class V2InferFastPath:
    """Pure ASGI middleware: the infer route answered before FastAPI's routing, dependency
    and exception layers, which cost more per request than the whole v2 decode, run and
    encode of a small tensor. Everything else goes on to the app."""

    def __init__(self, app: Any, infer: V2Infer):
        self.app = app
        self.infer = infer

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive,
                       send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = _INFER_PATH.fullmatch(scope["path"])
            if match is not None:
                headers = {k.decode("latin-1"): v.decode("latin-1")
                           for k, v in scope["headers"]}  # ASGI: names are lower case
                status, extra, content = await self.infer.answer(match.group(1),
                                                                 match.group(2), headers,
                                                                 receive)
                if status == CLIENT_CLOSED:
                    return  # nobody to answer
                raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
                raw.append((b"content-length", str(len(content)).encode()))
                await send({"type": "http.response.start", "status": status, "headers": raw})
                await send({"type": "http.response.body", "body": content})
                return
        await self.app(scope, receive, send)


async def _read_body(receive: Receive, headers: Mapping[str, str], max_body: int,
                     body_timeout: float) -> bytearray:
    """The whole body (413 over ``max_body``, 408 past ``body_timeout``)."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body:
        raise _BodyProblem(413, f"body of {declared} bytes is over the limit of {max_body} "
                                f"bytes")
    body = bytearray()
    try:
        async with asyncio.timeout(body_timeout):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    log.info("v2 client left after sending %d bytes of its body", len(body))
                    raise _ClientLeft
                chunk = message.get("body", b"")
                if len(body) + len(chunk) > max_body:
                    raise _BodyProblem(413, f"body is over the limit of {max_body} bytes")
                body += chunk
                if not message.get("more_body", False):
                    return body
    except TimeoutError:
        raise _BodyProblem(408, f"request body not received within {body_timeout} s") from None


async def _decode(body: bytearray, headers: Any, runner: Runner) -> Any:
    """The request, decoded on a thread when the body is large (the loop keeps serving)."""
    encoding = (headers.get("content-encoding") or "identity").strip().lower()
    length_header = headers.get("inference-header-content-length")
    header_length = None
    if length_header is not None:
        if not length_header.strip().isdigit():
            raise InputError(f"Inference-Header-Content-Length must be a byte count, got "
                             f"{length_header!r}")
        header_length = int(length_header)
    specs = runner.inputs

    def decode() -> Any:
        data: bytes | bytearray = body
        if encoding in ("gzip", "deflate"):
            data = _inflate(body, encoding)
        elif encoding != "identity":
            raise InputError(f"unsupported Content-Encoding {encoding!r}: send gzip, deflate "
                             f"or none")
        return decode_rest(data, header_length, specs)

    if len(body) <= OFF_LOOP_BYTES and encoding == "identity":
        return decode()
    return await asyncio.to_thread(decode)


def _inflate(body: bytearray, encoding: str) -> bytes:
    """gzip/deflate, bounded: at most 64 times the compressed size (a zip bomb stops there)."""
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    limit = max(len(body) * 64, 1 << 20)
    try:
        data = inflater.decompress(body, limit)
    except zlib.error as exc:
        raise InputError(f"body is not valid {encoding}: {exc}") from None
    if inflater.unconsumed_tail:
        raise InputError(f"{encoding} body inflates past {limit} bytes")
    return data


async def _finished_while_connected(work: asyncio.Future[Any], receive: Receive) -> None:
    """Wait for ``work``; raise _ClientLeft if the client disconnected first (``work`` is then
    cancelled, which withdraws its items). Errors of ``work`` are raised."""
    watch = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
    if work.cancelled():
        raise _ClientLeft
    work.result()  # raises the request's error


async def _disconnected(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
