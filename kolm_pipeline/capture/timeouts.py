"""Header and body read timeouts for uvicorn's httptools protocol.

uvicorn (0.54) closes a connection left idle between requests (`timeout_keep_alive`) but has no timeout of its
own for a request in progress: a client that never finishes its headers (slowloris) or stops sending its body
holds its connection, and its memory, forever.

One timer per connection checks a deadline that the parser callbacks move: set when the connection opens (or a
kept-alive request's first byte arrives) to the header timeout, on the end of the headers and on each piece of
body to the read timeout, and cleared once the request is read. The request path itself only reads the clock:
arming and cancelling a uvloop timer costs ~2.4 µs, twice a request would be a measurable share of a proxied call.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEADER_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0
REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class TimeoutHttpToolsProtocol(HttpToolsProtocol):
    """`header_timeout`: seconds from the connection, or from a kept-alive request's first byte, to the end of its
    headers (a total: trickling header lines does not extend it). `read_timeout`: seconds a request body may go
    without a byte arriving (an idle limit, not a total one). Time the server is not reading (flow control, an
    `Expect: 100-continue` the app has not answered) never counts against the client; neither does the time
    the app takes to answer."""

    header_timeout: float = HEADER_TIMEOUT_S
    read_timeout: float = READ_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline = math.inf  # when the wait on the client must end; inf while not waiting on it
        self._in_body = False
        self._server_waited = False  # the server was not reading this body at some look
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline = self.loop.time() + self.header_timeout
        self._timer = self.loop.call_later(self.header_timeout, self._check)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self) -> None:
        self._stop()  # the connection is the WebSocket protocol's from here on
        super().handle_websocket_upgrade()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline == math.inf:  # a kept-alive request; the first one's clock started with the connection
            self._deadline = self.loop.time() + self.header_timeout

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._in_body = True
        self._deadline = self.loop.time() + self.read_timeout

    def on_body(self, body: bytes) -> None:
        self._deadline = self.loop.time() + self.read_timeout
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_body = self._server_waited = False
        self._deadline = math.inf
        super().on_message_complete()

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        """Close the connection past its deadline; otherwise look again at the deadline, or within the shorter
        timeout while there is none (a deadline set meanwhile is never later than that)."""
        self._timer = None
        if self.transport.is_closing():
            return
        now = self.loop.time()
        if self._in_body and (self.flow.read_paused or self.cycle.waiting_for_100_continue):
            self._deadline = now + self.read_timeout  # the server is not reading: not the client's stall
            self._server_waited = True
        elif now >= self._deadline and self._server_waited:
            self._deadline = now + self.read_timeout  # it read again since the last look: a full wait from now
            self._server_waited = False
        if now < self._deadline:
            wait = min(self._deadline - now, self.header_timeout, self.read_timeout)
            self._timer = self.loop.call_later(wait, self._check)
            return
        # A 408 only where nothing else is written: not mid-body (the app may be about to answer; it sees the
        # client disconnect, as for any client that left), not while an earlier response is under way.
        if not self._in_body and (self.cycle is None or self.cycle.response_complete):
            self.transport.write(REQUEST_TIMEOUT)
        self.transport.close()


def timeout_protocol(
    header_timeout: float = HEADER_TIMEOUT_S, read_timeout: float = READ_TIMEOUT_S
) -> type[TimeoutHttpToolsProtocol]:
    """The protocol class to pass as uvicorn's `http=`, with these timeouts (seconds)."""
    if header_timeout <= 0 or read_timeout <= 0:
        raise ValueError(f"timeouts must be positive, got header {header_timeout}, read {read_timeout}")
    return type(
        "TimeoutHttpToolsProtocol",
        (TimeoutHttpToolsProtocol,),
        {"header_timeout": header_timeout, "read_timeout": read_timeout},
    )
