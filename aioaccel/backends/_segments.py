"""What every model backend shares: segment chaining and the model's input spec.

A model given as a list of segment files runs one stage per segment. Tensors travel between
stages in a dict by name: each stage takes its inputs by name and passes on its outputs plus
whatever later segments still need, so a segment may consume any tensor an *earlier* segment
produced (as pycoral's PipelinedModelRunner allows), and nothing is carried further than needed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import AccelError, ModelLoadError, ModelNotFound
from ..tensors import DEFAULT_MAX_INPUT_BYTES, InputValidator, TensorSpec

__all__ = ["check_chain", "check_file", "loading", "model_paths", "needed_after", "validator"]


def model_paths(target: Any, suffixes: Sequence[str]) -> list[Path]:
    """The segment files of ``target`` (one path or a list), checked to exist."""
    items = list(target) if isinstance(target, (list, tuple)) else [target]
    if not items:
        raise ValueError("no model files given")
    paths = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"expected a model file path, got {type(item).__name__}")
        path = check_file(Path(item))
        if suffixes and path.suffix.lower() not in suffixes:
            raise ValueError(f"{str(path)!r} is not a {'/'.join(suffixes)} file")
        paths.append(path)
    return paths


def check_file(path: Path, what: str = "model file") -> Path:
    """``path``, if it is a non-empty regular file; else ModelNotFound / ModelLoadError."""
    if path.is_dir():
        raise ModelLoadError(f"{str(path)!r} is a directory, not a {what}")
    if not path.exists():
        raise ModelNotFound(f"{what} not found: {str(path)!r}")
    if not path.is_file():
        raise ModelLoadError(f"{str(path)!r} is not a regular file, so not a {what}")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{what} {str(path)!r} is empty (0 bytes)")
    return path


#: lines of a native error message that say where in the runtime's sources it was raised
_WHERE = re.compile(r"^(Exception from |Check '.*' failed at )")


@contextmanager
def loading(path: Any, runtime: str, doing: str = "open") -> Iterator[None]:
    """Turn what a runtime raises while reading ``path`` into a ModelLoadError that names the
    file and the runtime (the native exception is chained as ``__cause__``)."""
    try:
        yield
    except AccelError:
        raise
    except Exception as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        gist = " ".join(ln for ln in lines if not _WHERE.match(ln)) or type(exc).__name__
        raise ModelLoadError(f"{runtime} cannot {doing} {str(path)!r}: {gist}") from exc


def check_chain(segments: Sequence[tuple[str, Sequence[TensorSpec], Sequence[TensorSpec]]]) -> None:
    """Each segment's inputs must be produced by an earlier segment (or be model inputs of the
    first). ``segments``: (label, inputs, outputs) in order."""
    available = {spec.name for spec in segments[0][1]}
    for index, (label, inputs, outputs) in enumerate(segments):
        if index:
            for spec in inputs:
                if spec.name not in available:
                    raise ValueError(
                        f"segment {index} ({label}) needs tensor {spec.name!r}, which no earlier "
                        f"segment produces (available: {sorted(available)})")
        available |= {spec.name for spec in outputs}


def needed_after(segments: Sequence[Sequence[TensorSpec]]) -> list[frozenset[str]]:
    """For each segment index i, the tensor names that segments after i consume."""
    result = []
    later: set[str] = set()
    for inputs in reversed(segments):
        result.append(frozenset(later))
        later |= {spec.name for spec in inputs}
    return result[::-1]


def carry(tensors: dict[str, Any], outputs: dict[str, Any], keep: frozenset[str],
          last: bool) -> dict[str, Any]:
    """What a segment passes on: its outputs (all of them at the end) plus what is still needed."""
    if last:
        return outputs
    passed = {name: value for name, value in tensors.items() if name in keep}
    passed.update((name, value) for name, value in outputs.items() if name in keep)
    return passed


def validator(inputs: Sequence[TensorSpec], cast: bool,
              max_input_bytes: int | None) -> Callable[[Any], dict[str, Any]]:
    return InputValidator(inputs, cast=cast,
                          max_bytes=DEFAULT_MAX_INPUT_BYTES if max_input_bytes is None
                          else max_input_bytes)
