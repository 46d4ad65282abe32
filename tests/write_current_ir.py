"""Write IR models with the *current* OpenVINO, plus inputs and reference outputs, so that the
legacy-environment tests can check that OpenVINO 2023.3's legacy API loads them.

Run: ``python tests/write_current_ir.py DIR`` (``.ci/run`` does, in the main environment).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from aioaccel.testing.models import conv_chain, dense_chain


def main(directory: str) -> None:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for name, chain in (("dense", dense_chain(32, 3, inputs=16)),
                        ("conv", conv_chain(size=8, channels=4, depth=2))):
        chain.write_openvino(out / f"{name}.xml")
        x = chain.random_input(seed=3)
        np.savez(out / f"{name}.npz", x=x, y=chain.reference(x))
    import openvino

    (out / "VERSION").write_text(openvino.__version__)
    print(f"wrote IR from OpenVINO {openvino.__version__} to {out}")


if __name__ == "__main__":
    main(sys.argv[1])
