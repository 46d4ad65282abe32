"""A property-based input fuzzer: arrays, nested lists, dicts, tuples and scalars of every kind
against random input specs. Every outcome is accepted-and-correct or InputError: never another
exception, never a hang (hypothesis' deadline), and the same through the web body decoders."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import aioaccel
from aioaccel.integrations import bodies
from aioaccel.integrations.http import decode_inputs
from aioaccel.tensors import InputValidator, TensorSpec
from aioaccel.testing.models import dense_chain

pytestmark = pytest.mark.anyio

DTYPES = ["float32", "float64", "float16", "int8", "uint8", "int32", "int64", "bool"]
FUZZ = settings(max_examples=400, deadline=2000,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

dims = st.one_of(st.none(), st.integers(1, 3))
shapes = st.one_of(st.none(), st.lists(dims, max_size=3).map(tuple))


@st.composite
def input_specs(draw: st.DrawFn) -> list[TensorSpec]:
    count = draw(st.integers(1, 3))
    return [TensorSpec(f"in{i}", draw(st.sampled_from(DTYPES)), draw(shapes))
            for i in range(count)]


scalars = st.one_of(
    st.integers(-(2 ** 70), 2 ** 70), st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.none(), st.text(max_size=3), st.binary(max_size=3),
    st.complex_numbers(max_magnitude=10), st.sampled_from([np.float32(1.5), np.int8(-3),
                                                           np.uint64(2 ** 63), np.bool_(True)]),
)
nested = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) |
                      st.tuples(inner, inner), max_leaves=24)
arrays = hnp.arrays(
    dtype=st.sampled_from([*DTYPES, "complex64", "<U2", ">f4", "uint16", "datetime64[s]"]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3))


@st.composite
def regular_lists(draw: st.DrawFn) -> Any:
    """Nested lists of one kind of number, of a regular shape (what NumPy can read)."""
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=3))
    element = draw(st.sampled_from([st.integers(-300, 300), st.floats(-1e40, 1e40),
                                    st.booleans()]))
    return draw(hnp.arrays(object, shape, elements=element)).tolist()


masked = arrays.filter(lambda a: a.dtype.kind in "biuf").map(
    lambda a: np.ma.masked_array(a, mask=np.zeros(a.shape, bool)))
values = st.one_of(arrays, nested, regular_lists(), scalars, masked)


@st.composite
def item_inputs(draw: st.DrawFn, specs: list[TensorSpec]) -> Any:
    """One item's inputs: by name (right, wrong or missing names), by position, or bare."""
    names = [s.name for s in specs]
    kind = draw(st.sampled_from(["dict", "list", "tuple", "bare"]))
    if kind == "dict":
        keys = draw(st.one_of(st.just(names), st.lists(st.sampled_from([*names, "other"]),
                                                       max_size=4, unique=True)))
        return {k: draw(values) for k in keys}
    if kind in ("list", "tuple"):
        count = draw(st.sampled_from([len(specs), len(specs), 0, len(specs) + 1]))
        items = [draw(values) for _ in range(count)]
        return items if kind == "list" else tuple(items)
    return draw(values)


def fits(shape: tuple[int, ...], want: tuple[int | None, ...] | None) -> bool:
    return want is None or (len(shape) == len(want) and all(
        w is None or w == g for w, g in zip(want, shape)))


def same(actual: np.ndarray, given_value: Any, dtype: np.dtype[Any]) -> bool:
    try:
        with np.errstate(all="ignore"):
            expected = np.asarray(given_value).astype(dtype)
    except (ValueError, TypeError, OverflowError):
        return False
    if expected.shape != actual.shape:
        return False
    return bool(np.array_equal(actual, expected, equal_nan=dtype.kind in "fc"))


def assert_says_something(exc: Exception) -> None:
    assert str(exc).strip(), "an InputError must say what was wrong"


def natural_dtype(value: Any) -> np.dtype[Any] | None:
    """The dtype NumPy gives ``value`` by itself, or None if it cannot make an array of it."""
    try:
        return np.asarray(value).dtype
    except (ValueError, TypeError, OverflowError):
        return None


def check_accepted(specs: list[TensorSpec], inputs: Any, out: dict[str, np.ndarray],
                   cast: bool) -> None:
    assert list(out) == [s.name for s in specs]
    for i, spec in enumerate(specs):
        array = out[spec.name]
        dtype = np.dtype(spec.dtype)
        assert type(array) is np.ndarray and array.dtype == dtype
        assert array.flags.c_contiguous and fits(array.shape, spec.shape)
        # which value was this input? by name, by position, or the whole (one input)
        candidates = []
        if isinstance(inputs, dict):
            candidates.append(inputs[spec.name])
        elif isinstance(inputs, (list, tuple)):
            if len(inputs) == len(specs):
                candidates.append(inputs[i])
            if len(specs) == 1:
                candidates.append(inputs)
        else:
            candidates.append(inputs)
        assert any(same(array, c, dtype) for c in candidates), (spec, inputs, array)
        if not cast:  # no silent casts: what was accepted came with the input's dtype
            assert any(natural_dtype(c) == dtype for c in candidates), (spec, inputs)


@FUZZ
@given(data=st.data(), specs=input_specs(), cast=st.booleans())
def test_inputs_are_accepted_and_correct_or_input_errors(data: st.DataObject,
                                                         specs: list[TensorSpec],
                                                         cast: bool) -> None:
    inputs = data.draw(item_inputs(specs))
    validator = InputValidator(specs, cast=cast, max_bytes=4096)
    try:
        out = validator(inputs)
    except aioaccel.InputError as exc:
        assert_says_something(exc)
        return
    check_accepted(specs, inputs, out, cast)


json_values = st.recursive(
    st.one_of(st.integers(-(2 ** 70), 2 ** 70), st.floats(), st.booleans(), st.none(),
              st.text(max_size=3)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["in0", "in1", "inputs", "x"]), inner, max_size=3),
    max_leaves=24)


@FUZZ
@given(data=st.data(), specs=input_specs(), cast=st.booleans())
def test_json_bodies_decode_and_validate_or_are_input_errors(data: st.DataObject,
                                                             specs: list[TensorSpec],
                                                             cast: bool) -> None:
    value = data.draw(st.one_of(json_values, regular_lists()))
    body = json.dumps(value).encode()  # NaN/Infinity included: refused as not JSON
    check_fast_path_agrees(body, specs)
    try:
        inputs = decode_inputs(body, "application/json", specs)
        InputValidator(specs, cast=cast, max_bytes=4096)(inputs)
    except aioaccel.InputError as exc:
        assert_says_something(exc)
        return
    assert b"NaN" not in body and b"Infinity" not in body


def check_fast_path_agrees(body: bytes, specs: list[TensorSpec]) -> None:
    """Where the array fast path (used for big bodies) takes a body, it gives what
    ``json.loads`` gives, or refuses what it refuses."""
    try:
        fast = bodies._fast_path(body, specs)
    except aioaccel.InputError:
        with pytest.raises(aioaccel.InputError):
            bodies.decode_json(body, specs)
        return
    if fast is None:
        return
    if bodies.value_limit(specs) is not None and body.count(b",") + 1 > (
            bodies.value_limit(specs) or 0) + 4 * len(specs):
        return  # the value count refuses it before either path runs
    slow = bodies.decode_json(body, specs)  # small bodies take json.loads
    if isinstance(fast, dict):
        assert fast.keys() == slow.keys()
        fast, slow = fast[specs[0].name], slow[specs[0].name]
    assert fast.dtype == slow.dtype and fast.shape == slow.shape
    assert np.array_equal(fast, slow, equal_nan=True)


@FUZZ
@given(body=st.one_of(st.binary(max_size=300), st.builds(
    lambda a, cut: _npy(a)[:cut], arrays.filter(lambda a: a.dtype.kind != "U"),
    st.integers(0, 400))))
def test_npy_bodies_decode_or_are_input_errors(body: bytes) -> None:
    specs = [TensorSpec("x", "float32", None)]
    try:
        array = decode_inputs(body, "application/x-npy", specs)
    except aioaccel.InputError:
        return
    assert isinstance(array, np.ndarray) and array.nbytes <= len(body)


def _npy(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


async def test_hostile_inputs_through_a_real_runner_fail_alone(tmp_path: Any) -> None:
    """A sample of the fuzzer's inputs through ONNX Runtime: each one is refused with
    InputError or answered correctly, and good items keep flowing between them."""
    chain = dense_chain(4, 2)
    hostile = [
        [[1.0, 2.0, 3.0, 4.0]], [[1, 2, 3, 4]], [[True, False, True, False]], [[1, 2], [3]],
        np.ma.masked_array(np.zeros((1, 4), np.float32)), np.zeros((1, 4), np.float64),
        np.zeros((1, 5), np.float32), {"input": "text"}, {"nope": 1}, None, math.nan,
        [np.zeros((1, 4), np.float32)] * 2, np.zeros((1, 4), "<U1"), (1.5,), [[2 ** 70] * 4],
    ]
    good = chain.random_input()
    path = chain.write_onnx(tmp_path / "m.onnx")
    for cast in (False, True):
        async with aioaccel.open(path, cast=cast, num_threads=1) as runner:
            for inputs in hostile:
                try:
                    out = await runner.infer(inputs)
                except aioaccel.InputError:
                    pass
                else:
                    x = np.asarray(inputs, dtype=np.float32)
                    assert np.allclose(out["output"], chain.reference(x), atol=1e-4)
                assert np.allclose((await runner.infer(good))["output"], chain.reference(good),
                                   atol=1e-4)
            stats = runner.stats()
        assert stats.failed == 0 and stats.completed == stats.pushed
