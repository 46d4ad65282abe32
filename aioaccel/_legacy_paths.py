"""Old module paths of the core, kept importable for one release.

The core moved into :mod:`aioaccel.core` (one module per job). Code that imported the old paths
(``aioaccel.admission``, ``aioaccel.pipeline``, ...) gets the new module under the old name: the
same module object, so ``isinstance`` checks and monkeypatching keep working. No file sits at
the old paths, so nothing can drift apart from the real modules.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType

#: old name -> where it lives now
MOVED = {
    "aioaccel.admission": "aioaccel.core.admission",
    "aioaccel.lanes": "aioaccel.core.records",
    "aioaccel.completion": "aioaccel.core.completion",
    "aioaccel.supervisor": "aioaccel.core.generation",
    "aioaccel.recovery": "aioaccel.core.healing",
    "aioaccel.watchdog": "aioaccel.core.hang_watchdog",
    "aioaccel.bridge": "aioaccel.core.loop_bridge",
    "aioaccel.batcher": "aioaccel.core.batch_gather",
    "aioaccel.pipeline": "aioaccel.core.stage_threads",
    "aioaccel.routing": "aioaccel.pool_policies",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(MOVED[spec.name])
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # Already executed under its new name; the import system has just given it the alias's
        # spec: give it back its own, so that it still says where it really lives.
        module.__spec__ = module.__spec__.loader_state if module.__spec__ else None


def install() -> None:
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.append(_Alias())


install()
