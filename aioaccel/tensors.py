"""Input and output specs of a model, and the validation of inputs against them.

Validation runs on the event loop in ``push``/``infer``, before an item is admitted, so a bad
input costs nothing else: the error names the input, what came and what was expected.
No silent casts (OpenVINO would cast silently, LiteRT refuses): ``cast=True`` opts in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError

__all__ = ["DEFAULT_MAX_INPUT_BYTES", "InputValidator", "TensorSpec", "format_shape",
           "nested_shape"]

#: the byte-size cap for one input whose shape has dynamic dimensions
DEFAULT_MAX_INPUT_BYTES = 256 * 1024 * 1024
#: NumPy's own limit on dimensions (numpy 2; numpy 1 has 32)
_MAX_DIMS = 64


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor; ``shape`` uses None for a dynamic dimension, and is None
    when not even the rank is known (a runtime that does not describe its inputs)."""

    name: str
    dtype: str
    shape: tuple[int | None, ...] | None

    @property
    def dynamic(self) -> bool:
        return self.shape is None or any(d is None for d in self.shape)

    def __str__(self) -> str:
        dims = "..." if self.shape is None else _dims(self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"


def _dims(shape: Sequence[int | None]) -> str:
    return ", ".join("?" if d is None else str(d) for d in shape)


def format_shape(shape: Sequence[int | None] | None) -> str:
    return "(any shape)" if shape is None else f"({_dims(shape)})"


class InputValidator:
    """Turns one item's inputs into ``{name: contiguous ndarray}`` or raises InputError.

    Accepts a dict by name, a list/tuple by position, or a single array for a one-input model.
    For a one-input model, a nested Python list whose shape is the input's is that input (not
    "inputs by position"). Shape and byte size are checked before anything is converted or
    copied, so a huge wrong input costs microseconds on the event loop.
    """

    def __init__(self, specs: Sequence[TensorSpec], *, cast: bool = False,
                 max_bytes: int = DEFAULT_MAX_INPUT_BYTES):
        self.specs = list(specs)
        self.names = [s.name for s in self.specs]
        self.cast = cast
        self.max_bytes = max_bytes
        self._dtypes = [np.dtype(s.dtype) for s in self.specs]
        # per-item checks run on the event loop: work out once what each spec needs
        self._dynamic = [s.dynamic for s in self.specs]
        #: (rank, ((axis, size), ...) of the fixed dimensions), or None for an unknown shape
        self._fixed = [None if s.shape is None or dtype.hasobject or dtype.kind in "OUSVMm" else
                       (len(s.shape), tuple((i, d) for i, d in enumerate(s.shape) if d is not None))
                       for s, dtype in zip(self.specs, self._dtypes, strict=True)]
        # One input given as an ndarray is the hot case (one check per item on the loop):
        # its name, dtype, rank and fixed dimensions are cached, so the check is a handful of
        # attribute reads and compares, and everything else takes the full path below.
        self._one: tuple[str, np.dtype[Any], int, tuple[tuple[int, int], ...], bool] | None = None
        if len(self.specs) == 1 and self._fixed[0] is not None:
            rank, fixed = self._fixed[0]
            self._one = (self.names[0], self._dtypes[0], rank, fixed, self._dynamic[0])

    def __call__(self, inputs: Any) -> dict[str, np.ndarray]:
        one = self._one
        if one is not None and type(inputs) is np.ndarray:
            name, want_dtype, rank, want_dims, dynamic = one
            shape = inputs.shape
            if (inputs.dtype == want_dtype and len(shape) == rank
                    and (not dynamic or inputs.nbytes <= self.max_bytes)
                    and inputs.flags.c_contiguous):
                for axis, size in want_dims:
                    if shape[axis] != size:
                        break
                else:
                    return {name: inputs}
        specs = self.specs
        if isinstance(inputs, Mapping):
            given = set(inputs)
            missing = [n for n in self.names if n not in given]
            extra = sorted(str(n) for n in given - set(self.names))
            if missing or extra:
                raise InputError(
                    f"inputs by name: missing {missing or 'none'}, unexpected {extra or 'none'}; "
                    f"the model takes {self.names}")
            values = [inputs[n] for n in self.names]
        elif isinstance(inputs, (list, tuple)):
            if len(specs) == 1 and _is_the_one_input(inputs, specs[0]):
                values = [inputs]
            elif len(inputs) != len(specs):
                raise InputError(f"got {len(inputs)} inputs by position, the model takes "
                                 f"{len(specs)}: {self.names}")
            else:
                values = list(inputs)
        elif len(specs) == 1:
            values = [inputs]
        else:
            raise InputError(f"got one {type(inputs).__name__}, the model takes {len(specs)} "
                             f"inputs {self.names}: pass a dict by name or a list by position")
        checked = {}
        for k, value in enumerate(values):
            spec, dtype, fixed = specs[k], self._dtypes[k], self._fixed[k]
            if (type(value) is np.ndarray and value.dtype == dtype and fixed is not None
                    and value.ndim == fixed[0] and all(value.shape[i] == d for i, d in fixed[1])
                    and (not self._dynamic[k] or value.nbytes <= self.max_bytes)):
                # the common case, checked in full: right array, dtype, shape and size
                checked[spec.name] = _contiguous(value)
            else:
                checked[spec.name] = self._check(spec, dtype, value)
        return checked

    def _check(self, spec: TensorSpec, dtype: np.dtype[Any], value: Any) -> np.ndarray:
        where = f"input {spec.name!r}"
        if isinstance(value, np.ndarray):
            if isinstance(value, np.ma.MaskedArray):
                raise InputError(f"{where}: got a masked array; its mask would be ignored by "
                                 f"the runtime: fill it first (value.filled(...)) or pass "
                                 f"value.data")
            self._check_kind(where, dtype, value.dtype)
            if value.dtype != dtype and not self.cast:
                raise InputError(f"{where}: expected dtype {dtype}, got {value.dtype} (no "
                                 f"silent casts: convert it, or open the runner with cast=True)")
            self._check_size(spec, where, dtype, tuple(value.shape))
            if value.dtype != dtype:
                with _casting():
                    value = value.astype(dtype)
            return _contiguous(value)
        if isinstance(value, (list, tuple)):
            return self._from_list(spec, where, dtype, value)
        if not isinstance(value, (int, float, bool, np.generic)):
            raise InputError(f"{where}: expected a numpy array of {dtype} with shape "
                             f"{format_shape(spec.shape)}, got {type(value).__name__}")
        array = _asarray(where, value, None)
        self._check_kind(where, dtype, array.dtype)
        if array.dtype != dtype and not self.cast:
            raise InputError(f"{where}: expected dtype {dtype}, got {type(value).__name__} "
                             f"({array.dtype}) (no silent casts: pass np.{dtype.name}(value), "
                             f"or open the runner with cast=True)")
        self._check_size(spec, where, dtype, array.shape)
        return _contiguous(_asarray(where, value, dtype) if self.cast else array)

    def _from_list(self, spec: TensorSpec, where: str, dtype: np.dtype[Any],
                   value: list[Any] | tuple[Any, ...]) -> np.ndarray:
        """A nested Python list: its claimed shape is checked before NumPy builds anything."""
        claimed = nested_shape(value)
        self._check_size(spec, where, dtype, claimed, what="a nested list of shape")
        array = _asarray(where, value, None)
        self._check_kind(where, dtype, array.dtype)
        if array.dtype != dtype:
            if not self.cast:
                raise InputError(
                    f"{where}: a nested {type(value).__name__} was given; its values make "
                    f"{array.dtype}, the model takes {dtype} (no silent casts): pass "
                    f"np.asarray(value, dtype=np.{dtype.name}), or open the runner with "
                    f"cast=True")
            array = _asarray(where, value, dtype)
        if array.shape != claimed:  # a ragged list NumPy still made an array of
            self._check_size(spec, where, dtype, array.shape)
        return _contiguous(array)

    @staticmethod
    def _check_kind(where: str, dtype: np.dtype[Any], got: np.dtype[Any]) -> None:
        if got.hasobject or got.kind in "OUSVMm":
            raise InputError(f"{where}: expected {dtype}, got an array of {got} "
                             f"(object/string/void arrays are never accepted)")
        if got.kind == "c" and dtype.kind != "c":
            raise InputError(f"{where}: expected {dtype}, got complex values ({got}), which "
                             f"no cast turns into {dtype} without losing their imaginary part")

    def _check_size(self, spec: TensorSpec, where: str, dtype: np.dtype[Any],
                    shape: tuple[int, ...], what: str = "got") -> None:
        want = spec.shape
        if want is not None and not _fits(shape, want):
            raise InputError(f"{where}: expected shape {format_shape(want)}, {what} "
                             f"{tuple(shape)}")
        if spec.dynamic:
            nbytes = math.prod(shape) * dtype.itemsize
            if nbytes > self.max_bytes:
                raise InputError(f"{where}: {nbytes} bytes is over the cap of {self.max_bytes} "
                                 f"bytes for dynamic shapes (max_input_bytes=)")


def nested_shape(value: Any) -> tuple[int, ...]:
    """The shape a nested list claims, read down its first elements (without building it)."""
    shape = []
    while isinstance(value, (list, tuple)):
        shape.append(len(value))
        if not value or len(shape) > _MAX_DIMS:
            break
        value = value[0]
    return tuple(shape)


def _is_the_one_input(value: list[Any] | tuple[Any, ...], spec: TensorSpec) -> bool:
    """Is ``value`` the single input itself (a nested list), rather than inputs by position?

    It is unless it holds arrays or dicts, or it is ``[x]`` with ``x`` a scalar or a nested list
    of the input's own shape (one input by position)."""
    if any(isinstance(v, (np.ndarray, Mapping)) for v in value):
        return False
    if _fits(nested_shape(value), spec.shape):
        return True
    if len(value) == 1:
        first = value[0]
        return isinstance(first, (list, tuple)) and not _fits(nested_shape(first), spec.shape)
    return True


def _fits(shape: tuple[int, ...], want: tuple[int | None, ...] | None) -> bool:
    return want is None or (len(shape) == len(want) and all(
        w is None or w == g for w, g in zip(want, shape, strict=True)))


def _contiguous(array: np.ndarray) -> np.ndarray:
    """``array`` in C order (copied only if it is not); unlike ``np.ascontiguousarray`` it
    keeps a 0-d array 0-d."""
    return array if array.flags.c_contiguous else array.copy(order="C")


def _casting() -> Any:
    """``cast=True`` follows NumPy's ``astype``: NaN or out-of-range floats into integers give
    NumPy's values, without its warnings (which would be errors under ``-W error``)."""
    return np.errstate(invalid="ignore", over="ignore")


def _asarray(where: str, value: Any, dtype: np.dtype[Any] | None) -> np.ndarray:
    try:
        with _casting():
            return np.asarray(value, dtype=dtype)
    except OverflowError as exc:
        raise InputError(f"{where}: a value is out of range for {dtype}: {exc}") from None
    except (ValueError, TypeError, RecursionError) as exc:
        raise InputError(f"{where}: not a regular numeric array (a ragged or mixed nested "
                         f"list?): {exc}") from None
