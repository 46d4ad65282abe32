"""Every public module says what it exports, and says only what exists and is public."""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

import pytest

import aioaccel

#: optional dependencies a module may need at import time (then it is skipped, with the reason)
OPTIONAL = {"fastapi", "aiohttp", "uvicorn", "prometheus_client", "starlette", "pydantic"}


def module_names() -> list[str]:
    return sorted(["aioaccel"] + [m.name for m in pkgutil.walk_packages(aioaccel.__path__,
                                                                        "aioaccel.")])


def load(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if exc.name and exc.name.split(".")[0] in OPTIONAL:
            pytest.skip(f"{name} needs {exc.name}, which is not installed")
        raise


def is_public(name: str) -> bool:
    return not any(part.startswith("_") for part in name.split("."))


@pytest.mark.parametrize("name", module_names())
def test_all_lists_only_public_names_that_exist(name: str) -> None:
    module = load(name)
    exported = getattr(module, "__all__", None)
    if exported is None:
        assert not is_public(name), f"public module {name} has no __all__"
        return
    assert len(exported) == len(set(exported)), f"{name}.__all__ repeats a name"
    for item in exported:
        assert isinstance(item, str) and not item.startswith("_"), f"{name}: {item!r}"
        assert hasattr(module, item), f"{name}.__all__ lists {item!r}, which does not exist"


def test_the_package_all_is_exactly_its_public_re_exports() -> None:
    public = {name for name, value in vars(aioaccel).items()
              if not name.startswith("_") and not isinstance(value, ModuleType)}
    assert set(aioaccel.__all__) == public


def test_every_module_is_found() -> None:
    names = module_names()
    for expected in ("aioaccel.backends.litert", "aioaccel.testing.coral", "aioaccel.cli",
                     "aioaccel.integrations.http"):
        assert expected in names
