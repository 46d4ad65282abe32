"""aioaccel.integrations.ray on a real local Ray cluster: a head node without devices and two
nodes with {"EdgeTPU": 1} each (ray.cluster_utils.Cluster: several raylets on this machine).

One cluster for the module; every application is deleted by the fixture that made it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="needs the ray extra: pip install 'aioaccel[ray]'")
serve = pytest.importorskip("ray.serve", reason="needs the ray extra: pip install 'aioaccel[ray]'")

import httpx  # noqa: E402
from fastapi import Depends, FastAPI, Request, Response  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from support import stream_all  # noqa: E402

import aioaccel  # noqa: E402
from aioaccel.integrations.fastapi import Accel  # noqa: E402
from aioaccel.integrations.ray import (  # noqa: E402
    AccelReplica,
    DeployError,
    NotEnoughResources,
    RemoteError,
    connect,
    deploy,
)
from aioaccel.testing.models import dense_chain  # noqa: E402

pytestmark = pytest.mark.anyio

# functions defined here travel to the replicas by value (the workers cannot import this file)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

CHAIN = dense_chain(32, 3, inputs=8)


@pytest.fixture(scope="module")
def cluster() -> Any:
    cluster = Cluster(initialize_head=True, connect=True,
                      head_node_args={"num_cpus": 2, "include_dashboard": False})
    devices = [cluster.add_node(num_cpus=1, resources={"EdgeTPU": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    try:
        yield SimpleNamespace(devices={node.node_id for node in devices})
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for _ in range(3):  # a late serve.delete thread may reconnect the driver meanwhile:
                try:           # Cluster.shutdown then disconnects it and refuses; again
                    cluster.shutdown()
                    break
                except ValueError:
                    ray.shutdown()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(CHAIN.write_onnx(tmp_path_factory.mktemp("ray") / "mlp.onnx"))


@pytest.fixture(scope="module")
def mlp(cluster: Any, model_file: str) -> str:
    """The model on two replicas, one per EdgeTPU node."""
    deploy(model_file, name="mlp", replicas=2, resources={"EdgeTPU": 1, "CPU": 0.5},
           num_threads=1)
    yield "mlp"
    serve.delete("mlp")


def inputs(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.standard_normal((1, 8)).astype(np.float32) for _ in range(n)]


def slow_double(x: np.ndarray) -> np.ndarray:
    time.sleep(0.003)  # a device that takes 3 ms per item (sleeping releases the GIL)
    return x * 2


def fails_on_negative(x: np.ndarray) -> np.ndarray:
    if x[0] < 0:
        raise ValueError(f"negative input {x[0]}")
    return x + 1


def stalls_on_negative(x: np.ndarray) -> np.ndarray:
    if x[0] < 0:
        time.sleep(3)  # a device call that takes far longer than the client's timeout
    return x


def unplugs_on_negative(x: np.ndarray) -> np.ndarray:
    if x[0] < 0:
        raise aioaccel.DeviceError("device unplugged")  # breaks the replica's runner
    return x * 3


def dies_on_negative(x: np.ndarray) -> np.ndarray:
    if x[0] < 0:
        os._exit(1)  # a poisoned input crashes the runtime: the replica's process dies
    time.sleep(0.002)
    return x * 2


def replica_names(app: str) -> list[str]:
    """The live replica actors of ``app`` (Serve names them ``SERVE_REPLICA::app#...#id``)."""
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{app}#")]


def replica_actors(app: str) -> list[Any]:
    return [ray.get_actor(name, namespace="serve") for name in replica_names(app)]


def node_of(actor: Any) -> str:
    return ray.get(actor.__ray_call__.remote(lambda _self: ray.get_runtime_context()
                                             .get_node_id()))


def test_without_ray_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` does when it is absent
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    for call in (lambda: connect("x"), lambda: deploy("m.onnx", name="x")):
        with pytest.raises(aioaccel.BackendUnavailable, match=r"pip install 'aioaccel\[ray\]'"):
            call()


# ---- placement ---------------------------------------------------------------------------
def test_replicas_land_only_on_nodes_with_the_resource(cluster: Any, mlp: str) -> None:
    actors = replica_actors(mlp)
    assert len(actors) == 2
    nodes = [node_of(a) for a in actors]
    assert set(nodes) == cluster.devices  # one on each EdgeTPU node, none on the head


def test_more_devices_than_the_cluster_has_is_refused_at_once(cluster: Any,
                                                              model_file: str) -> None:
    started = time.monotonic()
    with pytest.raises(NotEnoughResources) as info:
        deploy(model_file, name="greedy", replicas=3, resources={"EdgeTPU": 1})
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert "'greedy'" in message and "3 replicas" in message and "EdgeTPU" in message
    assert "can hold 2" in message
    assert "greedy" not in serve.status().applications


def test_replicas_that_cannot_start_are_reported_after_the_deadline(cluster: Any,
                                                                    model_file: str) -> None:
    # an autoscaling cluster skips the up-front check; the deadline still bounds the wait
    with pytest.raises(NotEnoughResources, match="was not running after 3"):
        deploy(model_file, name="pending", replicas=1, resources={"EdgeTPU": 5},
               check_resources=False, deploy_timeout=3)
    deadline = time.monotonic() + 10
    while (left := serve.status().applications.get("pending")) is not None:
        if left.status == "DELETING":
            break  # deleting a replica that never started takes Serve a while: not waited for
        assert time.monotonic() < deadline, f"the application was not deleted: {left}"
        time.sleep(0.1)


def test_a_replica_that_cannot_open_its_runner_fails_the_deploy(cluster: Any) -> None:
    with pytest.raises(DeployError, match="no-such-model.onnx"):
        deploy("/nonexistent/no-such-model.onnx", name="broken", replicas=1,
               resources={"CPU": 0.25}, deploy_timeout=60)
    assert "broken" not in serve.status().applications or \
        serve.status().applications["broken"].status == "DELETING"


# ---- streaming ---------------------------------------------------------------------------
async def test_500_items_through_two_replicas_in_order_with_tags(
        cluster: Any, mlp: str, model_file: str) -> None:
    xs = inputs(500)
    async with aioaccel.open(model_file, num_threads=1) as local:
        expected = await stream_all(local, xs, tag=lambda i: f"frame-{i}")
    async with connect(mlp, maxsize=32) as remote:
        assert remote.inputs == local.inputs and remote.outputs == local.outputs
        results = await stream_all(remote, xs, tag=lambda i: f"frame-{i}")
        stats = remote.stats()
    assert [r.tag for r in results] == [f"frame-{i}" for i in range(500)]
    assert [r.seq for r in results] == list(range(500))
    for got, want in zip(results, expected):
        (name, value), = got.outputs.items()
        np.testing.assert_array_equal(value, want.outputs[name])
    assert stats.completed == 500 and stats.failed == 0 and stats.in_flight == 0
    profile = stats.profile
    answered = profile["answered_by"]
    assert len(answered) == 2 and sum(answered.values()) == 500  # both replicas served
    assert {where.split("@")[1] for where in answered} == cluster.devices
    assert profile["calls"] < 250  # items travel in batches, not one call each
    assert profile["retries"] == 0


async def test_streams_keep_their_own_order(mlp: str) -> None:
    xs = inputs(40)
    async with connect(mlp, maxsize=16) as remote:
        a, b = remote.stream("a"), remote.stream("b")

        async def produce() -> None:
            for i, x in enumerate(xs):
                await (a if i % 2 else b).push(x, tag=i)
            a.close()
            b.close()

        async def consume(stream: aioaccel.Stream) -> list[Any]:
            return [r.tag async for r in stream]

        _, got_a, got_b = await asyncio.gather(produce(), consume(a), consume(b))
    assert got_a == list(range(1, 40, 2)) and got_b == list(range(0, 40, 2))


# ---- failures ------------------------------------------------------------------------------
async def test_a_replica_killed_mid_stream_loses_no_item(cluster: Any) -> None:
    deploy(slow_double, name="killme", replicas=2, resources={"CPU": 0.25})
    try:
        n = 300
        victim = replica_actors("killme")[0]
        async with connect("killme", maxsize=32, timeout=20) as remote:
            async def produce() -> None:
                for i in range(n):
                    await remote.push(np.array([float(i)]), tag=i)
                remote.close()

            producer = asyncio.create_task(produce())
            results = []
            killed = False
            async for result in remote:
                results.append(result)
                answered_by = remote.stats().profile["answered_by"]  # type: ignore[index]
                if not killed and len(results) >= 60 and len(answered_by) == 2:
                    ray.kill(victim, no_restart=True)  # both replicas are being fed now
                    killed = True
            await producer
            stats = remote.stats()
        assert [r.tag for r in results] == list(range(n))
        assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
        assert [float(r.outputs[0]) for r in results] == [2.0 * i for i in range(n)]
        assert stats.completed == n and stats.failed == 0
        assert killed
        # Serve may have stopped routing to the victim just before the kill (then it held
        # nothing); when a call was lost, its items were re-sent and counted
        lost = stats.profile["failed_calls"]
        assert (lost == 0 and stats.profile["retries"] == 0) or stats.profile["retries"] >= 1
    finally:
        serve.delete("killme")


async def test_remote_item_failure_is_an_inference_error_with_the_cause(cluster: Any) -> None:
    deploy(fails_on_negative, name="picky", replicas=1, resources={"CPU": 0.25})
    try:
        async with connect("picky", maxsize=8) as remote:
            with pytest.raises(aioaccel.InferenceError) as info:
                await remote.infer(np.array([-3.0]))
            assert isinstance(info.value.__cause__, RemoteError)
            assert "ValueError" in str(info.value) and "negative input -3.0" in str(info.value)
            assert float((await remote.infer(np.array([2.0])))[0]) == 3.0  # later items flow
            results = await stream_all(remote, [np.array([1.0]), np.array([-1.0]),
                                                np.array([5.0])])
            assert [r.ok for r in results] == [True, False, True]
            assert remote.stats().profile["retries"] == 0  # an item's failure is not retried
    finally:
        serve.delete("picky")


async def test_serve_overload_becomes_client_backpressure(cluster: Any) -> None:
    # one replica serving one call at a time, one more queued: the client's other calls are
    # refused by Serve (BackPressureError), wait and go again; the client fills up meanwhile
    deploy(slow_double, name="narrow", replicas=1, resources={"CPU": 0.25}, max_ongoing=1,
           max_queued=1)
    try:
        async with connect("narrow", maxsize=8, calls=4, batch=2) as remote:
            for i in range(8):
                remote.push_nowait(np.array([float(i)]), tag=i)
            with pytest.raises(aioaccel.WouldBlock):
                remote.push_nowait(np.array([8.0]))
            results = [await anext(remote) for _ in range(8)]
            stats = remote.stats()
        assert [r.tag for r in results] == list(range(8))
        assert [float(r.outputs[0]) for r in results] == [2.0 * i for i in range(8)]
        assert stats.profile["overloaded_calls"] >= 1 and stats.failed == 0
    finally:
        serve.delete("narrow")


async def test_a_replica_that_does_not_answer_is_bounded_by_the_timeout(cluster: Any) -> None:
    deploy(stalls_on_negative, name="stalls", replicas=1, resources={"CPU": 0.25})
    try:
        async with connect("stalls", maxsize=4, timeout=0.5, retries=1) as remote:
            started = time.monotonic()
            with pytest.raises(aioaccel.InferenceError,
                               match=r"no answer within timeout=0.5 s; gave up after 2 attempts"):
                await remote.infer(np.array([-1.0]))
            assert time.monotonic() - started < 2.5  # two calls of 0.5 s, not the 3 s stall
            profile = remote.stats().profile
            assert profile["retries"] == 1 and profile["failed_calls"] == 2
    finally:
        serve.delete("stalls")


async def test_a_broken_runner_makes_serve_replace_its_replica(cluster: Any) -> None:
    deploy(unplugs_on_negative, name="fragile", replicas=1, resources={"CPU": 0.25},
           health_check_period=0.5)
    try:
        [before] = replica_names("fragile")
        async with connect("fragile", maxsize=4, retries=0) as remote:
            with pytest.raises(aioaccel.InferenceError, match="device unplugged"):
                await remote.infer(np.array([-1.0]))
            # check_health now fails on that replica: Serve replaces it (no event to await)
            deadline = time.monotonic() + 25
            while replica_names("fragile") in ([before], []):
                assert time.monotonic() < deadline, "Serve did not replace the broken replica"
                await asyncio.sleep(0.2)
            while True:  # the new replica serves once Serve routes to it
                try:
                    reply = await remote.infer(np.array([2.0]))
                    break
                except aioaccel.InferenceError:
                    assert time.monotonic() < deadline, "the new replica never answered"
                    await asyncio.sleep(0.2)
            assert float(reply[0]) == 6.0
    finally:
        serve.delete("fragile")


async def stream_with_poison(app: str, n: int, poison: int, **options: Any) -> tuple[
        list[aioaccel.Result], Any]:
    async with connect(app, **options) as remote:
        xs = [np.array([-1.0 if i == poison else float(i)]) for i in range(n)]
        results = await stream_all(remote, xs, tag=lambda i: i)
        return results, remote.stats()


def check_poisoned(results: list[aioaccel.Result], stats: Any, n: int, poison: int,
                   factor: float) -> None:
    """Only the poison item failed, alone and saying so; every neighbour was answered."""
    assert [r.tag for r in results] == list(range(n))
    failed = [r.tag for r in results if not r.ok]
    assert failed == [poison], [r.error for r in results if not r.ok][:3]
    error = results[poison].error
    assert isinstance(error, aioaccel.InferenceError)
    assert isinstance(error.__cause__, RemoteError)
    assert "poison item" in str(error) and "failed two replicas" in str(error)
    assert [float(r.outputs[0]) for r in results if r.ok] == [
        factor * i for i in range(n) if i != poison]
    profile = stats.profile
    assert profile["poisoned"] == 1 and profile["suspects"] >= 1
    assert stats.completed == n - 1 and stats.failed == 1 and stats.in_flight == 0


@pytest.fixture
def replica_killer(cluster: Any) -> Any:
    """Two replicas whose process a negative input kills (deployed outside the test's own
    time limit: a deploy takes seconds here)."""
    deploy(dies_on_negative, name="poisoned", replicas=2, resources={"CPU": 0.25})
    yield "poisoned"
    serve.delete("poisoned")


@pytest.fixture
def runner_breaker(cluster: Any) -> Any:
    """Two replicas whose runner a negative input breaks (a DeviceError)."""
    deploy(unplugs_on_negative, name="unplugged", replicas=2, resources={"CPU": 0.25},
           health_check_period=0.5)
    yield "unplugged"
    serve.delete("unplugged")


async def test_a_poison_item_that_kills_replicas_fails_alone(replica_killer: str) -> None:
    """Issue 26: over Ray a poison item that killed a replica failed 33-64 innocent items.
    The items a dead replica held are re-sent alone, one at a time; the one that kills a
    second replica is failed alone as the poison item, and every other item is answered."""
    n, poison = 120, 50
    results, stats = await stream_with_poison(replica_killer, n, poison, maxsize=32, batch=8,
                                              retries=1, timeout=60)
    check_poisoned(results, stats, n, poison, 2.0)


async def test_a_poison_item_that_breaks_replica_runners_fails_alone(runner_breaker: str
                                                                     ) -> None:
    """The same when the item breaks the replica's runner (a DeviceError) instead of its
    process: the broken replica refuses later items without blaming them until Serve
    replaces it, and only the poison item fails."""
    n, poison = 80, 30
    results, stats = await stream_with_poison(runner_breaker, n, poison, maxsize=16, batch=4,
                                              retries=1, timeout=60)
    check_poisoned(results, stats, n, poison, 3.0)


async def test_connect_to_an_unknown_application_says_so(cluster: Any) -> None:
    with pytest.raises(aioaccel.DeviceError, match="no Ray Serve application 'nothing-here'"):
        async with connect("nothing-here"):
            pass


# ---- infer -----------------------------------------------------------------------------------
async def test_200_concurrent_infer_callers_some_cancelled(mlp: str) -> None:
    xs = inputs(200)
    expected = [CHAIN.reference(x) for x in xs]
    async with connect(mlp, maxsize=32) as remote:
        tasks = [asyncio.create_task(remote.infer(x)) for x in xs]
        cancelled_early = set(range(0, 200, 9))
        for i in cancelled_early:
            tasks[i].cancel()  # before they ran: never pushed
        first_done = asyncio.Event()
        answered = 0

        def count(_task: asyncio.Task[Any]) -> None:
            nonlocal answered
            answered += 1
            if answered == 40:
                first_done.set()

        for t in tasks:
            t.add_done_callback(count)
        await first_done.wait()
        cancelled_late = {i for i in range(5, 200, 4) if not tasks[i].done()}
        for i in cancelled_late:
            tasks[i].cancel()  # admitted, queued, or on a replica
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        stats = remote.stats()
    ok = [i for i, o in enumerate(outcomes) if not isinstance(o, BaseException)]
    cancelled = [i for i, o in enumerate(outcomes) if isinstance(o, asyncio.CancelledError)]
    assert len(ok) + len(cancelled) == 200  # nothing failed
    assert set(cancelled) <= cancelled_early | cancelled_late
    assert len(ok) == 200 - len(cancelled_early) - len(cancelled_late)
    for i in ok:
        (value,) = outcomes[i].values()
        np.testing.assert_allclose(value, expected[i], rtol=1e-5, atol=1e-5)
    # exact accounting: every pushed item was answered, withdrawn or discarded, once
    assert stats.pushed == len(ok) + stats.withdrawn + stats.discarded
    assert stats.pushed == stats.completed + stats.failed + stats.withdrawn
    # the only failures: items of cancelled callers, never sent or whose call was cancelled
    assert stats.failed == stats.profile["cancelled_items"]
    assert stats.withdrawn + stats.discarded == stats.pushed - len(ok)
    assert stats.in_flight == 0 and stats.waiting == 0


async def test_bad_input_is_refused_at_the_client(mlp: str) -> None:
    async with connect(mlp, maxsize=8) as remote:
        good = inputs(1)[0]
        await remote.infer(good)
        sent = remote.stats().profile["items_sent"]
        with pytest.raises(aioaccel.InputError, match=r"expected shape \(1, 8\), got \(1, 3\)"):
            await remote.infer(np.zeros((1, 3), np.float32))
        with pytest.raises(aioaccel.InputError, match="expected dtype float32, got float64"):
            await remote.push(good.astype(np.float64))
        with pytest.raises(aioaccel.InputError):
            remote.push_nowait({"nope": good})
        stats = remote.stats()
        assert stats.profile["items_sent"] == sent  # the replicas never saw them
        assert stats.pushed == 1 and stats.failed == 0


async def test_push_nowait_says_would_block_when_the_client_is_full(mlp: str) -> None:
    async with connect(mlp, maxsize=2) as remote:
        x = inputs(1)[0]
        remote.push_nowait(x)
        remote.push_nowait(x)
        with pytest.raises(aioaccel.WouldBlock):
            remote.push_nowait(x)
        remote.close()
        assert len([r async for r in remote]) == 2


# ---- web -------------------------------------------------------------------------------------
async def test_fastapi_integration_over_connect(mlp: str) -> None:
    accel = Accel(default=connect(mlp, maxsize=8), admit_timeout=5.0)
    app = FastAPI(lifespan=accel.lifespan)

    @app.post("/infer")
    async def infer(request: Request,
                    runner: aioaccel.Runner = Depends(accel.runner())) -> Response:  # noqa: B008
        return await accel.infer(request, runner, await accel.read_inputs(request, runner))

    @app.get("/healthz")
    async def healthz() -> Response:
        return accel.health()

    x = inputs(1)[0]
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            replies = await asyncio.gather(*(client.post("/infer", json=x.tolist())
                                             for _ in range(10)))
            bad = await client.post("/infer", json=[[1.0, 2.0]])
            health = await client.get("/healthz")
    assert [r.status_code for r in replies] == [200] * 10, replies[0].text
    (value,) = replies[0].json()["outputs"].values()
    np.testing.assert_allclose(value, CHAIN.reference(x), rtol=1e-5, atol=1e-5)
    assert bad.status_code == 422 and "expected shape (1, 8)" in bad.text
    assert health.status_code == 200 and health.json()["ok"] is True


# ---- the example -----------------------------------------------------------------------------
def test_scale_out_example_runs(cluster: Any) -> None:
    root = Path(__file__).resolve().parent.parent
    # its own local Ray instance (address="local"), beside this module's cluster
    proc = subprocess.run([sys.executable, "-W", "error", "examples/ray_scale_out.py", "60", "2"],
                          cwd=root, capture_output=True, text=True, timeout=180,
                          env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
                               "PYTHONPATH": str(root)})  # this checkout's aioaccel
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("60 frames in order, answered by ")
    assert "bad input refused at the client: input 'input': expected shape (1, 16)" in proc.stdout


# ---- the replica, on its own -----------------------------------------------------------------
async def test_replica_health_follows_its_runner(cluster: Any) -> None:
    def broken(x: Any) -> Any:
        raise aioaccel.DeviceError("device unplugged")

    replica = AccelReplica.__new__(AccelReplica)
    await replica.__init__(broken, {})  # what Serve does with an async __init__
    try:
        await replica.check_health()  # healthy while the runner is open
        where, answers = await replica.infer_batch([np.array([1.0])])
        assert where.endswith("@" + ray.get_runtime_context().get_node_id())
        [(kind, text)] = answers
        assert kind == 2 and "device unplugged" in text  # "try another replica"
        with pytest.raises(RuntimeError, match="closed or broken"):
            await replica.check_health()
    finally:
        closing = replica.__del__()  # what Serve awaits at the replica's shutdown
        assert closing is not None
        await closing
        assert replica.__del__() is None  # a second call (garbage collection) has nothing to do
