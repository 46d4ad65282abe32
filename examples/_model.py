"""The model the web examples serve: ``AIOACCEL_MODEL`` (a model file, or several separated by
``,`` for a pipeline; ``AIOACCEL_BACKEND`` to choose the backend, ``AIOACCEL_REPLICAS`` for
worker threads per stage, ``AIOACCEL_BATCH`` (an int or ``auto``) and ``AIOACCEL_BATCH_WAIT``
to group concurrent requests into batches), or an embedded dense model written at start-up
for the first CPU runtime installed."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import aioaccel
from aioaccel.testing.models import dense_chain

EMBEDDED = dense_chain(64, 3, inputs=16)


def open_model(**options: Any) -> aioaccel.Runner:
    options.setdefault("replicas", int(os.environ.get("AIOACCEL_REPLICAS", "1")))
    batch = os.environ.get("AIOACCEL_BATCH")
    if batch:
        options.setdefault("batch", batch if batch == "auto" else int(batch))
        options.setdefault("batch_wait", float(os.environ.get("AIOACCEL_BATCH_WAIT", "0.002")))
    model = os.environ.get("AIOACCEL_MODEL")
    backend = os.environ.get("AIOACCEL_BACKEND") or None
    if model:
        paths = [p.strip() for p in model.split(",") if p.strip()]
        return aioaccel.open(paths if len(paths) > 1 else paths[0], backend=backend, **options)
    directory = Path(tempfile.mkdtemp(prefix="aioaccel-example-"))
    available = aioaccel.available_backends()
    if "litert" in available:
        return aioaccel.open(EMBEDDED.write_tflite(directory / "model.tflite"), **options)
    if "onnx" in available:
        return aioaccel.open(EMBEDDED.write_onnx(directory / "model.onnx"), **options)
    if "openvino" in available:
        return aioaccel.open(EMBEDDED.write_openvino(directory / "model.xml"), **options)
    return aioaccel.open(EMBEDDED.reference, **options)  # NumPy, when no runtime is installed
