"""Joining items into one batch along axis 0, and splitting outputs back (pure functions).

An item's inputs are an array, a dict of arrays (by input name) or a list/tuple of arrays (by
position); each item brings its own number of rows (its leading dimension: items of shape
(1, 16) make a (k, 16) batch; an item of shape (3, 16) brings 3 rows). Outputs come back in
the same forms and are split by those row counts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .backends import Model

__all__ = ["AUTO_SIZES", "join", "load_model", "rows", "split"]


def rows(inputs: Any) -> int:
    """The rows an item brings (its leading dimension); ValueError if it has none."""
    first = _first_array(inputs)
    if first.ndim == 0:
        raise ValueError("a scalar has no batch axis to join along")
    return int(first.shape[0])


def join(inputs: list[Any]) -> tuple[Any, list[int]]:
    """Concatenate items' inputs along axis 0; returns the batch and each item's rows.
    ValueError if the items cannot be joined (different forms, names or trailing shapes)."""
    if not inputs:
        raise ValueError("nothing to join")
    counts = [rows(x) for x in inputs]
    first = inputs[0]
    if isinstance(first, np.ndarray):
        return np.concatenate(inputs, axis=0), counts
    if isinstance(first, Mapping):
        names = list(first)
        if any(not isinstance(x, Mapping) or list(x) != names for x in inputs):
            raise ValueError("items name different inputs")
        return {n: np.concatenate([x[n] for x in inputs], axis=0) for n in names}, counts
    if isinstance(first, (list, tuple)):
        width = len(first)
        if any(not isinstance(x, (list, tuple)) or len(x) != width for x in inputs):
            raise ValueError("items have different numbers of inputs")
        joined = [np.concatenate([x[i] for x in inputs], axis=0) for i in range(width)]
        return (tuple(joined) if isinstance(first, tuple) else joined), counts
    raise ValueError(f"cannot join inputs of type {type(first).__name__}")


def split(outputs: Any, counts: Sequence[int]) -> list[Any]:
    """The inverse of :func:`join` for outputs: each item gets back the rows it brought.
    ValueError if an output's first axis does not have ``sum(counts)`` rows. The parts are
    copies, so a kept result does not pin the whole batch in memory."""
    total = sum(counts)
    edges = np.cumsum(counts)[:-1]

    def cut(array: Any, where: str) -> list[np.ndarray]:
        array = np.asarray(array)
        if array.ndim == 0 or array.shape[0] != total:
            got = "a scalar" if array.ndim == 0 else f"{array.shape[0]} rows"
            raise ValueError(f"the stage returned {got}{where} for a batch of {total} rows "
                             f"from {len(counts)} items")
        return [part.copy() for part in np.split(array, edges, axis=0)]

    if isinstance(outputs, Mapping):
        columns = {name: cut(value, f" in output {name!r}") for name, value in outputs.items()}
        return [{name: parts[i] for name, parts in columns.items()} for i in range(len(counts))]
    if isinstance(outputs, (list, tuple)):
        lists = [cut(value, f" in output {k}") for k, value in enumerate(outputs)]
        kind = type(outputs) if isinstance(outputs, tuple) else list
        return [kind(parts[i] for parts in lists) for i in range(len(counts))]
    return cut(outputs, "")


def _first_array(inputs: Any) -> np.ndarray:
    if isinstance(inputs, np.ndarray):
        return inputs
    if isinstance(inputs, Mapping) and inputs:
        value = next(iter(inputs.values()))
    elif isinstance(inputs, (list, tuple)) and inputs:
        value = inputs[0]
    else:
        raise ValueError(f"cannot batch inputs of type {type(inputs).__name__}")
    if not isinstance(value, np.ndarray):
        raise ValueError(f"cannot batch inputs of type {type(value).__name__}")
    return value


def load_model(load_backend: Callable[[int | None], Model], batch: int | str,
               batch_wait: float) -> Model:
    """Load with batching (called on the runner's load thread). ``batch`` is an int >= 2 (the
    backend must be able to batch, or it raises a clear error) or "auto"."""
    if batch == "auto":
        try:
            return load_backend(AUTO_SIZES[-1])
        except ValueError:
            return load_backend(None)
    assert isinstance(batch, int)
    return load_backend(batch)


#: batch sizes "auto" chooses from
AUTO_SIZES = (1, 2, 4, 8, 16, 32)
