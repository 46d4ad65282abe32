"""Optional dependencies that are not runtimes: imported when used, with what to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import BackendUnavailable

__all__ = ["need"]

#: the package index names of modules whose name differs (or that need a companion)
_PACKAGES = {"prometheus_client": "prometheus-client", "fastapi": "fastapi uvicorn"}


def need(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` for ``feature``, or say what to install: the package itself (aioaccel
    is not on the package index yet) and the extra, from a checkout."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        raise BackendUnavailable(f"{feature} needs {top}: pip install "
                                 f"{_PACKAGES.get(top, top)} (from an aioaccel checkout: "
                                 f"pip install -e '.[{extra}]'; with aioaccel installed from "
                                 f"an index: pip install 'aioaccel[{extra}]')") from exc
