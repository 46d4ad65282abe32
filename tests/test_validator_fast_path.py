"""InputValidator's fast path (the common case, on the event loop for every item) accepts and
returns exactly what the full check does, and refuses everything the full check refuses."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from aioaccel import InputError, TensorSpec
from aioaccel.tensors import InputValidator

SPECS = [(1, 4), (None, 4), (None, None), (2, 3, None), None, ()]
DTYPES = ["float32", "float64", "int64", "uint8", "complex64", "datetime64[s]"]


def full_check(validator: InputValidator, value: Any) -> Any:
    spec, dtype = validator.specs[0], validator._dtypes[0]
    try:
        return validator._check(spec, dtype, value)
    except InputError:
        return InputError


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(SPECS), st.sampled_from(DTYPES), st.sampled_from(DTYPES),
       st.lists(st.integers(0, 5), min_size=0, max_size=3), st.booleans(), st.booleans(),
       st.sampled_from([16, 1 << 20]))
def test_fast_path_agrees_with_the_full_check(shape: Any, spec_dtype: str, dtype: str,
                                              dims: list[int], conforming: bool,
                                              transpose: bool, cap: int) -> None:
    if conforming and shape is not None:  # mostly shapes that fit, the fast path's case
        dims = [d if d is not None else (dims[i] if i < len(dims) else 3)
                for i, d in enumerate(shape)]
        dtype = spec_dtype if transpose or cap == 16 else dtype
    validator = InputValidator([TensorSpec("x", spec_dtype, shape)], max_bytes=cap)
    value = np.zeros(dims, dtype)
    if transpose and value.ndim >= 2:
        value = value.T  # not C-contiguous: both paths must hand back a contiguous copy
    expected = full_check(validator, value)
    try:
        got = validator(value)["x"]
    except InputError:
        got = InputError
    if expected is InputError:
        assert got is InputError
    else:
        assert got is not InputError
        assert got.flags.c_contiguous and got.dtype == expected.dtype
        assert got.shape == expected.shape and np.array_equal(got, expected)
