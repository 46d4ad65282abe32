"""Input and output specs of a model, and the validation of inputs against them.

Validation runs on the event loop in ``push``/``infer``, before an item is admitted, so a bad
input costs nothing else: the error names the input, what came and what was expected.
No silent casts (OpenVINO would cast silently, LiteRT refuses): ``cast=True`` opts in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError

__all__ = ["DEFAULT_MAX_INPUT_BYTES", "InputValidator", "TensorSpec", "format_shape"]

#: the byte-size cap for one input whose shape has dynamic dimensions
DEFAULT_MAX_INPUT_BYTES = 256 * 1024 * 1024


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
    """

    def __init__(self, specs: Sequence[TensorSpec], *, cast: bool = False,
                 max_bytes: int = DEFAULT_MAX_INPUT_BYTES):
        self.specs = list(specs)
        self.names = [s.name for s in self.specs]
        self.cast = cast
        self.max_bytes = max_bytes
        self._dtypes = [np.dtype(s.dtype) for s in self.specs]

    def __call__(self, inputs: Any) -> dict[str, np.ndarray]:
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
            if len(inputs) != len(specs):
                raise InputError(f"got {len(inputs)} inputs by position, the model takes "
                                 f"{len(specs)}: {self.names}")
            values = list(inputs)
        elif len(specs) == 1:
            values = [inputs]
        else:
            raise InputError(f"got one {type(inputs).__name__}, the model takes {len(specs)} "
                             f"inputs {self.names}: pass a dict by name or a list by position")
        return {spec.name: self._check(spec, dtype, value)
                for spec, dtype, value in zip(specs, self._dtypes, values, strict=True)}

    def _check(self, spec: TensorSpec, dtype: np.dtype[Any], value: Any) -> np.ndarray:
        where = f"input {spec.name!r}"
        if not isinstance(value, np.ndarray):
            if not isinstance(value, (list, tuple, int, float, bool, np.generic)):
                raise InputError(f"{where}: expected a numpy array of {dtype} with shape "
                                 f"{format_shape(spec.shape)}, got {type(value).__name__}")
            value = np.asarray(value)
        if value.dtype.hasobject or value.dtype.kind in "OUSV":
            raise InputError(f"{where}: expected {dtype}, got an array of {value.dtype} "
                             f"(object/string/void arrays are never accepted)")
        if value.dtype != dtype:
            if not self.cast:
                raise InputError(f"{where}: expected dtype {dtype}, got {value.dtype} (no "
                                 f"silent casts: convert it, or open the runner with cast=True)")
            value = value.astype(dtype)
        shape = spec.shape
        if shape is not None and (value.ndim != len(shape) or any(
                want is not None and want != got
                for want, got in zip(shape, value.shape, strict=True))):
            raise InputError(f"{where}: expected shape {format_shape(shape)}, got "
                             f"{tuple(value.shape)}")
        if spec.dynamic and value.nbytes > self.max_bytes:
            raise InputError(f"{where}: {value.nbytes} bytes is over the cap of {self.max_bytes} "
                             f"bytes for dynamic shapes (max_input_bytes=)")
        # (np.ascontiguousarray would turn a 0-d scalar input into shape (1,))
        return value if value.flags.c_contiguous else np.ascontiguousarray(value)
