"""Every option is honoured or refused with a clear error, never silently ignored (issue 26,
item 6): one check for open(), pool(), reload() and Restart (aioaccel.options)."""

from __future__ import annotations

import asyncio
import math
import threading
from typing import Any

import numpy as np
import pytest

import aioaccel

pytestmark = pytest.mark.anyio

NAN = math.nan


class Sizes:
    """A batchable stage that records the rows of each call."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self.lock:
            self.rows.append(x.shape[0])
        return x + 1


@pytest.mark.parametrize(("field", "value"), [
    ("limit", True), ("limit", 0), ("limit", 2.0), ("window", NAN), ("window", 0),
    ("backoff", NAN), ("backoff", -1), ("backoff", math.inf), ("max_backoff", NAN),
    ("max_backoff", math.inf), ("max_backoff", "1"),
])
def test_restart_refuses_nan_and_other_bad_fields_naming_them(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"Restart.{field} must be"):
        aioaccel.Restart(**{field: value})


def test_restart_takes_an_endless_window() -> None:
    assert aioaccel.Restart(window=math.inf).window == math.inf


@pytest.mark.parametrize(("options", "match"), [
    ({"batch_wait": NAN, "batch": 4}, "batch_wait must be"),
    ({"batch_wait": NAN}, "batch_wait must be"),
    ({"batch_wait": 0.01}, "no effect without batch="),
    ({"batch_wait": math.inf, "batch": 4}, "batch_wait must be"),
    ({"batch": True}, "batch must be"),
    ({"batch": "big"}, "batch must be"),
    ({"call_timeout": NAN}, "call_timeout must be"),
    ({"call_timeout": 0}, "call_timeout must be"),
    ({"close_timeout": NAN}, "close_timeout must be"),
    ({"open_timeout": NAN}, "open_timeout must be"),
    ({"open_timeout": -1}, "open_timeout must be"),
    ({"maxsize": True}, "maxsize must be"),
    ({"maxsize": 0}, "maxsize must be"),
    ({"retries": True}, "retries must be"),
    ({"retries": -1}, "retries must be"),
    ({"warmup": 1.5}, "warmup must be"),
    ({"replicas": NAN}, "replicas must be"),
    ({"replicas": 0}, "replicas must be"),
])
def test_open_refuses_bad_options_naming_them(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        aioaccel.open(Sizes(), **options)


@pytest.mark.parametrize(("options", "match"), [
    ({"close_timeout": NAN}, "close_timeout must be"),
    ({"maxsize": 0}, "maxsize must be"),
    ({"retries": True}, "retries must be"),
])
def test_pool_refuses_bad_options_naming_them(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        aioaccel.pool(aioaccel.open(Sizes()), **options)


async def test_reload_honours_batch_and_batch_wait() -> None:
    stage = Sizes()
    x = np.zeros((1, 3), np.float32)
    async with aioaccel.open(stage, maxsize=32) as runner:
        await asyncio.gather(*(runner.infer(x) for _ in range(16)))
        assert runner.stats().batching is None and set(stage.rows) == {1}
        await runner.reload(batch=8, batch_wait=0.05)
        stage.rows.clear()
        replies = await asyncio.gather(*(runner.infer(x) for _ in range(32)))
        stats = runner.stats().batching
        assert stats is not None and stats.size == 8
        assert max(stage.rows) > 1 and max(stage.rows) <= 8
        assert all(np.array_equal(r, x + 1) for r in replies)
        await runner.reload(batch=None)  # and back to one item per call
        assert runner.stats().batching is None


async def test_reload_refuses_the_runners_own_options_and_batch_wait_without_batch() -> None:
    async with aioaccel.open(Sizes()) as runner:
        with pytest.raises(ValueError, match=r"cannot change call_timeout, maxsize"):
            await runner.reload(maxsize=4, call_timeout=1.0)
        with pytest.raises(ValueError, match="no effect without batch="):
            await runner.reload(batch_wait=0.01)
        with pytest.raises(ValueError, match="batch must be"):
            await runner.reload(batch=0)
        assert runner.state == "ready"
        assert np.array_equal(await runner.infer(np.zeros((1, 2))), np.ones((1, 2)))
