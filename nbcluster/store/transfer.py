"""Moving stored objects between nodes: an agent pulls a segment from the agent that holds it.

Objects travel from node agent to node agent, never through the head. Concurrent readers of one
object on a node wait for the same pull, so it crosses the network once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import zmq

from nbcluster.exceptions import ObjectLostError
from nbcluster.protocol.codec import decode, encode
from nbcluster.protocol.messages import Kind
from nbcluster.store.manager import StoreManager

log = logging.getLogger(__name__)

PULL_TIMEOUT_S = 300.0


class ObjectPuller:
    """Fetches segments from other agents' store sockets into this node's store."""

    def __init__(self, transport: Any, manager: StoreManager) -> None:
        self._transport = transport
        self._manager = manager
        self._socks: dict[str, Any] = {}
        self._replies: dict[int, asyncio.Future[tuple[dict[str, Any], list[Any]]]] = {}
        self._inflight: dict[str, asyncio.Future[None]] = {}
        self._rid = itertools.count(1)
        self._readers: list[asyncio.Task[Any]] = []

    async def pull(self, oid: str, addr: str) -> None:
        """Make ``oid`` (held by the agent at ``addr``) a sealed object of this node's store."""
        if self._manager.contains(oid):
            return
        waiting = self._inflight.get(oid)
        if waiting is not None:
            await asyncio.shield(waiting)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inflight[oid] = fut
        try:
            await self._fetch(oid, addr)
            fut.set_result(None)
        except BaseException as exc:
            fut.set_exception(exc)
            raise
        finally:
            del self._inflight[oid]
            if not fut.done():
                fut.cancel()
            elif fut.exception() is not None:
                fut.exception()  # retrieved: waiters got it already

    async def _fetch(self, oid: str, addr: str) -> None:
        sock = self._socks.get(addr)
        if sock is None:
            sock = self._socks[addr] = self._transport.client(zmq.DEALER, addr)
            self._readers.append(asyncio.create_task(self._read(sock)))
        rid = next(self._rid)
        reply_fut = asyncio.get_running_loop().create_future()
        self._replies[rid] = reply_fut
        await sock.send_multipart(encode({"k": Kind.STORE_READ, "rid": rid, "oid": oid}))
        try:
            h, payload = await asyncio.wait_for(reply_fut, PULL_TIMEOUT_S)
        finally:
            self._replies.pop(rid, None)
        if not h.get("ok") or not payload:
            raise ObjectLostError(
                f"object {oid} could not be fetched from the node that holds it ({addr}): "
                f"{h.get('msg', 'it is gone')}"
            )
        data = payload[0]
        m = self._manager
        loop = asyncio.get_running_loop()
        path = await loop.run_in_executor(None, m.reserve, oid, len(data))
        try:
            await loop.run_in_executor(None, _write, path, data)
        except BaseException:
            m.free(oid)
            raise
        m.seal(oid)

    async def _read(self, sock: Any) -> None:
        while True:
            frames = await sock.recv_multipart(copy=False)
            h, payload = decode(frames)
            fut = self._replies.get(h.get("rid", -1))
            if fut is not None and not fut.done():
                fut.set_result((h, payload))

    def close(self) -> None:
        for t in self._readers:
            t.cancel()
        for sock in self._socks.values():
            sock.close(linger=0)
        self._socks.clear()


def _write(path: str, data: Any) -> None:
    import os

    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        done = 0
        while done < view.nbytes:
            done += os.write(fd, view[done:])
    finally:
        os.close(fd)


def read_segment_file(path: str) -> bytes:
    """The bytes of a segment file (what another node copies into its own store)."""
    with open(path, "rb") as f:
        return f.read()
