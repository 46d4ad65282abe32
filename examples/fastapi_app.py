"""A model served over HTTP with FastAPI: ``uvicorn examples.fastapi_app:app``.

Serves the embedded model (or ``AIOACCEL_MODEL``, see ``examples/_model.py``):

* ``POST /infer`` -- body: JSON (``[[...]]``, ``{"input": [[...]]}`` or ``{"inputs": ...}``) or a
  ``.npy`` array (``Content-Type: application/x-npy``); answer: JSON outputs, or ``.npy`` with
  ``Accept: application/x-npy``. 503 + Retry-After when the runner stays full for
  ``AIOACCEL_ADMIT_TIMEOUT`` seconds (default 0.5); 413 over 16 MiB; 422 for bad input.
* ``GET /model`` -- the input and output specs
* ``GET /healthz`` -- 200 while the runner is open
* ``GET /metrics`` -- Prometheus metrics

Try: ``curl -s localhost:8000/infer -H 'content-type: application/json' -d "$(python -c
'print([[0.1] * 16])')"``
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from fastapi import Depends, FastAPI, Request, Response

sys.path.insert(0, str(Path(__file__).parent))
from _model import open_model

import aioaccel
from aioaccel.integrations.fastapi import Accel


def create_app() -> FastAPI:
    accel = Accel(default=open_model(maxsize=int(os.environ.get("AIOACCEL_MAXSIZE", "16")),
                                     name="model"),
                  admit_timeout=float(os.environ.get("AIOACCEL_ADMIT_TIMEOUT", "0.5")))
    app = FastAPI(title="aioaccel model server", lifespan=accel.lifespan)

    @app.post("/infer")
    async def infer(request: Request,
                    runner: aioaccel.Runner = Depends(accel.runner())) -> Response:
        inputs = await accel.read_inputs(request, runner)
        return await accel.infer(request, runner, inputs)

    @app.get("/model")
    async def model(runner: aioaccel.Runner = Depends(accel.runner())) -> dict[str, object]:
        return {"inputs": [str(s) for s in runner.inputs or []],
                "outputs": [str(s) for s in runner.outputs or []]}

    @app.get("/healthz")
    async def healthz() -> Response:
        return accel.health()

    @app.get("/metrics")
    async def metrics() -> Response:
        return accel.metrics()

    return app


app = create_app()
