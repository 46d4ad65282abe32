"""Open Inference Protocol (KServe v2) tensors: datatypes, and requests and responses to and
from NumPy, for REST (JSON plus Triton's binary tensor extension) and gRPC.

What a request may cost is bounded before anything is built from it: shapes are checked
(non-negative ints, at most 64 dims) and their byte size compared with the bytes that came
before an array is made; binary tensors are :func:`numpy.frombuffer` views of the request body
(no copy); JSON ``data`` is counted before ``json.loads`` builds Python lists for it. Values
never change type silently: ``FP64`` data for an ``FP32`` input, a float for an integer
tensor, a boolean for a number, a number out of the datatype's range are refused. Every
refusal is an :class:`~aioaccel.InputError` naming the tensor and what was expected; the
servers answer it with 400 (REST) or ``INVALID_ARGUMENT`` (gRPC).

``BYTES`` (strings) and ``BF16`` tensors are refused with a clear message: the runtimes
aioaccel drives take numeric tensors.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError
from ..integrations.bodies import holds_bool, jsonable, value_limit

if TYPE_CHECKING:
    from ..tensors import TensorSpec

__all__ = [
    "DATATYPES",
    "InferRequest",
    "RequestedOutput",
    "datatype_of",
    "decode_rest",
    "dtype_of",
    "encode_rest",
    "join_rows",
    "name_outputs",
    "select_outputs",
    "split_rows",
    "tensor_metadata",
]

#: the protocol's datatypes that map to NumPy (little-endian on the wire)
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
_BY_KIND_SIZE = {(d.kind, d.itemsize): name for name, d in DATATYPES.items()}
#: datatypes the protocol has that aioaccel does not take, and why
_REFUSED = {
    "BYTES": "BYTES (string) tensors are not supported: aioaccel's runtimes take numeric "
             "tensors",
    "BF16": "BF16 tensors are not supported (NumPy has no bfloat16): send FP32",
}
_MAX_DIMS = 64
#: commas a JSON header may hold beyond its tensors' values (keys, shapes, parameters)
_STRUCTURE_SLACK = 256
_PER_TENSOR_SLACK = 72
#: the model version aioaccel reports: one model per name, never reloaded under another
VERSION = "1"


def datatype_of(dtype: Any) -> str:
    """The protocol's datatype for a NumPy dtype (``float32`` -> ``FP32``; strings: ``BYTES``)."""
    found = np.dtype(dtype)
    if found.kind in "OSU":
        return "BYTES"
    name = _BY_KIND_SIZE.get((found.kind, found.itemsize))
    if name is None:
        raise InputError(f"dtype {found} has no Open Inference Protocol datatype")
    return name


def dtype_of(datatype: str, where: str) -> np.dtype[Any]:
    """The NumPy dtype for a protocol datatype, or InputError naming ``where``."""
    found = DATATYPES.get(datatype)
    if found is not None:
        return found
    if datatype in _REFUSED:
        raise InputError(f"{where}: {_REFUSED[datatype]}")
    raise InputError(f"{where}: unknown datatype {datatype!r}; expected one of "
                     f"{sorted(DATATYPES)}")


def tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    """``{"name", "datatype", "shape"}`` for model metadata (-1 for a dynamic dimension)."""
    shape = [-1] if spec.shape is None else [-1 if d is None else int(d) for d in spec.shape]
    return {"name": spec.name, "datatype": datatype_of(spec.dtype), "shape": shape}


@dataclass(frozen=True)
class RequestedOutput:
    """An output the client asked for; ``binary`` None: the request's default."""

    name: str
    binary: bool | None = None


@dataclass
class InferRequest:
    """One decoded inference request: inputs by name (in the order sent) and what to answer."""

    inputs: dict[str, np.ndarray]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    #: the outputs asked for, in order; None: every output
    outputs: list[RequestedOutput] | None = None
    #: REST: outputs as binary unless an output says otherwise (``binary_data_output``)
    binary_output: bool = False

    def priority(self) -> int:
        """The ``priority`` parameter (aioaccel's convention: higher is served first)."""
        value = self.parameters.get("priority", 0)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"parameter 'priority' must be an integer, got {value!r}")
        return value

    def timeout(self) -> float | None:
        """The ``timeout`` parameter in seconds (the protocol sends microseconds), or None."""
        value = self.parameters.get("timeout")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise InputError(f"parameter 'timeout' must be a positive number of "
                             f"microseconds, got {value!r}")
        return float(value) / 1e6


# ---- shapes and checks -------------------------------------------------------------------------
def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or len(value) > _MAX_DIMS:
        raise InputError(f"{where}: 'shape' must be a list of at most {_MAX_DIMS} "
                         f"non-negative integers, got {_short(value)}")
    for dim in value:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise InputError(f"{where}: 'shape' must hold non-negative integers, got "
                             f"{_short(value)}")
    return tuple(int(d) for d in value)


def _check_spec(name: str, dtype: np.dtype[Any], specs: Sequence[TensorSpec] | None,
                datatype: str) -> None:
    """The input's datatype must be the model's (no silent casts); its name one the model has."""
    if not specs:
        return
    for spec in specs:
        if spec.name == name:
            if np.dtype(spec.dtype) != dtype:
                raise InputError(f"input {name!r} is {datatype}; the model takes "
                                 f"{datatype_of(spec.dtype)}")
            return
    raise InputError(f"no input named {name!r}; the model takes "
                     f"{[s.name for s in specs]}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---- REST: JSON header and binary tensors ----------------------------------------------------
def decode_rest(body: bytes | bytearray, header_length: int | None,
                specs: Sequence[TensorSpec] | None) -> InferRequest:
    """A REST request body: JSON, or (``Inference-Header-Content-Length``) a JSON header
    followed by the binary tensors it sizes. Binary inputs are views of ``body``."""
    if header_length is None:
        header_length = len(body)
    elif not 0 < header_length <= len(body):
        raise InputError(f"Inference-Header-Content-Length is {header_length}, but the body "
                         f"holds {len(body)} bytes")
    view = memoryview(body)
    header = bytes(view[:header_length])  # the JSON part only (small for binary tensors)
    limit = value_limit(specs)
    if limit is not None:
        commas = header.count(b",")
        allowed = limit + _STRUCTURE_SLACK + _PER_TENSOR_SLACK * len(specs or ())
        if commas > allowed:
            raise InputError(f"JSON holds up to {commas + 1} values; the model takes at most "
                             f"{limit}")
    try:
        message = json.loads(header, parse_constant=_refuse_constant)
    except RecursionError:
        raise InputError("JSON is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"request is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise InputError('request must be a JSON object {"inputs": [...]}')
    parameters = _parameters(message.get("parameters"), "request")
    binary = view[header_length:]
    booleans = b"true" in header or b"false" in header  # else no bool can hide in the data
    offset = 0
    inputs: dict[str, np.ndarray] = {}
    tensors = message.get("inputs")
    if not isinstance(tensors, list) or not tensors:
        raise InputError('request must have "inputs": a non-empty list of tensors')
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, dict):
            raise InputError(f"inputs[{index}] must be an object with name, shape, datatype")
        name, dtype, shape, where = _tensor_head(tensor, index)
        if name in inputs:
            raise InputError(f"{where}: given twice")
        _check_spec(name, dtype, specs, tensor["datatype"])
        tensor_parameters = _parameters(tensor.get("parameters"), where)
        size = tensor_parameters.get("binary_data_size")
        if size is not None:
            if "data" in tensor:
                raise InputError(f"{where}: has both 'data' and binary_data_size")
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InputError(f"{where}: binary_data_size must be a byte count, got "
                                 f"{size!r}")
            need = math.prod(shape) * dtype.itemsize
            if size != need:
                raise InputError(f"{where}: binary_data_size is {size} bytes; "
                                 f"{tensor['datatype']}{list(shape)} takes {need}")
            if offset + size > len(binary):
                raise InputError(f"{where}: binary data ends past the body ({len(binary)} "
                                 f"bytes after the JSON header, {offset + size} needed)")
            inputs[name] = np.frombuffer(binary, dtype=dtype, count=math.prod(shape),
                                         offset=offset).reshape(shape)
            offset += size
        else:
            if "data" not in tensor:
                raise InputError(f"{where}: has neither 'data' nor binary_data_size")
            inputs[name] = _json_array(tensor["data"], dtype, shape, where, booleans)
    if offset != len(binary):
        raise InputError(f"the body holds {len(binary)} bytes after the JSON header; the "
                         f"inputs' binary_data_size add up to {offset}")
    binary_output = parameters.pop("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise InputError(f"parameter 'binary_data_output' must be true or false, got "
                         f"{binary_output!r}")
    return InferRequest(inputs, _request_id(message.get("id")), parameters,
                        _requested(message.get("outputs")), binary_output)


def _tensor_head(tensor: Mapping[str, Any], index: int
                 ) -> tuple[str, np.dtype[Any], tuple[int, ...], str]:
    name = tensor.get("name")
    if not isinstance(name, str) or not name:
        raise InputError(f"inputs[{index}] needs a 'name' (a string)")
    where = f"input {name!r}"
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str):
        raise InputError(f"{where} needs a 'datatype' (e.g. \"FP32\")")
    dtype = dtype_of(datatype, where)
    if "shape" not in tensor:
        raise InputError(f"{where} needs a 'shape'")
    return name, dtype, _shape(tensor["shape"], where), where


def _json_array(data: Any, dtype: np.dtype[Any], shape: tuple[int, ...], where: str,
                booleans: bool = True) -> np.ndarray:
    """JSON ``data`` (flat in row-major order, or nested) as an array of ``dtype``."""
    if not isinstance(data, list):
        data = [data]
    try:
        array = np.asarray(data)
    except (ValueError, TypeError, RecursionError):
        raise InputError(f"{where}: 'data' is not a regular list of numbers (ragged?)"
                         ) from None
    count = math.prod(shape)
    if array.size != count:
        raise InputError(f"{where}: 'data' holds {array.size} values; shape {list(shape)} "
                         f"takes {count}")
    if array.size == 0:
        return np.zeros(shape, dtype)
    kind = array.dtype.kind
    if kind not in "biuf":
        raise InputError(f"{where}: 'data' must hold numbers (or booleans for BOOL), got "
                         f"values that are not (strings, nulls, objects)")
    if dtype.kind == "b":
        if kind != "b":
            raise InputError(f"{where} is BOOL: 'data' must hold true/false")
    elif kind == "b" or (booleans and holds_bool(data)):
        raise InputError(f"{where} is {datatype_of(dtype)}: 'data' holds booleans")
    elif dtype.kind in "iu":
        if kind == "f":
            integral = np.isfinite(array) & (array == np.floor(array))
            if not integral.all():
                raise InputError(f"{where} is {datatype_of(dtype)}: 'data' holds "
                                 f"{array[~integral].flat[0].item()!r}, not an integer")
        info = np.iinfo(dtype)
        low, high = array.min().item(), array.max().item()
        if low < info.min or high > info.max:
            bad = low if low < info.min else high
            raise InputError(f"{where}: {bad} is out of range for {datatype_of(dtype)} "
                             f"({info.min}..{info.max})")
    else:
        with np.errstate(over="ignore"):
            converted = array.astype(dtype)
        if not np.isfinite(converted[np.isfinite(array)]).all():
            raise InputError(f"{where}: a value overflows {datatype_of(dtype)} (largest: "
                             f"{float(np.finfo(dtype).max):.4g})")
        return converted.reshape(shape)
    return array.astype(dtype).reshape(shape)


def _refuse_constant(name: str) -> Any:
    raise InputError(f"JSON holds {name}, which is not JSON (RFC 8259): send numbers")


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"{where}: 'parameters' must be an object")
    return dict(value)


def _request_id(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InputError(f"'id' must be a string, got {_short(value)}")
    return value


def _requested(value: Any) -> list[RequestedOutput] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise InputError("'outputs' must be a list of {\"name\": ...}")
    requested = []
    for index, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InputError(f"outputs[{index}] must be an object with a 'name'")
        parameters = _parameters(item.get("parameters"), f"output {item['name']!r}")
        if "classification" in parameters:
            raise InputError(f"output {item['name']!r}: the classification extension is not "
                             f"supported")
        binary = parameters.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise InputError(f"output {item['name']!r}: binary_data must be true or false")
        requested.append(RequestedOutput(item["name"], binary))
    return requested


def encode_rest(model: str, request: InferRequest,
                outputs: Mapping[str, np.ndarray]) -> tuple[bytes, int | None]:
    """(body, JSON header length or None) of a REST response: a JSON header, then the binary
    outputs it sizes (one copy of each output, into the body)."""
    chosen = select_outputs(outputs, request.outputs)
    binary: list[memoryview] = []
    described = []
    for name, (array, wanted) in chosen.items():
        array = _wire(array, name)
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(array.dtype),
                                 "shape": list(array.shape)}
        if request.binary_output if wanted is None else wanted:
            entry["parameters"] = {"binary_data_size": array.nbytes}
            binary.append(memoryview(array.data).cast("B"))
        else:
            entry["data"] = jsonable(array.reshape(-1))
        described.append(entry)
    reply: dict[str, Any] = {"model_name": model, "model_version": VERSION}
    if request.id is not None:
        reply["id"] = request.id
    reply["outputs"] = described
    header = json.dumps(reply, allow_nan=False, separators=(",", ":")).encode()
    if not binary:
        return header, None
    return b"".join([header, *binary]), len(header)


def _wire(array: Any, name: str) -> np.ndarray:
    """An output as a C-contiguous little-endian array of a protocol datatype."""
    found = np.asarray(array)
    if found.dtype.kind in "OSU":
        raise InputError(f"output {name!r} holds strings (BYTES), which aioaccel does not send")
    datatype_of(found.dtype)  # raises for dtypes the protocol has no name for
    if found.dtype.byteorder == ">":
        found = found.astype(found.dtype.newbyteorder("<"))
    return np.ascontiguousarray(found)


def select_outputs(outputs: Mapping[str, np.ndarray], requested: list[RequestedOutput] | None
                   ) -> dict[str, tuple[np.ndarray, bool | None]]:
    """The outputs to answer, in order, with each one's binary choice (None: the default)."""
    if requested is None:
        return {name: (array, None) for name, array in outputs.items()}
    chosen = {}
    for item in requested:
        if item.name not in outputs:
            raise InputError(f"no output named {item.name!r}; the model has "
                             f"{list(outputs)}")
        chosen[item.name] = (outputs[item.name], item.binary)
    return chosen


def name_outputs(outputs: Any, specs: Sequence[TensorSpec] | None) -> dict[str, np.ndarray]:
    """A runner's outputs (a dict, a sequence or one array) by name."""
    if isinstance(outputs, Mapping):
        return {str(k): np.asarray(v) for k, v in outputs.items()}
    names = [s.name for s in specs or ()]
    if isinstance(outputs, list | tuple):
        return {names[i] if i < len(names) else f"output_{i}": np.asarray(v)
                for i, v in enumerate(outputs)}
    return {names[0] if names else "output": np.asarray(outputs)}


# ---- several rows: one bulk submission -------------------------------------------------------
def split_rows(inputs: dict[str, np.ndarray], specs: Sequence[TensorSpec] | None
               ) -> list[dict[str, np.ndarray]] | None:
    """The request's items, one per row, when the model takes one row per call (its batch
    dimension is fixed at 1) and the request has several rows; None: the request is one item."""
    if not specs or not inputs:
        return None
    by_name = {s.name: s for s in specs}
    rows = None
    for name, array in inputs.items():
        spec = by_name.get(name)
        if spec is None or spec.shape is None or not spec.shape or spec.shape[0] != 1:
            return None
        if array.ndim != len(spec.shape) or array.shape[0] <= 1:
            return None
        if rows is None:
            rows = array.shape[0]
        elif rows != array.shape[0]:
            raise InputError(f"inputs have different batch sizes ({rows} and "
                             f"{array.shape[0]} rows, input {name!r})")
    if rows is None:
        return None
    return [{name: array[i:i + 1] for name, array in inputs.items()} for i in range(rows)]


def join_rows(rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One response's outputs from its rows' outputs (stacked on the batch dimension)."""
    return {name: np.concatenate([row[name] for row in rows]) for name in rows[0]}
