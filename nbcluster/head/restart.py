"""The head's side of a restart: the snapshot it keeps, and taking peers back after it.

A mixin of :class:`~nbcluster.head.service.HeadService`; the snapshot format and the window's
bookkeeping are in :mod:`nbcluster.head.recovery`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import zmq

from nbcluster.head.actors import ALIVE, DEAD, PENDING, ActorDirectory, ActorInfo, actor_client
from nbcluster.head.recovery import (
    LeaseClaim,
    Recovery,
    gpu_shares,
    save_snapshot,
    take_snapshot,
)
from nbcluster.head.state import ClusterState, Instruction, WorkerInfo
from nbcluster.protocol.codec import encode
from nbcluster.protocol.messages import Kind
from nbcluster.transport import Transport

if TYPE_CHECKING:
    from nbcluster.head.service import Peer

log = logging.getLogger(__name__)

UNKNOWN_AFTER_RESTART = (
    "the head restarted and has no record of this actor (it was created shortly before the "
    "head stopped, after the head last saved its state); create it again"
)


class RestartMixin:
    """Snapshot writing, node and client adoption, and the end of the recovery window."""

    if TYPE_CHECKING:
        state: ClusterState
        actors: ActorDirectory
        peers: dict[bytes, Peer]
        head_id: str
        state_file: str | None
        _recovery: Recovery | None
        _dead_nodes: set[str]
        _dirty: bool
        _transport: Transport | None
        _worker_socks: dict[str, Any]
        _tasks: list[asyncio.Task[Any]]

        async def _send(
            self, ident: bytes, header: dict[str, Any], payload: list[Any] | None = None
        ) -> None: ...
        async def _run(self, instructions: list[Instruction]) -> None: ...
        async def _handle(self, ident: bytes, h: dict[str, Any], payload: list[Any]) -> None: ...
        async def _publish_to(self, a: ActorInfo, ident: bytes) -> None: ...
        async def _read_worker(self, sock: Any, aid: str) -> None: ...

    async def _attach_actor(self, a: ActorInfo, w: WorkerInfo) -> None:
        """Reconnect to an actor's worker after a restart, so that its notices reach us."""
        assert self._transport is not None
        sock = self._transport.client(zmq.DEALER, w.address)
        self._worker_socks[w.worker_id] = sock
        self._tasks.append(asyncio.create_task(self._read_worker(sock, a.aid)))
        await sock.send_multipart(encode({"k": Kind.ACTOR_ATTACH, "aid": a.aid}))

    async def _persist_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            if self._dirty and self._recovery is None:
                self._save()

    def _save(self) -> None:
        """Write the restart snapshot (see :mod:`nbcluster.head.recovery`)."""
        if not self.state_file:
            return
        self._dirty = False
        jobs = [p.job_id for p in self.peers.values() if p.owns_job and p.job_id]
        try:
            snap = take_snapshot(self.head_id, self.actors, jobs, sorted(self._dead_nodes))
            save_snapshot(self.state_file, snap)
        except OSError as exc:
            log.warning("could not write the head's restart snapshot %s: %s", self.state_file, exc)

    async def _adopt_node(self, node_id: str, workers: list[dict[str, Any]]) -> list[Instruction]:
        """Take over the workers (and the actors in them) of a node that outlived the old head."""
        rec = self._recovery
        st = self.state
        for w in workers:
            st.adopt_worker(
                node_id, w["worker_id"], w["addr"], w["control_addr"], int(w["pid"]), "@adopted"
            )
            if rec is not None:
                rec.adopted.add(w["worker_id"])
        if rec is not None:
            rec.waiting_nodes.discard(node_id)
        gpus_of = rec.snapshot.actor_gpus if rec is not None else {}
        out: list[Instruction] = []
        for a in self.actors.actors.values():
            w_ = st.workers.get(a.worker_id or "")
            if w_ is None or w_.node_id != node_id or a.state != ALIVE or a.lease_id is None:
                continue
            gpus = gpu_shares(gpus_of.get(a.aid, []), a.shape)
            if st.claim_lease(
                actor_client(a.aid), a.job_id, a.lease_id, w_.worker_id, a.shape, gpus
            ):
                w_.actor_id = a.aid
                w_.detached = a.detached
                a.node_id = node_id
                out.append(("actor_state", a))
                await self._attach_actor(a, w_)
        if rec is not None:
            for wid, claim in list(rec.claims.items()):
                if wid in st.workers and self._claim(claim):
                    del rec.claims[wid]
        return out

    def _claim(self, c: LeaseClaim) -> bool:
        gpus = gpu_shares(c.gpus, c.shape)
        return self.state.claim_lease(c.client, c.job_id, c.lease_id, c.worker_id, c.shape, gpus)

    async def _rejoin_client(self, peer: Peer, h: dict[str, Any]) -> None:
        """A driver (or worker-client) is back after a head restart: take back what it holds."""
        rec = self._recovery
        if rec is not None and peer.job_id:
            rec.rejoined_jobs.add(peer.job_id)
        for ls in h.get("leases") or ():
            claim = LeaseClaim(
                peer.ident,
                peer.job_id or "",
                ls["lease_id"],
                ls["worker_id"],
                {k: float(v) for k, v in dict(ls["shape"]).items()},
                list(ls.get("gpus") or ()),
            )
            held = self.state.leases.get(claim.lease_id)
            if held is not None and (held.worker_id, held.job_id) == (
                claim.worker_id,
                claim.job_id,
            ):
                held.client = peer.ident  # a repeated rejoin: it is ours already
                continue
            if self._claim(claim):
                continue
            if rec is not None and claim.worker_id not in self.state.workers:
                rec.claims[claim.worker_id] = claim  # its node has not reconnected yet
            else:
                await self._send(
                    peer.ident,
                    {"k": Kind.LEASE_LOST, "lease_id": claim.lease_id, "reason": "head restarted"},
                )
        for aid in h.get("actors") or ():
            a = self.actors.actors.get(aid)
            if a is None:
                # Created after the old head last saved its snapshot (or its ACTOR_CREATE was
                # lost with the old head): nobody can vouch for it, and the worker it may run
                # in is recycled as unclaimed. Say so, or calls to it would wait forever.
                await self._send(
                    peer.ident,
                    {
                        "k": Kind.ACTOR_STATE,
                        "aid": aid,
                        "state": DEAD,
                        "reason": UNKNOWN_AFTER_RESTART,
                    },
                )
                continue
            a.subscribers.add(peer.ident)
            if a.job_id == peer.job_id and peer.owns_job:
                a.owner = peer.ident
            if a.state != PENDING or rec is None:
                await self._publish_to(a, peer.ident)

    async def _end_recovery(self) -> None:
        """Close the restart window: settle everything nobody came back for."""
        rec, self._recovery = self._recovery, None
        if rec is None:
            return
        st = self.state
        for claim in rec.claims.values():
            await self._send(
                claim.client,
                {
                    "k": Kind.LEASE_LOST,
                    "lease_id": claim.lease_id,
                    "reason": "its node did not come back after the head restarted",
                },
            )
        ins: list[Instruction] = []
        for a in list(self.actors.actors.values()):
            w = st.workers.get(a.worker_id or "")
            held = w is not None and w.actor_id == a.aid
            if a.state == DEAD or held:
                continue
            if a.state == PENDING and a.restarts == 0 and a.worker_id is None:
                ins += self.actors.place(a)
            else:
                ins += self.actors.on_lost(
                    a.aid, "its node did not come back after the head restarted"
                )
        for job in set(rec.snapshot.jobs) - rec.rejoined_jobs:
            log.info("job %s did not reconnect after the restart: ending it", job)
            ins += self.actors.job_gone(job)
            ins += st.client_gone(b"", job, True)
            for node in st.nodes.values():
                if node.alive:
                    await self._send(node.client, {"k": Kind.JOB_ENDED, "job_id": job})
        for wid in rec.adopted:
            w = st.workers.get(wid)
            if w is not None and w.lease_id is None and w.job_id == "@adopted":
                ins.append(("kill_worker", w.node_id, wid))  # its job is unknown: recycle it
        await self._run(ins)
        self._dirty = True
        log.warning(
            "restart complete: %d node(s), %d actor(s)", len(st.nodes), len(self.actors.actors)
        )
        for ident, h, payload in rec.deferred:
            await self._handle(ident, h, payload)
