"""Headless Chromium driven over the DevTools protocol (a WebSocket), for the status page test.

Bounded everywhere: the browser must announce its port within ``START_TIMEOUT``, every call
answers within ``CALL_TIMEOUT``, and the process is killed on exit whatever happened.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import websockets

START_TIMEOUT = 30.0
CALL_TIMEOUT = 20.0
NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    return next((path for name in NAMES if (path := shutil.which(name))), None)


class Chromium:
    """``async with Chromium(profile_dir) as page:`` one page of a headless browser."""

    def __init__(self, profile: Path, width: int = 1100, height: int = 900, *,
                 offline: bool = False):
        self.profile = profile
        #: resolve no host but 127.0.0.1: a page that needs the network shows it
        self.offline = offline
        self.size = (width, height)
        self._ids = itertools.count(1)
        self._proc: subprocess.Popen[bytes] | None = None
        self._ws: Any = None

    async def __aenter__(self) -> Chromium:
        self._launch()
        try:
            port = await self._port()
            async with httpx.AsyncClient(timeout=CALL_TIMEOUT) as client:
                targets = (await client.get(f"http://127.0.0.1:{port}/json/list")).json()
            page = next(t for t in targets if t["type"] == "page")
            self._ws = await websockets.connect(page["webSocketDebuggerUrl"], max_size=None)
            await self.call("Page.enable")
            await self.call("Runtime.enable")
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    def _launch(self) -> None:
        binary = find_chromium()
        assert binary is not None
        self.profile.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-extensions", "--disable-dev-shm-usage", "--remote-debugging-port=0",
             "--remote-debugging-address=127.0.0.1", f"--user-data-dir={self.profile}",
             f"--window-size={self.size[0]},{self.size[1]}",
             *(["--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"]
               if self.offline else []), "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def _port(self) -> int:
        """Chromium writes its DevTools port to DevToolsActivePort in the profile."""
        marker = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self._proc.returncode}")
            if marker.exists():
                first = marker.read_text().splitlines()
                if first and first[0].isdigit():
                    return int(first[0])
            await asyncio.sleep(0.05)
        raise TimeoutError(f"chromium did not open its DevTools port in {START_TIMEOUT} s")

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self._ids)
        await self._ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        async with asyncio.timeout(CALL_TIMEOUT):
            while True:  # events arrive in between: skip them
                message = json.loads(await self._ws.recv())
                if message.get("id") == ident:
                    if "error" in message:
                        raise RuntimeError(f"{method}: {message['error']}")
                    return message["result"]  # type: ignore[no-any-return]

    async def goto(self, url: str) -> None:
        """Navigate and wait until the new document is parsed (its scripts have run)."""
        await self.call("Page.navigate", url=url)
        await self.wait_until(f"location.href === {json.dumps(url)} && "
                              f"document.readyState !== 'loading'")

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_until(self, expression: str, timeout: float = 15.0) -> Any:  # noqa: ASYNC109
        """Poll ``expression`` until it is truthy (the page has no event to await from here)."""
        async with asyncio.timeout(timeout):
            while not (value := await self.evaluate(expression)):
                await asyncio.sleep(0.1)
        return value

    async def screenshot(self, path: Path) -> Path:
        shot = await self.call("Page.captureScreenshot", format="png")
        await asyncio.to_thread(path.write_bytes, base64.b64decode(shot["data"]))
        return path
