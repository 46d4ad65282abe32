"""aioaccel.batching: join/split (property-checked), calibrate, load_model and the open checks."""

from __future__ import annotations

import time
from types import MappingProxyType
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aioaccel import BlockingStage, StageSpec, TensorSpec
from aioaccel.backends import Model
from aioaccel.batching import (
    BatchingUnsupported,
    backend_batch,
    batched_specs,
    calibrate,
    check_batch,
    join,
    load_model,
    rows,
    split,
)


def rows_of(n: int, width: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32)


# ---- join ------------------------------------------------------------------------------------
def test_join_arrays_concatenates_along_axis_0_and_counts_rows() -> None:
    items = [rows_of(1, 16, 0), rows_of(3, 16, 1), rows_of(1, 16, 2)]
    batch, rows = join(items)
    assert batch.shape == (5, 16)
    assert rows == [1, 3, 1]
    assert np.array_equal(batch[1:4], items[1])


def test_join_dicts_by_name_and_sequences_by_position() -> None:
    a = [{"x": rows_of(1, 2, i), "m": np.full((1, 3), i, np.int64)} for i in range(3)]
    batch, rows = join(a)
    assert set(batch) == {"x", "m"} and rows == [1, 1, 1]
    assert batch["x"].shape == (3, 2) and batch["m"][:, 0].tolist() == [0, 1, 2]
    t, rows = join([(rows_of(2, 2), rows_of(2, 5)), (rows_of(1, 2), rows_of(1, 5))])
    assert isinstance(t, tuple) and [v.shape for v in t] == [(3, 2), (3, 5)] and rows == [2, 1]
    lst, _ = join([[rows_of(1)], [rows_of(1)]])
    assert isinstance(lst, list) and lst[0].shape == (2, 4)


def test_join_matches_inputs_by_name_whatever_their_order() -> None:
    a = {"x": np.zeros((1, 2), np.float32), "m": np.zeros((1, 3), np.int64)}
    b = {"m": np.ones((1, 3), np.int64), "x": np.ones((1, 2), np.float32)}
    for items in ([a, b], [a, MappingProxyType(b)]):  # the fast path, and the checking one
        batch, rows = join(items)
        assert rows == [1, 1]
        assert batch["x"].tolist() == [[0, 0], [1, 1]] and batch["m"][:, 0].tolist() == [0, 1]


def test_join_of_one_item_hands_it_back_unchanged() -> None:
    item = {"x": rows_of(2)}
    batch, rows = join([item])
    assert batch is item and rows == [2]


@pytest.mark.parametrize(("items", "match"), [
    ([], "at least one item"),
    ([{"x": rows_of(1)}, {"y": rows_of(1)}], r"item 1 .* by name \['y'\].* by name \['x'\]"),
    ([rows_of(1), rows_of(1).astype(np.float64)], r"item 1 .*float64.*float32"),
    ([rows_of(1, 4), rows_of(1, 5)], r"item 1 .*\[1, 5\].*\[1, 4\] .*along dimension 1"),
    ([np.float32(1.0), np.float32(2.0)], "at least one dimension"),
    ([(rows_of(2), rows_of(3))], r"input 0 \[2, 4\], input 1 \[3, 4\]"),
    ([rows_of(1), {"x": rows_of(1)}], "every item needs the same inputs"),
])
def test_join_refuses_items_that_cannot_be_joined(items: list[Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        join(items)


# ---- split -----------------------------------------------------------------------------------
def test_split_gives_each_item_its_rows_in_the_same_form() -> None:
    out = np.arange(5 * 2, dtype=np.float32).reshape(5, 2)
    parts = split(out, [1, 3, 1])
    assert [p.shape for p in parts] == [(1, 2), (3, 2), (1, 2)]
    assert np.array_equal(parts[1], out[1:4])
    named = split({"y": out, "z": out[:, :1]}, [2, 3])
    assert [set(p) for p in named] == [{"y", "z"}, {"y", "z"}]
    assert named[1]["z"].shape == (3, 1)
    positional = split((out, out), [4, 1])
    assert all(isinstance(p, tuple) for p in positional) and positional[1][0].shape == (1, 2)


@pytest.mark.parametrize(("outputs", "where"), [
    (np.zeros((7, 3)), ""),
    ({"y": np.zeros((8, 3)), "z": np.zeros((7, 3))}, "output 'z': "),
    ([np.zeros((7, 3))], "output 0: "),
])
def test_split_names_a_wrong_row_count(outputs: Any, where: str) -> None:
    with pytest.raises(ValueError, match="stage returned 7 rows") as info:
        split(outputs, [2, 2, 2, 2])
    assert str(info.value).startswith(
        f"{where}stage returned 7 rows for a batch of 8 rows from 4 items")


def test_split_refuses_a_scalar_output() -> None:
    with pytest.raises(ValueError, match="a value with no first axis for a batch of 2 rows"):
        split(np.float32(1.0), [1, 1])


def test_split_parts_are_copies_that_pin_nothing_of_the_batch() -> None:
    for width in (8, 1 << 15):
        batch = np.zeros((4, width), np.float32)
        parts = split(batch, [1, 2, 1])
        assert not any(np.shares_memory(p, batch) for p in parts)
        assert all(p.base is None or p.base.nbytes == p.nbytes for p in parts)


def test_rows_is_the_leading_dimension_of_the_first_input() -> None:
    assert rows(np.zeros((3, 2))) == 3
    assert rows({"x": np.zeros((2, 5)), "y": np.zeros((2,))}) == 2
    assert rows([np.zeros((4, 1))]) == 4
    for bad in (np.float32(1), 7, [1.0], {}, np.zeros(())):
        with pytest.raises(ValueError, match="cannot batch"):
            rows(bad)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=9), st.sampled_from(["array", "dict",
                                                                            "tuple"]))
def test_split_inverts_join(rows: list[int], form: str) -> None:
    arrays = [rows_of(n, 3, i) for i, n in enumerate(rows)]
    items: list[Any] = {"array": arrays, "dict": [{"a": x, "b": x * 2} for x in arrays],
                        "tuple": [(x, x + 1) for x in arrays]}[form]
    batch, got_rows = join(items)
    assert got_rows == rows
    back = split(batch, got_rows)
    assert len(back) == len(items)
    for original, part in zip(items, back, strict=True):
        if form == "array":
            assert np.array_equal(original, part)
        elif form == "dict":
            assert set(part) == {"a", "b"}
            assert all(np.array_equal(original[k], part[k]) for k in original)
        else:
            assert isinstance(part, tuple)
            assert all(np.array_equal(o, p) for o, p in zip(original, part, strict=True))


def test_batched_specs_free_the_first_dimension_only() -> None:
    specs = [TensorSpec("x", "float32", (1, 16)), TensorSpec("y", "int64", None)]
    assert batched_specs(specs) == [TensorSpec("x", "float32", (None, 16)), specs[1]]


# ---- calibrate -------------------------------------------------------------------------------
def timings(per_call: dict[int, float]) -> Any:
    calls: list[int] = []

    def run(n: int) -> float:
        calls.append(n)
        return per_call[n]

    return run, calls


def test_calibrate_picks_the_largest_size_that_keeps_paying() -> None:
    # fixed overhead 1 ms + 0.1 ms per item: every doubling gains well over 15%
    run, _ = timings({n: 0.001 + 0.0001 * n for n in (1, 2, 4, 8, 16, 32)})
    size, ms = calibrate(run, budget=1.0)
    assert size == 32
    assert [m["size"] for m in ms] == [1, 2, 4, 8, 16, 32]
    assert ms[0]["gain"] is None and ms[1]["gain"] == pytest.approx((2 / 0.0012) / (1 / 0.0011))
    assert ms[2]["items_per_second"] == pytest.approx(4 / 0.0014)
    assert all(m["within_budget"] for m in ms)


def test_calibrate_chooses_1_when_batching_does_not_pay() -> None:
    run, _ = timings({n: 0.001 * n for n in (1, 2, 4, 8)})  # cost per item is constant
    assert calibrate(run, (1, 2, 4, 8), budget=1.0)[0] == 1


def test_calibrate_stops_where_the_gain_flattens() -> None:
    # 1 -> 2 -> 4 gain ~2x, 4 -> 8 gains 10%: 8 only adds latency; 16 gains again (noise) but
    # the climb has stopped
    per_item = {1: 1.0, 2: 0.5, 4: 0.25, 8: 0.25 / 1.10, 16: 0.25 / 1.10 / 1.5}
    run, _ = timings({n: per_item[n] * n * 1e-3 for n in per_item})
    assert calibrate(run, (1, 2, 4, 8, 16), budget=1.0)[0] == 4
    assert calibrate(run, (1, 2, 4, 8, 16), budget=1.0, gain=1.05)[0] == 16


def test_calibrate_keeps_the_call_within_budget_and_stops_measuring_past_it() -> None:
    run, calls = timings({n: 0.001 + 0.0001 * n for n in (1, 2, 4, 8, 16, 32)})
    size, ms = calibrate(run, budget=0.0019)  # 8 -> 1.8 ms fits, 16 -> 2.6 ms does not
    assert size == 8
    assert calls == [1, 2, 4, 8, 16]
    assert ms[-1] == {"size": 16, "call_seconds": pytest.approx(0.0026),
                      "items_per_second": pytest.approx(16 / 0.0026),
                      "gain": pytest.approx((16 / 0.0026) / (8 / 0.0018)),
                      "within_budget": False}


def test_calibrate_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="sizes"):
        calibrate(lambda n: 1.0, (0, 1), budget=1.0)
    with pytest.raises(ValueError, match="gain"):
        calibrate(lambda n: 1.0, budget=1.0, gain=0)


# ---- load_model --------------------------------------------------------------------------------
class Timed(BlockingStage):
    """Sleeps ``fixed + per_row * rows`` seconds: a model whose batch gain is known."""

    def __init__(self, fixed: float, per_row: float, closed: list[str]):
        self.fixed, self.per_row, self.closed = fixed, per_row, closed

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        time.sleep(self.fixed + self.per_row * x.shape[0])  # stands in for compute time
        return {"y": x * 2}

    def close(self) -> None:
        self.closed.append("stage")


class Backend:
    """A fake ``load_backend``: records each call; ``batchable=False`` refuses batch=N."""

    def __init__(self, fixed: float = 0.0, per_row: float = 0.0, batchable: bool = True,
                 spec: bool = True):
        self.calls: list[int | None] = []
        self.closed: list[str] = []
        self.fixed, self.per_row, self.batchable, self.spec = fixed, per_row, batchable, spec

    def __call__(self, n: int | None) -> Model:
        self.calls.append(n)
        if n is not None and not self.batchable:
            raise BatchingUnsupported("batch=32 needs a dynamic batch dimension: input 'x'")
        stage = StageSpec("timed", lambda: Timed(self.fixed, self.per_row, self.closed))
        shape = (None, 4) if n else (1, 4)
        return Model(stages=[stage], inputs=[TensorSpec("x", "float32", shape)] if self.spec
                     else None, close=lambda: self.closed.append("model"), batch=n or 1)


def test_load_model_without_batching_and_with_a_fixed_size() -> None:
    backend = Backend()
    model = load_model(backend, None, 0.002)
    assert backend.calls == [None] and model.batch == 1
    assert model.info["batch"] == {"size": 1, "measurements": []}
    model = load_model(backend, 8, 0.002)
    assert backend.calls == [None, 8] and model.batch == 8
    assert model.info["batch"]["size"] == 8


def test_load_model_lets_a_refusal_of_batch_n_propagate() -> None:
    with pytest.raises(BatchingUnsupported, match="input 'x'"):
        load_model(Backend(batchable=False), 4, 0.002)


def test_auto_chooses_1_when_the_backend_cannot_batch() -> None:
    backend = Backend(batchable=False)
    model = load_model(backend, "auto", 0.002)
    assert backend.calls == [32, None]
    assert model.batch == 1 and model.info["batch"]["size"] == 1
    assert "cannot batch" in model.info["batch"]["reason"]


def test_auto_chooses_1_without_an_input_spec_to_measure_with() -> None:
    backend = Backend(spec=False)
    model = load_model(backend, "auto", 0.002)
    assert backend.calls == [32, None] and model.batch == 1
    assert backend.closed == ["model"]  # the batched load was released
    assert "no input spec" in model.info["batch"]["reason"]


def test_auto_measures_and_picks_a_size_that_pays() -> None:
    backend = Backend(fixed=0.01)  # 10 ms a call whatever the batch: batching pays in full
    model = load_model(backend, "auto", 0.002, sizes=(1, 2, 4), latency_budget=0.5)
    assert backend.calls == [4] and model.batch == 4
    info = model.info["batch"]
    assert info["size"] == 4 and [m["size"] for m in info["measurements"]] == [1, 2, 4]
    assert all(m["call_seconds"] >= 0.01 for m in info["measurements"])
    assert backend.closed == ["stage"]  # the timing stage was closed, the model kept


def test_auto_falls_back_to_1_and_reloads_when_no_size_pays() -> None:
    backend = Backend(per_row=0.01)  # cost grows with the rows: no gain
    model = load_model(backend, "auto", 0.002, sizes=(1, 2, 4), latency_budget=0.5)
    assert backend.calls == [4, None] and model.batch == 1
    assert model.inputs is not None and model.inputs[0].shape == (1, 4)  # the unbatched load
    assert [m["size"] for m in model.info["batch"]["measurements"]] == [1, 2, 4]
    assert backend.closed == ["stage", "model"]


def test_auto_respects_the_latency_budget() -> None:
    backend = Backend(fixed=0.01, per_row=0.005)
    model = load_model(backend, "auto", 0.004, sizes=(1, 2, 4, 8), latency_budget=0.044)
    # budget for the call: 44 - 4 ms wait = 40 ms; 4 rows take 30 ms, 8 rows 50 ms
    assert model.batch == 4
    assert model.info["batch"]["measurements"][-1]["within_budget"] is False


@pytest.mark.parametrize(("batch", "wait", "match"), [
    (0, 0.002, "batch must be None, an int >= 2"), ("big", 0.002, "got 'big'"),
    (True, 0.002, "batch must be"), (2.5, 0.002, "batch must be"),
    (4, -1, "batch_wait must be"), (4, float("nan"), "batch_wait must be"),
    (4, "1", "batch_wait must be"),
])
def test_bad_batch_arguments_are_refused(batch: Any, wait: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_batch(batch, wait)
    with pytest.raises(ValueError, match=match):
        load_model(Backend(), batch, wait)


def test_backend_batch_keyword() -> None:
    assert backend_batch(None, "onnx") is None and backend_batch(1, "onnx") is None
    assert backend_batch(8, "onnx") == 8
    with pytest.raises(ValueError, match="the onnx backend takes batch=None or an int >= 2"):
        backend_batch("auto", "onnx")
