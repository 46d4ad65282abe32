"""A model served over HTTP with aiohttp: ``python examples/aiohttp_app.py [port]``.

The same routes as ``examples/fastapi_app.py`` (``POST /infer``, ``GET /model``,
``GET /healthz``, ``GET /metrics``) and the same model (``AIOACCEL_MODEL``, or the embedded
one). Handlers of lost connections are cancelled (``handler_cancellation=True``), so a client
that disconnects withdraws its item.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).parent))
from _model import open_model

from aioaccel.integrations.aiohttp import ACCEL, Accel


async def infer(request: web.Request) -> web.Response:
    accel = request.app[ACCEL]
    runner = accel.runner()
    inputs = await accel.read_inputs(request, runner)
    return await accel.infer(request, runner, inputs)


async def model(request: web.Request) -> web.Response:
    runner = request.app[ACCEL].runner()
    return web.json_response({"inputs": [str(s) for s in runner.inputs or []],
                              "outputs": [str(s) for s in runner.outputs or []]})


async def healthz(request: web.Request) -> web.Response:
    return request.app[ACCEL].health()


async def metrics(request: web.Request) -> web.Response:
    return request.app[ACCEL].metrics()


def create_app() -> web.Application:
    accel = Accel(default=open_model(maxsize=int(os.environ.get("AIOACCEL_MAXSIZE", "16")),
                                     name="model"),
                  admit_timeout=float(os.environ.get("AIOACCEL_ADMIT_TIMEOUT", "0.5")))
    app = web.Application(client_max_size=accel.max_body)
    accel.setup(app)
    app.router.add_post("/infer", infer)
    app.router.add_get("/model", model)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


if __name__ == "__main__":
    web.run_app(create_app(), host="127.0.0.1",
                port=int(sys.argv[1]) if len(sys.argv) > 1 else 8080,
                handler_cancellation=True)
