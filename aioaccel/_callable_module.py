"""Modules that are also their main function: ``aioaccel.pool`` and ``aioaccel.devices``.

The package exports the functions ``pool()`` and ``devices()`` under the names of the modules
that define them. A package attribute holds one object, and Python's import system rebinds
``aioaccel.pool`` to the module whenever the submodule is (first) imported, while
``from .pool import pool`` binds the function: which one a user got depended on import order,
and ``import aioaccel.pool as m`` could hand back the function. So the package attribute is
the module itself, made callable: ``aioaccel.pool(...)`` calls the function,
``import aioaccel.pool`` gives the module (``aioaccel.pool.Pool`` ...), in every import order.
``from aioaccel.pool import pool`` still gives the plain function.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__: list[str] = []


class CallableModule(ModuleType):
    """A module whose call is its main function's (``__call_target__``)."""

    __call_target__: Callable[..., Any]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__call_target__(*args, **kwargs)


def make_callable(module_name: str, function: Callable[..., Any]) -> None:
    """Make the (already executing) module ``module_name`` callable as ``function``, with its
    signature, so ``inspect.signature`` and ``help`` describe the call."""
    module = sys.modules[module_name]
    module.__class__ = CallableModule
    module.__call_target__ = function  # type: ignore[attr-defined]
    module.__signature__ = inspect.signature(function)  # type: ignore[attr-defined]
