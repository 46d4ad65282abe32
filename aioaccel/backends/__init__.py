"""Backends: what turns ``aioaccel.open(target)`` into a list of stages.

Each backend is a module ``aioaccel.backends.<module>`` with a function
``load(target, *, replicas, **options) -> Model``. Modules are imported only when used, so a
missing runtime costs nothing until it is asked for, and then raises
:class:`~aioaccel.BackendUnavailable` naming the extra to install.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ..errors import BackendUnavailable
from ..stages import BlockingStage, DeviceStage, StageSpec

if TYPE_CHECKING:
    from ..tensors import TensorSpec

__all__ = ["BACKENDS", "Backend", "Model", "available_backends", "get_backend", "require",
           "resolve_backend"]


@dataclass
class Model:
    """What a backend hands to the runner."""

    stages: list[StageSpec]
    inputs: list[TensorSpec] | None = None
    outputs: list[TensorSpec] | None = None
    #: checks/converts one item's inputs on the loop before admission (raises InputError)
    prepare: Callable[[Any], Any] | None = None
    #: releases what the stages share (called after every worker thread has stopped)
    close: Callable[[], None] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    #: most streams the device serves at once (MemryX multi-stream), None: no limit
    max_streams: int | None = None
    #: per-layer timings for ``runner.stats().profile`` (backends that can profile)
    profile: Callable[[], dict[str, Any]] | None = None
    #: rows the first stage takes per call (``open(batch=N)``); 1: one item per call
    batch: int = 1


@dataclass(frozen=True)
class Backend:
    name: str
    module: str
    suffixes: tuple[str, ...]     #: model files it opens when no backend is named
    runtime: tuple[str, ...]      #: modules to import to tell whether it is usable
    install: str                  #: what to install when it is not
    runtime_any: tuple[str, ...] = ()  #: and at least one of these must import


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("function", "function", (), (), "nothing: it is built in"),
        Backend("litert", "litert", (".tflite",), (),
                "pip install ai-edge-litert flatbuffers (from an aioaccel checkout: "
                "pip install -e '.[litert]'; with aioaccel installed from an index: "
                "pip install 'aioaccel[litert]')",
                ("ai_edge_litert.interpreter", "tflite_runtime.interpreter")),
        Backend("openvino", "openvino", (".xml",), ("openvino",),
                "pip install openvino (from an aioaccel checkout: "
                "pip install -e '.[openvino]'; with aioaccel installed from an index: "
                "pip install 'aioaccel[openvino]')"),
        Backend("onnx", "onnx", (".onnx",), ("onnxruntime",),
                "pip install onnxruntime onnx (from an aioaccel checkout: "
                "pip install -e '.[onnx]'; with aioaccel installed from an index: "
                "pip install 'aioaccel[onnx]')"),
        Backend("openvino-legacy", "openvino_legacy", (), ("openvino.inference_engine",),
                "pip install 'openvino<2024' 'numpy<2' (OpenVINO 2024.0 removed the legacy "
                "Inference Engine API)"),
        Backend("coral", "coral", (), ("pycoral.pipeline.pipelined_model_runner",),
                "pycoral and libedgetpu from Coral's package repository (not PyPI): "
                "https://coral.ai/software/#debian-packages"),
        Backend("memryx", "memryx", (".dfp",), ("memryx",),
                "the MemryX SDK (not on PyPI): https://developer.memryx.com"),
    )
}

_loaded: dict[str, ModuleType] = {}


def get_backend(name: str) -> ModuleType:
    """Import backend ``name`` (cached); raise BackendUnavailable if its runtime is missing."""
    if name in _loaded:
        return _loaded[name]
    try:
        backend = BACKENDS[name]
    except KeyError:
        known = ", ".join(sorted(BACKENDS))
        raise ValueError(f"unknown backend {name!r}; known: {known}") from None
    try:
        module = importlib.import_module(f"{__name__}.{backend.module}")
    except ImportError as exc:
        raise BackendUnavailable(
            f"backend {name!r} needs a runtime that is not installed ({exc}); "
            f"install it with: {backend.install}") from exc
    _loaded[name] = module
    return module


def require(backend: str, *modules: str) -> ModuleType:
    """Import the first of ``modules`` that is installed, for ``backend``; if none is, raise
    BackendUnavailable with the registry's install hint."""
    error: ImportError | None = None
    for name in modules:
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            error = error or exc
    raise BackendUnavailable(f"the {backend} backend needs {modules[0].split('.')[0]}: "
                             f"{BACKENDS[backend].install}") from error


def available_backends() -> list[str]:
    """Names of the backends whose runtime imports here."""
    names = []
    for name, backend in BACKENDS.items():
        try:
            with warnings.catch_warnings():  # openvino.inference_engine warns on import
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                for mod in backend.runtime:
                    importlib.import_module(mod)
                if backend.runtime_any:
                    require(name, *backend.runtime_any)
        except ImportError:
            continue
        names.append(name)
    return names


def _is_stage(obj: Any) -> bool:
    return isinstance(obj, (StageSpec, BlockingStage, DeviceStage)) or callable(obj)


def resolve_backend(target: Any) -> str:
    """The backend that opens ``target``: callables and stages -> "function", files by suffix."""
    items = list(target) if isinstance(target, (list, tuple)) else [target]
    if not items:
        raise ValueError("aioaccel.open() needs a model, a callable, or a non-empty list of them")
    if all(_is_stage(t) for t in items):
        return "function"
    first = items[0]
    if type(first).__module__.startswith("openvino"):
        return "openvino"
    if isinstance(first, (str, os.PathLike)):
        suffix = os.path.splitext(os.fspath(first))[1].lower()
        # .xml -> "openvino", whose load (on a worker thread) hands over to the legacy backend
        # when the installed OpenVINO has only the legacy API: finding that out imports the
        # openvino package, which must not happen here, on the event loop.
        for backend in BACKENDS.values():
            if suffix in backend.suffixes:
                return backend.name
        known = sorted(s for b in BACKENDS.values() for s in b.suffixes)
        raise ValueError(f"cannot tell which backend opens {os.fspath(first)!r}: unknown file "
                         f"type {suffix!r} (known: {', '.join(known) or 'none'}); pass backend=")
    raise TypeError(f"aioaccel.open() cannot open {type(first).__name__} objects; pass a model "
                    f"path, a callable, a stage, or backend=")

