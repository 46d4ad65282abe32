"""Web-service integrations: :mod:`aioaccel.integrations.fastapi` and
:mod:`aioaccel.integrations.aiohttp` (each needs its extra), sharing
:mod:`aioaccel.integrations.http` (request bodies to arrays, results to responses, errors to
status codes) and :mod:`aioaccel.integrations.streaming` (a WebSocket as one of a runner's
streams)."""

__all__: list[str] = []  # a namespace: import the submodule of the framework you use
