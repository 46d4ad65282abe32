"""``/docs`` that renders with no network: Swagger UI's assets served from the
``swagger-ui-bundle-v2`` package (part of ``aioaccel[serve]``) instead of a CDN.

Edge boxes are often offline, and FastAPI's default page loads its script and style from a
CDN, so offline it is blank. Without the package the app keeps FastAPI's CDN page.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

__all__ = ["ASSETS", "add_offline_docs", "swagger_assets"]

#: where the assets are served
ASSETS = "/docs/assets"


def swagger_assets() -> Path | None:
    """The directory of the installed Swagger UI assets, or None without the package."""
    try:
        from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-untyped]
    except ImportError:
        return None
    path = Path(swagger_ui_path)
    return path if (path / "swagger-ui-bundle.js").is_file() else None


def add_offline_docs(app: FastAPI, docs_url: str = "/docs") -> bool:
    """Serve ``docs_url`` from local assets; False (nothing added) without them. The app
    must be made with ``docs_url=None`` for this to take the route."""
    assets = swagger_assets()
    if assets is None or app.openapi_url is None:
        return False
    app.mount(ASSETS, StaticFiles(directory=assets), name="swagger-ui-assets")
    redirect = f"{docs_url}/oauth2-redirect"

    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=root + (app.openapi_url or "/openapi.json"),
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS}/favicon-32x32.png",
            oauth2_redirect_url=root + redirect)

    async def oauth2_redirect(request: Request) -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    app.add_route(docs_url, swagger_ui, include_in_schema=False)
    app.add_route(redirect, oauth2_redirect, include_in_schema=False)
    return True
