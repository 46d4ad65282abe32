"""OpenVINO reports the tensor names the model file declares, as ONNX Runtime does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import aioaccel

pytestmark = pytest.mark.anyio


def aliased_output_model(path: Path) -> Path:
    """``input -> Relu -> "a/internal" -> Identity -> "output"``: OpenVINO folds the Identity,
    so the output port carries both names and ``get_any_name()`` returns the internal one."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["a/internal"]),
         helper.make_node("Identity", ["a/internal"], ["output"])], "aliased",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("api", ["sync", "async"])
async def test_openvino_uses_the_declared_output_name_not_get_any_name(api: str,
                                                                      tmp_path: Path) -> None:
    import openvino as ov

    path = aliased_output_model(tmp_path / "aliased.onnx")
    port = ov.Core().compile_model(str(path), "CPU").outputs[0]
    assert port.get_names() == {"output", "a/internal"}  # the trap this test is about
    x = np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32)
    names = {}
    for backend, options in (("onnx", {}), ("openvino", {"api": api})):
        async with aioaccel.open(path, backend=backend, **options) as runner:
            names[backend] = [s.name for s in runner.outputs]
            out = await runner.infer({"input": x})
        assert list(out) == ["output"] and np.array_equal(out["output"], np.maximum(x, 0))
    assert names["openvino"] == names["onnx"] == ["output"]
