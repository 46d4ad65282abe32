"""The Open Inference Protocol (KServe v2) over gRPC: ``inference.GRPCInferenceService``.

ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer and the
bidirectional ModelStreamInfer (Triton's streaming clients: ``start_stream`` /
``async_stream_infer``, ``stream_infer`` in the aio client), on ``grpc.aio`` in the event loop
of ``aioaccel serve`` (``--grpc-port``). The other methods of Triton's service answer
``UNIMPLEMENTED``.

* Tensors come as ``raw_input_contents`` (what tritonclient sends; arrays are views of them)
  or typed ``contents``; outputs go back as ``raw_output_contents``.
* Errors: bad input ``INVALID_ARGUMENT``, unknown model ``NOT_FOUND``, overloaded or not ready
  ``UNAVAILABLE``, past the timeout ``DEADLINE_EXCEEDED``, a runtime failure ``INTERNAL``
  with an error id (the detail is logged). A cancelled call withdraws its items.
* ``ModelStreamInfer`` answers in request order; a failed request answers its
  ``error_message`` and the stream goes on. At most the runner's ``maxsize`` requests of a
  stream are in flight: past that the server stops reading the stream, and gRPC's flow control
  holds the client back. On shutdown a stream stops reading, answers what it accepted, ends.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from .._optional import need

need("grpc", "serve", "aioaccel serve --grpc-port")

import grpc  # noqa: E402

from ..errors import InputError, RunnerClosed  # noqa: E402
from ._grpc import grpc_service_pb2 as pb  # noqa: E402
from .status import HEALTHY, model_state  # noqa: E402
from .v2_infer import UnknownModel, problem, run_request  # noqa: E402
from .v2_metrics import V2Requests  # noqa: E402
from .v2_tensors import (  # noqa: E402
    VERSION,
    InferRequest,
    RequestedOutput,
    datatype_of,
    dtype_of,
    select_outputs,
)

if TYPE_CHECKING:
    from ..runner import Runner

#: a stream's request in flight: (model name, its task)
_Pending = tuple[str, "asyncio.Task[pb.ModelInferResponse]"]

__all__ = ["SERVICE", "V2GrpcServer", "decode_grpc", "encode_grpc"]

log = logging.getLogger("aioaccel.v2")

SERVICE = "inference.GRPCInferenceService"
_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
          408: grpc.StatusCode.DEADLINE_EXCEEDED, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
          503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}
#: the typed ``contents`` field of each datatype (FP16 has none: it comes raw)
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
             "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
             "UINT16": "uint_contents", "UINT32": "uint_contents",
             "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents"}


# ---- messages to and from NumPy --------------------------------------------------------------
def _parameter(value: Any) -> Any:
    choice = value.WhichOneof("parameter_choice")
    return None if choice is None else getattr(value, choice)


def decode_grpc(message: pb.ModelInferRequest) -> InferRequest:
    """A ``ModelInferRequest`` as an :class:`InferRequest` (raw tensors are views)."""
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise InputError(f"raw_input_contents has {len(raw)} tensors for "
                         f"{len(message.inputs)} inputs")
    inputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(message.inputs):
        name = tensor.name
        where = f"input {name!r}"
        if not name:
            raise InputError(f"inputs[{index}] needs a name")
        if name in inputs:
            raise InputError(f"{where}: given twice")
        dtype = dtype_of(tensor.datatype, where)
        shape = tuple(tensor.shape)
        if len(shape) > 64 or any(d < 0 for d in shape):
            raise InputError(f"{where}: shape must hold at most 64 non-negative dims, got "
                             f"{list(shape)}")
        count = math.prod(shape)
        if raw:
            data = raw[index]
            if len(data) != count * dtype.itemsize:
                raise InputError(f"{where}: {len(data)} bytes of raw contents; "
                                 f"{tensor.datatype}{list(shape)} takes "
                                 f"{count * dtype.itemsize}")
            inputs[name] = np.frombuffer(data, dtype=dtype, count=count).reshape(shape)
        else:
            inputs[name] = _typed(tensor, dtype, shape, count, where)
    parameters = {k: _parameter(v) for k, v in message.parameters.items()}
    outputs = None
    if message.outputs:
        outputs = [RequestedOutput(o.name) for o in message.outputs]
        for o in message.outputs:
            if "classification" in o.parameters:
                raise InputError(f"output {o.name!r}: the classification extension is not "
                                 f"supported")
    return InferRequest(inputs, message.id or None, parameters, outputs)


def _typed(tensor: Any, dtype: np.dtype[Any], shape: tuple[int, ...], count: int,
           where: str) -> np.ndarray:
    field = _CONTENTS.get(tensor.datatype)
    if field is None:
        raise InputError(f"{where}: {tensor.datatype} tensors must come as raw_input_contents")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InputError(f"{where}: contents.{field} holds {len(values)} values; shape "
                         f"{list(shape)} takes {count}")
    array = np.asarray(values)
    if dtype.kind in "iu" and array.size:
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise InputError(f"{where}: a value is out of range for {tensor.datatype}")
    return array.astype(dtype).reshape(shape)


def encode_grpc(model: str, request: InferRequest,
                outputs: Mapping[str, np.ndarray]) -> pb.ModelInferResponse:
    """The ``ModelInferResponse`` of a request's outputs (raw little-endian contents)."""
    reply = pb.ModelInferResponse(model_name=model, model_version=VERSION,
                                  id=request.id or "")
    for name, (array, _) in select_outputs(outputs, request.outputs).items():
        found = np.asarray(array)
        if found.dtype.kind in "OSU":
            raise InputError(f"output {name!r} holds strings (BYTES), which aioaccel does "
                             f"not send")
        datatype = datatype_of(found.dtype)
        reply.outputs.add(name=name, datatype=datatype, shape=list(found.shape))
        reply.raw_output_contents.append(
            np.ascontiguousarray(found, dtype=found.dtype.newbyteorder("<")).tobytes())
    return reply


# ---- the service ---------------------------------------------------------------------------
class V2GrpcServer:
    """``inference.GRPCInferenceService`` for ``runners`` on a ``grpc.aio`` server."""

    def __init__(self, runners: Mapping[str, Runner], *, admit_timeout: float | None = 1.0,
                 retry_after: float = 1.0, timeout: float | None = None,
                 max_message: int = 16 * 1024 * 1024, stop: asyncio.Event | None = None,
                 version: str = "", requests: V2Requests | None = None):
        self.runners = runners
        #: requests answered, for /metrics (shared with the REST routes by aioaccel serve)
        self.requests = requests if requests is not None else V2Requests(runners)
        self.admit_timeout = admit_timeout
        self.retry_after = retry_after
        self.timeout = timeout
        self.stop = stop if stop is not None else asyncio.Event()
        self.version = version
        self._server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", max_message),
            ("grpc.max_send_message_length", max_message),
            ("grpc.so_reuseport", 0),  # a busy port is an error, not shared silently
        ])
        self._server.add_generic_rpc_handlers((self._handler(),))
        self.port: int | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: a free port); returns the port."""
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = self._server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot listen for gRPC on {address}: {exc}") from None
        if not bound:
            raise OSError(f"cannot listen for gRPC on {address} (in use?)")
        await self._server.start()
        self.port = int(bound)
        return self.port

    async def stop_serving(self, grace: float | None) -> None:
        """Stop accepting calls; let those in flight finish for ``grace`` seconds."""
        self.stop.set()
        await self._server.stop(grace)

    # ---- handlers -----------------------------------------------------------------------
    def _handler(self) -> Any:
        def unary(method: Callable[..., Any], request: Any, response: Any) -> Any:
            return grpc.unary_unary_rpc_method_handler(
                method, request_deserializer=request.FromString,
                response_serializer=response.SerializeToString)

        return grpc.method_handlers_generic_handler(SERVICE, {
            "ServerLive": unary(self.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": unary(self.server_ready, pb.ServerReadyRequest,
                                 pb.ServerReadyResponse),
            "ModelReady": unary(self.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ServerMetadata": unary(self.server_metadata, pb.ServerMetadataRequest,
                                    pb.ServerMetadataResponse),
            "ModelMetadata": unary(self.model_metadata, pb.ModelMetadataRequest,
                                   pb.ModelMetadataResponse),
            "ModelInfer": unary(self.model_infer, pb.ModelInferRequest, pb.ModelInferResponse),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                self.model_stream_infer, request_deserializer=pb.ModelInferRequest.FromString,
                response_serializer=pb.ModelStreamInferResponse.SerializeToString),
        })

    def _find(self, name: str, version: str = "") -> Runner:
        runner = self.runners.get(name)
        if runner is None:
            raise UnknownModel(f"unknown model {name!r}; this server has "
                               f"{sorted(self.runners)}")
        if version not in ("", VERSION):
            raise UnknownModel(f"model {name!r} has no version {version!r}; it serves "
                               f"version {VERSION}")
        return runner

    async def _abort(self, context: Any, exc: BaseException) -> None:
        code, message = self._status(exc)
        await context.abort(code, message)

    def _status(self, exc: BaseException) -> tuple[Any, str]:
        found = problem(exc, self.retry_after)
        if found is None:
            log.exception("v2 gRPC request failed", exc_info=exc)
            return grpc.StatusCode.INTERNAL, "internal error"
        return _CODES.get(found.status, grpc.StatusCode.INTERNAL), found.message

    async def server_live(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=all(model_state(r) in HEALTHY
                                                for r in self.runners.values()))

    async def model_ready(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        try:
            runner = self._find(request.name, request.version)
        except UnknownModel as exc:
            await self._abort(context, exc)
            raise  # abort raises; this is for the type checker
        return pb.ModelReadyResponse(ready=model_state(runner) in HEALTHY)

    async def server_metadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        from .v2_rest import EXTENSIONS, SERVER_NAME

        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self.version,
                                         extensions=EXTENSIONS)

    async def model_metadata(self, request: Any, context: Any) -> pb.ModelMetadataResponse:
        from .v2_rest import model_metadata

        try:
            found = model_metadata(request.name, self._find(request.name, request.version))
        except UnknownModel as exc:
            await self._abort(context, exc)
            raise
        reply = pb.ModelMetadataResponse(name=found["name"], versions=found["versions"],
                                         platform=found["platform"])
        for key in ("inputs", "outputs"):
            for tensor in found[key]:
                getattr(reply, key).add(**tensor)
        return reply

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        runner = self._find(request.model_name, request.model_version)
        if model_state(runner) not in HEALTHY:
            raise RunnerClosed(f"model {request.model_name!r} is {model_state(runner)}, "
                               f"not ready")
        decoded = decode_grpc(request)
        outputs = await run_request(runner, decoded, timeout=self.timeout,
                                    admit_timeout=self.admit_timeout)
        return encode_grpc(request.model_name, decoded, outputs)

    async def model_infer(self, request: pb.ModelInferRequest,
                          context: Any) -> pb.ModelInferResponse:
        try:
            reply = await self._infer(request)
        except asyncio.CancelledError:
            self.requests.count("grpc", request.model_name, "CANCELLED")
            raise  # the client cancelled: run_request withdrew its items
        except Exception as exc:
            code, message = self._status(exc)
            self.requests.count("grpc", request.model_name, code.name)
            await context.abort(code, message)
            raise
        self.requests.count("grpc", request.model_name, "OK")
        return reply

    async def model_stream_infer(self, requests: AsyncIterator[pb.ModelInferRequest],
                                 context: Any) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Answers in request order; at most ``maxsize`` requests of the stream in flight."""
        runner_depth = max((r.maxsize for r in self.runners.values()), default=16)
        room = asyncio.Semaphore(runner_depth)
        pending: asyncio.Queue[_Pending | None] = asyncio.Queue()
        reader = asyncio.ensure_future(self._read_stream(requests, pending, room))
        try:
            while True:
                item = await pending.get()
                if item is None:
                    break
                model, task = item
                try:
                    reply = await task
                except asyncio.CancelledError:
                    if not task.cancelled():
                        raise
                    continue
                except Exception as exc:
                    code, message = self._status(exc)
                    self.requests.count("grpc_stream", model, code.name)
                    yield pb.ModelStreamInferResponse(error_message=message)
                    continue
                finally:
                    room.release()
                self.requests.count("grpc_stream", model, "OK")
                yield pb.ModelStreamInferResponse(infer_response=reply)
            await reader  # raises what stopped the reader, if anything
        finally:
            reader.cancel()
            leftover = []
            while not pending.empty():
                left = pending.get_nowait()
                if left is not None:
                    left[1].cancel()
                    leftover.append(left[1])
            await asyncio.gather(reader, *leftover, return_exceptions=True)

    async def _read_stream(self, requests: AsyncIterator[pb.ModelInferRequest],
                           pending: asyncio.Queue[_Pending | None],
                           room: asyncio.Semaphore) -> None:
        """Start each request as it comes (so that they batch), in order, once the stream has
        room; stop at the end of the client's stream or on shutdown. While there is no room
        nothing is read: gRPC's flow control then holds the client back."""
        stopping = asyncio.ensure_future(self.stop.wait())
        iterator = requests.__aiter__()
        try:
            while True:
                await room.acquire()
                following = asyncio.ensure_future(anext(iterator))
                await asyncio.wait((following, stopping), return_when=asyncio.FIRST_COMPLETED)
                if not following.done():  # shutting down: read no more
                    following.cancel()
                    await asyncio.gather(following, return_exceptions=True)
                    break
                try:
                    request = following.result()
                except StopAsyncIteration:
                    break
                pending.put_nowait((request.model_name,
                                    asyncio.ensure_future(self._infer(request))))
        finally:
            stopping.cancel()
            pending.put_nowait(None)
