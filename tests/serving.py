"""``aioaccel serve`` as a subprocess on a free port, for the serve, stream and page tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
_URL = re.compile(r"aioaccel serve: (http://127\.0\.0\.1:(\d+))")
_GRPC = re.compile(r"aioaccel serve: grpc://(127\.0\.0\.1:\d+)")


@dataclass
class Served:
    url: str
    port: int
    proc: subprocess.Popen[str]
    log: Path  #: the server's stderr (a file: a pipe nobody reads could fill and stall it)
    banner: str = ""  #: the line the server printed once it listened
    grpc: str | None = None  #: host:port of the gRPC server (with --grpc-port)

    def stderr(self) -> str:
        return self.log.read_text()

    @property
    def ws(self) -> str:
        return self.url.replace("http://", "ws://")

    def rss_kib(self) -> int:
        """The server's resident memory now (Linux /proc)."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]

    def metric(self, name: str, **labels: str) -> float:
        """One sample of ``/metrics``."""
        wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith(f"{name}{{{wanted}}} "):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(f"{name}{{{wanted}}} not in /metrics")


@contextmanager
def serve(*args: str, latency: float = 0.005, timeout: float = 60.0) -> Iterator[Served]:
    """Run ``python -m aioaccel serve ARGS --port 0``; yield once it listens; on exit SIGTERM
    it (if still running) and wait for it."""
    env = {**os.environ, "AIOACCEL_TEST_LATENCY": str(latency),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    log = Path(tempfile.mkstemp(prefix="aioaccel-serve-", suffix=".log")[1])
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-W", "error", "-m", "aioaccel", "serve",
                                 *args, "--port", "0"], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        deadline = time.monotonic() + timeout
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the server prints its URL once it listens
        match = _URL.search(line)
        if match is None:
            proc.kill()
            proc.wait(timeout=10)
            raise AssertionError(f"aioaccel serve did not start: {line!r} {log.read_text()}")
        grpc = None
        if "--grpc-port" in args:  # its address follows the URL
            found = _GRPC.search(proc.stdout.readline())
            assert found is not None, log.read_text()
            grpc = found.group(1)
        assert time.monotonic() < deadline
        yield Served(match.group(1), int(match.group(2)), proc, log, line, grpc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        log.unlink(missing_ok=True)
