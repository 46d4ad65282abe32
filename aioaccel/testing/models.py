"""Small models built in code, for tests and demos: no download, no converter.

A :class:`Chain` is a stack of fully-connected or 3x3 convolution layers with fixed random
weights. It computes its own NumPy reference, splits into segments (the output of segment i
is the input of segment i+1, so the segments together compute exactly the whole chain), and
writes itself as:

* ``.tflite`` -- with the flatbuffer schema that ships in ``ai_edge_litert`` and ``flatbuffers``
* ``.onnx``   -- with ``onnx.helper``
* OpenVINO    -- an ``openvino.Model`` built with its opset API, or IR ``.xml``/``.bin``

Tensor names are the contract between segments: the chain's input is ``input``, its output is
``output``, and the activation after layer k is ``act<k>``; a segment's tensors keep the names
they have in the whole chain.

::

    chain = dense_chain(width=256, depth=8)
    paths = chain.write_tflite_segments(tmp_dir, 2)   # [seg0.tflite, seg1.tflite]
    expected = chain.reference(x)
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Chain", "Layer", "conv_chain", "dense_chain", "two_input_model"]


@dataclass(frozen=True)
class Layer:
    kind: str               #: "dense" or "conv"
    weights: np.ndarray     #: dense: (in, out); conv: (out_ch, 3, 3, in_ch), TFLite's OHWI
    bias: np.ndarray
    relu: bool


@dataclass(frozen=True)
class Chain:
    """A sequential model; ``layers[k]`` turns ``act<k>`` into ``act<k+1>``."""

    input_shape: tuple[int, ...]
    layers: tuple[Layer, ...]
    first: int = 0          #: index of this chain's first layer in the whole chain
    total: int = 0          #: number of layers of the whole chain
    dynamic_batch: bool = False  #: the first dimension is dynamic in the written models
    #: name this chain's own input "input" and output "output" even when it is a segment, as
    #: generic exporters do (the segments then chain by position, not by name)
    generic_names: bool = False

    @property
    def input_name(self) -> str:
        return "input" if self.first == 0 or self.generic_names else f"act{self.first}"

    @property
    def output_name(self) -> str:
        end = self.first + len(self.layers)
        last = end == (self.total or len(self.layers))
        return "output" if last or self.generic_names else f"act{end}"

    def generically_named(self) -> Chain:
        """This chain with its input and output named ``input`` / ``output``."""
        return dataclasses.replace(self, generic_names=True)

    def _shapes(self) -> list[tuple[int, ...]]:
        shapes = [self.input_shape]
        for layer in self.layers:
            if layer.kind == "dense":
                shapes.append((shapes[-1][0], layer.weights.shape[1]))
            else:
                n, h, w, _ = shapes[-1]
                shapes.append((n, h, w, layer.weights.shape[0]))
        return shapes

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self._shapes()[-1]

    def random_input(self, seed: int = 0) -> np.ndarray:
        return np.random.default_rng(seed).standard_normal(self.input_shape).astype(np.float32)

    def reference(self, x: np.ndarray) -> np.ndarray:
        """What the model computes, in NumPy (float64 accumulation, float32 result)."""
        y = x.astype(np.float64)
        for layer in self.layers:
            if layer.kind == "dense":
                y = y @ layer.weights + layer.bias
            else:
                padded = np.pad(y, ((0, 0), (1, 1), (1, 1), (0, 0)))
                windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2))
                # windows: (n, h, w, in_ch, 3, 3); weights: (out_ch, 3, 3, in_ch)
                y = np.einsum("nhwcij,oijc->nhwo", windows, layer.weights) + layer.bias
            if layer.relu:
                y = np.maximum(y, 0.0)
        return y.astype(np.float32)

    def split(self, segments: int) -> list[Chain]:
        """``segments`` consecutive chains whose composition is this chain."""
        if not 1 <= segments <= len(self.layers):
            raise ValueError(f"cannot split {len(self.layers)} layers into {segments} segments")
        shapes = self._shapes()
        # Balance by compute (multiply-adds), not by layer count: a pipeline runs at the pace
        # of its slowest segment, and a first conv layer on 3 channels is ~10x cheaper.
        cumulative = np.concatenate([[0.0], np.cumsum(self._layer_costs())])
        bounds = [0]
        for k in range(1, segments):
            best = int(np.abs(cumulative - cumulative[-1] * k / segments).argmin())
            bounds.append(min(max(best, bounds[-1] + 1), len(self.layers) - (segments - k)))
        bounds.append(len(self.layers))
        total = self.total or len(self.layers)
        return [Chain(shapes[a], self.layers[a:b], self.first + a, total, self.dynamic_batch,
                      self.generic_names)
                for a, b in itertools.pairwise(bounds)]

    def _layer_costs(self) -> list[float]:
        """Multiply-adds per layer and batch row: dense in*out, conv h*w*out*3*3*in."""
        shapes = self._shapes()
        return [float(layer.weights.size * (shapes[k + 1][1] * shapes[k + 1][2]
                                            if layer.kind == "conv" else 1))
                for k, layer in enumerate(self.layers)]

    def cost(self) -> float:
        """Multiply-adds of one inference (what ``split`` balances)."""
        return sum(self._layer_costs())

    # ---- writers ------------------------------------------------------------------------
    def tflite_bytes(self) -> bytes:
        return _tflite_bytes(self)

    def write_tflite(self, path: str | os.PathLike[str]) -> Path:
        return _write(path, self.tflite_bytes())

    def write_tflite_segments(self, directory: str | os.PathLike[str], segments: int, *,
                              generic_names: bool = False) -> list[Path]:
        """Segment files; ``generic_names``: each named ``input`` -> ``output``."""
        return [part.write_tflite(Path(directory) / f"segment_{i}_of_{segments}.tflite")
                for i, part in enumerate(self._parts(segments, generic_names))]

    def _parts(self, segments: int, generic_names: bool) -> list[Chain]:
        parts = self.split(segments)
        return [p.generically_named() for p in parts] if generic_names else parts

    def onnx_bytes(self) -> bytes:
        return bytes(_onnx_model(self).SerializeToString())

    def write_onnx(self, path: str | os.PathLike[str]) -> Path:
        return _write(path, self.onnx_bytes())

    def write_onnx_segments(self, directory: str | os.PathLike[str], segments: int, *,
                            generic_names: bool = False) -> list[Path]:
        return [part.write_onnx(Path(directory) / f"segment_{i}_of_{segments}.onnx")
                for i, part in enumerate(self._parts(segments, generic_names))]

    def openvino_model(self) -> Any:
        return _openvino_model(self)

    def write_openvino(self, path: str | os.PathLike[str]) -> Path:
        import openvino as ov

        path = Path(path)
        ov.save_model(self.openvino_model(), str(path), compress_to_fp16=False)
        return path


def _write(path: str | os.PathLike[str], data: bytes) -> Path:
    path = Path(path)
    path.write_bytes(data)
    return path


def _weights(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    weights: np.ndarray = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    return weights


def dense_chain(width: int = 64, depth: int = 4, *, inputs: int | None = None, batch: int = 1,
                dynamic_batch: bool = False, seed: int = 0) -> Chain:
    """``depth`` fully-connected layers of ``width`` units (ReLU between, none after the last).
    Cost grows as ``depth * width**2``: width 1024, depth 8 is about 1 ms on one CPU core.
    ``dynamic_batch`` writes the batch dimension as dynamic (``batch`` is then the example's)."""
    rng = np.random.default_rng(seed)
    fan_in = inputs or width
    layers = []
    for k in range(depth):
        layers.append(Layer("dense", _weights(rng, (fan_in, width), fan_in),
                            _weights(rng, (width,), width), relu=k < depth - 1))
        fan_in = width
    return Chain((batch, inputs or width), tuple(layers), 0, depth, dynamic_batch)


def conv_chain(size: int = 32, channels: int = 16, depth: int = 4, *, in_channels: int = 3,
               seed: int = 0) -> Chain:
    """``depth`` 3x3 convolutions (stride 1, SAME padding, ReLU) on a ``size``x``size`` NHWC
    image with ``in_channels`` channels."""
    rng = np.random.default_rng(seed)
    layers = []
    cin = in_channels
    for k in range(depth):
        layers.append(Layer("conv", _weights(rng, (channels, 3, 3, cin), 9 * cin),
                            _weights(rng, (channels,), channels), relu=k < depth - 1))
        cin = channels
    return Chain((1, size, size, in_channels), tuple(layers), 0, depth)


# ---- TFLite -----------------------------------------------------------------------------
def _tflite_bytes(chain: Chain) -> bytes:
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    buffers = [s.BufferT()]  # buffer 0 is the empty sentinel
    tensors: list[Any] = []

    def tensor(name: str, shape: tuple[int, ...], data: np.ndarray | None = None) -> int:
        t = s.TensorT()
        t.name = name.encode()
        t.shape = list(shape)
        t.type = s.TensorType.FLOAT32
        t.buffer = 0
        if chain.dynamic_batch and data is None:
            t.shapeSignature = [-1, *shape[1:]]
        if data is not None:
            b = s.BufferT()
            b.data = np.ascontiguousarray(data, dtype=np.float32).view(np.uint8).ravel()
            buffers.append(b)
            t.buffer = len(buffers) - 1
        tensors.append(t)
        return len(tensors) - 1

    codes = {"dense": s.BuiltinOperator.FULLY_CONNECTED, "conv": s.BuiltinOperator.CONV_2D}
    opcodes = []
    for code in codes.values():
        oc = s.OperatorCodeT()
        oc.builtinCode = code
        oc.deprecatedBuiltinCode = code
        oc.version = 1
        opcodes.append(oc)

    shapes = chain._shapes()
    current = tensor(chain.input_name, shapes[0])
    first_input = current
    operators = []
    for k, layer in enumerate(chain.layers):
        index = chain.first + k
        last = k == len(chain.layers) - 1
        out_name = chain.output_name if last else f"act{index + 1}"
        op = s.OperatorT()
        act = s.ActivationFunctionType.RELU if layer.relu else s.ActivationFunctionType.NONE
        if layer.kind == "dense":
            w = tensor(f"dense{index}/weights", layer.weights.shape[::-1], layer.weights.T)
            op.opcodeIndex = 0
            op.builtinOptionsType = s.BuiltinOptions.FullyConnectedOptions
            op.builtinOptions = s.FullyConnectedOptionsT()
        else:
            w = tensor(f"conv{index}/weights", layer.weights.shape, layer.weights)
            op.opcodeIndex = 1
            op.builtinOptionsType = s.BuiltinOptions.Conv2DOptions
            opts = s.Conv2DOptionsT()
            opts.padding = s.Padding.SAME
            opts.strideH = opts.strideW = 1
            opts.dilationHFactor = opts.dilationWFactor = 1
            op.builtinOptions = opts
        op.builtinOptions.fusedActivationFunction = act
        b = tensor(f"layer{index}/bias", layer.bias.shape, layer.bias)
        out = tensor(out_name, shapes[k + 1])
        op.inputs = [current, w, b]
        op.outputs = [out]
        operators.append(op)
        current = out

    subgraph = s.SubGraphT()
    subgraph.tensors = tensors
    subgraph.inputs = [first_input]
    subgraph.outputs = [current]
    subgraph.operators = operators
    subgraph.name = b"main"

    def tensor_map(name: str, index: int) -> Any:
        m = s.TensorMapT()
        m.name = name.encode()
        m.tensorIndex = index
        return m

    signature = s.SignatureDefT()
    signature.inputs = [tensor_map(chain.input_name, first_input)]
    signature.outputs = [tensor_map(chain.output_name, current)]
    signature.signatureKey = b"serving_default"
    signature.subgraphIndex = 0

    model = s.ModelT()
    model.version = 3
    model.operatorCodes = opcodes
    model.subgraphs = [subgraph]
    model.buffers = buffers
    model.signatureDefs = [signature]
    model.description = b"aioaccel.testing.models chain"
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def two_input_model(path: str | os.PathLike[str], width: int = 4) -> Path:
    """A ``.tflite`` model with two inputs ``a`` and ``b`` (float32, ``(1, width)``) and one
    output ``sum = a + b``: for checks of input order and multi-input requests."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    tensors = []
    for name in ("a", "b", "sum"):
        t = s.TensorT()
        t.name = name.encode()
        t.shape = [1, width]
        t.type = s.TensorType.FLOAT32
        t.buffer = 0
        tensors.append(t)
    code = s.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.ADD
    code.version = 1
    op = s.OperatorT()
    op.opcodeIndex = 0
    op.inputs, op.outputs = [0, 1], [2]
    op.builtinOptionsType = s.BuiltinOptions.AddOptions
    op.builtinOptions = s.AddOptionsT()
    subgraph = s.SubGraphT()
    subgraph.tensors, subgraph.inputs, subgraph.outputs = tensors, [0, 1], [2]
    subgraph.operators = [op]
    model = s.ModelT()
    model.version = 3
    model.operatorCodes = [code]
    model.subgraphs = [subgraph]
    model.buffers = [s.BufferT()]
    builder = flatbuffers.Builder(256)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return _write(path, bytes(builder.Output()))


# ---- ONNX -------------------------------------------------------------------------------
def _onnx_model(chain: Chain) -> Any:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = []
    inits = []
    shapes = chain._shapes()
    current = chain.input_name
    for k, layer in enumerate(chain.layers):
        index = chain.first + k
        last = k == len(chain.layers) - 1
        out = chain.output_name if last else f"act{index + 1}"
        pre = f"layer{index}"
        inits.append(numpy_helper.from_array(layer.bias, f"{pre}/bias"))
        if layer.kind == "dense":
            inits.append(numpy_helper.from_array(layer.weights, f"{pre}/weights"))
            nodes.append(helper.make_node("MatMul", [current, f"{pre}/weights"], [f"{pre}/mm"]))
            nodes.append(helper.make_node("Add", [f"{pre}/mm", f"{pre}/bias"],
                                          [f"{pre}/pre" if layer.relu else out]))
        else:  # NHWC in and out, NCHW inside: ONNX's Conv is channels-first
            inits.append(numpy_helper.from_array(
                np.ascontiguousarray(layer.weights.transpose(0, 3, 1, 2)), f"{pre}/weights"))
            nodes.append(helper.make_node("Transpose", [current], [f"{pre}/nchw"],
                                          perm=[0, 3, 1, 2]))
            nodes.append(helper.make_node("Conv", [f"{pre}/nchw", f"{pre}/weights", f"{pre}/bias"],
                                          [f"{pre}/conv"], pads=[1, 1, 1, 1],
                                          kernel_shape=[3, 3]))
            nodes.append(helper.make_node("Transpose", [f"{pre}/conv"],
                                          [f"{pre}/pre" if layer.relu else out],
                                          perm=[0, 2, 3, 1]))
        if layer.relu:
            nodes.append(helper.make_node("Relu", [f"{pre}/pre"], [out]))
        current = out
    def dims(shape: tuple[int, ...]) -> list[Any]:
        return ["batch", *shape[1:]] if chain.dynamic_batch else list(shape)

    graph = helper.make_graph(
        nodes, "chain",
        [helper.make_tensor_value_info(chain.input_name, TensorProto.FLOAT, dims(shapes[0]))],
        [helper.make_tensor_value_info(chain.output_name, TensorProto.FLOAT, dims(shapes[-1]))],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="aioaccel")
    model.ir_version = 8  # readable by onnxruntime releases from 1.14 on
    onnx.checker.check_model(model)
    return model


# ---- OpenVINO ---------------------------------------------------------------------------
def _openvino_model(chain: Chain) -> Any:
    import openvino as ov

    try:
        import openvino.opset13 as ops
    except ImportError:  # OpenVINO before 2024 keeps the opsets under openvino.runtime
        import openvino.runtime.opset13 as ops

    shape = ov.PartialShape([-1 if chain.dynamic_batch and i == 0 else d
                             for i, d in enumerate(chain.input_shape)])
    param = ops.parameter(shape, ov.Type.f32, name=chain.input_name)
    param.output(0).get_tensor().set_names({chain.input_name})
    y: Any = param
    for layer in chain.layers:
        if layer.kind == "dense":
            y = ops.add(ops.matmul(y, ops.constant(layer.weights), False, False),
                        ops.constant(layer.bias))
        else:
            nchw = ops.transpose(y, ops.constant(np.array([0, 3, 1, 2], dtype=np.int64)))
            conv = ops.convolution(nchw, ops.constant(layer.weights.transpose(0, 3, 1, 2).copy()),
                                   [1, 1], [1, 1], [1, 1], [1, 1])
            conv = ops.add(conv, ops.constant(layer.bias.reshape(1, -1, 1, 1)))
            y = ops.transpose(conv, ops.constant(np.array([0, 2, 3, 1], dtype=np.int64)))
        if layer.relu:
            y = ops.relu(y)
    y.output(0).get_tensor().set_names({chain.output_name})
    y.set_friendly_name(chain.output_name)  # the legacy IE API names outputs by their layer
    result = ops.result(y)
    return ov.Model([result], [param], "chain")
