"""What ``aioaccel bench`` needs besides the command line: the inputs it runs, and the raw
vendor loop it compares against.

Inputs: every input of fixed shape gets random data of its dtype (float: standard normal;
integer and bool: zeros). A dynamic dimension is never guessed (an OCR detector "measured" on
a 1x1 image says nothing, and many models cannot take 1): give it with ``--shape
NAME=1,3,640,640``, or give whole arrays with ``--input file.npz`` (arrays named like the
inputs). A model with dynamic dimensions and neither is refused, naming the inputs.

The raw baseline calls the vendor API in a plain loop for every model the CPU runtimes open,
with any number of inputs; segments run one after another, chained the way the backend
chains them (:func:`aioaccel.backends._segments.plan`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .backends._segments import SegmentIO, plan
from .tensors import TensorSpec, format_shape

__all__ = ["RAW_BACKENDS", "bench_inputs", "describe_inputs", "parse_shapes", "raw_chain"]

#: backends whose vendor API the bench can call directly for a baseline
RAW_BACKENDS = ("litert", "onnx", "openvino")


def parse_shapes(options: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """``["x=1,3,640,640", "sr="]`` -> ``{"x": (1, 3, 640, 640), "sr": ()}``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for option in options:
        name, sep, dims = option.rpartition("=")
        if not sep or not name:
            raise ValueError(f"--shape {option!r}: expected NAME=D1,D2,... such as "
                             f"images=1,3,640,640 (NAME= for a scalar)")
        try:
            shape = tuple(int(d) for d in dims.split(",") if d.strip()) if dims else ()
        except ValueError:
            raise ValueError(f"--shape {option!r}: dimensions must be integers, such as "
                             f"{name}=1,3,640,640") from None
        if any(d < 1 for d in shape):
            raise ValueError(f"--shape {option!r}: dimensions must be >= 1")
        shapes[name] = shape
    return shapes


def bench_inputs(specs: Sequence[TensorSpec] | None, shapes: dict[str, tuple[int, ...]],
                 npz: Path | None, seed: int = 0) -> dict[str, np.ndarray]:
    """One input dict for ``specs``: arrays from ``npz``, else random data of the given or
    fixed shape. Raises ValueError naming what is missing or does not fit."""
    if not specs:
        raise ValueError("this backend does not describe its inputs: give them all with "
                         "--input file.npz")
    known = {spec.name: spec for spec in specs}
    given: dict[str, np.ndarray] = {}
    if npz is not None:
        if not npz.is_file():
            raise FileNotFoundError(f"input file not found: {str(npz)!r}")
        with np.load(npz, allow_pickle=False) as data:
            given = {name: data[name] for name in data.files}
    for name in [*given, *shapes]:
        if name not in known:
            raise ValueError(f"the model has no input {name!r}; its inputs: {sorted(known)}")
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    missing: list[TensorSpec] = []
    for spec in specs:
        if spec.name in given:
            arrays[spec.name] = given[spec.name]
            continue
        shape = shapes.get(spec.name)
        if shape is None:
            if spec.shape is None or any(d is None for d in spec.shape):
                missing.append(spec)
                continue
            shape = tuple(d for d in spec.shape if d is not None)
        elif spec.shape is not None and (
                len(shape) != len(spec.shape)
                or any(d is not None and d != s for d, s in zip(spec.shape, shape, strict=True))):
            raise ValueError(f"--shape {spec.name}={','.join(map(str, shape))} does not fit "
                             f"the input {spec.name!r} of shape {format_shape(spec.shape)}")
        arrays[spec.name] = _fill(rng, shape, np.dtype(spec.dtype))
    if missing:
        listed = ", ".join(f"{s.name} {format_shape(s.shape)}" for s in missing)
        example = missing[0]
        dims = ",".join(str(d) if d is not None else "1" if i == 0 else "640"
                        for i, d in enumerate(example.shape or ()))
        raise ValueError(f"the model has dynamic dimensions ({listed}): aioaccel bench does "
                         f"not guess them; give them with --shape NAME=D1,D2,... (for example "
                         f"--shape {example.name}={dims}) or give arrays with --input file.npz")
    return arrays


def _fill(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    return np.zeros(shape, dtype)


def describe_inputs(arrays: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{name} {a.dtype} {format_shape(a.shape)}" for name, a in arrays.items())


def raw_chain(backend: str, files: Sequence[Any],
              probe: Callable[[Any], SegmentIO] | None = None
              ) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None:
    """The vendor API in a plain loop over ``files`` (segments one after another), or None
    when the backend has no raw loop here."""
    if backend not in RAW_BACKENDS:
        return None
    from .testing.vendor import raw_segment

    steps = [raw_segment(backend, f) for f in files]
    if len(steps) == 1:
        return steps[0]
    wirings = plan([(probe or _probe(backend))(f) for f in files])

    def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = feed
        for step, wiring in zip(steps, wirings, strict=True):
            tensors = wiring.pass_on(tensors, step(wiring.gather(tensors)))
        return tensors
    return run


def _probe(backend: str) -> Callable[[Any], SegmentIO]:
    """A segment's inputs and outputs as the backend reads them (its load builds no stage)."""
    from .backends import get_backend

    def probe(path: Any) -> SegmentIO:
        model = get_backend(backend).load(path)
        try:
            return SegmentIO(str(path), model.inputs or [], model.outputs or [])
        finally:
            if model.close is not None:
                model.close()
    return probe
