"""A standalone head's Prometheus endpoint (``nbcluster head --metrics-port N``).

A minimal HTTP/1.1 server on the head's own event loop (the collector reads the head's state,
which only that loop may touch): ``GET /metrics`` (and ``GET /nbcluster/metrics``, the Jupyter
server's path) answer :func:`~nbcluster.head.export.exposition`; anything else is 404 (405 for
other methods). One request per connection.

It has **no authentication**: anyone who can reach the port reads the cluster's metrics (node
names, function and actor class names, utilisation). It binds to loopback unless told otherwise
(``--metrics-host``); see docs/security.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from nbcluster.head.export import CONTENT_TYPE, exposition

if TYPE_CHECKING:
    from nbcluster.head.observe import Observer

log = logging.getLogger(__name__)

#: The paths that answer the metrics.
METRICS_PATHS = ("/metrics", "/nbcluster/metrics")
#: A client has this long to send its request head.
REQUEST_TIMEOUT_S = 10.0
#: Most header lines read (a request head larger than this is refused).
MAX_HEADER_LINES = 100


class MetricsServer:
    """Serves ``observe``'s metrics on ``host:port`` once :meth:`start` is awaited."""

    def __init__(self, observe: Observer, host: str = "127.0.0.1", port: int = 0) -> None:
        self.observe = observe
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        """Listen; returns the URL of the metrics (the port chosen when it was 0)."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, body, ctype = await asyncio.wait_for(self._answer(reader), REQUEST_TIMEOUT_S)
        except (TimeoutError, ValueError, ConnectionError, asyncio.IncompleteReadError):
            writer.close()
            return
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        try:
            writer.write(head.encode("latin-1") + body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[str, bytes, str]:
        line = (await reader.readline()).decode("latin-1")
        for _ in range(MAX_HEADER_LINES):
            if (await reader.readline()) in (b"\r\n", b"\n", b""):
                break
        else:
            return "431 Request Header Fields Too Large", b"too many headers\n", "text/plain"
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return "400 Bad Request", b"bad request\n", "text/plain"
        method, path = parts[0], parts[1].split("?", 1)[0]
        if path not in METRICS_PATHS:
            return "404 Not Found", b"the metrics are at /metrics\n", "text/plain"
        if method != "GET":
            return "405 Method Not Allowed", b"GET only\n", "text/plain"
        return "200 OK", exposition(self.observe), CONTENT_TYPE
