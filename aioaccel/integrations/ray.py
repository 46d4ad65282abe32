"""Scale-out on Ray Serve: one runner per accelerator across a cluster, the same Runner API on
the client.

``pip install 'aioaccel[ray]'``::

    # where the cluster is (each node started with: ray start --resources='{"EdgeTPU": 1}')
    deploy("model_edgetpu.tflite", name="detector", replicas=4, resources={"EdgeTPU": 1})

    # in any process connected to the cluster
    async with connect("detector", maxsize=64) as runner:     # an aioaccel.Runner
        await runner.push(frame, tag=frame_id)
        async for result in runner: ...
        outputs = await runner.infer(x)

* **Replicas.** Each replica of the Serve application owns one ``aioaccel.open(target,
  **open_options)`` runner for its lifetime: opened in the replica (``async __init__``), closed
  when Serve shuts the replica down. ``resources`` go to the replica's actor options, so it
  lands only on a node that has the device; Serve's ``check_health`` asks that runner, and a
  broken runner makes Serve replace the replica.
* **The client** is a real :class:`aioaccel.Runner` whose one stage is remote: every Runner
  contract (push order, tags, ``maxsize``, streams, cancellation, stats) holds unchanged.
  The stage sends items in small batches (one Serve call carries up to ``batch`` inputs, each
  gets its own answer), with at most ``calls`` calls in flight, so Ray's per-call cost of
  milliseconds is paid per batch, not per item.
* **Failures.** A replica that dies (killed, node lost), whose runner breaks, or that does not
  answer within ``timeout`` fails the items it held; they are re-sent (inference is
  idempotent) at most ``retries`` times each, counted in ``stats().profile["retries"]``; after
  that the item fails with :class:`~aioaccel.InferenceError`. Items that failed on the replica
  fail the same way on the client, with the remote cause as text (:class:`RemoteError`).
* **Poison items.** The items a lost replica held are *suspects*: they are re-sent one at a
  time, each alone in its call, with nothing else of this client in flight (new items wait
  meanwhile: a short probation, only after a failure). A suspect that fails its replica again
  while alone has failed two replicas: it is failed alone as the poison item (a
  :class:`RemoteError` that says so), never re-sent; the others are answered. So a poison item
  costs two replicas and fails nobody else (``profile["suspects"]``, ``profile["poisoned"]``).
  Limits: another client's traffic on the same replicas is not held back, so a replica lost to
  something else while a suspect runs on it (another client's poison, an operator's kill) makes
  that suspect look guilty. A replica whose runner is already broken refuses new items
  without blame (it answers "refused", they go again after a pause, for up to
  ``UNAVAILABLE_FOR`` seconds, as when no replica is available) until Serve replaces it.
* **Bad input** is refused at the client (:class:`~aioaccel.InputError`) against the input
  spec ``connect`` fetched once.
* **Overload.** When Serve's queue is full (``max_queued``), the batch waits and is re-sent:
  the overload reaches callers as the client's own backpressure (``push`` waits,
  ``push_nowait`` and ``infer(admit_timeout=)`` raise :class:`~aioaccel.WouldBlock`, the web
  integrations 503).
* **Cancellation.** An ``infer`` cancelled before its batch was sent is never sent; a call
  whose items were all cancelled is cancelled in Serve (``DeploymentResponse.cancel``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from .._optional import need
from ..backends import Model
from ..errors import (
    AccelError,
    DeployError,
    DeviceError,
    NotEnoughResources,
    RemoteError,
    RunnerClosed,
)
from ..options import check_count, check_seconds
from ..runner import Runner
from ..stages import Complete, DeviceStage, StageSpec, made
from ..tensors import InputValidator, TensorSpec

__all__ = [
    "DEFAULT_MAX_ONGOING",
    "DEFAULT_MAX_QUEUED",
    "AccelReplica",
    "DeployError",
    "NotEnoughResources",
    "RemoteError",
    "connect",
    "deploy",
    "deployment",
]

log = logging.getLogger("aioaccel")

#: requests (batches) Serve may queue for the application before it refuses more
DEFAULT_MAX_QUEUED = 256
#: calls one replica serves at once (each carries a batch)
DEFAULT_MAX_ONGOING = 8
#: the replica runner's maxsize unless open_options give one: room for every ongoing batch
DEFAULT_REPLICA_MAXSIZE = 64
_FEATURE = "aioaccel.integrations.ray"
#: reply kinds, per item: answered; failed on its own; the replica broke while holding it; the
#: replica was already broken when it came (not the item's doing: it goes again, unblamed)
_OK, _FAILED, _REPLICA_BROKEN, _REPLICA_REFUSED = 0, 1, 2, 3
#: seconds an item keeps going again while every replica it reaches refuses it (broken, being
#: replaced) or none is available, before it fails
UNAVAILABLE_FOR = 30.0


def _serve() -> Any:
    need("ray", "ray", _FEATURE)
    return need("ray.serve", "ray", _FEATURE)


# ---- the replica (server side) ----------------------------------------------------------
class AccelReplica:
    """The body of one Serve replica: it owns one aioaccel runner for its lifetime.

    Use :func:`deployment` for the Serve deployment of this class (to compose your own
    application), or :func:`deploy` to run it as an application of its own.
    """

    # Serve awaits an async __init__ (the runner opens on the replica's loop); mypy objects
    async def __init__(self, target: Any, open_options: dict[str, Any]) -> None:  # type: ignore[misc]
        import aioaccel

        options = dict(open_options)
        options.setdefault("maxsize", DEFAULT_REPLICA_MAXSIZE)
        self._cast = bool(options.get("cast", False))
        self._items = 0
        self._where = _where_am_i()
        self._runner = aioaccel.open(target, **options)
        await self._runner.__aenter__()

    async def describe(self) -> dict[str, Any]:
        """What a client needs once: the model's specs, and where this replica runs."""
        runner = self._runner
        return {
            "inputs": runner.inputs,
            "outputs": runner.outputs,
            "cast": self._cast,
            "replica": self._where,
            "pid": os.getpid(),
            "items": self._items,
            "stats": runner.stats(),
        }

    async def infer_batch(self, batch: list[Any]) -> tuple[str, list[tuple[int, Any]]]:
        """Run every input of ``batch`` concurrently: ``(replica, answers)``, one ``(kind,
        value)`` answer per input; ``replica`` names this replica (its actor id and node)."""
        self._items += len(batch)
        answers = await asyncio.gather(*(self._infer_one(x) for x in batch))
        return self._where, list(answers)

    async def _infer_one(self, inputs: Any) -> tuple[int, Any]:
        runner = self._runner
        if runner.closed:  # broken before this item came: refuse it, the item is not to blame
            return _REPLICA_REFUSED, f"replica {self._where} is broken or closing"
        try:
            return _OK, await runner.infer(inputs)
        except (DeviceError, RunnerClosed) as exc:  # this replica cannot serve: try another
            return _REPLICA_BROKEN, _describe_error(exc)
        except AccelError as exc:
            return _FAILED, _describe_error(exc)

    async def check_health(self) -> None:
        """Serve's health probe: a closed or broken runner makes Serve replace the replica."""
        if self._runner.closed:
            raise RuntimeError(f"aioaccel runner {self._runner.name!r} is closed or broken")

    async def aclose(self) -> None:
        """Close the runner: it drains what it admitted (bounded by its ``close_timeout``)."""
        await self._runner.aclose()

    def __del__(self) -> Coroutine[Any, Any, None] | None:
        # Serve calls __del__ at the replica's graceful shutdown and awaits what it returns;
        # Python's own call at garbage collection must not make a coroutine nobody awaits.
        if getattr(self, "_runner", None) is None or getattr(self, "_closing", False):
            return None
        self._closing = True
        return self.aclose()


def _where_am_i() -> str:
    """``"<actor id>@<node id>"``: which replica answered, on which node."""
    import ray

    context = ray.get_runtime_context()
    return f"{context.get_actor_id()}@{context.get_node_id()}"


def _describe_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__
    if cause is not None and repr(cause) not in text:
        text += f" (caused by {cause!r})"
    return text


@functools.cache
def deployment() -> Any:
    """The Serve deployment of :class:`AccelReplica` (``deployment().options(...).bind(target,
    open_options)``), for users who compose their own Serve applications."""
    return _serve().deployment(AccelReplica)


def __getattr__(name: str) -> Any:
    # ``AccelDeployment``: the Serve deployment, made on first use (it needs Ray)
    if name == "AccelDeployment":
        return deployment()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _actor_options(resources: Mapping[str, float] | None) -> dict[str, Any]:
    """``{"CPU": 1, "GPU": 0, "EdgeTPU": 1}`` -> Ray actor options (CPU/GPU are separate)."""
    custom = dict(resources or {})
    for key, value in custom.items():
        if not isinstance(value, int | float) or value < 0:
            raise ValueError(f"resources[{key!r}] must be a number >= 0, got {value!r}")
    options: dict[str, Any] = {}
    if "CPU" in custom:
        options["num_cpus"] = custom.pop("CPU")
    if "GPU" in custom:
        options["num_gpus"] = custom.pop("GPU")
    if custom:
        options["resources"] = custom
    return options


def _replicas_that_fit(need_per_replica: Mapping[str, float]) -> tuple[int, dict[str, float]]:
    """How many replicas needing ``need_per_replica`` the cluster's live nodes can hold, and the
    cluster's totals of those resources."""
    import ray

    fit = 0
    totals = dict.fromkeys(need_per_replica, 0.0)
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        have = node.get("Resources", {})
        for key in totals:
            totals[key] += have.get(key, 0.0)
        per_node = [math.floor(have.get(k, 0.0) / v + 1e-9) for k, v in need_per_replica.items()
                    if v > 0]
        fit += min(per_node) if per_node else 1 << 30
    return fit, totals


def deploy(target: Any, *, name: str, replicas: int = 1,
           resources: Mapping[str, float] | None = None, max_queued: int = DEFAULT_MAX_QUEUED,
           max_ongoing: int = DEFAULT_MAX_ONGOING, check_resources: bool = True,
           deploy_timeout: float = 120.0, health_check_period: float | None = None,
           open_retries: int = 3, **open_options: Any) -> Any:
    """Run the Ray Serve application ``name``: ``replicas`` replicas, each owning one
    ``aioaccel.open(target, **open_options)`` runner. Returns its ``DeploymentHandle``.

    ``resources`` (``{"EdgeTPU": 1}``; ``"CPU"``/``"GPU"`` for those) is what each replica
    reserves, so it lands on a node that has it. Serve refuses calls beyond ``max_queued``
    queued requests; each replica serves ``max_ongoing`` calls at once. Unless
    ``check_resources=False`` (an autoscaling cluster that adds nodes on demand), asking for
    more replicas than the live nodes can hold raises :class:`NotEnoughResources` at once;
    replicas not running within ``deploy_timeout`` seconds raise it too, and the application
    is deleted. A replica whose runner fails to open is started again up to ``open_retries``
    times, then :class:`DeployError` says why. Serve asks each replica's runner for its health
    every ``health_check_period`` seconds (Serve's default: 10). ``target`` must be picklable
    (a model path, a picklable callable). It blocks until the replicas run: from async code,
    ``await asyncio.to_thread(deploy, ...)``.
    """
    check_count("replicas", replicas, 1)
    if isinstance(max_queued, bool) or not isinstance(max_queued, int) or (
            max_queued < 1 and max_queued != -1):
        raise ValueError(f"max_queued must be a positive int (or -1: unbounded), "
                         f"got {max_queued!r}")
    # not ``retries``: that is an item's re-runs; this is a replica's attempts at opening
    check_count("open_retries", open_retries, 1)
    check_count("max_ongoing", max_ongoing, 1)
    check_seconds("deploy_timeout", deploy_timeout, zero=False)
    if health_check_period is not None:
        check_seconds("health_check_period", health_check_period, zero=False)
    serve = _serve()
    actor_options = _actor_options(resources)
    _ensure_serve(serve)
    if check_resources:
        need_per_replica = {"CPU": actor_options.get("num_cpus", 1),
                            "GPU": actor_options.get("num_gpus", 0),
                            **actor_options.get("resources", {})}
        need_per_replica = {k: float(v) for k, v in need_per_replica.items() if v}
        fit, totals = _replicas_that_fit(need_per_replica)
        if fit < replicas:
            raise NotEnoughResources(
                f"application {name!r} asks for {replicas} replicas, each needing "
                f"{need_per_replica}, but the cluster's live nodes can hold {fit} (cluster "
                f"totals: {totals}); start nodes with those resources (ray start "
                f"--resources=...), or ask for fewer replicas")
    options: dict[str, Any] = {}
    if health_check_period is not None:
        options["health_check_period_s"] = health_check_period
    app = deployment().options(
        name="AccelReplica", num_replicas=replicas, ray_actor_options=actor_options,
        max_ongoing_requests=max_ongoing, max_queued_requests=max_queued,
        max_constructor_retry_count=open_retries, **options,
    ).bind(target, dict(open_options))
    return _run_bounded(serve, app, name, deploy_timeout)


def _ensure_serve(serve: Any) -> None:
    """Connect to Ray (``RAY_ADDRESS`` or a local cluster) and start Serve if it is not running,
    without its HTTP proxy: clients come through handles (``connect``), not HTTP. A Serve that
    runs already is joined as it is (``serve.start`` leaves its options alone then)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"))
    serve.start(proxy_location="Disabled")


def _run_bounded(serve: Any, app: Any, name: str, timeout: float) -> Any:
    """``serve.run(app)`` within ``timeout`` seconds: the application's handle once it runs,
    else :class:`DeployError` / :class:`NotEnoughResources` with Serve's reason, and the
    application deleted.

    Serve's public ``run`` waits for the application to be running with no bound (replicas
    waiting for resources wait forever), so it runs on a thread while this one watches
    ``serve.status()`` up to the deadline. Past it the application is deleted, which ends
    that wait too (Serve then says the application does not exist). The two threads block in
    Ray's own client calls (like ``ray-cancel``, below), so they are named for Ray, not for a
    runner: each ends when Serve is done (``serve.delete`` gives up after 60 s itself).
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["handle"] = serve.run(app, name=name, route_prefix=None, blocking=False)
        except BaseException as exc:  # reported by the watching thread
            outcome["error"] = exc

    runner = threading.Thread(target=run, name=f"ray-serve-run-{name}", daemon=True)
    runner.start()
    deadline = time.monotonic() + timeout
    pause = 0.05
    while True:
        runner.join(pause)
        pause = min(pause * 1.5, 0.5)
        if not runner.is_alive() and "error" not in outcome:
            return outcome["handle"]
        status, message, detail = _app_status(serve, name)
        if status == "RUNNING" and "error" not in outcome:
            runner.join(max(0.0, min(deadline - time.monotonic(), 5.0)))  # returns within 1 s
            return outcome.get("handle") or serve.get_app_handle(name)
        failed = "error" in outcome or status == "DEPLOY_FAILED"
        if failed or time.monotonic() > deadline:
            # not waited for: deleting replicas that never started takes Serve a while
            _delete_in_background(serve, name)
            if failed:
                cause = outcome.get("error")
                reason = message or (str(cause) if cause is not None else "")
                raise DeployError(f"application {name!r} failed to deploy: {reason} {detail}"
                                  .strip()) from cause
            raise NotEnoughResources(f"application {name!r} was not running after {timeout} s "
                                     f"(status {status}): {message} {detail}".strip())


def _app_status(serve: Any, name: str) -> tuple[str, str, str]:
    """The application's status name, Serve's message, and what its deployments say."""
    app = serve.status().applications.get(name)
    status = str(getattr(app, "status", "NOT_STARTED")).rsplit(".", 1)[-1]
    message = getattr(app, "message", "") or ""
    detail = "; ".join(
        f"{dep}: {d.status}: {d.message}"
        for dep, d in (getattr(app, "deployments", None) or {}).items() if d.message)
    return status, message, detail


def _delete_in_background(serve: Any, name: str) -> None:
    """``serve.delete(name)`` (public; it waits for the deletion, up to 60 s) off this thread."""
    def delete() -> None:
        try:
            serve.delete(name)
        except Exception as exc:  # the deploy's own error is what the caller needs
            log.warning("ray app %r: deleting it after a failed deploy failed: %s", name, exc)

    threading.Thread(target=delete, name=f"ray-serve-delete-{name}", daemon=True).start()


# ---- the client -------------------------------------------------------------------------
def connect(name: str, *, maxsize: int = 64, timeout: float | None = None, retries: int = 1,
            batch: int | None = None, calls: int | None = None, runner_name: str | None = None,
            close_timeout: float = 10.0, connect_timeout: float = 60.0) -> Runner:
    """A :class:`~aioaccel.Runner` over the Serve application ``name`` made by :func:`deploy`.

    Open it like a local runner (``async with connect(...) as runner``). ``maxsize`` bounds
    items admitted and not consumed, as for any runner. ``timeout`` (seconds) bounds each
    remote call: past it the call counts as failed, as if its replica had died (None: wait as
    long as Serve takes; Serve itself reports dead replicas). ``retries`` is how many more
    times an item is run after the device holding it failed (0: never; the item then fails
    with that failure). Here an item whose replica died, broke or timed out is sent again, to
    whichever replica Serve picks; used up, it fails with :class:`~aioaccel.RemoteError` as
    the cause. One call carries up to ``batch`` items (default: ``maxsize`` spread over
    ``calls``), with up to ``calls`` calls in flight (default: 2 per replica).
    ``connect_timeout`` bounds fetching the model's spec when the runner opens.
    """
    # the arguments first: a bad one is refused the same way with or without Ray installed
    check_count("maxsize", maxsize, 1)
    check_seconds("timeout", timeout, none=True, zero=False, infinite=True)
    check_count("retries", retries)
    for label, value in (("batch", batch), ("calls", calls)):
        if value is not None:
            check_count(label, value, 1)
    check_seconds("close_timeout", close_timeout)
    check_seconds("connect_timeout", connect_timeout, zero=False)
    _serve()
    settings = _ClientSettings(name, maxsize, timeout, retries, batch, calls, connect_timeout)
    return Runner(functools.partial(_load_remote, settings), maxsize=maxsize,
                  name=runner_name or f"ray-{name}", close_timeout=close_timeout)


@dataclass(frozen=True)
class _ClientSettings:
    app: str
    maxsize: int
    timeout: float | None
    retries: int
    batch: int | None
    calls: int | None
    connect_timeout: float


def _load_remote(settings: _ClientSettings) -> Model:
    """Runs on the runner's load thread: find the application, fetch its spec once."""
    serve = _serve()
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"))
    try:
        handle = serve.get_app_handle(settings.app)
    except Exception as exc:  # Serve raises RayServeException for an unknown app
        raise DeviceError(f"no Ray Serve application {settings.app!r} is running "
                          f"({exc}); deploy it first with aioaccel.integrations.ray.deploy"
                          ) from exc
    try:
        described = handle.describe.remote().result(timeout_s=settings.connect_timeout)
    except Exception as exc:
        raise DeviceError(f"Ray Serve application {settings.app!r} did not describe its "
                          f"model within {settings.connect_timeout} s: {exc}") from exc
    replicas = _running_replicas(serve, settings.app)
    calls = settings.calls or max(2, 2 * replicas)
    batch = settings.batch or max(1, math.ceil(settings.maxsize / calls))
    stage = _RemoteStage(handle, app=settings.app, batch=batch, calls=calls,
                         timeout=settings.timeout, retries=settings.retries)
    inputs: list[TensorSpec] | None = described["inputs"]
    prepare = InputValidator(inputs, cast=described["cast"]) if inputs else None
    return Model(stages=[StageSpec(f"ray:{settings.app}", made(stage), device=True)],
                 inputs=inputs, outputs=described["outputs"], prepare=prepare,
                 info={"app": settings.app, "replicas": replicas, "batch": batch,
                       "calls": calls},
                 profile=stage.counters)


def _running_replicas(serve: Any, app: str) -> int:
    try:
        status = serve.status().applications[app]
        return sum(d.replica_states.get("RUNNING", 0) for d in status.deployments.values())
    except Exception:  # only a default for `calls`: never worth failing the open over
        return 1


class _Pending:
    """One item on the client side of the wire."""

    __slots__ = ("attempts", "failure", "inputs", "token", "unavailable_since")

    def __init__(self, token: object, inputs: Any):
        self.token = token
        self.inputs = inputs
        self.attempts = 0
        self.failure = ""                 # why its replica failed it the first time (a suspect)
        self.unavailable_since = 0.0      # first refusal / no replica available (monotonic)


def _abandoned(token: object) -> bool:
    """True when the ``infer`` waiting for this item is gone (cancelled or timed out).

    Reads the job's ``abandoned`` flag, which the runner sets on the loop: a plain attribute
    read, and a stale answer only means one item more or less is sent."""
    return bool(getattr(token, "abandoned", False))


class _RemoteStage(DeviceStage):
    """The client's one stage: batches items to the Serve application on a sender thread that
    runs its own event loop, and completes each item when its answer comes back."""

    def __init__(self, handle: Any, *, app: str, batch: int, calls: int,
                 timeout: float | None, retries: int):
        self._method = handle.options(method_name="infer_batch")
        self._app = app
        self._batch = batch
        self._calls = calls
        self._timeout = timeout
        self._retries = retries
        self._complete: Complete | None = None
        self._arrived: deque[_Pending] = deque()
        self._lock = threading.Lock()
        self._wake_scheduled = False
        self._in_flight: dict[asyncio.Task[None], list[_Pending]] = {}
        # probation (see the module docstring): items a lost replica held, to re-send alone
        self._suspects: deque[_Pending] = deque()
        self._trial: _Pending | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._reaper: asyncio.Task[None] | None = None
        # counters (read by stats().profile)
        self._sent_calls = self._sent_items = self._retried = self._lost_calls = 0
        self._cancelled_unsent = self._cancelled_calls = self._overloaded = 0
        self._cancelled_items = 0  # answered "cancelled": never sent, or their call cancelled
        self._tried_alone = self._poisoned = self._refused = 0
        self._answered_by: dict[str, int] = {}  # "<actor id>@<node id>" -> items answered

    def counters(self) -> dict[str, Any]:
        calls = self._sent_calls
        return {"app": self._app, "calls": calls, "items_sent": self._sent_items,
                "mean_batch": self._sent_items / calls if calls else 0.0,
                "retries": self._retried, "failed_calls": self._lost_calls,
                "overloaded_calls": self._overloaded, "cancelled_unsent": self._cancelled_unsent,
                "cancelled_calls": self._cancelled_calls,
                "cancelled_items": self._cancelled_items, "in_flight_calls": len(self._in_flight),
                "suspects": self._tried_alone, "poisoned": self._poisoned,
                "refused": self._refused,
                "batch": self._batch, "max_calls": self._calls,
                "answered_by": dict(self._answered_by)}

    # ---- DeviceStage --------------------------------------------------------------------
    def start(self, complete: Complete) -> None:
        self._complete = complete
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        name = threading.current_thread().name.removesuffix("-0") + "-sender"
        self._thread = threading.Thread(target=self._main, args=(ready,), name=name, daemon=True)
        self._thread.start()
        ready.wait()

    def submit(self, token: object, inputs: Any) -> None:
        with self._lock:
            self._arrived.append(_Pending(token, inputs))
            if self._wake_scheduled:
                return
            self._wake_scheduled = True
        self._loop.call_soon_threadsafe(self._dispatch)  # type: ignore[union-attr]

    def close(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            loop.call_soon_threadsafe(self._stop)
        except RuntimeError:  # the loop already stopped
            pass
        thread.join(10.0)
        if thread.is_alive():
            log.warning("ray sender of %r did not stop within 10 s; abandoned", self._app)

    # ---- the sender loop ------------------------------------------------------------------
    def _main(self, ready: threading.Event) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        self._reaper = loop.create_task(self._reap())
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            loop.close()

    def _stop(self) -> None:
        self._stopping = True
        tasks = [*self._in_flight, *([self._reaper] if self._reaper else [])]
        for task in tasks:
            task.cancel()
        loop = self._loop
        assert loop is not None

        async def finish() -> None:
            await asyncio.gather(*tasks, return_exceptions=True)
            loop.stop()

        loop.create_task(finish())

    def _dispatch(self) -> None:
        """Start calls while fewer than ``calls`` are in flight and items wait; during a
        probation, only the next suspect, alone."""
        with self._lock:
            self._wake_scheduled = False
        if self._stopping:
            return
        arrived, loop = self._arrived, self._loop
        assert loop is not None
        if (self._suspects or self._trial is not None) and not self._next_trial():
            return  # new items wait until the probation is over
        while arrived and len(self._in_flight) < self._calls:
            batch: list[_Pending] = []
            while arrived and len(batch) < self._batch:
                pending = arrived.popleft()
                if _abandoned(pending.token):
                    self._cancelled_unsent += 1
                    self._cancelled_items += 1
                    self._answer(pending, None, RemoteError("cancelled before it was sent"))
                else:
                    batch.append(pending)
            if batch:
                task = loop.create_task(self._call(batch))
                self._in_flight[task] = batch

    def _next_trial(self) -> bool:
        """Start the next suspect's call, alone, once nothing else of ours is in flight (so a
        replica lost meanwhile was lost to it). True when the probation is over."""
        if self._trial is not None or self._in_flight:
            return False
        loop = self._loop
        assert loop is not None
        while self._suspects:
            pending = self._suspects.popleft()
            if _abandoned(pending.token):
                self._cancelled_items += 1
                self._answer(pending, None, RemoteError("cancelled before it was sent again"))
                continue
            self._trial = pending
            self._tried_alone += 1
            task = loop.create_task(self._call([pending], trial=True))
            self._in_flight[task] = [pending]
            return False
        return True

    async def _call(self, batch: list[_Pending], trial: bool = False) -> None:
        try:
            while batch:
                batch = await self._attempt(batch, trial)
        except asyncio.CancelledError:
            if self._stopping:  # the runner has failed what was pending already
                raise
            self._cancelled_calls += 1  # every item's infer was cancelled (see _reap)
            for p in batch:
                self._cancelled_items += 1
                self._answer(p, None, RemoteError("cancelled"))
        finally:
            self._in_flight.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            if trial:
                self._trial = None
            if not self._stopping:
                self._dispatch()

    async def _attempt(self, batch: list[_Pending], trial: bool = False) -> list[_Pending]:
        """One Serve call for ``batch``; returns the items to send again in this same call
        (overload, or no replica could take them); the items a lost replica held become
        suspects (or, for the suspect on ``trial``, the poison item)."""
        from ray.exceptions import RayActorError, TaskCancelledError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        response = self._method.remote([p.inputs for p in batch])
        self._sent_calls += 1
        self._sent_items += len(batch)
        try:
            async with asyncio.timeout(self._timeout):
                replies = await response
        except BackPressureError:
            # Serve's queue is full: the batch waits here, the client's maxsize fills and
            # callers feel the overload as the client's own backpressure
            self._overloaded += 1
            await asyncio.sleep(0.01 * min(self._overloaded, 10))
            return batch
        except asyncio.CancelledError:
            _cancel_in_background(response)
            raise
        except TimeoutError:
            _cancel_in_background(response)
            return self._lost(batch, f"no answer within timeout={self._timeout} s", trial)
        except DeploymentUnavailableError as exc:  # no replica at all: nobody is to blame
            return await self._unavailable(batch, f"no replica available ({exc})")
        except (RayActorError, TaskCancelledError) as exc:
            return self._lost(batch, f"replica lost ({type(exc).__name__}: {exc})", trial)
        except Exception as exc:  # the call itself failed (e.g. an input that does not pickle)
            self._lost_calls += 1
            for p in batch:
                self._answer(p, None, RemoteError(_describe_error(exc)))
            return []
        replica, answers = replies
        self._answered_by[replica] = self._answered_by.get(replica, 0) + len(batch)
        broken: list[_Pending] = []
        refused: list[_Pending] = []
        reason = refusal = ""
        for p, (kind, value) in zip(batch, answers, strict=True):
            if kind == _OK:
                p.unavailable_since = 0.0
                self._answer(p, value, None)
            elif kind == _REPLICA_BROKEN:
                broken.append(p)
                reason = value
            elif kind == _REPLICA_REFUSED:
                refused.append(p)
                refusal = value
            else:
                self._answer(p, None, RemoteError(value))
        if broken:
            self._lost(broken, f"replica broken ({reason})", trial)
        if refused:
            self._refused += len(refused)
            return await self._unavailable(refused, f"refused ({refusal})")
        return []

    def _lost(self, items: list[_Pending], reason: str, trial: bool) -> list[_Pending]:
        """A replica failed ``items`` (it died, broke or did not answer): those with retries
        left become suspects, to be re-sent alone; the suspect on ``trial`` failed a replica
        alone, the second time: it is the poison item. Returns nothing to re-send at once."""
        self._lost_calls += 1
        log.warning("ray app %r: a call with %d items failed: %s", self._app, len(items), reason)
        for p in items:
            gave_up = (f"{reason}; gave up after {p.attempts + 1} attempts "
                       f"(retries={self._retries})")
            if trial:
                self._poisoned += 1
                self._answer(p, None, RemoteError(
                    f"{gave_up}: a poison item: it failed two replicas, the second time sent "
                    f"alone (the first time: {p.failure}); not re-sent again"))
            elif p.attempts < self._retries and not _abandoned(p.token):
                p.attempts += 1
                self._retried += 1
                p.failure = reason
                self._suspects.append(p)
            else:
                self._answer(p, None, RemoteError(gave_up))
        return []

    async def _unavailable(self, items: list[_Pending], reason: str) -> list[_Pending]:
        """No replica could take ``items`` (the one reached was broken, or none is
        available): not their doing. They go again after a pause, for up to
        ``UNAVAILABLE_FOR`` seconds each, then fail."""
        now = time.monotonic()
        again = []
        for p in items:
            if not p.unavailable_since:
                p.unavailable_since = now
            if _abandoned(p.token):
                self._cancelled_items += 1
                self._answer(p, None, RemoteError("cancelled"))
            elif now - p.unavailable_since > UNAVAILABLE_FOR:
                self._answer(p, None, RemoteError(
                    f"{reason}; no replica could take it for {UNAVAILABLE_FOR:g} s"))
            else:
                again.append(p)
        if again:
            waited = now - min(p.unavailable_since for p in again)
            await asyncio.sleep(min(0.5, 0.02 + waited / 10))
        return again

    async def _reap(self) -> None:
        """Cancel in Serve the calls all of whose items' ``infer`` callers are gone."""
        while True:
            await asyncio.sleep(0.05)
            for task, batch in list(self._in_flight.items()):
                if all(_abandoned(p.token) for p in batch):
                    task.cancel()

    def _answer(self, pending: _Pending, outputs: Any, error: BaseException | None) -> None:
        pending.inputs = None
        self._complete(pending.token, outputs, error)  # type: ignore[misc]


def _cancel_in_background(response: Any) -> None:
    """``DeploymentResponse.cancel`` may block until the request is assigned: off the loop."""
    threading.Thread(target=_quiet_cancel, args=(response,), name="ray-cancel",
                     daemon=True).start()


def _quiet_cancel(response: Any) -> None:
    try:
        response.cancel()
    except Exception:
        pass
