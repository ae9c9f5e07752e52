"""What the nodes' object stores hold: the head asks every alive agent, on demand.

``nbcluster memory``, ``GET nbcluster/api/memory`` and ``ray.util.state.list_objects`` read it.
The head keeps no table of objects (each object is known by its owner and by the store that
holds it), so a listing is one round trip: the head sends each alive agent ``STORE_LIST``
``{rid, limit}`` and the agent answers ``STORE_LISTING`` with its ``limit`` largest objects
(``[oid, size, job, state, pins]`` each). Nothing is sent while nobody asks: agents' pings stay
as small as they were. A node that does not answer within :data:`ANSWER_TIMEOUT_S` is listed
with an ``error`` and without objects.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec

from nbcluster.protocol.messages import Kind
from nbcluster.protocol.schema import StoreListing
from nbcluster.refs import hex_id
from nbcluster.views import (
    MEMORY_LIMIT_MAX,
    MemoryBody,
    MemoryNodeView,
    MemoryObjectView,
    ObjectState,
)

if TYPE_CHECKING:
    from nbcluster.head.observe import Observer
    from nbcluster.head.peers import Peer
    from nbcluster.head.state import ClusterState

log = logging.getLogger(__name__)

#: Objects listed per node (and in all) when the caller does not say.
DEFAULT_LIMIT = 100
#: The most a caller may ask for per node: one answer stays a small message.
MAX_LIMIT = MEMORY_LIMIT_MAX
#: How long the head waits for each agent's answer.
ANSWER_TIMEOUT_S = 5.0
_STATES: frozenset[str] = frozenset({"in_memory", "spilled", "writing"})

Send = Callable[[bytes, dict[str, Any]], Awaitable[None]]


class MemoryQueries:
    """Asks the agents for their stores' contents and assembles a :class:`MemoryBody`.

    Parameters
    ----------
    state
        The head's cluster state (which nodes are alive, and their agents' identities).
    send
        Sends a header to a peer identity (the head's socket).
    """

    def __init__(self, state: ClusterState, send: Send) -> None:
        self.state = state
        self._send = send
        self._rids = itertools.count(1)
        self._pending: dict[int, tuple[str, asyncio.Future[StoreListing]]] = {}
        self._answering: set[asyncio.Task[None]] = set()

    async def collect(
        self, observe: Observer, limit: int | None = None, timeout: float = ANSWER_TIMEOUT_S
    ) -> MemoryBody:
        """Every alive node's ``limit`` largest objects, all of them largest first (at most
        ``limit`` in all), with each node's store figures.

        Raises
        ------
        ValueError
            If ``limit`` is below 1 or above :data:`MAX_LIMIT`.
        """
        limit = DEFAULT_LIMIT if limit is None else limit
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
        loop = asyncio.get_running_loop()
        asked: list[tuple[str, str, int, asyncio.Future[StoreListing]]] = []
        for node in [n for n in self.state.nodes.values() if n.alive]:
            rid = next(self._rids)
            fut: asyncio.Future[StoreListing] = loop.create_future()
            self._pending[rid] = (node.node_id, fut)
            asked.append((node.node_id, node.name, rid, fut))
            await self._send(node.client, {"k": Kind.STORE_LIST, "rid": rid, "limit": limit})
        try:
            if asked:
                await asyncio.wait([f for *_, f in asked], timeout=timeout)
        finally:
            for _, _, rid, _ in asked:
                self._pending.pop(rid, None)
        nodes: list[MemoryNodeView] = []
        objects: list[MemoryObjectView] = []
        for node_id, name, _, fut in asked:
            if not fut.done():
                nodes.append(_node(node_id, name, {}, 0, 0, f"no answer within {timeout:g} s"))
                continue
            listing = fut.result()
            mine = [o for o in (_object(r, node_id, name, observe) for r in listing.objects) if o]
            objects.extend(mine)
            nodes.append(_node(node_id, name, listing.stats, listing.total, len(mine)))
        objects.sort(key=lambda o: o.size, reverse=True)
        return MemoryBody(nodes=nodes, objects=objects[:limit], limit=limit)

    async def on_listing(self, peer: Peer, msg: StoreListing, payload: list[Any]) -> None:
        """An agent's ``STORE_LISTING`` (a late or unknown one is dropped)."""
        pending = self._pending.get(msg.rid)
        if pending is None or pending[0] != peer.node_id or pending[1].done():
            return
        pending[1].set_result(msg)

    def answer(self, ident: bytes, rid: int, observe: Observer, limit: int | None) -> None:
        """Answer a driver's ``QUERY {what: "memory"}`` once the agents have (in a task of its
        own: the head's loop must go on receiving their answers meanwhile)."""

        async def reply() -> None:
            try:
                result: Any = msgspec.to_builtins(await self.collect(observe, limit))
                await self._send(ident, {"k": Kind.QUERY_REPLY, "rid": rid, "result": result})
            except ValueError as exc:
                await self._send(ident, {"k": Kind.ERROR, "rid": rid, "msg": str(exc)})

        t = asyncio.create_task(reply(), name="head-memory-query")
        self._answering.add(t)
        t.add_done_callback(self._answering.discard)


def _node(
    node_id: str,
    name: str,
    stats: dict[str, Any],
    total: int,
    listed: int,
    error: str | None = None,
) -> MemoryNodeView:
    def figure(key: str) -> int:
        v = stats.get(key, 0)
        return int(v) if isinstance(v, int | float) else 0

    return MemoryNodeView(
        node_id=node_id,
        name=name,
        capacity=figure("capacity"),
        used=figure("used"),
        spilled=figure("spilled"),
        objects=total,
        listed=listed,
        error=error,
    )


def _object(row: list[Any], node_id: str, name: str, observe: Observer) -> MemoryObjectView | None:
    """One row of a ``STORE_LISTING``; ``None`` (and a warning) for a malformed one."""
    try:
        oid, size, job, state, pins = row
        if state not in _STATES:
            raise ValueError(f"unknown state {state!r}")
        st: ObjectState = state
        return MemoryObjectView(
            object_id=hex_id(str(oid)),
            size=int(size),
            node_id=node_id,
            node_name=name,
            state=st,
            pins=int(pins),
            owner=observe.owner(str(job)),
        )
    except (TypeError, ValueError, UnicodeEncodeError) as exc:
        log.warning("node %s listed a malformed object %r: %s", node_id, row, exc)
        return None
