"""Optional dependencies that are not runtimes: imported when used, with what to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import BackendUnavailable

__all__ = ["need"]


def need(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` for ``feature``, or say which aioaccel extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailable(f"{feature} needs {module.split('.')[0]}: "
                                 f"pip install 'aioaccel[{extra}]'") from exc
