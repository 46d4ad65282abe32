"""``aioaccel serve``: several models behind one FastAPI app on uvicorn.

:func:`build_app` makes the app (``pip install 'aioaccel[serve]'``); the command line is in
:mod:`aioaccel.serve.command`. Routes and behaviour: docs/serve.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["build_app", "create_app"]

if TYPE_CHECKING:
    from .app import build_app as build_app
    from .app import build_app as create_app


def __getattr__(name: str) -> Any:
    # FastAPI is an optional extra: imported when the app is built, not when the command
    # line (which imports aioaccel.serve.command) starts
    if name in ("build_app", "create_app"):  # create_app: the examples' name for it
        from .app import build_app

        return build_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
