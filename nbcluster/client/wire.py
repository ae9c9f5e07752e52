"""Wire helpers of the client: non-blocking sends, splitting result frames, probing the head."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from nbcluster.exceptions import ConnectionFailedError
from nbcluster.refs import ObjectRef

log = logging.getLogger("nbcluster")


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
