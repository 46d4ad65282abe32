"""Write the ``.tflite`` models that tests/test_tflite_runtime.py runs, with their inputs and
NumPy references, for an environment whose interpreter is ``tflite_runtime``: the model
builders need ``ai_edge_litert``'s flatbuffer schema, which tflite-runtime does not ship.

Run: ``python tests/write_tflite_models.py DIR`` in the main environment (``.ci/run`` does), then
``AIOACCEL_TFLITE_MODELS=DIR python -m pytest tests/test_tflite_runtime.py`` in the other.
Without the variable, the tests write the same files themselves (on ``ai_edge_litert``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from aioaccel.testing.models import conv_chain, dense_chain, two_input_model

__all__ = ["write_all"]


def write_all(directory: str | Path) -> Path:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    chains = {"dense": dense_chain(16, 4, inputs=8), "conv": conv_chain(size=8, channels=4,
                                                                          depth=3),
              "dynamic": dense_chain(8, 2, dynamic_batch=True),
              "generic": dense_chain(8, 4, inputs=8, seed=5)}
    for name, chain in chains.items():
        chain.write_tflite(out / f"{name}.tflite")
        xs = np.stack([chain.random_input(seed) for seed in range(6)])
        np.savez(out / f"{name}.npz", x=xs, y=np.stack([chain.reference(x) for x in xs]))
    for segments in (2, 3):
        directory_named = out / f"dense-{segments}"
        directory_named.mkdir(exist_ok=True)
        chains["dense"].write_tflite_segments(directory_named, segments)
        directory_generic = out / f"generic-{segments}"
        directory_generic.mkdir(exist_ok=True)
        chains["generic"].write_tflite_segments(directory_generic, segments, generic_names=True)
    two_input_model(out / "two.tflite")
    (out / "broken.tflite").write_bytes(b"this is not a flatbuffer" * 4)
    return out


if __name__ == "__main__":
    print(f"wrote .tflite test models to {write_all(sys.argv[1])}")
