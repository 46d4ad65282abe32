"""Behaviours of the MemryX Accelerator API (the seed documentation) that tests/test_memryx.py
does not pin already; docs/testing.md maps every documented behaviour to its test."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from support import close

from aioaccel.testing.memryx import simulate_memryx, write_dfp
from aioaccel.testing.models import dense_chain


def test_a_dfp_object_in_memory_works_like_a_path(tmp_path: Path) -> None:
    # "dfp: bytes or string -- Path to dfp or a dfp object (bytearray)"
    chain = dense_chain(8, 2, inputs=4)
    data = bytearray(write_dfp(tmp_path / "m.dfp", chain).read_bytes())
    x = chain.random_input()
    with simulate_memryx():
        from memryx import SyncAccl

        accl = SyncAccl(data)
        assert close(accl.run(x), chain.reference(x), atol=1e-5)
        del accl


def test_multistream_wait_refuses_unconnected_models_and_stop_joins(tmp_path: Path) -> None:
    # "wait() Raises: RuntimeError: If the any of the model's inputs/outputs are left
    # unconnected"; "stop() ... blocks until each of the models stops"
    chain = dense_chain(8, 2, inputs=4)
    dfp = write_dfp(tmp_path / "m.dfp", chain)
    with simulate_memryx() as sim:
        from memryx import MultiStreamAsyncAccl

        accl = MultiStreamAsyncAccl(dfp)
        with pytest.raises(RuntimeError, match="left unconnected"):
            accl.wait()
        started = threading.Event()

        def endless(stream_idx: int) -> np.ndarray:
            started.set()
            return chain.random_input(seed=stream_idx)

        accl.connect_streams(endless, lambda stream_idx, *fmaps: None, 2)
        assert started.wait(5)
        accl.stop()
        assert all(not t.is_alive() for t in sim.accelerators[0].threads)


def test_pre_and_post_processing_models_are_not_simulated(tmp_path: Path) -> None:
    # documented by the SDK; the simulator says plainly that it does not run them
    dfp = write_dfp(tmp_path / "m.dfp", dense_chain(8, 2, inputs=4))
    with simulate_memryx():
        from memryx import AsyncAccl

        accl = AsyncAccl(dfp)
        with pytest.raises(NotImplementedError, match="pre-processing"):
            accl.set_preprocessing_model("pre.onnx")
        with pytest.raises(NotImplementedError, match="post-processing"):
            accl.set_postprocessing_model("post.onnx")
        accl.stop()
