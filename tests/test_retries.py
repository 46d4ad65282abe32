"""``retries`` means one thing in ``open()``, ``pool()`` and ``integrations.ray.connect()``
(issue 20 item 8): how many more times an item is run after the device holding it failed.
The same check refuses the same bad values with the same message, the same sentence documents
it, and the same failure gives the same outcome: re-run with ``retries=1``, failed with 0.
"""

from __future__ import annotations

import asyncio
import re
import sys
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import aioaccel
from aioaccel.integrations import ray as aray
from aioaccel.options import RETRIES

pytestmark = pytest.mark.anyio

DOCS = Path(__file__).parent.parent / "docs"
FAST = aioaccel.Restart(limit=3, window=60.0, backoff=0.01, max_backoff=0.1)


def plain(x: Any) -> Any:
    return x


MAKERS: dict[str, Callable[[Any], Any]] = {
    "open": lambda retries: aioaccel.open(plain, retries=retries),
    "pool": lambda retries: aioaccel.pool(aioaccel.open(plain), retries=retries),
    "ray.connect": lambda retries: aray.connect("app", retries=retries),
}


def words(text: str) -> str:
    return " ".join(text.replace("``", "`").split())


@pytest.mark.parametrize("where", list(MAKERS))
@pytest.mark.parametrize("bad", [-1, True, 1.5, "1", None])
def test_a_bad_retries_is_refused_the_same_way_everywhere(where: str, bad: Any) -> None:
    with pytest.raises(ValueError, match="^retries must be") as refused:
        MAKERS[where](bad)
    assert str(refused.value) == f"retries must be an int >= 0, got {bad!r}"


@pytest.mark.parametrize(("where", "function"), [
    ("open", aioaccel.open), ("pool", sys.modules["aioaccel.pool"].pool),
    ("ray.connect", aray.connect)])
def test_each_docstring_says_what_retries_means_in_the_same_words(where: str,
                                                                   function: Any) -> None:
    assert words(RETRIES) in words(function.__doc__), f"{where}'s docstring"


@pytest.mark.parametrize("page", ["recovery.md", "pools.md", "scale-out.md"])
def test_each_docs_page_says_it_in_the_same_words(page: str) -> None:
    assert words(RETRIES) in words((DOCS / page).read_text())


def test_deploy_s_open_retries_is_named_apart_and_checked_alike() -> None:
    with pytest.raises(ValueError, match=r"^open_retries must be a positive int, got True$"):
        aray.deploy("m.onnx", name="x", open_retries=True)
    with pytest.raises(ValueError, match=r"^open_retries must be a positive int, got 0$"):
        aray.deploy("m.onnx", name="x", open_retries=0)


class Device:
    """A device that fails fatally once, while it runs item ``at``; counts each item's runs."""

    def __init__(self, at: int = 3):
        self.at = at
        self.runs: Counter[int] = Counter()
        self.failed = False
        self._lock = threading.Lock()

    def __call__(self, x: int) -> int:
        with self._lock:
            self.runs[x] += 1
            fail = x == self.at and not self.failed
            self.failed = self.failed or fail
        if fail:
            raise aioaccel.DeviceError("device unplugged")
        return x


async def answers(runner: aioaccel.Runner, n: int) -> list[Any]:
    async with runner:
        return await asyncio.wait_for(asyncio.gather(
            *(runner.infer(i) for i in range(n)), return_exceptions=True), 20)


def over_a_restart(device: Device, retries: int) -> aioaccel.Runner:
    return aioaccel.open(device, maxsize=4, restart=FAST, retries=retries)


def over_a_pool(device: Device, retries: int) -> aioaccel.Runner:
    return aioaccel.pool(aioaccel.open(device, maxsize=4), aioaccel.open(device, maxsize=4),
                         policy="failover", retries=retries)


@pytest.mark.parametrize("make", [over_a_restart, over_a_pool], ids=["open", "pool"])
async def test_retries_1_runs_the_item_the_failed_device_held_once_more(make: Any) -> None:
    device = Device()
    got = await answers(make(device, 1), 10)
    assert got == list(range(10))
    assert device.runs[device.at] == 2  # once on the device that failed, once more
    assert max(device.runs.values()) <= 2


@pytest.mark.parametrize(("make", "error"), [(over_a_restart, aioaccel.DeviceError),
                                             (over_a_pool, aioaccel.MemberLost)],
                         ids=["open", "pool"])
async def test_retries_0_fails_the_item_the_failed_device_held(make: Any, error: type) -> None:
    device = Device()
    got = await answers(make(device, 0), 10)
    failed = {i for i, outcome in enumerate(got) if isinstance(outcome, BaseException)}
    assert device.at in failed
    assert all(got[i] == i for i in set(range(10)) - failed), got  # later items still flow
    assert all(device.runs[i] <= 1 for i in failed), device.runs  # never run again
    lost = got[device.at]
    chain = [lost, lost.__cause__, getattr(lost.__cause__, "__cause__", None)]
    assert any(isinstance(e, error) for e in chain), repr(lost)
    assert any(re.search("device unplugged", str(e)) for e in chain if e is not None)
