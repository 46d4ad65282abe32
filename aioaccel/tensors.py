"""Input and output specs of a model, and the validation of inputs against them."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TensorSpec"]


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor: ``shape`` uses None for a dynamic dimension."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]
