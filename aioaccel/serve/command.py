"""``aioaccel serve MODEL [MODEL ...]``: the models behind HTTP and WebSocket on uvicorn.

Each ``MODEL`` is a model file, several files joined by ``,`` (a pipeline of segments), or
``module:attribute`` naming a Python callable or stage (as uvicorn names apps). The runners
open before the server binds, so a model that fails to load is reported before anything
listens. SIGTERM or SIGINT: stop accepting, answer what was accepted (bounded by
``--drain-timeout``), close the runners, exit 0; a second signal exits at once (what is left
is failed, not drained). Runs on uvloop when it is installed (``--loop asyncio`` not).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aioaccel

from .._optional import need
from ..backends import BACKENDS
from ..loops import add_loop_arguments, keep_on_cpus, resolve_loop
from ..loops import run as run_on_loop
from .limits import DEFAULT_HEADER_TIMEOUT

__all__ = ["UsageError", "add_parser", "open_runners", "run"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3


class UsageError(ValueError):
    """A bad ``aioaccel serve`` argument (exit code 2)."""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """The ``serve`` subcommand of the ``aioaccel`` parser."""
    serve = sub.add_parser(
        "serve", help="serve models over HTTP and WebSocket (FastAPI on uvicorn)",
        description="Serve each MODEL under its name: POST /v1/models/{name}/infer, "
                    "GET /v1/models/{name}, WS /v1/models/{name}/stream, GET /healthz, "
                    "GET /metrics, GET /docs, and a live status page at GET /.")
    serve.add_argument("model", nargs="+", metavar="MODEL",
                       help="a model file; files joined by ',' for a pipeline; or "
                            "module:attribute naming a Python callable or stage")
    serve.add_argument("--name", action="append", default=None, metavar="NAME",
                       help="the name to serve a MODEL under (once per MODEL, in order; "
                            "default: the file's stem)")
    serve.add_argument("--backend", default=None, choices=sorted(BACKENDS),
                       help="the runtime for every model (default: from the file type)")
    serve.add_argument("--device", default=None, help="device= option for the backend")
    serve.add_argument("--maxsize", type=_positive_int, default=16,
                       help="items admitted per model before requests wait (default 16)")
    serve.add_argument("--replicas", type=_positive_int, default=1,
                       help="worker threads per blocking stage (default 1)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1; 0.0.0.0 exposes the server)")
    serve.add_argument("--port", type=int, default=8000,
                       help="port (default 8000; 0 picks a free one, printed at start)")
    serve.add_argument("--grpc-port", type=int, default=None, metavar="PORT",
                       help="also serve the Open Inference Protocol (KServe v2) over gRPC on "
                            "this port, e.g. 8001 (0 picks a free one; default: no gRPC)")
    serve.add_argument("--admit-timeout", type=float, default=1.0, metavar="S",
                       help="seconds a request waits for space before 503 (default 1.0)")
    serve.add_argument("--batch", type=batch_option, default=None, metavar="N|auto",
                       help="batch items for the device (aioaccel.open(batch=...))")
    serve.add_argument("--restart", nargs="?", const="", default=None, metavar="KEY=VALUE,...",
                       help="restart a failed device (aioaccel.open(restart=aioaccel.Restart"
                            "(...))); optional Restart options, e.g. --restart limit=5,"
                            "backoff=0.5")
    # [isolation] stages in child processes: a crashing runtime takes down a child, not us
    serve.add_argument("--isolation", default="thread", choices=["thread", "process"],
                       help="run each model's stages in a child process (process), so a "
                            "runtime that segfaults or aborts is restarted instead of "
                            "killing the server (default thread)")
    serve.add_argument("--max-rss", type=_positive_int, default=None, metavar="MIB",
                       help="with --isolation process: restart a child whose memory passes "
                            "MIB mebibytes")
    serve.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="a backend option (JSON value, else a string), e.g. num_threads=1")
    serve.add_argument("--drain-timeout", type=float, default=10.0, metavar="S",
                       help="on SIGTERM, seconds to answer accepted requests (default 10)")
    serve.add_argument("--allow-origin", action="append", default=None, metavar="ORIGIN",
                       help="a browser origin (https://host[:port]) allowed to open WebSocket "
                            "streams besides the server's own; repeatable; '*' allows any "
                            "(default: the server's own origin only; clients that send no "
                            "Origin, which are not browsers, are always allowed)")
    serve.add_argument("--header-timeout", type=_positive_float, default=DEFAULT_HEADER_TIMEOUT,
                       metavar="S", help="seconds a client has to send a request's headers, "
                                         "from connecting or from its previous response "
                                         f"(default {DEFAULT_HEADER_TIMEOUT:g}); then the "
                                         "connection is closed")
    serve.add_argument("--keep-alive-timeout", type=_positive_float, default=5.0, metavar="S",
                       help="seconds an idle keep-alive connection is kept (default 5)")
    add_loop_arguments(serve)
    serve.add_argument("--log-level", default="warning",
                       choices=["critical", "error", "warning", "info", "debug"],
                       help="uvicorn's log level (default warning; info logs each request)")
    return serve  # type: ignore[no-any-return]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0 and finite, got {text!r}")
    return value


def batch_option(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return _positive_int(text)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"--batch takes a positive int or 'auto', got "
                                         f"{text!r}") from None


def _key_values(pairs: list[str], what: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"{what} takes key=value, got {pair!r}")
        try:
            options[key] = json.loads(text)
        except ValueError:
            options[key] = text
    return options


def _target(spec: str) -> tuple[Any, str]:
    """(what aioaccel.open takes, default name) for one MODEL argument."""
    if "," in spec:
        parts = [p for p in spec.split(",") if p]
        for part in parts:
            _check_file(part)
        return parts, Path(parts[0]).stem
    module, sep, attr = spec.partition(":")
    if sep and not Path(spec).exists() and module and attr.isidentifier():
        try:
            target = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise UsageError(f"cannot import {spec!r} ({exc}): MODEL is a model file or "
                             f"module:attribute") from None
        return target, attr
    _check_file(spec)
    return spec, Path(spec).stem


def _check_file(path: str) -> None:
    if not Path(path).is_file():
        raise FileNotFoundError(f"model file not found: {path!r}")


def open_runners(args: argparse.Namespace) -> dict[str, aioaccel.Runner]:
    """One unopened runner per MODEL, keyed by the name it is served under."""
    names = args.name or []
    if len(names) > len(args.model):
        raise UsageError(f"{len(names)} --name for {len(args.model)} MODEL(s): give one "
                         f"--name per MODEL, in order")
    options = _key_values(args.option, "--option")
    if args.device is not None:
        options["device"] = args.device
    if args.batch is not None:
        options["batch"] = args.batch
    if getattr(args, "isolation", "thread") != "thread":  # [isolation]
        options["isolation"] = args.isolation
    if getattr(args, "max_rss", None) is not None:
        options["max_rss"] = args.max_rss * 2**20
    if args.restart is not None:
        restart = getattr(aioaccel, "Restart", None)
        if restart is None:
            raise UsageError("--restart needs aioaccel.Restart, which this version of "
                             "aioaccel does not have yet")
        pairs = [p for p in args.restart.split(",") if p]
        try:
            options["restart"] = restart(**_key_values(pairs, "--restart"))
        except (TypeError, ValueError) as exc:
            fields = getattr(restart, "__dataclass_fields__", None)
            known = f" (Restart's options: {', '.join(fields)})" if fields else ""
            raise UsageError(f"--restart: {exc}{known}") from None
    runners: dict[str, aioaccel.Runner] = {}
    for index, spec in enumerate(args.model):
        target, default_name = _target(spec)
        name = names[index] if index < len(names) else default_name
        if name in runners:
            raise UsageError(f"two models named {name!r}: give each a --name")
        try:
            runners[name] = aioaccel.open(target, backend=args.backend, maxsize=args.maxsize,
                                          replicas=args.replicas, name=name, **options)
        except TypeError as exc:
            raise UsageError(_unsupported(exc, args)) from None
        except ValueError as exc:  # [isolation] e.g. --max-rss without --isolation process
            raise UsageError(str(exc)) from None
    return runners


def _unsupported(exc: TypeError, args: argparse.Namespace) -> str:
    """Say which option this aioaccel (or backend) does not take, for a TypeError."""
    for flag, key in (("--batch", "batch"), ("--restart", "restart")):
        if getattr(args, key) is not None and repr(key) in str(exc):
            return (f"{flag} is not supported by this aioaccel or this backend "
                    f"(aioaccel.open(..., {key}=...) was refused: {exc})")
    return f"an --option the backend does not take: {exc}"


def run(args: argparse.Namespace) -> int:
    """``aioaccel serve``: returns the exit code."""
    need("uvicorn", "serve", "aioaccel serve")
    try:
        resolve_loop(args.loop)
        keep_on_cpus(args.cpus)
        runners = open_runners(args)
    except (UsageError, ValueError) as exc:
        print(f"aioaccel serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return run_on_loop(_serve(runners, args), args.loop)


async def _serve(runners: dict[str, aioaccel.Runner], args: argparse.Namespace) -> int:
    import uvicorn
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    from .app import build_app
    from .limits import guarded
    from .server import Server

    stop = asyncio.Event()
    async with AsyncExitStack() as stack:
        for runner in runners.values():
            try:
                await stack.enter_async_context(runner)
            except TypeError as exc:  # backend options are checked when the model loads
                print(f"aioaccel serve: {_unsupported(exc, args)}", file=sys.stderr)
                return EXIT_USAGE
        app = build_app(runners, admit_timeout=args.admit_timeout, manage_runners=False,
                        stop=stop, allowed_origins=args.allow_origin)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                lifespan="on", ws="websockets-sansio",
                                http=guarded(AutoHTTPProtocol, args.header_timeout),
                                timeout_keep_alive=args.keep_alive_timeout,
                                timeout_graceful_shutdown=args.drain_timeout)
        server = Server(config, stop, list(runners), app.state.streams)
        if getattr(args, "grpc_port", None) is not None:
            from .v2_serve import start_grpc

            try:
                server.announce = await stack.enter_async_context(
                    start_grpc(runners, args, stop, app.state.v2_requests))
            except OSError as exc:
                print(f"aioaccel serve: {exc}", file=sys.stderr)
                return EXIT_FAILED
        await server.serve()
        if server.forced.is_set():  # a second signal: fail what is left instead of draining
            for runner in runners.values():
                await runner.aclose(timeout=0)
        if not server.started:
            return EXIT_FAILED
    return EXIT_OK
