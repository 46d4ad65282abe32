"""``/docs`` renders with no network (issue 25 item 3): Swagger UI's assets come from the
package, not a CDN. Checked in headless Chromium that resolves no host but 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from browser import Chromium, find_chromium
from serving import serve

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> object:
    return "asyncio"  # the server under test is a subprocess


async def test_docs_reference_only_local_assets() -> None:
    with serve("served_models:slow_double", latency=0.0) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            page = (await client.get("/docs")).text
            assert "cdn." not in page and "https://" not in page.replace(
                "https://swagger.io", "")
            for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
                reply = await client.get(f"/docs/assets/{asset}")
                assert reply.status_code == 200 and len(reply.content) > 10_000
            assert (await client.get("/redoc")).status_code == 404  # its page needs a CDN


@pytest.mark.skipif(find_chromium() is None,
                    reason="no Chromium: apt-get install chromium (.ci/run does)")
async def test_docs_render_in_a_browser_with_no_network(tmp_path: Path) -> None:
    with serve("served_models:slow_double", latency=0.0) as server:
        async with Chromium(tmp_path / "profile", offline=True) as browser:
            await browser.goto(f"{server.url}/docs")
            title = await browser.wait_until(
                "document.querySelector('.swagger-ui .info .title')?.textContent", 30)
            assert "aioaccel serve" in title
            paths = await browser.wait_until(
                "[...document.querySelectorAll('.opblock-summary-path')]"
                ".map(e => e.textContent).join(' ')", 30)
            assert "/v1/models/{name}/infer" in paths
            loaded = await browser.evaluate(
                "JSON.stringify(performance.getEntriesByType('resource').map(e => e.name))")
            assert all(url.startswith(server.url) for url in json.loads(loaded)), loaded
            await browser.screenshot(tmp_path / "docs.png")
