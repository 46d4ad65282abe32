"""Every public module says what it exports, and says only what exists and is public."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
import textwrap
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


# ---- aioaccel.pool / aioaccel.devices: the module, callable as the function ----------------
#: each snippet runs in a fresh interpreter, so that its import order is the first one
IMPORT_ORDERS = {
    "submodule first": """
        import aioaccel.pool as p
        import aioaccel.devices as d
        import aioaccel
    """,
    "package first": """
        import aioaccel
        import aioaccel.pool as p
        import aioaccel.devices as d
    """,
    "from-imports first": """
        from aioaccel import devices as d, pool as p
        from aioaccel.pool import Pool, pool as pool_function
        from aioaccel.devices import devices as devices_function
        import aioaccel
        assert inspect.isfunction(pool_function) and inspect.isfunction(devices_function)
        assert isinstance(pool_function(aioaccel.open(lambda x: x)), Pool)
    """,
    "submodule imported by plain import": """
        import aioaccel.pool
        import aioaccel.devices
        import aioaccel
        p, d = aioaccel.pool, aioaccel.devices
    """,
}
CHECKS = """
    import sys
    from types import ModuleType
    assert isinstance(p, ModuleType) and p is sys.modules["aioaccel.pool"], p
    assert isinstance(d, ModuleType) and d is sys.modules["aioaccel.devices"], d
    assert aioaccel.pool is p and aioaccel.devices is d
    assert p.Pool is aioaccel.Pool and p.MemberLost is aioaccel.MemberLost
    assert d.Device is aioaccel.Device
    made = aioaccel.pool(aioaccel.open(lambda x: x), aioaccel.open(lambda x: x), retries=2)
    assert isinstance(made, aioaccel.Pool) and len(made.members) == 2
    found = aioaccel.devices()
    assert found and all(isinstance(x, aioaccel.Device) for x in found)
    assert str(inspect.signature(aioaccel.pool)) == str(inspect.signature(p.pool))
    print("ok")
"""


@pytest.mark.parametrize("order", list(IMPORT_ORDERS))
def test_pool_and_devices_are_modules_that_call_their_function(order: str) -> None:
    code = "import inspect\n" + textwrap.dedent(IMPORT_ORDERS[order]) + textwrap.dedent(CHECKS)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_a_bad_call_of_the_module_is_the_function_s_error() -> None:
    with pytest.raises(ValueError, match="at least one member"):
        aioaccel.pool()
    with pytest.raises(TypeError):
        aioaccel.devices("cpu")  # devices() takes no argument
    assert list(inspect.signature(aioaccel.pool).parameters)[:2] == ["members", "policy"]


def test_every_module_is_found() -> None:
    names = module_names()
    for expected in ("aioaccel.backends.litert", "aioaccel.testing.coral", "aioaccel.cli",
                     "aioaccel.integrations.http"):
        assert expected in names
