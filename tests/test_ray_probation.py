"""The Ray client's probation of suspects (issue 26, item 3), against a stand-in for the Serve
handle: replicas that die or break on a poison row, on the client's own sender loop, so every
case is fast and deterministic. tests/test_ray.py runs the same promises on a real cluster.

A call to the stand-in takes a few milliseconds on its replica; a replica that gets a poison
row dies (every call it holds fails with ``ActorDiedError``, as Ray reports a dead actor) or
breaks (the items it holds answer "replica broken", later calls "refused") and is replaced.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from typing import Any

import numpy as np
import pytest

pytest.importorskip("ray", reason="needs the ray extra: pip install 'aioaccel[ray]'")
pytest.importorskip("ray.serve", reason="needs the ray extra: pip install 'aioaccel[ray]'")

from ray.exceptions import ActorDiedError

import aioaccel
from aioaccel.backends import Model
from aioaccel.integrations import ray as ray_integration
from aioaccel.integrations.ray import RemoteError, _RemoteStage
from aioaccel.runner import Runner
from aioaccel.stages import StageSpec, made

pytestmark = pytest.mark.anyio

OK, FAILED, BROKEN, REFUSED = 0, 1, 2, 3


class Replica:
    def __init__(self, name: str):
        self.name = name
        self.dead = False
        self.broken = False


class FakeApp:
    """The Serve handle ``_RemoteStage`` calls: ``options(...).remote(batch)`` -> an awaitable
    response. Routes to the live replica with the fewest calls; records each call."""

    def __init__(self, replicas: int = 2, kind: str = "die", latency: float = 0.003,
                 refusals_before_replaced: int = 3, stall: float = 0.0):
        self._names = itertools.count()
        self.replicas = [Replica(f"r{next(self._names)}") for _ in range(replicas)]
        self.kind = kind
        self.latency = latency
        self.stall = stall
        self.refusals_before_replaced = refusals_before_replaced
        self.in_flight = 0
        #: (rows sent, calls of the client in flight at the fake when it started)
        self.calls: list[tuple[list[float], int]] = []
        #: the calls re-sending a row that an earlier call lost (its replica died or broke)
        self.resent: list[tuple[list[float], int]] = []
        self._lost_rows: set[float] = set()
        self._load: dict[Replica, int] = {}
        self._refusals: dict[Replica, int] = {}
        self.deaths = 0
        self.called = threading.Event()  # set at the first call (it runs on the sender loop)

    def options(self, method_name: str) -> FakeApp:
        assert method_name == "infer_batch"
        return self

    def remote(self, batch: list[Any]) -> Response:
        return Response(self._call(batch))

    def _pick(self) -> Replica:
        live = [r for r in self.replicas if not r.dead]
        return min(live, key=lambda r: self._load.get(r, 0))

    def _replace(self, replica: Replica) -> None:
        self.replicas.remove(replica)
        self.replicas.append(Replica(f"r{next(self._names)}"))

    async def _call(self, batch: list[Any]) -> tuple[str, list[tuple[int, Any]]]:
        rows = [float(np.asarray(x).ravel()[0]) for x in batch]
        self.calls.append((rows, self.in_flight))
        if self._lost_rows.intersection(rows):
            self.resent.append((rows, self.in_flight))
        self.called.set()
        replica = self._pick()
        self.in_flight += 1
        self._load[replica] = self._load.get(replica, 0) + 1
        try:
            if replica.broken:  # already broken: it refuses (until Serve replaces it)
                self._refusals[replica] = self._refusals.get(replica, 0) + 1
                if self._refusals[replica] >= self.refusals_before_replaced:
                    self._replace(replica)
                return replica.name, [(REFUSED, "broken") for _ in batch]
            await asyncio.sleep(self.latency)
            if self.stall and any(r < 0 for r in rows):
                await asyncio.sleep(self.stall)  # a call that never answers in time
            if replica.dead:
                self._lost_rows.update(rows)
                raise ActorDiedError()
            if any(r < 0 for r in rows):
                self._lost_rows.update(rows)
                if self.kind == "die":
                    replica.dead = True
                    self.deaths += 1
                    self._replace(replica)
                    raise ActorDiedError()
                replica.broken = True
                self.deaths += 1
                return replica.name, [(BROKEN, "DeviceError: device unplugged") for _ in batch]
            return replica.name, [(OK, x * 2) for x in batch]
        finally:
            self.in_flight -= 1
            self._load[replica] -= 1


class Response:
    def __init__(self, coro: Any):
        self._coro = coro

    def __await__(self) -> Any:
        return self._coro.__await__()

    def cancel(self) -> None:
        pass


def remote_runner(app: FakeApp, *, batch: int = 4, calls: int = 4, retries: int = 1,
                  timeout: float | None = None, maxsize: int = 16) -> tuple[Runner, Any]:
    stage = _RemoteStage(app, app="fake", batch=batch, calls=calls, timeout=timeout,
                         retries=retries)

    def load() -> Model:
        return Model(stages=[StageSpec("ray:fake", made(stage), device=True)],
                     profile=stage.counters)

    return Runner(load, maxsize=maxsize, name="fake-ray"), stage


async def stream(runner: Runner, values: list[float]) -> list[aioaccel.Result]:
    async def produce() -> None:
        for i, v in enumerate(values):
            await runner.push(np.array([v]), tag=i)
        runner.close()

    producer = asyncio.create_task(produce())
    results = [r async for r in runner]
    await producer
    return results


def values(n: int, poison: int | None) -> list[float]:
    return [-1.0 if i == poison else float(i) for i in range(n)]


def trials(app: FakeApp) -> list[tuple[list[float], int]]:
    """The calls that re-sent a suspect. A plain call may hold one row too (the batch former
    sends what is there), so a one-row call alone says nothing."""
    return list(app.resent)


@pytest.mark.parametrize("kind", ["die", "break"])
async def test_only_the_poison_item_fails_and_it_says_so(kind: str) -> None:
    app = FakeApp(kind=kind)
    runner, _ = remote_runner(app)
    async with runner:
        results = await stream(runner, values(100, 40))
        stats = runner.stats()
    assert [r.tag for r in results] == list(range(100))
    assert [r.tag for r in results if not r.ok] == [40]
    error = results[40].error
    assert isinstance(error, aioaccel.InferenceError) and isinstance(error.__cause__,
                                                                     RemoteError)
    assert "a poison item: it failed two replicas, the second time sent alone" in str(error)
    assert "gave up after 2 attempts (retries=1)" in str(error)
    assert all(float(r.outputs[0]) == 2.0 * r.tag for r in results if r.ok)
    assert app.deaths == 2  # the poison item cost two replicas, no more
    assert stats.profile["poisoned"] == 1 and stats.profile["suspects"] >= 1
    assert stats.failed == 1 and stats.completed == 99 and stats.in_flight == 0
    if kind == "break":
        assert stats.profile["refused"] >= 1  # turned away by the broken one, not blamed


async def test_a_suspect_runs_alone_with_nothing_else_in_flight() -> None:
    app = FakeApp(kind="die")
    runner, _ = remote_runner(app, batch=4, calls=4)
    async with runner:
        await stream(runner, values(60, 13))
    resent = trials(app)
    assert resent, "no suspect was re-sent"
    assert all(len(rows) == 1 and concurrent == 0 for rows, concurrent in resent), resent
    poison_calls = [rows for rows, _ in app.calls if -1.0 in rows]
    assert len(poison_calls) == 2 and poison_calls[1] == [-1.0]


async def test_without_retries_the_items_of_a_lost_replica_fail_at_once() -> None:
    app = FakeApp(kind="die")
    runner, _ = remote_runner(app, retries=0)
    async with runner:
        results = await stream(runner, values(40, 10))
        stats = runner.stats()
    failed = [r for r in results if not r.ok]
    assert results[10] in failed and len(failed) >= 1
    assert all("gave up after 1 attempts (retries=0)" in str(r.error) for r in failed)
    assert all("poison" not in str(r.error) for r in failed)
    assert stats.profile["suspects"] == 0 and stats.profile["poisoned"] == 0
    assert app.deaths == 1


async def test_a_stalled_item_times_out_alone_and_its_neighbours_are_answered() -> None:
    app = FakeApp(kind="die", stall=5.0)
    runner, _ = remote_runner(app, timeout=0.2, batch=4)
    async with runner:
        results = await stream(runner, values(12, 5))
    assert [r.tag for r in results if not r.ok] == [5]
    assert "no answer within timeout=0.2 s" in str(results[5].error)
    assert "poison item" in str(results[5].error)


async def test_replicas_that_refuse_for_too_long_fail_the_items_with_a_clear_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_integration, "UNAVAILABLE_FOR", 0.3)
    app = FakeApp(kind="break", refusals_before_replaced=10_000)
    for replica in app.replicas:
        replica.broken = True  # every replica is broken, and Serve never replaces them
    runner, _ = remote_runner(app)
    async with runner:
        with pytest.raises(aioaccel.InferenceError, match="no replica could take it for 0.3 s"):
            await asyncio.wait_for(runner.infer(np.array([1.0])), 10)


async def test_a_suspect_whose_caller_left_is_not_sent_again() -> None:
    app = FakeApp(kind="die", latency=0.01)
    runner, _ = remote_runner(app, batch=8, calls=1, maxsize=8)
    async with runner:
        tasks = [asyncio.create_task(runner.infer(np.array([v])))
                 for v in (1.0, 2.0, -1.0, 3.0)]
        # the first call left (its replica will die on the poison row): its first caller goes
        assert await asyncio.to_thread(app.called.wait, 10)
        tasks[0].cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        stats = runner.stats()
    assert isinstance(outcomes[0], asyncio.CancelledError)
    assert [float(o[0]) for o in (outcomes[1], outcomes[3])] == [4.0, 6.0]
    assert isinstance(outcomes[2], aioaccel.InferenceError) and "poison" in str(outcomes[2])
    assert [1.0] not in [rows for rows, _ in app.calls[1:]]  # never re-sent
    assert stats.in_flight == 0
