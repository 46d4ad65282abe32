"""Batching through ``aioaccel.open`` on the real CPU runtimes: with ``batch=8`` every item gets
what it gets without batching (concurrent ``infer`` callers and tagged streams), and
``batch="auto"`` chooses from measurements."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import close, stream_all

import aioaccel
from aioaccel.testing.models import Chain, dense_chain

pytestmark = pytest.mark.anyio

BACKENDS = ["litert", "onnx", "openvino", "openvino-async"]


def target(backend: str, chain: Chain, tmp: Path) -> Any:
    if backend == "litert":
        return chain.write_tflite(tmp / "model.tflite")
    if backend == "onnx":
        return chain.write_onnx(tmp / "model.onnx")
    return chain.write_openvino(tmp / "model.xml")


def open_model(backend: str, path: Any, **options: Any) -> aioaccel.Runner:
    if backend == "openvino-async":
        options["api"] = "async"
    return aioaccel.open(path, backend=backend.split("-")[0], **options)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_batched_infer_from_100_callers_equals_unbatched(backend: str,
                                                               tmp_path: Path) -> None:
    chain = dense_chain(24, 3, dynamic_batch=backend == "onnx", seed=5)
    path = target(backend, chain, tmp_path)
    xs = [chain.random_input(seed) for seed in range(100)]
    async with open_model(backend, path, maxsize=100) as plain:
        expected = await asyncio.gather(*(plain.infer(x) for x in xs))
    async with open_model(backend, path, batch=8, maxsize=100) as batched:
        got = await asyncio.gather(*(batched.infer(x) for x in xs))
        stats = batched.stats().batching
    assert stats is not None
    if backend != "openvino-async":  # the core groups items for blocking stages only, so far
        assert stats.items == 100
        assert stats.batches < 100  # items really shared calls
        assert max(size for size, _ in stats.sizes) <= 8
    for x, want, have in zip(xs, expected, got, strict=True):
        assert have["output"].shape == (1, 24)
        assert close(have["output"], want["output"])
        assert close(have["output"], chain.reference(x))


@pytest.mark.parametrize("backend", BACKENDS)
async def test_batched_stream_keeps_order_tags_and_values(backend: str, tmp_path: Path) -> None:
    chain = dense_chain(16, 2, dynamic_batch=backend == "onnx", seed=7)
    path = target(backend, chain, tmp_path)
    xs = [chain.random_input(seed) for seed in range(40)]
    async with open_model(backend, path, batch=8, maxsize=32) as runner:
        results = await stream_all(runner, xs, tag=lambda i: f"frame-{i}")
    assert [r.tag for r in results] == [f"frame-{i}" for i in range(40)]
    assert [r.seq for r in results] == sorted(r.seq for r in results)
    assert all(r.latency > 0 for r in results)
    for r, x in zip(results, xs, strict=True):
        assert close(r.outputs["output"], chain.reference(x))


async def test_auto_picks_more_than_1_on_a_small_onnx_model(tmp_path: Path) -> None:
    chain = dense_chain(32, 4, dynamic_batch=True)
    path = chain.write_onnx(tmp_path / "model.onnx")
    async with aioaccel.open(path, batch="auto", maxsize=64) as runner:
        info = runner.info["batch"]
        assert info["size"] > 1
        assert [m["size"] for m in info["measurements"]][:2] == [1, 2]
        xs = [chain.random_input(seed) for seed in range(64)]
        replies = await asyncio.gather(*(runner.infer(x) for x in xs))
        stats = runner.stats().batching
    assert stats is not None and stats.size == info["size"]
    assert all(close(r["output"], chain.reference(x)) for r, x in zip(replies, xs, strict=True))


async def test_auto_picks_1_on_an_onnx_model_with_a_fixed_batch_dimension(
        tmp_path: Path) -> None:
    chain = dense_chain(32, 4)
    path = chain.write_onnx(tmp_path / "model.onnx")
    async with aioaccel.open(path, batch="auto") as runner:
        assert runner.info["batch"]["size"] == 1
        assert "dynamic batch dimension" in runner.info["batch"]["reason"]
        assert runner.inputs is not None and runner.inputs[0].shape == (1, 32)
        assert runner.stats().batching is None  # one item per call, as without batch=
        out = await runner.infer(chain.random_input(1))
    assert close(out["output"], chain.reference(chain.random_input(1)))


async def test_a_batched_model_takes_items_of_several_rows(tmp_path: Path) -> None:
    chain = dense_chain(16, 2)
    path = chain.write_openvino(tmp_path / "model.xml")  # static batch 1, reshaped at open
    async with aioaccel.open(path, batch=8, maxsize=16) as runner:
        assert runner.inputs is not None and runner.inputs[0].shape == (None, 16)
        xs = [np.concatenate([chain.random_input(s), chain.random_input(s + 50)])
              for s in range(6)]
        replies = await asyncio.gather(*(runner.infer(x) for x in xs))
    for x, r in zip(xs, replies, strict=True):
        assert r["output"].shape == (2, 16)
        assert close(r["output"], chain.reference(x))
