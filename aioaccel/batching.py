"""Dynamic batching, the parts the runner core calls: join, split, calibrate, load_model.

The runner groups up to N admitted items for the first stage. :func:`join` concatenates their
inputs along axis 0 (an item of shape ``(1, 16)`` brings one row, ``(3, 16)`` three), the
stages run once on the batch, and :func:`split` hands each item back the rows it brought.
:func:`load_model` is what the runner's load thread calls: it loads the backend for batching
(``batch=N``) or measures the model to choose N (``batch="auto"``, with :func:`calibrate`).

Nothing here starts threads or touches the event loop; ``load_model`` blocks (it loads and
times the model), so it runs where loading already runs: on the runner's load thread.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from itertools import accumulate
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import BatchingUnsupported
from .stages import DeviceStage

if TYPE_CHECKING:
    from .backends import Model
    from .tensors import TensorSpec

__all__ = [
    "AUTO_SIZES",
    "DEFAULT_LATENCY_BUDGET",
    "BatchingUnsupported",
    "backend_batch",
    "batched_model",
    "batched_specs",
    "calibrate",
    "check_batch",
    "join",
    "load_model",
    "refuse_batch",
    "require_batch_axis",
    "rows",
    "split",
]

#: batch sizes ``batch="auto"`` measures
AUTO_SIZES = (1, 2, 4, 8, 16, 32)
#: ``batch="auto"``: the most an item may wait for its batch plus the batched call (seconds)
DEFAULT_LATENCY_BUDGET = 0.010


def check_batch(batch: Any, batch_wait: Any = 0.0) -> int | str | None:
    """``batch`` as given to open, checked: None, an int >= 1 or ``"auto"``."""
    if isinstance(batch_wait, bool) or not isinstance(batch_wait, (int, float)) or not (
            math.isfinite(batch_wait) and batch_wait >= 0):
        raise ValueError(f"batch_wait must be a number of seconds >= 0, got {batch_wait!r}")
    if batch is None or (isinstance(batch, str) and batch == "auto"):
        return batch
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be None, an int >= 2 (items per call) or 'auto', "
                         f"got {batch!r}")
    return batch


def backend_batch(batch: Any, backend: str) -> int | None:
    """A backend's ``batch=`` keyword, checked: N >= 2, or None for one item per call."""
    if batch is None:
        return None
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"the {backend} backend takes batch=None or an int >= 2 (items per "
                         f"call; the runner resolves 'auto'), got {batch!r}")
    return None if batch == 1 else batch


def refuse_batch(batch: Any, backend: str, why: str) -> None:
    """For backends whose runtime cannot batch: raise BatchingUnsupported for ``batch=N``."""
    n = backend_batch(batch, backend)
    if n is not None:
        raise BatchingUnsupported(f"batch={n}: the {backend} backend cannot batch ({why}); open "
                                  f"it without batch= (batch='auto' chooses 1 for it)")


def require_batch_axis(specs: Sequence[TensorSpec], batch: int, kind: str, label: str = "",
                       fixed_ok: bool = False) -> None:
    """Raise BatchingUnsupported unless every spec has a first axis to batch along (dynamic,
    or any size when ``fixed_ok``: the backend reshapes it)."""
    from .tensors import format_shape

    for spec in specs:
        if spec.shape is not None and (not spec.shape or (
                spec.shape[0] is not None and not fixed_ok)):
            reason = ("it has no dimensions" if not spec.shape else
                      "its first dimension is fixed")
            raise BatchingUnsupported(
                f"batch={batch}: batch= needs a dynamic batch dimension, and {kind} "
                f"{spec.name!r}{f' of {label}' if label else ''} has shape "
                f"{format_shape(spec.shape)}: {reason}; export the model with a dynamic first "
                f"axis, or open it without batch=")


# ---- join / split ------------------------------------------------------------------------
def _leaves(item: Any) -> tuple[str, list[Any], Any]:
    """(kind, values, names) of one item: "dict" (names), "list"/"tuple" or "array"."""
    if isinstance(item, Mapping):
        return "dict", list(item.values()), list(item)
    if isinstance(item, (list, tuple)):
        return type(item).__name__, list(item), len(item)
    return "array", [item], None


def _label(kind: str, names: Any, position: int) -> str:
    if kind == "dict":
        return f"input {names[position]!r}"
    return "the input" if kind == "array" else f"input {position}"


def join(inputs: list[Any]) -> tuple[Any, list[int]]:
    """Concatenate items' inputs along axis 0; return the batch and each item's row count.

    Each item is an array, a dict of arrays by name or a list/tuple of arrays by position, and
    every item has the same form (names, count, dtypes, and shapes after the first axis).
    One item comes back as it is. Raises ValueError naming the item and input that differ.
    """
    if not inputs:
        raise ValueError("join() needs at least one item")
    if len(inputs) > 1:
        joined = _join_fast(inputs)
        if joined is not None:
            return joined
    # one item, or something the fast path does not take: check everything, name what differs
    kind, first, names = _leaves(inputs[0])
    leaves = [first]
    for index in range(1, len(inputs)):
        item = inputs[index]
        k, values, n = _leaves(item)
        if k != kind or (n != names if kind != "dict" else set(n) != set(names)):
            raise ValueError(f"item {index} of the batch has inputs {_describe(k, n)}, item 0 "
                             f"has {_describe(kind, names)}: every item needs the same inputs")
        leaves.append([item[name] for name in names] if kind == "dict" else values)
    arrays = [[v if isinstance(v, np.ndarray) else np.asarray(v) for v in values]
              for values in leaves]
    rows = []
    for index, values in enumerate(arrays):
        counts = {a.shape[0] if a.ndim else -1 for a in values}
        if len(counts) != 1 or -1 in counts:
            raise ValueError(_rows_error(index, kind, names, values))
        rows.append(counts.pop())
    if len(inputs) == 1:
        return inputs[0], rows
    columns = []
    for position in range(len(arrays[0])):
        head = arrays[0][position]
        tail, dtype = head.shape[1:], head.dtype
        column = []
        for index, values in enumerate(arrays):
            a = values[position]
            if a.dtype != dtype or a.shape[1:] != tail:
                raise ValueError(
                    f"item {index} of the batch: {_label(kind, names, position)} is "
                    f"{a.dtype}{list(a.shape)}, item 0's is {dtype}{list(head.shape)}"
                    f"{_difference(a, head)}: batched items must agree in dtype and in every "
                    f"dimension after the first")
            column.append(a)
        columns.append(np.concatenate(column))
    if kind == "dict":
        return dict(zip(names, columns, strict=True)), rows
    if kind == "array":
        return columns[0], rows
    return (tuple(columns) if kind == "tuple" else columns), rows


def rows(inputs: Any) -> int:
    """The rows one item brings: the leading dimension of its (first) input array. ValueError
    for anything without one (a scalar, a non-array), which the runner then runs on its own."""
    # the hot cases first (once per item on the batching worker, holding the GIL)
    kind = type(inputs)
    if kind is np.ndarray:
        if inputs.ndim:
            return int(inputs.shape[0])
    elif kind is dict and inputs:
        head = next(iter(inputs.values()))
        if type(head) is np.ndarray and head.ndim:
            return int(head.shape[0])
    if isinstance(inputs, np.ndarray):
        first = inputs
    elif isinstance(inputs, Mapping) and inputs:
        first = next(iter(inputs.values()))
    elif isinstance(inputs, (list, tuple)) and inputs:
        first = inputs[0]
    else:
        raise ValueError(f"cannot batch inputs of type {type(inputs).__name__}: expected an "
                         f"array, or a dict or list of arrays")
    if not isinstance(first, np.ndarray) or first.ndim == 0:
        raise ValueError(f"cannot batch a {type(first).__name__} without a first axis: expected "
                         f"arrays with the item's rows on axis 0")
    return int(first.shape[0])


def _join_fast(inputs: list[Any]) -> tuple[Any, list[int]] | None:
    """The hot path (runs per batch on the stage's worker): items of one form whose arrays
    agree. Returns None on anything unusual, and :func:`join` then names the problem."""
    first = inputs[0]
    names: list[Any] | None = None
    if isinstance(first, dict):
        keys = first.keys()
        for item in inputs:
            if not isinstance(item, dict) or item.keys() != keys:
                return None
        names = list(first)
        columns = [[item[name] for item in inputs] for name in names]
    elif isinstance(first, (list, tuple)):
        kind, size = type(first), len(first)
        for item in inputs:
            if type(item) is not kind or len(item) != size:
                return None
        columns = [[item[p] for item in inputs] for p in range(size)]
    else:
        columns = [inputs]
    rows: list[int] | None = None
    joined = []
    for column in columns:
        head = column[0]
        if not isinstance(head, np.ndarray):
            return None
        dtype = head.dtype
        try:
            counts = [a.shape[0] for a in column]  # a 0-d array raises IndexError
            if not all(a.dtype == dtype for a in column):
                return None
            joined.append(np.concatenate(column))  # other dimensions differ: ValueError
        except (AttributeError, IndexError, ValueError, TypeError):
            return None
        if rows is None:
            rows = counts
        elif counts != rows:
            return None
    if rows is None:  # items with no inputs at all
        return None
    if names is not None:
        return dict(zip(names, joined, strict=True)), rows
    if isinstance(first, (list, tuple)):
        return (tuple(joined) if isinstance(first, tuple) else joined), rows
    return joined[0], rows


def _difference(a: np.ndarray, b: np.ndarray) -> str:
    if a.ndim != b.ndim:
        return f" ({a.ndim} dimensions against {b.ndim})"
    for dim in range(1, a.ndim):
        if a.shape[dim] != b.shape[dim]:
            return f" (they differ along dimension {dim})"
    return " (they differ in dtype)"


def _describe(kind: str, names: Any) -> str:
    if kind == "dict":
        return f"by name {names}"
    return "as one array" if kind == "array" else f"as a {kind} of {names}"


def _rows_error(index: int, kind: str, names: Any, values: list[np.ndarray]) -> str:
    shapes = ", ".join(f"{_label(kind, names, p)} {list(a.shape)}" for p, a in enumerate(values))
    return (f"item {index} of the batch cannot be joined along axis 0: {shapes}; batching needs "
            f"every input of an item to have at least one dimension, and the same first one "
            f"(the item's rows)")


def split(outputs: Any, rows: list[int]) -> list[Any]:
    """The inverse of :func:`join` for a stage's outputs: each item gets back its rows.

    ``outputs`` is an array, a dict of arrays or a list/tuple of arrays, each with
    ``sum(rows)`` rows on axis 0 (else ValueError). Each item's part is a copy, so a result
    kept on its own never pins its batch-mates' memory (measured here: a copy costs 0.2-0.3 us
    more than a view per item for outputs up to 4 KiB, and 90 us per MiB).
    """
    total = sum(rows)
    if isinstance(outputs, Mapping):
        names = list(outputs)
        parts = [_split_one(outputs[n], rows, total, f"output {n!r}: ") for n in names]
        if len(names) == 1:
            name = names[0]
            return [{name: part} for part in parts[0]]
        return [dict(zip(names, item, strict=True)) for item in zip(*parts, strict=True)]
    if isinstance(outputs, (list, tuple)):
        parts = [_split_one(v, rows, total, f"output {p}: ") for p, v in enumerate(outputs)]
        if not parts:
            return [type(outputs)() for _ in rows]
        wrap = tuple if isinstance(outputs, tuple) else list
        return [wrap(item) for item in zip(*parts, strict=True)]
    return _split_one(outputs, rows, total, "")


def _split_one(value: Any, rows: list[int], total: int, where: str) -> list[Any]:
    array = value if isinstance(value, np.ndarray) else np.asarray(value)
    got = array.shape[0] if array.ndim else None
    if got != total:
        returned = f"{got} rows" if got is not None else "a value with no first axis"
        raise ValueError(f"{where}stage returned {returned} for a batch of {total} rows from "
                         f"{len(rows)} items (a batched stage must return one output row per "
                         f"input row, in order)")
    if len(rows) == 1:
        return [value]
    ends = list(accumulate(rows))
    return [array[a:b].copy() for a, b in zip([0, *ends], ends, strict=False)]


def batched_specs(specs: Sequence[TensorSpec]) -> list[TensorSpec]:
    """The per-item input specs of a batched model: any number of rows on axis 0."""
    from .tensors import TensorSpec

    out = []
    for spec in specs:
        if spec.shape is None or not spec.shape:
            out.append(spec)
        else:
            out.append(TensorSpec(spec.name, spec.dtype, (None, *spec.shape[1:])))
    return out


def batched_model(model: Model, batch: int | None, *, cast: bool = False,
                  max_input_bytes: int | None = None) -> Model:
    """``model`` as a backend hands it out for ``batch=N``: input specs (and the validator
    that checks each item against them) take any number of rows on axis 0; ``model.batch``
    is N. Unchanged for ``batch=None``."""
    if batch is None or model.inputs is None:
        return model
    from .tensors import DEFAULT_MAX_INPUT_BYTES, InputValidator

    model.inputs = batched_specs(model.inputs)
    model.prepare = InputValidator(model.inputs, cast=cast, max_bytes=DEFAULT_MAX_INPUT_BYTES
                                   if max_input_bytes is None else max_input_bytes)
    model.batch = batch
    return model


# ---- choosing the batch size ----------------------------------------------------------------
def calibrate(run: Callable[[int], float], sizes: Sequence[int] = AUTO_SIZES, *, budget: float,
              gain: float = 1.15) -> tuple[int, list[dict[str, Any]]]:
    """Choose a batch size from timings: ``run(n)`` returns the seconds of one call at batch n.

    Sizes are measured in ascending order. The choice is the largest size reached through
    steps that each raise per-item throughput by at least ``gain`` over the next smaller size
    while the call stays within ``budget`` seconds; the smallest size is always allowed.
    Measuring stops at the first size over budget (larger ones would only take longer).
    Returns the choice and one dict per size measured: ``size``, ``call_seconds``,
    ``items_per_second``, ``gain`` (over the next smaller size; None for the first),
    ``within_budget``.
    """
    ordered = sorted(set(sizes))
    if not ordered or ordered[0] < 1:
        raise ValueError(f"sizes must be positive ints, got {list(sizes)!r}")
    if gain <= 0:
        raise ValueError(f"gain must be > 0, got {gain!r}")
    measurements: list[dict[str, Any]] = []
    chosen = ordered[0]
    climbing = True
    previous: float | None = None
    for n in ordered:
        seconds = float(run(n))
        throughput = n / seconds if seconds > 0 else math.inf
        within = seconds <= budget
        step = None if previous is None else throughput / previous
        measurements.append({"size": n, "call_seconds": seconds,
                             "items_per_second": throughput, "gain": step,
                             "within_budget": within})
        if not within:
            break
        if step is not None and climbing:
            if step >= gain:
                chosen = n
            else:
                climbing = False  # the gain has flattened out: larger sizes only add latency
        previous = throughput
    return chosen, measurements


def load_model(load_backend: Callable[[int | None], Model], batch: int | str | None,
               batch_wait: float, *, sizes: Sequence[int] = AUTO_SIZES,
               latency_budget: float = DEFAULT_LATENCY_BUDGET, gain: float = 1.15) -> Model:
    """Load the model for ``batch`` (what the runner's load thread calls).

    ``load_backend(n)`` loads the backend with ``batch=n`` (None: no batching). An int N >= 2
    loads with N (a backend that cannot batch raises :class:`BatchingUnsupported`, which
    propagates). ``"auto"`` loads with the largest of ``sizes``; if the backend cannot batch,
    or the model has no input spec to make synthetic inputs from, it loads without batching;
    else it times the model's stages at each size and chooses with :func:`calibrate`, within
    ``latency_budget`` seconds for ``batch_wait`` plus one call. ``model.batch`` is the size the
    runner must use, and ``model.info["batch"]`` says how it was chosen.
    """
    batch = check_batch(batch, batch_wait)
    if batch is None or batch == 1:
        model = load_backend(None)
        model.batch = 1
        model.info["batch"] = {"size": 1, "measurements": []}
        return model
    if isinstance(batch, int):
        model = load_backend(batch)
        model.batch = batch
        model.info["batch"] = {"size": batch, "measurements": []}
        return model
    largest = max(sizes)
    try:
        model = load_backend(largest)
    except ValueError as exc:  # BatchingUnsupported, or a backend without batch= at all
        return _unbatched(load_backend, f"the model cannot batch: {exc}", [])
    if model.inputs is None:
        _close(model)
        return _unbatched(load_backend, "the model has no input spec to measure it with", [])
    budget = max(0.0, latency_budget - batch_wait)
    try:
        with _Chain(model) as chain:
            chosen, measurements = calibrate(chain.timer(), sizes, budget=budget, gain=gain)
    except BaseException:
        _close(model)
        raise
    if chosen == 1:
        _close(model)  # reload for one item per call: static shapes are faster on some runtimes
        return _unbatched(load_backend, "no batch size paid off", measurements)
    model.batch = chosen
    model.info["batch"] = {"size": chosen, "measurements": measurements, "budget": budget,
                           "gain": gain, "reason": f"{chosen} gains >= {gain:.2f}x per step "
                           f"within {budget * 1e3:.1f} ms per call"}
    return model


def _unbatched(load_backend: Callable[[int | None], Model], reason: str,
               measurements: list[dict[str, Any]]) -> Model:
    model = load_backend(None)
    model.batch = 1
    model.info["batch"] = {"size": 1, "measurements": measurements, "reason": reason}
    return model


def _close(model: Model) -> None:
    if model.close is not None:
        model.close()


def synthetic_inputs(specs: Sequence[TensorSpec], rows: int, seed: int = 0) -> dict[str, Any]:
    """Inputs of ``specs`` with ``rows`` rows (other unknown dimensions: 1); floats are random
    normal, integers and bools zero (valid indices and masks for any model)."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in specs:
        dims = spec.shape if spec.shape is not None else (None,)
        shape = tuple(rows if i == 0 else (1 if d is None else d) for i, d in enumerate(dims))
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            out[spec.name] = rng.standard_normal(shape).astype(dtype)
        else:
            out[spec.name] = np.zeros(shape, dtype)
    return out


class _Chain:
    """The model's stages, made on this thread and run one after the other, for timing."""

    def __init__(self, model: Model):
        self.model = model
        self.stages: list[Any] = []

    def __enter__(self) -> _Chain:
        try:
            for spec in self.model.stages:
                stage = spec.factory()
                self.stages.append(_DeviceCall(stage) if isinstance(stage, DeviceStage)
                                   else stage)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for stage in reversed(self.stages):
            close = getattr(stage, "close", None)
            if close is not None:
                close()
        self.stages.clear()

    def call(self, inputs: Any) -> Any:
        value = inputs
        for stage in self.stages:
            value = stage.run(value) if hasattr(stage, "run") else stage(value)
        return value

    def timer(self, warmup: int = 2, min_seconds: float = 0.02,
              max_calls: int = 200) -> Callable[[int], float]:
        """``run(n)`` for :func:`calibrate`: the fastest call at batch n, after a warm-up
        (first calls allocate), over at least 3 calls or ``min_seconds``. The fastest, not the
        median: on a shared machine other processes only ever add time to a call, and the
        median of a size measured while they ran read batching as no gain (it chose 1)."""
        model = self.model
        assert model.inputs is not None

        def run(n: int) -> float:
            inputs = synthetic_inputs(model.inputs or [], n)
            if model.prepare is not None:
                inputs = model.prepare(inputs)
            for _ in range(warmup):
                self.call(inputs)
            times: list[float] = []
            spent = 0.0
            while len(times) < max_calls and (len(times) < 3 or spent < min_seconds):
                start = time.perf_counter()
                self.call(inputs)
                took = time.perf_counter() - start
                times.append(took)
                spent += took
            return min(times)

        return run


class _DeviceCall:
    """A device stage driven one call at a time (calibration only: latency of one batch)."""

    def __init__(self, stage: DeviceStage):
        import threading

        self.stage = stage
        self._done = threading.Event()
        self._outcome: tuple[Any, BaseException | None] = (None, None)
        stage.start(self._complete)

    def _complete(self, token: object, outputs: Any, error: BaseException | None) -> None:
        self._outcome = (outputs, error)
        self._done.set()

    def run(self, inputs: Any) -> Any:
        self._done.clear()
        self.stage.submit(None, inputs)
        if not self._done.wait(60.0):
            raise TimeoutError("a device stage did not complete a calibration call in 60 s")
        outputs, error = self._outcome
        if error is not None:
            raise error
        return outputs

    def close(self) -> None:
        self.stage.close()
