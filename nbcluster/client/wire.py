"""Connection helpers shared by the client's submission paths."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from nbcluster.client.tasks import Lease
from nbcluster.exceptions import ConnectionFailedError
from nbcluster.refs import ObjectRef

log = logging.getLogger("nbcluster")


class WorkerConn:
    """A connection to one worker process (kept across leases of the same worker)."""

    def __init__(
        self, addr: str, control_addr: str, sock: Any, ctrl: Any, worker_id: str = ""
    ) -> None:
        self.addr = addr
        self.worker_id = worker_id  # the process behind addr: a later one may reuse its port
        self.control_addr = control_addr
        self.sock = sock
        self.ctrl = ctrl
        self.fns_sent: set[str] = set()
        self.reader: asyncio.Task[Any] | None = None
        self.lease: Lease | None = None
        self.node_id = ""  # where the worker runs (named in its output when that helps)
        self.node_name = ""

    def close(self) -> None:
        """Stop reading and close both sockets (I/O thread)."""
        if self.reader is not None:
            self.reader.cancel()
        self.sock.close(linger=0)
        self.ctrl.close(linger=0)


def send_nowait(sock: Any, frames: list[Any]) -> None:
    """Queue a message without awaiting (high-water marks are off, so sending never blocks)."""
    fut = sock.send_multipart(frames, copy=False)
    if not fut.done():
        fut.add_done_callback(log_send_error)
    elif fut.exception() is not None:
        log.debug("send failed: %s", fut.exception())


def log_send_error(fut: Any) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.debug("send failed: %s", fut.exception())


def split_parts(counts: list[int], payload: list[Any]) -> list[list[Any]]:
    """Cut a result's payload into one frame list per return value."""
    parts, pos = [], 0
    for c in counts:
        parts.append(payload[pos : pos + c])
        pos += c
    return parts


def is_ref(v: Any) -> bool:
    """Whether ``v`` is an ``ObjectRef`` (exact type: subclasses are plain values)."""
    return type(v) is ObjectRef


async def probe_listening(address: str, timeout: float = 5.0) -> None:
    """Fail at once when nothing listens at ``address`` (``host:port``).

    The ZeroMQ handshake retries a refused connection silently until its timeout; a plain TCP
    connect tells a refused (or unresolvable, unreachable) address right away. A probe that
    only times out proves nothing (a slow network): the handshake then has its own timeout.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout)
    except TimeoutError:
        return
    except ValueError:
        raise ConnectionFailedError(
            f"{address!r} is not a valid head address (expected HOST:PORT)"
        ) from None
    except ConnectionRefusedError:
        raise ConnectionFailedError(
            f"nothing is listening at {address} (connection refused): is the nbcluster head "
            "running there, on that port? (start one with `nbcluster head`)"
        ) from None
    except OSError as exc:
        raise ConnectionFailedError(
            f"cannot reach the nbcluster head at {address}: {exc}"
        ) from None
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
