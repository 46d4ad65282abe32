"""What every model backend shares: segment files, chaining, per-stage wiring, the Model.

A model given as a list of segment files runs one stage per segment. Tensors travel between
stages in a dict keyed by name: each stage takes its inputs from that dict and passes on its
outputs plus whatever later segments still need, so a segment may consume any tensor an
*earlier* segment produced (as pycoral's PipelinedModelRunner allows), and nothing is carried
further than needed.

How segment i+1 finds its inputs (:func:`plan`):

1. **by name**, when every input it declares was produced earlier under that name with a
   matching dtype and shape (the Edge TPU compiler's segments, and ours);
2. **by position**, when names do not chain but segment i's outputs, in order, match segment
   i+1's inputs in count, dtype and shape: generic exporters name every segment's tensors
   ``input`` / ``output``, so "by name" would hand segment 2 the *model* input;
3. otherwise the chain is refused at open, naming the segment, the tensor and both shapes. A
   tensor of the wrong shape never reaches a runtime.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import AccelError, ModelLoadError, ModelNotFound
from ..tensors import DEFAULT_MAX_INPUT_BYTES, InputValidator, TensorSpec

if TYPE_CHECKING:
    from ..stages import StageSpec
    from . import Model

__all__ = ["SegmentIO", "Wiring", "build_model", "check_file", "ir_read_error", "loading",
           "model_paths", "plan", "validator"]


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


def native_reason(exc: BaseException) -> str:
    """A runtime's message on one line, without the lines that say where in its sources it
    was raised."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return " ".join(ln for ln in lines if not _WHERE.match(ln)) or type(exc).__name__


def ir_read_error(xml: Path, runtime: str, exc: BaseException) -> ModelLoadError:
    """What a failed read of an OpenVINO IR means for the user. Only the runtime knows whether
    the graph needs weights (a graph without constants has an empty ``.bin``, or none, and
    loads), so the weights file is looked at only once the read has failed: a missing one is
    ModelNotFound, one that is not a readable file says so, else the runtime's reason."""
    weights = xml.with_suffix(".bin")
    reason = native_reason(exc)
    if not weights.exists():
        return ModelNotFound(f"weights file of {xml.name} not found: {str(weights)!r} "
                             f"({runtime}: {reason})")
    if not weights.is_file():
        return ModelLoadError(f"weights file of {xml.name}, {str(weights)!r}, is not a "
                              f"regular file ({runtime}: {reason})")
    if not os.access(weights, os.R_OK):
        return ModelLoadError(f"weights file of {xml.name}, {str(weights)!r}, is not "
                              f"readable ({runtime}: {reason})")
    return ModelLoadError(f"{runtime} cannot read {str(xml)!r} (weights {weights.name}, "
                          f"{weights.stat().st_size} bytes): {reason}")


@contextmanager
def loading(path: Any, runtime: str, doing: str = "open") -> Iterator[None]:
    """Turn what a runtime raises while reading ``path`` into a ModelLoadError that names the
    file and the runtime (the native exception is chained as ``__cause__``)."""
    try:
        yield
    except AccelError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{runtime} cannot {doing} {str(path)!r}: "
                             f"{native_reason(exc)}") from exc


@dataclass(frozen=True)
class SegmentIO:
    """One segment as probed from its file: a label for messages, its inputs and outputs."""

    label: str
    inputs: Sequence[TensorSpec]
    outputs: Sequence[TensorSpec]


@dataclass(frozen=True)
class Wiring:
    """The bookkeeping of one stage: where its inputs come from, what it passes on.

    ``feeds``: (the segment's own input name, the key in the carried dict), in the segment's
    input order. ``outputs``: the segment's output names, in order. ``keep``: carried keys
    that later segments still read. ``last``: the final segment passes on its outputs only.
    """

    feeds: tuple[tuple[str, str], ...]
    outputs: tuple[str, ...]
    keep: frozenset[str]
    last: bool

    @property
    def input_names(self) -> list[str]:
        return [name for name, _ in self.feeds]

    def gather(self, tensors: dict[str, Any]) -> dict[str, Any]:
        """This segment's inputs, keyed by the names its runtime knows."""
        return {name: tensors[key] for name, key in self.feeds}

    def gather_list(self, tensors: dict[str, Any]) -> list[Any]:
        """This segment's inputs in its input order."""
        return [tensors[key] for _, key in self.feeds]

    def pass_on(self, tensors: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
        """What the stage hands on: its outputs (all of them at the end) plus what later
        segments still need."""
        if self.last:
            return outputs
        keep = self.keep
        passed = {name: value for name, value in tensors.items() if name in keep}
        passed.update((name, value) for name, value in outputs.items() if name in keep)
        return passed

    def pass_on_values(self, tensors: dict[str, Any], values: Sequence[Any]) -> dict[str, Any]:
        """:meth:`pass_on` for outputs given as a list in output order."""
        return self.pass_on(tensors, dict(zip(self.outputs, values, strict=True)))


def _fits(spec: TensorSpec, other: TensorSpec) -> bool:
    """Whether a tensor described by ``other`` can feed the input ``spec``: same dtype, same
    rank, every fixed dimension equal (a dynamic one on either side matches anything)."""
    if spec.dtype != other.dtype:
        return False
    if spec.shape is None or other.shape is None:
        return True
    if len(spec.shape) != len(other.shape):
        return False
    return all(a is None or b is None or a == b for a, b in zip(spec.shape, other.shape,
                                                                strict=True))


def _describe(spec: TensorSpec) -> str:
    return f"{spec.name!r} {spec.dtype} {spec.shape}"


def plan(segments: Sequence[SegmentIO]) -> list[Wiring]:
    """The wiring of each segment: by name, else by position, else ValueError (see the module
    doc). Raises naming the segment, the tensor and both shapes."""
    if not segments:
        raise ValueError("no segments given")
    # key in the carried dict -> what it holds
    available: dict[str, TensorSpec] = {spec.name: spec for spec in segments[0].inputs}
    available.update((spec.name, spec) for spec in segments[0].outputs)
    feeds_per_segment: list[tuple[tuple[str, str], ...]] = [
        tuple((spec.name, spec.name) for spec in segments[0].inputs)]
    produced = {spec.name for spec in segments[0].outputs}
    for index in range(1, len(segments)):
        segment, previous = segments[index], segments[index - 1]
        # By name only if some input really comes from an earlier segment: a segment that
        # names nothing but model inputs would leave the earlier outputs unconsumed (libcoral
        # refuses such chains), and is what a generic exporter's "input" looks like.
        by_name = (all(spec.name in available and _fits(spec, available[spec.name])
                       for spec in segment.inputs)
                   and any(spec.name in produced for spec in segment.inputs))
        if by_name:
            feeds = tuple((spec.name, spec.name) for spec in segment.inputs)
        elif (len(previous.outputs) == len(segment.inputs)
              and all(_fits(spec, out) for spec, out in zip(segment.inputs, previous.outputs,
                                                            strict=True))):
            feeds = tuple((spec.name, out.name)
                          for spec, out in zip(segment.inputs, previous.outputs, strict=True))
        else:
            raise ValueError(_refusal(index, segment, previous, available))
        feeds_per_segment.append(feeds)
        available.update((spec.name, spec) for spec in segment.outputs)
        produced |= {spec.name for spec in segment.outputs}
    wirings = []
    later: set[str] = set()
    for index in reversed(range(len(segments))):
        wirings.append(Wiring(feeds_per_segment[index],
                              tuple(spec.name for spec in segments[index].outputs),
                              frozenset(later), index == len(segments) - 1))
        later |= {key for _, key in feeds_per_segment[index]}
    return wirings[::-1]


def _refusal(index: int, segment: SegmentIO, previous: SegmentIO,
             available: dict[str, TensorSpec]) -> str:
    """Why segment ``index`` cannot be fed, by name and by position."""
    for spec in segment.inputs:
        if spec.name not in available:
            by_name = (f"needs tensor {spec.name!r} ({spec.dtype} {spec.shape}), which no "
                       f"earlier segment produces (available: {sorted(available)})")
            break
        if not _fits(spec, available[spec.name]):
            by_name = (f"needs tensor {_describe(spec)}, but the tensor of that name is "
                       f"{available[spec.name].dtype} {available[spec.name].shape}")
            break
    else:
        by_name = ("names only model inputs, so no earlier segment's output would be "
                   "consumed")
    if len(previous.outputs) != len(segment.inputs):
        by_position = (f"segment {index - 1} ({previous.label}) has {len(previous.outputs)} "
                       f"outputs for its {len(segment.inputs)} inputs")
    else:
        spec, out = next((s, o) for s, o in zip(segment.inputs, previous.outputs, strict=True)
                         if not _fits(s, o))
        by_position = (f"input {_describe(spec)} does not match segment {index - 1} "
                       f"({previous.label})'s output {_describe(out)} either")
    return (f"segment {index} ({segment.label}) {by_name}; by position: {by_position}. "
            f"Segment files must chain by tensor name, or by position in count, dtype and "
            f"shape")


def validator(inputs: Sequence[TensorSpec], cast: bool,
              max_input_bytes: int | None) -> Callable[[Any], dict[str, Any]]:
    return InputValidator(inputs, cast=cast,
                          max_bytes=DEFAULT_MAX_INPUT_BYTES if max_input_bytes is None
                          else max_input_bytes)


def build_model(segments: Sequence[SegmentIO], stages: list[StageSpec], *, cast: bool,
                max_input_bytes: int | None, info: dict[str, Any],
                **extra: Any) -> Model:
    """The :class:`~aioaccel.backends.Model` of a chain: the first segment's inputs (checked
    on the loop), the last one's outputs."""
    from . import Model

    inputs = list(segments[0].inputs)
    return Model(stages=stages, inputs=inputs, outputs=list(segments[-1].outputs),
                 prepare=validator(inputs, cast, max_input_bytes), info=info, **extra)
