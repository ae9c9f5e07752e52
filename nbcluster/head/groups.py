"""The head service's placement group requests: create, remove, and removal with a job.

A mixin of :class:`~nbcluster.head.service.HeadService`; the decisions are
:class:`~nbcluster.head.placement.PlacementGroups`' (through the service's
:class:`~nbcluster.head.state.ClusterState`), the actors of a removed group are killed by the
:class:`~nbcluster.head.actors.ActorDirectory`, as Ray kills them.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from nbcluster.head.placement import CREATED, REMOVED
from nbcluster.protocol import schema as m
from nbcluster.protocol.messages import Kind

if TYPE_CHECKING:
    from nbcluster.head.actors import ActorDirectory
    from nbcluster.head.instructions import Instruction
    from nbcluster.head.peers import Peer
    from nbcluster.head.state import ClusterState


class GroupRequests:
    """Handlers of ``PG_CREATE``/``PG_REMOVE``/``PG_WAIT`` (all answered ``QUERY_REPLY``)."""

    state: ClusterState
    actors: ActorDirectory
    _dirty: bool  # the service's: save the restart snapshot soon

    def __init__(self) -> None:
        # Group id -> the PG_WAITs not answered yet: (client, rid) -> the timer of its limit.
        self._pg_waiters: dict[str, dict[tuple[bytes, int], asyncio.TimerHandle | None]] = {}

    async def _send(self, ident: bytes, header: dict[str, Any]) -> None:
        raise NotImplementedError

    async def _run(self, instructions: list[Instruction]) -> None:
        raise NotImplementedError

    async def _on_pg_create(self, peer: Peer, msg: m.PgCreate, payload: list[Any]) -> None:
        assert peer.job_id is not None
        error, ins = self.state.create_group(
            peer.ident,
            peer.job_id,
            msg.pg_id,
            bundles=msgspec_list(msg.bundles),
            strategy=msg.strategy,
            name=msg.name,
            namespace=msg.ns,
            detached=msg.detached,
            creator_worker=peer.worker_id or "",
        )
        self._dirty = True  # the restart snapshot holds the groups
        reply = {"k": Kind.QUERY_REPLY, "rid": msg.rid, "result": {"error": error}}
        await self._send(peer.ident, reply)
        await self._run(ins)

    async def _on_pg_remove(self, peer: Peer, msg: m.PgRemove, payload: list[Any]) -> None:
        found = await self.remove_group(msg.pg_id, "removed by remove_placement_group()")
        reply = {"k": Kind.QUERY_REPLY, "rid": msg.rid, "result": {"removed": found}}
        await self._send(peer.ident, reply)

    async def _on_pg_wait(self, peer: Peer, msg: m.PgWait, payload: list[Any]) -> None:
        g = self.state.groups.groups.get(msg.pg_id)
        if g is None or g.state in (CREATED, REMOVED):
            await self._answer_wait(peer.ident, msg.rid, msg.pg_id)
            return
        key = (peer.ident, msg.rid)
        timer = None
        if msg.timeout is not None:
            loop = asyncio.get_running_loop()
            timer = loop.call_later(
                msg.timeout, lambda: asyncio.ensure_future(self._wait_over(msg.pg_id, key))
            )
        self._pg_waiters.setdefault(msg.pg_id, {})[key] = timer

    async def _wait_over(self, pg_id: str, key: tuple[bytes, int]) -> None:
        """A PG_WAIT's time is up: not placed (yet)."""
        waiters = self._pg_waiters.get(pg_id)
        if waiters is None or key not in waiters:
            return  # answered meanwhile
        del waiters[key]
        if not waiters:
            del self._pg_waiters[pg_id]
        reply = {"k": Kind.QUERY_REPLY, "rid": key[1], "result": {"ready": False}}
        await self._send(key[0], reply)

    async def group_placed(self, pg_id: str) -> None:
        """Answer the PG_WAITs of a group that was placed (or removed)."""
        self._dirty = True  # where its bundles are is in the restart snapshot
        for (client, rid), timer in self._pg_waiters.pop(pg_id, {}).items():
            if timer is not None:
                timer.cancel()
            await self._answer_wait(client, rid, pg_id)

    async def _answer_wait(self, client: bytes, rid: int, pg_id: str) -> None:
        g = self.state.groups.groups.get(pg_id)
        if g is None:
            result: dict[str, Any] = {
                "error": f"placement group {pg_id} does not exist (it was never created here, "
                "or the head restarted since)"
            }
        elif g.state == REMOVED:
            result = {"error": f"placement group {g.name or pg_id} was {g.removal_reason}"}
        else:
            result = {"ready": g.state == CREATED}
        await self._send(client, {"k": Kind.QUERY_REPLY, "rid": rid, "result": result})

    async def remove_group(self, pg_id: str, reason: str) -> bool:
        """Remove a group: its actors die, its tasks' workers are killed, its bundles freed.

        ``False`` when there is no such group.
        """
        if pg_id not in self.state.groups.groups:
            return False
        why = f"its placement group {pg_id} was {reason}"
        ins: list[Instruction] = []
        for aid in self.state.groups.actors_in(pg_id, list(self.state.pending)):
            ins += self.actors.kill(aid, True, why)
        ins += self.state.remove_group(pg_id, reason) or []
        await self._run(ins)
        await self.group_placed(pg_id)  # its waiters learn it was removed
        return True

    async def creator_gone(self, client: bytes, job_id: str | None) -> None:
        """A client left: the groups it created die with it unless detached, as in Ray (a
        driver's, and with ``job_id`` (a driver's job ended) every group of the job; a worker's:
        the groups its tasks or actor created)."""
        for pg_id in self.state.groups.of_creator(client, job_id):
            await self.remove_group(pg_id, "removed with its creator (driver, task or actor)")


def msgspec_list(bundles: list[dict[str, int | float]]) -> list[dict[str, float]]:
    """Bundles as plain dicts of floats (the wire keeps an int amount an int)."""
    return [{str(k): float(v) for k, v in b.items()} for b in bundles]
