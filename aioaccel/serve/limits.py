"""A deadline on HTTP request headers, for uvicorn's HTTP protocols (httptools or h11).

uvicorn bounds the idle time between requests on a keep-alive connection
(``timeout_keep_alive``), but not the time before the first request, nor how long a client
may take to send its headers: a connection that never sends a byte, or trickles one header
byte a second (slowloris), is held for good, with its file descriptor. The request body is
bounded by the integrations (``body_timeout``, 408).

:func:`guarded` makes a subclass of the protocol that starts a timer when the connection is
made and again when a response completes; when the next request's headers have not all
arrived by then, the connection is closed (after a 408 if some of them had). A WebSocket
upgrade ends the deadline: the WebSocket protocol takes the connection over.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["DEFAULT_HEADER_TIMEOUT", "guarded"]

#: seconds a client has, from connecting (or from its previous response), to send its headers
DEFAULT_HEADER_TIMEOUT = 10.0

_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: 37\r\nconnection: close\r\n\r\n"
            b"request headers not received in time\n")


def guarded(base: type[asyncio.Protocol], header_timeout: float) -> type[asyncio.Protocol]:
    """``base`` (uvicorn's ``HttpToolsProtocol`` or ``H11Protocol``) with a deadline of
    ``header_timeout`` seconds on each request's headers."""
    if not header_timeout > 0:
        raise ValueError(f"header_timeout must be > 0 seconds, got {header_timeout!r}")

    class HeaderDeadline(base):  # type: ignore[valid-type,misc]
        _deadline: asyncio.TimerHandle | None = None
        _partial = False  # bytes of a request arrived since the deadline was set

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            self._partial = True
            super().data_received(data)
            if self._deadline is not None and (self._in_request() or self._upgraded()):
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and not self._in_request():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._partial = False
            self._deadline = self.loop.call_later(header_timeout, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _in_request(self) -> bool:
            """Headers of a request arrived and its response is not complete."""
            cycle = getattr(self, "cycle", None)
            return cycle is not None and not cycle.response_complete

        def _upgraded(self) -> bool:
            return self.transport.get_protocol() is not self

        def _expired(self) -> None:
            self._deadline = None
            transport = self.transport
            if transport.is_closing() or self._in_request() or self._upgraded():
                return
            if self._partial:
                transport.write(_TIMEOUT)
            transport.close()

    HeaderDeadline.__name__ = HeaderDeadline.__qualname__ = f"HeaderDeadline{base.__name__}"
    return HeaderDeadline
