"""Run an ASGI app with uvicorn: `serve` in the foreground the way production should, `BackgroundServer`
in a daemon thread, so the demo, the tests and the stand-in teacher have a real HTTP server on a real port
without a subprocess. Both take their uvicorn settings from `server_options` (uvloop, httptools with header and
body read timeouts, no access log), so what a test shows of one holds for the other.
"""

from __future__ import annotations

import gc
import socket
import threading
import time
from types import TracebackType
from typing import Any

import uvicorn

from kolm_pipeline.capture.timeouts import HEADER_TIMEOUT_S, READ_TIMEOUT_S, timeout_protocol


def server_options(
    log_level: str, header_timeout: float = HEADER_TIMEOUT_S, read_timeout: float = READ_TIMEOUT_S
) -> dict[str, Any]:
    """The uvicorn settings `serve`, `BackgroundServer` and `kolm serve` share. The access log stays off (a log line per
    proxied call costs a good part of what proxying the call costs) and so does forwarded-header rewriting:
    nothing here reads the client's address. `header_timeout` (seconds) bounds the time from a connection, or a
    kept-alive request's first byte, to the end of the request headers; `read_timeout` (seconds) the time a
    request body may go without a byte arriving. Either closes the connection (see `timeouts`)."""
    return {
        "log_level": log_level,
        "access_log": False,
        "loop": "uvloop",
        "http": timeout_protocol(header_timeout, read_timeout),
        "proxy_headers": False,
    }


def serve(
    app: Any,
    host: str,
    port: int,
    log_level: str = "info",
    header_timeout: float = HEADER_TIMEOUT_S,
    read_timeout: float = READ_TIMEOUT_S,
) -> None:
    """Serve `app` until interrupted, with `server_options`.

    What is alive once the app is built (modules, the app, its routes) lives as long as the process: it is
    frozen out of the garbage collector's reach, so a full collection no longer walks ~100k objects that
    cannot be garbage (each one paused the event loop for tens of ms under load)."""
    gc.collect()
    gc.freeze()
    uvicorn.run(
        app,
        host=host,
        port=port,
        timeout_graceful_shutdown=10,
        **server_options(log_level, header_timeout, read_timeout),
    )


class BackgroundServer:
    """Serve `app` on `host:port` (port 0 picks a free one) until `stop()`; `.url` has the bound port.

    The socket is bound before the thread starts, so `.url` is known at once and never races. The timeouts are
    `server_options`' (seconds); tests pass short ones.
    """

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        startup_timeout: float = 15.0,
        header_timeout: float = HEADER_TIMEOUT_S,
        read_timeout: float = READ_TIMEOUT_S,
    ) -> None:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        bound_port = self._socket.getsockname()[1]
        self.url = f"http://[{host}]:{bound_port}" if ":" in host else f"http://{host}:{bound_port}"
        config = uvicorn.Config(
            app,
            log_config=None,
            lifespan="on",
            timeout_graceful_shutdown=5,
            **server_options(log_level, header_timeout, read_timeout),
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._socket]},
            name=f"uvicorn {self.url}",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + startup_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server at {self.url} did not start")
            time.sleep(0.01)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask uvicorn to shut down (running the app's lifespan shutdown) and wait for the thread."""
        self._server.should_exit = True
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._socket.close()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
