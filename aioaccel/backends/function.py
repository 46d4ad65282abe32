"""The built-in backend: plain blocking Python callables (and stage objects) as stages.

``aioaccel.open(fn)`` runs ``fn(inputs)`` on a worker thread; ``aioaccel.open([f, g, h])`` is a
pipeline (each stage's outputs are the next one's inputs), each stage on its own thread(s).
A list may also hold :class:`~aioaccel.BlockingStage`, :class:`~aioaccel.DeviceStage` objects
and :class:`~aioaccel.StageSpec` for per-stage replicas or per-thread construction.
"""

from __future__ import annotations

from typing import Any

from ..stages import DeviceStage, StageSpec, made
from . import Model

__all__ = ["load"]


def load(target: Any, *, replicas: int = 1, batch: int | None = None, **options: Any) -> Model:
    """``batch``: the first stage receives the items' inputs joined along axis 0 (an array, or a
    dict or list of arrays) and must return outputs with the same first-axis length."""
    if options:
        raise TypeError(f"the function backend takes no options, got {', '.join(sorted(options))}")
    targets = list(target) if isinstance(target, (list, tuple)) else [target]
    specs: list[StageSpec] = []
    seen: set[str] = set()
    for i, stage in enumerate(targets):
        if isinstance(stage, StageSpec):
            spec = stage
        else:
            name = getattr(stage, "__name__", None) or type(stage).__name__
            device = isinstance(stage, DeviceStage)
            spec = StageSpec(name, made(stage), 1 if device else replicas, device, shared=True)
        if spec.name in seen:  # thread names and stats key on it
            spec = StageSpec(f"{spec.name}{i}", spec.factory, spec.replicas, spec.device,
                             spec.shared)
        seen.add(spec.name)
        specs.append(spec)
    return Model(stages=specs)
