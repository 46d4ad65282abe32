"""The live status page in a real browser: headless Chromium (Debian's ``chromium``) loads
``GET /`` from ``aioaccel serve`` under load; its numbers change once a second and match
``/metrics``; it draws the throughput and latency history as inline SVG; a page opened after
the load stopped shows the current rate (0), not the average since start, and still draws the
history; screenshots are saved in the test's temporary folder."""

from __future__ import annotations

import asyncio
import contextlib
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from browser import Chromium, find_chromium
from serving import serve

from aioaccel.client import connect

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(find_chromium() is None,
                       reason="no Chromium: apt-get install chromium (.ci/run does)"),
]

MODEL = "slow_double"


@pytest.fixture
def anyio_backend() -> object:
    return "asyncio"  # the server under test is a subprocess


def field(name: str) -> str:
    return (f"document.querySelector('[data-model=\"{MODEL}\"][data-field=\"{name}\"]')"
            f"?.textContent")


UPDATES = "Number(document.body?.dataset.updates || 0)"


def points(chart: str, series: str) -> str:
    """How many points the page drew for one series of one chart."""
    return (f"Number(document.querySelector('[data-model=\"{MODEL}\"][data-chart=\"{chart}\"] "
            f"svg path[data-series=\"{series}\"]')?.dataset.points || 0)")


async def test_status_page_shows_live_numbers_that_match_metrics(tmp_path: Path) -> None:
    with serve(f"served_models:{MODEL}", "--maxsize", "4", latency=0.004) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            page_html = await client.get("/")
            assert page_html.status_code == 200
            script = page_html.text.split("<script>")[1]
            # everything the page runs is in the page: no CDN (the SVG namespace is a name)
            assert "<script src" not in page_html.text
            assert not re.search(r"https?://(?!www\.w3\.org/2000/svg\b)", script)
            stop = asyncio.Event()

            async def load() -> None:
                while not stop.is_set():
                    reply = await client.post(f"/v1/models/{MODEL}/infer", json=[[1.0]])
                    assert reply.status_code == 200

            async def camera() -> None:
                async with connect(f"{server.ws}/v1/models/{MODEL}/stream?stream=cam0") as s:
                    i = 0
                    while not stop.is_set():
                        await s.send(np.array([[float(i)]]), tag=i)
                        await s.receive()
                        i += 1
                    await s.end()
                    async for _ in s:
                        pass

            workers = [asyncio.create_task(load()) for _ in range(3)]
            workers.append(asyncio.create_task(camera()))
            try:
                async with Chromium(tmp_path / "profile") as page:
                    await page.goto(server.url + "/")
                    await page.wait_until(f"{UPDATES} >= 1")
                    first = int(await page.evaluate(field("completed")))
                    updates = await page.evaluate(UPDATES)
                    await page.wait_until(f"{UPDATES} >= {updates + 2}")  # ~2 s later
                    second = int(await page.evaluate(field("completed")))
                    assert second > first, "the page's numbers did not change under load"
                    assert float(await page.evaluate(field("items_per_s"))) > 0
                    assert await page.evaluate(field("state")) == "ready"
                    streams = await page.evaluate(
                        "[...document.querySelectorAll('td')].map(td => td.textContent)")
                    assert "cam0" in streams  # the per-stream table
                    # the history, drawn: one point a second, the latency lines beside it
                    await page.wait_until(f"{points('items_per_s', 'items_per_s')} >= 3")
                    assert await page.evaluate(points("latency_ms", "p50_ms")) >= 2
                    assert await page.evaluate(points("latency_ms", "p99_ms")) >= 2
                    drawn = await page.evaluate(
                        f"document.querySelector('[data-model=\"{MODEL}\"]"
                        f"[data-chart=\"items_per_s\"] path').getAttribute('d')")
                    assert re.fullmatch(r"M[\d.]+,[\d.]+( L[\d.]+,[\d.]+)+", drawn), drawn
                    shot = await page.screenshot(tmp_path / "status-under-load.png")
                    assert shot.stat().st_size > 10_000

                    stop.set()
                    await asyncio.gather(*workers)
                    # idle now: the rate falls to 0 within two sampling intervals, and the
                    # numbers are exactly what /metrics says
                    await page.wait_until(f"{field('items_per_s')} === '0.0'")
                    updates = await page.evaluate(UPDATES)
                    await page.wait_until(f"{UPDATES} >= {updates + 1}")
                    shown = int(await page.evaluate(field("completed")))
                    assert shown == server.metric("aioaccel_items_completed_total",
                                                  runner=MODEL)
                    assert await page.evaluate(field("in_flight")) == "0 / 4"
                    assert await page.evaluate(field("items_per_s")) == "0.0"
                    await page.screenshot(tmp_path / "status-idle.png")

                    # a page opened now: its first paint says the current rate (0), not the
                    # average since the server started, and draws the busy past already
                    since_start = (await client.get("/v1/status")).json()["models"][MODEL]
                    assert since_start["completed"] > 0 and since_start["items_per_s"] == 0
                    assert max(since_start["history"]["items_per_s"]) > 0
                    await page.goto(server.url + "/?again")
                    await page.wait_until(f"{UPDATES} >= 1")
                    assert await page.evaluate(UPDATES) == 1  # the first paint
                    assert await page.evaluate(field("items_per_s")) == "0.0"
                    assert int(await page.evaluate(field("completed"))) == shown
                    assert await page.evaluate(points("items_per_s", "items_per_s")) >= 3
                    await page.screenshot(tmp_path / "status-reopened.png")
            finally:
                stop.set()
                for task in workers:
                    task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.gather(*workers, return_exceptions=True)
