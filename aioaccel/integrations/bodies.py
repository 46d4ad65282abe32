"""Request bodies to inputs and outputs to response bodies, for hostile clients.

What a body may cost is bounded before it is parsed:

* **JSON.** The number of values a body holds (at most its commas + 1) is checked against what
  the model's input spec can take before ``json.loads`` builds Python lists, so a big body for a
  small model costs one byte scan. Values become arrays of the input's dtype without silent
  casts: booleans are refused for a numeric input, non-integral numbers for an integer input,
  integers out of the input dtype's range, and numbers that overflow a float input's dtype
  (``1e39`` into float32). ``NaN``/``Infinity`` (not JSON, RFC 8259) and nesting too deep to
  parse are refused too. Every refusal is an :class:`~aioaccel.InputError` naming the input.
* **.npy.** The header is read and checked (no object dtype, a shape whose byte size is what
  the body holds) before any array is made; the array is then a view of the body, not a copy.

Responses are strict JSON: NaN and infinities in outputs are written as ``null``.
"""

from __future__ import annotations

import io
import json
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import InputError
from ..tensors import DEFAULT_MAX_INPUT_BYTES, TensorSpec
from .negotiation import JSON, NPY, NotAcceptable, acceptable

__all__ = ["NPY", "decode_json", "decode_npy", "encode_npy", "encode_outputs", "holds_bool",
           "jsonable", "value_limit"]

#: room for the keys of ``{"inputs": {"name": ...}}`` in the value count
_KEY_SLACK = 4
#: JSON bodies at least this big, for a float input, are parsed straight into an array
FAST_JSON_BYTES = 32 * 1024
_NUMBER = b"0123456789+-.eE"
_SPACE = b" \t\n\r"
_BRACKETS_TO_SPACES = bytes.maketrans(b"[]", b"  ")
_OBJECT = re.compile(rb"\s*\{")
_ONE_KEY = re.compile(rb'\s*\{\s*"([A-Za-z0-9_.:/-]*)"\s*:\s*(\[.*\])\s*\}\s*', re.DOTALL)


def value_limit(specs: Sequence[TensorSpec] | None,
                max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES) -> int | None:
    """The most values one item's inputs can hold (None: the spec does not say)."""
    if not specs:
        return None
    total = 0
    for spec in specs:
        itemsize = np.dtype(spec.dtype).itemsize
        if spec.shape is not None and not spec.dynamic:
            total += math.prod(spec.shape)  # type: ignore[arg-type]
        else:
            total += max_input_bytes // itemsize
    return total


def decode_json(body: bytes | bytearray, specs: Sequence[TensorSpec] | None,
                max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES) -> Any:
    """One item's inputs from a JSON body: an array, ``{name: array}``, or a list by position."""
    limit = value_limit(specs, max_input_bytes)
    if limit is not None:
        values = body.count(b",") + 1  # a JSON array of n values has n - 1 commas
        if values > limit + _KEY_SLACK * len(specs or ()):
            raise InputError(f"JSON body holds up to {values} values; the model takes at most "
                             f"{limit} ({', '.join(str(s) for s in specs or ())})")
    fast = _fast_path(body, specs) if len(body) >= FAST_JSON_BYTES else None
    if fast is not None:
        return fast
    try:
        value = json.loads(body, parse_constant=_refuse_constant)
    except RecursionError:
        raise InputError("JSON body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"body is not JSON: {exc}") from None
    if isinstance(value, dict) and "inputs" in value:
        value = value["inputs"]
    booleans = b"true" in body or b"false" in body
    by_name = {s.name: s for s in specs or ()}
    if isinstance(value, dict):
        return {str(k): _array(str(k), v, by_name.get(str(k)), booleans)
                for k, v in value.items()}
    if isinstance(value, list):
        if specs and len(specs) > 1:  # several inputs: a list by position
            if len(value) != len(specs):
                raise InputError(f"JSON list has {len(value)} inputs by position, the model "
                                 f"takes {len(specs)}: {[s.name for s in specs]}")
            return [_array(s.name, v, s, booleans) for s, v in zip(specs, value, strict=True)]
        spec = specs[0] if specs else None
        return _array(spec.name if spec else "input", value, spec, booleans)
    raise InputError('JSON body must be a nested list, {"input name": nested list}, or '
                     '{"inputs": ...}')


def _fast_path(body: bytes | bytearray, specs: Sequence[TensorSpec] | None) -> Any:
    """A big body that is one nested list of plain numbers for a one-input float model
    (bare, ``{"inputs": [...]}`` or ``{"<input name>": [...]}``), parsed without Python
    objects per value; None for anything else (``json.loads`` then decides)."""
    if not specs or len(specs) != 1 or np.dtype(specs[0].dtype).kind != "f":
        return None
    spec = specs[0]
    text: bytes | bytearray = body
    key = None
    if _OBJECT.match(body):
        match = _ONE_KEY.fullmatch(body)
        if match is None or match.group(1).decode() not in ("inputs", spec.name):
            return None
        key = match.group(1).decode()
        text = body[match.start(2):match.end(2)]
    array = _parse_numbers(text)
    if array is None:
        return None
    array = _array(spec.name, array, spec, False)
    return {spec.name: array} if key == spec.name else array


def _parse_numbers(text: bytes | bytearray) -> np.ndarray | None:
    """``text`` as float64 if it is a regular nested list of numbers, else None."""
    if text.translate(None, _NUMBER + _SPACE + b"[],"):
        return None  # true/false/null/NaN, strings, objects: not for this path
    skeleton = bytes(text.translate(None, _NUMBER + _SPACE))  # the brackets and commas
    shape = _shape_of(skeleton)
    if shape is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NumPy warns (and stops) at text it cannot read
        try:
            numbers = np.fromstring(bytes(text.translate(_BRACKETS_TO_SPACES)),
                                    dtype=np.float64, sep=",")
        except (ValueError, DeprecationWarning):
            return None
    if numbers.size != math.prod(shape):
        return None
    return numbers.reshape(shape)


def _shape_of(skeleton: bytes) -> tuple[int, ...] | None:
    """The shape of a regular nested list from its brackets and commas, or None."""
    ndim = len(skeleton) - len(skeleton.lstrip(b"["))
    if not 1 <= ndim <= 32 or b"[]" in skeleton:
        return None
    chars = np.frombuffer(skeleton, np.uint8)
    depth = np.cumsum((chars == ord("[")).astype(np.int16) - (chars == ord("]")))
    opens, commas = chars == ord("["), chars == ord(",")
    shape = []
    for level in range(1, ndim + 1):
        at_level = depth == level
        lists = int(np.count_nonzero(opens & at_level))
        separators = int(np.count_nonzero(commas & at_level))
        if lists == 0 or separators % lists:
            return None
        shape.append(separators // lists + 1)
    expected = b""
    for n in reversed(shape):  # the skeleton of a regular list of that shape
        expected = b"[" + b",".join([expected] * n) + b"]"
    return tuple(shape) if expected == skeleton else None


def _refuse_constant(name: str) -> Any:
    raise InputError(f"JSON body holds {name}, which is not JSON (RFC 8259): send numbers")


def _array(name: str, value: Any, spec: TensorSpec | None, booleans: bool) -> np.ndarray:
    """``value`` (parsed JSON) as an array of the input's dtype, or InputError: no silent casts."""
    where = f"input {name!r}"
    if not isinstance(value, (list, int, float, np.ndarray)):
        raise InputError(f"{where}: expected numbers or a nested list of numbers, got "
                         f"{_json_type(value)}")
    try:
        array = np.asarray(value)
    except (ValueError, TypeError, RecursionError) as exc:
        raise InputError(f"{where}: not a regular nested list of numbers (ragged?): "
                         f"{exc}") from None
    if array.dtype.kind not in "biuf":
        raise InputError(f"{where}: expected numbers, got values that are not (strings, nulls, "
                         f"objects, or integers too large for 64 bits)")
    if spec is None:
        return array
    dtype = np.dtype(spec.dtype)
    if dtype.kind == "b":
        if array.dtype.kind != "b":
            raise InputError(f"{where} takes booleans (true/false), got numbers")
        return array
    if array.dtype.kind == "b" or (booleans and holds_bool(value)):
        raise InputError(f"{where} takes {dtype} numbers, got booleans (true/false)")
    if dtype.kind in "iu":
        if array.dtype.kind == "f":
            integral = np.isfinite(array) & (array == np.floor(array))
            if not integral.all():
                bad = array[~integral].flat[0].item()
                raise InputError(f"{where} takes integers ({dtype}), got {bad!r}")
        info = np.iinfo(dtype)
        if array.size and (array.min() < info.min or array.max() > info.max):
            bad = (array.min() if array.min() < info.min else array.max()).item()
            raise InputError(f"{where}: {bad} is out of range for {dtype} "
                             f"({info.min}..{info.max})")
        return array.astype(dtype)
    with np.errstate(over="ignore"):
        converted = array.astype(dtype)
    if dtype.kind in "fc" and array.dtype.kind == "f" and not np.isfinite(converted).all():
        bad = array[~np.isfinite(converted)].flat[0].item()
        raise InputError(f"{where}: {bad!r} overflows {dtype} (largest: "
                         f"{float(np.finfo(dtype).max):.4g})")
    return converted


def holds_bool(value: Any) -> bool:
    """Whether a nested list holds a bool anywhere (NumPy turns [True, 1.5] into floats)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, bool):
            return True
        if isinstance(item, list):
            stack.extend(item)
    return False


def _json_type(value: Any) -> str:
    return {dict: "an object", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(value), type(value).__name__)


def decode_npy(body: bytes | bytearray) -> np.ndarray:
    """One array from a ``.npy`` body: its header is checked before anything is allocated; the
    array is a view of ``body`` (writable if ``body`` is a bytearray)."""
    fmt = np.lib.format
    stream = io.BytesIO(body)
    try:
        version = fmt.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(stream)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = fmt.read_array_header_2_0(stream)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except Exception as exc:  # any header NumPy cannot parse (its parser
        # raises ValueError, SyntaxError, tokenize.TokenError, ... for hostile headers)
        raise InputError(f"body is not a .npy array ({type(exc).__name__}: {exc}); send "
                         f"np.save() output with Content-Type: {NPY}") from None
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise InputError(f".npy header has shape {shape!r}: dimensions must be integers "
                         f">= 0")
    if dtype.hasobject:
        raise InputError(".npy body holds Python objects (a pickle), which are never accepted: "
                         "send a numeric array")
    count = math.prod(shape)
    need = count * dtype.itemsize
    offset = stream.tell()
    if need != len(body) - offset:
        raise InputError(f".npy header says {dtype}{list(shape)} ({need} bytes), but the body "
                         f"holds {len(body) - offset} bytes of data")
    array = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
    array = array.reshape(shape, order="F" if fortran else "C")
    return array if array.flags.writeable else array.copy()


def encode_outputs(outputs: Any, accept: str | None) -> tuple[bytes, str]:
    """(body, content type) of one item's outputs: strict JSON, or ``.npy`` when ``accept``
    prefers it (:mod:`.negotiation`; ``.npy`` holds one array, so a model with several
    outputs answers JSON if the client takes it). Raises :class:`NotAcceptable` (406)."""
    wanted = acceptable(accept)
    several = isinstance(outputs, Mapping) and len(outputs) != 1
    if wanted[0] == NPY and several and JSON in wanted:
        wanted = [JSON]
    if wanted[0] == NPY:
        if several:
            raise NotAcceptable(f"Accept: {NPY} needs a one-output model; this one has "
                                f"{sorted(outputs)}: ask for {JSON}")
        return encode_npy(next(iter(outputs.values())) if isinstance(outputs, Mapping)
                          else outputs), NPY
    body = json.dumps({"outputs": jsonable(outputs)}, allow_nan=False, separators=(",", ":"))
    return body.encode(), JSON


def encode_npy(array: Any) -> bytes:
    """One array as ``.npy`` bytes (dtype and shape exactly; never a pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types; NaN and infinities become None (``null``)."""
    if isinstance(value, np.ndarray | np.generic):
        array = np.asarray(value)
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            cells = array.astype(object)
            cells[~np.isfinite(array)] = None
            return cells.tolist()
        return value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value
