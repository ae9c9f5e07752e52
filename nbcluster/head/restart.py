"""Taking the cluster back after a head restart: events in, instructions out, no sockets.

:class:`Recovery` gets the snapshot the old head left (:mod:`nbcluster.head.recovery`) and the
peers that come back: a node re-registering with its workers (:meth:`Recovery.node_rejoined`),
a driver saying hello again with its leases and actors (:meth:`Recovery.client_rejoined`). It
opens a window while any of the snapshot's nodes or jobs' drivers is missing; the service holds
new lease requests and actor creations back meanwhile (:meth:`Recovery.defer`) and closes it
(:meth:`Recovery.end`) once :meth:`Recovery.over`. Like :class:`ClusterState` it returns
instructions for the service to carry out.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from nbcluster.head.actors import ActorDirectory
from nbcluster.head.instructions import (
    ActorChanged,
    ActorRequester,
    ActorUnknown,
    AttachActor,
    Instruction,
    JobEnded,
    KillWorker,
    LeaseLost,
    PublishActorTo,
)
from nbcluster.head.model import WorkerState
from nbcluster.head.placement import group_of
from nbcluster.head.recovery import Snapshot, gpu_shares, restore_actors, restore_groups
from nbcluster.head.state import ClusterState
from nbcluster.protocol.messages import ALIVE, DEAD, PENDING

log = logging.getLogger(__name__)

#: How long a restarted head waits for the nodes and drivers it knew before scheduling anew.
RECOVERY_WINDOW_S = 10.0

UNKNOWN_AFTER_RESTART = (
    "the head restarted and has no record of this actor (it was created shortly before the "
    "head stopped, after the head last saved its state); create it again"
)
NODE_NOT_BACK = "its node did not come back after the head restarted"

#: A message held back during the window: (sender identity, header, payload).
#: A message held back during the window: (sender, typed message, payload frames).
Deferred = tuple[bytes, Any, list[Any]]


@dataclass
class LeaseClaim:
    """A lease a reconnecting driver says it holds."""

    client: bytes
    job_id: str
    lease_id: str
    worker_id: str
    shape: dict[str, float]
    gpus: list[int]
    env: str = ""  # the runtime_env key of its worker
    pg: tuple[str, int] | None = None  # the placement group (id, bundle index) it ran in


@dataclass
class Window:
    """Bookkeeping of one restart, from the snapshot until the window closes."""

    snapshot: Snapshot
    started: float = field(default_factory=time.monotonic)
    waiting_nodes: set[str] = field(default_factory=set)
    claims: dict[str, LeaseClaim] = field(default_factory=dict)  # worker id -> claim
    rejoined_jobs: set[str] = field(default_factory=set)
    deferred: list[Deferred] = field(default_factory=list)
    adopted: set[str] = field(default_factory=set)  # worker ids re-registered by agents

    def __post_init__(self) -> None:
        self.waiting_nodes = set(self.snapshot.nodes)

    def over(self, now: float | None = None) -> bool:
        """Whether the window is closed: every node and every job's driver is back, or it
        timed out.

        Drivers count too: a job whose driver is not back when the window closes is ended
        (its actors killed, its workers recycled), and nodes usually reconnect a moment
        before drivers do.
        """
        now = time.monotonic() if now is None else now
        if now - self.started > RECOVERY_WINDOW_S:
            return True
        return not self.waiting_nodes and set(self.snapshot.jobs) <= self.rejoined_jobs


class Recovery:
    """Adopts what outlived the old head, and settles what did not come back.

    Peers may rejoin without a window too (a head without a state file, or one whose window
    already closed): their leases and actors are taken back as far as the head can.

    Parameters
    ----------
    state, actors
        The head's scheduling state and actor directory (they get the adopted workers, the
        claimed leases and the snapshot's actors).
    """

    def __init__(self, state: ClusterState, actors: ActorDirectory) -> None:
        self.state = state
        self.actors = actors
        self.window: Window | None = None

    @property
    def active(self) -> bool:
        """Whether the window is open (new lease requests and actor creations wait)."""
        return self.window is not None

    def start(self, snap: Snapshot, now: float | None = None) -> None:
        """Put the snapshot's actors and placement groups back and open the window."""
        restore_actors(self.actors, snap)
        restore_groups(self.state.groups, snap)
        self.window = Window(snap) if now is None else Window(snap, started=now)

    def over(self, now: float | None = None) -> bool:
        """Whether an open window should close now (see :meth:`Window.over`)."""
        return self.window is not None and self.window.over(now)

    def defer(self, message: Deferred) -> bool:
        """Hold a message back until the window closes; ``False`` when none is open."""
        if self.window is None:
            return False
        self.window.deferred.append(message)
        return True

    # ------------------------------------------------------------------------ events
    def node_rejoined(self, node_id: str, workers: list[dict[str, Any]]) -> list[Instruction]:
        """A node that outlived the old head registered again (already added to the state
        under its old id) with its running ``workers`` (``REGISTER_NODE.workers``): adopt them,
        with the actors they host and the leases drivers claimed before it was back."""
        rec = self.window
        st = self.state
        for w in workers:
            wid = w["worker_id"]
            st.adopt_worker(node_id, wid, w["addr"], w["control_addr"], int(w["pid"]))
            if rec is not None:
                rec.adopted.add(wid)
        if rec is not None:
            rec.waiting_nodes.discard(node_id)
        gpus_of = rec.snapshot.actor_gpus if rec is not None else {}
        attach: list[Instruction] = []
        changed: list[Instruction] = []
        for a in self.actors.actors.values():
            w_ = st.workers.get(a.worker_id or "")
            if w_ is None or w_.node_id != node_id or a.state != ALIVE or a.lease_id is None:
                continue
            gpus = gpu_shares(gpus_of.get(a.aid, []), a.shape)
            pg = pg_of(a.strategy)
            if st.claim_lease(
                ActorRequester(a.aid), a.job_id, a.lease_id, w_.worker_id, a.shape, gpus, pg=pg
            ):
                w_.actor_id = a.aid
                w_.detached = a.detached
                a.node_id = node_id
                attach.append(AttachActor(a, w_))
                changed.append(ActorChanged(a))
        if rec is not None:
            for wid, claim in list(rec.claims.items()):
                if wid in st.workers and self._claim(claim):
                    del rec.claims[wid]
        return attach + changed

    def client_rejoined(
        self,
        client: bytes,
        job_id: str | None,
        owns_job: bool,
        leases: list[dict[str, Any]],
        actor_ids: list[str],
        worker_id: str = "",
    ) -> list[Instruction]:
        """A driver (or worker-client) said hello again after a head restart, naming the
        ``leases`` it holds (``HELLO.leases``) and the actors it uses: take them back, and
        the placement groups it created (``worker_id``: the worker a worker-client is in)."""
        rec = self.window
        out: list[Instruction] = []
        if rec is not None and job_id:
            rec.rejoined_jobs.add(job_id)
        self.state.groups.rebind(client, job_id, owns_job, worker_id)
        for ls in leases:
            claim = LeaseClaim(
                client,
                job_id or "",
                ls["lease_id"],
                ls["worker_id"],
                {k: float(v) for k, v in dict(ls["shape"]).items()},
                list(ls.get("gpus") or ()),
                str(ls.get("env") or ""),
                pg_of({"t": "pg", **ls}) if ls.get("pg") else None,
            )
            held = self.state.leases.get(claim.lease_id)
            if held is not None and (held.worker_id, held.job_id) == (
                claim.worker_id,
                claim.job_id,
            ):
                held.requester = client  # a repeated rejoin: it is ours already
                continue
            if self._claim(claim):
                continue
            if rec is not None and claim.worker_id not in self.state.workers:
                rec.claims[claim.worker_id] = claim  # its node has not reconnected yet
            else:
                out.append(LeaseLost(client, claim.lease_id, "head restarted"))
        for aid in actor_ids:
            a = self.actors.actors.get(aid)
            if a is None:
                # Created after the old head last saved its snapshot (or its ACTOR_CREATE was
                # lost with the old head): nobody can vouch for it, and the worker it may run
                # in is recycled as unclaimed. Say so, or calls to it would wait forever.
                out.append(ActorUnknown(client, aid, UNKNOWN_AFTER_RESTART))
                continue
            a.subscribers.add(client)
            if a.job_id == job_id and owns_job:
                a.owner = client
            if a.state != PENDING or rec is None:
                out.append(PublishActorTo(client, a))
        return out

    def end(self) -> tuple[list[Instruction], list[Deferred]] | None:
        """Close the window: settle everything nobody came back for.

        Returns the instructions and the messages held back meanwhile (to be handled now, in
        order); ``None`` when no window was open.
        """
        rec, self.window = self.window, None
        if rec is None:
            return None
        st = self.state
        notices: list[Instruction] = [
            LeaseLost(c.client, c.lease_id, NODE_NOT_BACK) for c in rec.claims.values()
        ]
        ins: list[Instruction] = []
        for a in list(self.actors.actors.values()):
            w = st.workers.get(a.worker_id or "")
            held = w is not None and w.actor_id == a.aid
            if a.state == DEAD or held:
                continue
            if a.state == PENDING and a.restarts == 0 and a.worker_id is None:
                ins += self.actors.place(a)
            else:
                ins += self.actors.on_lost(a.aid, NODE_NOT_BACK)
        for job in set(rec.snapshot.jobs) - rec.rejoined_jobs:
            log.info("job %s did not reconnect after the restart: ending it", job)
            ins += self.actors.job_gone(job)
            ins += st.client_gone(b"", job, True)
            notices.append(JobEnded(job))
        for wid in rec.adopted:
            w = st.workers.get(wid)
            if w is not None and w.state is WorkerState.ADOPTED:
                ins.append(KillWorker(w.node_id, wid))  # its job is unknown: recycle it
        st.groups.restored()  # groups whose nodes did not come back are placed anew
        ins += st.schedule()
        return notices + ins, rec.deferred

    def _claim(self, c: LeaseClaim) -> bool:
        gpus = gpu_shares(c.gpus, c.shape)
        return self.state.claim_lease(
            c.client, c.job_id, c.lease_id, c.worker_id, c.shape, gpus, env=c.env, pg=c.pg
        )


def pg_of(strategy: dict[str, Any] | None) -> tuple[str, int] | None:
    """(group id, bundle index) of a placement group strategy's wire form, else ``None``."""
    pg_id = group_of(strategy)
    if pg_id is None or strategy is None:
        return None
    index = strategy.get("bundle", -1)
    return pg_id, index if isinstance(index, int) else -1
