"""Segment chaining on the CPU backends: by name, by position, or refused at open.

Generic exporters name every segment's tensors ``input`` / ``output``; matched by name, segment
2 would get the *model* input. Each case runs on LiteRT, ONNX Runtime and OpenVINO (both its
APIs) with segment files written both ways.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support import close, stream_all

import aioaccel
from aioaccel.backends._segments import SegmentIO, plan
from aioaccel.tensors import TensorSpec
from aioaccel.testing.models import Chain, dense_chain

pytestmark = pytest.mark.anyio

RUNTIMES = ["litert", "onnx", "openvino", "openvino-async", "openvino-ir"]


def segment_files(runtime: str, chain: Chain, tmp: Path, segments: int,
                  generic: bool) -> list[Path]:
    if runtime == "litert":
        return chain.write_tflite_segments(tmp, segments, generic_names=generic)
    if runtime == "openvino-ir":  # OpenVINO's own format, .xml + .bin per segment
        parts = chain.split(segments)
        return [(p.generically_named() if generic else p).write_openvino(
                    tmp / f"segment_{i}_of_{segments}.xml") for i, p in enumerate(parts)]
    # OpenVINO also reads the ONNX files (its frontend converts them at open)
    return chain.write_onnx_segments(tmp, segments, generic_names=generic)


def open_segments(runtime: str, paths: list[Path], **options: Any) -> aioaccel.Runner:
    backend = runtime.split("-")[0]
    if runtime == "openvino-async":
        options["api"] = "async"
    return aioaccel.open(paths, backend=backend, **options)


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("generic", [False, True], ids=["named", "generic"])
@pytest.mark.parametrize("segments", [2, 3])
async def test_segment_files_written_both_ways_compute_the_whole_chain(
        runtime: str, generic: bool, segments: int, tmp_path: Path) -> None:
    # inputs=8, width=8: every tensor has the model input's shape, so a generic segment's
    # "input" *could* be fed the model input by name without any shape error: position wins
    chain = dense_chain(8, 6, inputs=8, seed=segments)
    paths = segment_files(runtime, chain, tmp_path, segments, generic)
    xs = [chain.random_input(seed) for seed in range(8)]
    async with open_segments(runtime, paths, maxsize=4) as runner:
        assert [s.name for s in runner.inputs] == ["input"]
        assert [s.name for s in runner.outputs] == ["output"]
        results = await stream_all(runner, xs)
    for r, x in zip(results, xs):
        assert close(r.outputs["output"], chain.reference(x))


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_generic_segments_of_different_widths_chain_by_position(runtime: str,
                                                                      tmp_path: Path) -> None:
    chain = dense_chain(16, 4, inputs=5)
    paths = segment_files(runtime, chain, tmp_path, 2, generic=True)
    x = chain.random_input()
    async with open_segments(runtime, paths) as runner:
        out = await runner.infer(x)
    assert close(out["output"], chain.reference(x))


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_segments_that_chain_neither_way_are_refused_naming_tensor_and_shapes(
        runtime: str, tmp_path: Path) -> None:
    chain = dense_chain(16, 4, inputs=5)
    first, _ = segment_files(runtime, chain, tmp_path, 2, generic=True)
    # segment 1 takes "input" (1, 5): by name that is the model input, which no segment
    # output feeds; by position segment 0's output is (1, 16)
    with pytest.raises(ValueError, match=r"segment 1 \(segment_0_of_2\.\w+\) .*'input'.*"
                                         r"\(1, 5\).*'output' float32 \(1, 16\)"):
        async with open_segments(runtime, [first, first]):
            pass


def spec(name: str, *shape: int | None, dtype: str = "float32") -> TensorSpec:
    return TensorSpec(name, dtype, tuple(shape))


def test_plan_prefers_names_and_carries_what_later_segments_need() -> None:
    segments = [SegmentIO("a", [spec("x", 1, 4)], [spec("h", 1, 8)]),
                SegmentIO("b", [spec("h", 1, 8)], [spec("g", 1, 8)]),
                SegmentIO("c", [spec("g", 1, 8), spec("x", 1, 4)], [spec("y", 1, 2)])]
    a, b, c = plan(segments)
    assert c.feeds == (("g", "g"), ("x", "x"))
    assert a.keep == {"h", "g", "x"} and b.keep == {"g", "x"} and c.last
    assert b.pass_on({"h": 1, "x": 2}, {"g": 3}) == {"x": 2, "g": 3}


def test_plan_by_position_maps_each_input_to_the_previous_output() -> None:
    segments = [SegmentIO("a", [spec("input", None, 4)], [spec("output", None, 8),
                                                          spec("aux", None, 2)]),
                SegmentIO("b", [spec("input", 1, 8), spec("input_1", 1, 2)],
                          [spec("output", 1, 1)])]
    _, b = plan(segments)
    assert b.feeds == (("input", "output"), ("input_1", "aux"))  # dynamic dims match
    assert b.gather({"output": "O", "aux": "A", "input": "X"}) == {"input": "O",
                                                                   "input_1": "A"}


@pytest.mark.parametrize("second,message", [
    (SegmentIO("b", [spec("input", 1, 8, dtype="int8")], [spec("y", 1)]),
     r"'input' int8 \(1, 8\) does not match segment 0 \(a\)'s output 'output' float32 "),
    (SegmentIO("b", [spec("input", 1, 8), spec("z", 1, 8)], [spec("y", 1)]),
     "segment 0 \\(a\\) has 1 outputs for its 2 inputs"),
    (SegmentIO("b", [spec("input", 1, 8, 1)], [spec("y", 1)]),
     r"\(1, 8, 1\) does not match .* \(1, 8\)"),
])
def test_plan_refuses_dtype_count_and_rank_mismatches(second: SegmentIO, message: str) -> None:
    first = SegmentIO("a", [spec("input", 1, 4)], [spec("output", 1, 8)])
    with pytest.raises(ValueError, match=message):
        plan([first, second])
