"""Pure scheduling state of the head: events in, instructions out, no sockets.

The head service feeds events (a node registered, a worker became ready, a client asked for a
lease, ...) into :class:`ClusterState`; each call returns the instructions the service must carry
out (grant a lease, start a worker, ...). Keeping this free of I/O makes it unit-testable and lets
:meth:`ClusterState.validate_state` check its invariants after any sequence of events.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

EPS = 1e-9


@dataclass
class WorkerInfo:
    """A worker process known to the head."""

    worker_id: str
    node_id: str
    address: str
    control_address: str
    pid: int
    job_id: str | None = None  # a worker serves one job for its whole life
    lease_id: str | None = None
    blocked: bool = False
    # GPU ids of its first GPU lease: CUDA reads CUDA_VISIBLE_DEVICES once per process, so a
    # worker only ever gets leases for those same GPUs afterwards.
    gpus: tuple[int, ...] | None = None
    actor_id: str | None = None  # hosts this actor for its whole life
    detached: bool = False  # hosts a detached actor: outlives its job's driver


@dataclass
class NodeInfo:
    """A node (one agent) and its resources."""

    node_id: str
    name: str
    address: str
    client: bytes  # the agent's identity on the head socket
    total: dict[str, float]
    available: dict[str, float]
    gpus: dict[int, float]  # GPU id -> free fraction
    pid: int = 0
    alive: bool = True
    starting: int = 0  # workers asked for and not ready yet
    prestart: int = 0
    workers: dict[str, WorkerInfo] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class LeaseRequest:
    """A client's wish for a worker holding ``shape``."""

    rid: int
    client: bytes
    job_id: str
    shape: dict[str, float]
    name: str
    infeasible_reported: bool = False


@dataclass
class Lease:
    """A worker leased to a client together with the resources it holds."""

    lease_id: str
    client: bytes
    job_id: str
    worker_id: str
    node_id: str
    shape: dict[str, float]
    gpus: dict[int, float]


# Instructions: (verb, *arguments). The service interprets them.
Instruction = tuple[Any, ...]


class ClusterState:
    """Nodes, workers, leases and pending lease requests."""

    def __init__(self) -> None:
        self.nodes: dict[str, NodeInfo] = {}
        self.workers: dict[str, WorkerInfo] = {}
        self.leases: dict[str, Lease] = {}
        self.pending: deque[LeaseRequest] = deque()
        self._ids = itertools.count(1)

    # ----------------------------------------------------------------------------- nodes
    def add_node(
        self,
        client: bytes,
        name: str,
        address: str,
        resources: dict[str, float],
        gpu_ids: list[int],
        pid: int = 0,
        prestart: int = 0,
        info: dict[str, Any] | None = None,
    ) -> tuple[str, list[Instruction]]:
        """Register a node; returns its id and instructions (prestarting workers)."""
        node_id = f"node-{next(self._ids)}"
        total = {k: float(v) for k, v in resources.items() if v > 0}
        node = NodeInfo(
            node_id=node_id,
            name=name,
            address=address,
            client=client,
            total=total,
            available=dict(total),
            gpus={g: 1.0 for g in gpu_ids},
            pid=pid,
            prestart=prestart,
            info=info or {},
        )
        self.nodes[node_id] = node
        out: list[Instruction] = []
        for _ in range(prestart):
            node.starting += 1
            out.append(("start_worker", node_id))
        # A new node may make waiting requests feasible.
        for req in self.pending:
            req.infeasible_reported = False
        out += self.schedule()
        return node_id, out

    def remove_node(self, node_id: str, reason: str) -> list[Instruction]:
        """A node left or died: its workers and leases are gone."""
        node = self.nodes.get(node_id)
        if node is None or not node.alive:
            return []
        node.alive = False
        out: list[Instruction] = []
        for wid in list(node.workers):
            out += self.worker_died(wid, reason)
        node.starting = 0
        out += self.schedule()
        return out

    # ----------------------------------------------------------------------------- workers
    def worker_ready(
        self, node_id: str, worker_id: str, address: str, control_address: str, pid: int
    ) -> list[Instruction]:
        """An agent reports a started worker; it joins the idle pool."""
        node = self.nodes.get(node_id)
        if node is None or not node.alive:
            return [("kill_worker", node_id, worker_id)]
        node.starting = max(0, node.starting - 1)
        w = WorkerInfo(worker_id, node_id, address, control_address, pid)
        node.workers[worker_id] = w
        self.workers[worker_id] = w
        return self.schedule()

    def worker_start_failed(self, node_id: str) -> list[Instruction]:
        node = self.nodes.get(node_id)
        if node is not None:
            node.starting = max(0, node.starting - 1)
        return []

    def worker_died(self, worker_id: str, reason: str) -> list[Instruction]:
        """A worker process exited; its lease (if any) is lost and its resources freed."""
        w = self.workers.pop(worker_id, None)
        if w is None:
            return []
        node = self.nodes.get(w.node_id)
        if node is not None:
            node.workers.pop(worker_id, None)
        out: list[Instruction] = []
        if w.lease_id is not None:
            lease = self.leases.get(w.lease_id)
            if lease is not None:
                self._release(lease)
                out.append(("lease_lost", lease.client, lease.lease_id, reason))
        out += self.schedule()
        if node is not None and node.alive:
            out += self._refill(node)
        return out

    def _refill(self, node: NodeInfo) -> list[Instruction]:
        """Keep ``prestart`` fresh workers ready, so that the next job starts without waiting."""
        fresh = sum(1 for w in node.workers.values() if w.job_id is None)
        out: list[Instruction] = []
        while fresh + node.starting < node.prestart:
            node.starting += 1
            out.append(("start_worker", node.node_id))
        return out

    def worker_blocked(self, worker_id: str, blocked: bool) -> list[Instruction]:
        """A leased worker waits in ``get`` (or stopped waiting): lend (or take back) its CPUs.

        Lending the CPUs of blocked workers is what keeps tasks that wait on their own subtasks
        from deadlocking a full node.
        """
        w = self.workers.get(worker_id)
        if w is None or w.lease_id is None or w.blocked == blocked:
            return []
        lease = self.leases[w.lease_id]
        node = self.nodes[w.node_id]
        cpus = lease.shape.get("CPU", 0.0)
        w.blocked = blocked
        if cpus > 0:
            node.available["CPU"] = node.available.get("CPU", 0.0) + (cpus if blocked else -cpus)
        return self.schedule() if blocked else []

    # ----------------------------------------------------------------------------- leases
    def request_lease(
        self, client: bytes, job_id: str, rid: int, shape: dict[str, float], name: str
    ) -> list[Instruction]:
        """Queue a lease request and try to place it."""
        self.pending.append(LeaseRequest(rid, client, job_id, dict(shape), name))
        return self.schedule()

    def cancel_request(self, client: bytes, rid: int) -> list[Instruction]:
        self.pending = deque(r for r in self.pending if not (r.client == client and r.rid == rid))
        return []

    def return_lease(self, client: bytes, lease_id: str) -> list[Instruction]:
        """The client is done with a lease: free its resources, its worker becomes idle."""
        lease = self.leases.get(lease_id)
        if lease is None or lease.client != client:
            return []
        self._release(lease)
        return self.schedule()

    def client_gone(self, client: bytes, job_id: str | None, owns_job: bool) -> list[Instruction]:
        """A client disconnected: drop its requests and leases.

        When it was the driver of ``job_id``, every worker of that job is stopped too (a job's
        workers run its code and must not outlive it).
        """
        self.pending = deque(r for r in self.pending if r.client != client)
        out: list[Instruction] = []
        for lease in [ls for ls in self.leases.values() if ls.client == client]:
            self._release(lease)
            w = self.workers.get(lease.worker_id)
            if w is not None and not owns_job:
                # The worker may still run a task for the gone client: recycle it.
                out.append(("kill_worker", w.node_id, w.worker_id))
        if owns_job and job_id is not None:
            for w in [w for w in self.workers.values() if w.job_id == job_id and not w.detached]:
                out.append(("kill_worker", w.node_id, w.worker_id))
        return out + self.schedule()

    def resize_lease(self, lease_id: str, shape: dict[str, float]) -> list[Instruction]:
        """Change what a lease holds (an actor keeps less once placed); frees the difference."""
        lease = self.leases.get(lease_id)
        if lease is None:
            return []
        node = self.nodes[lease.node_id]
        w = self.workers.get(lease.worker_id)
        blocked = w.blocked if w is not None else False
        for k in set(lease.shape) | set(shape):
            if k == "GPU":
                continue  # GPU assignments do not change
            if k == "CPU" and blocked:
                continue
            delta = lease.shape.get(k, 0.0) - shape.get(k, 0.0)
            node.available[k] = node.available.get(k, 0.0) + delta
        gpu = lease.shape.get("GPU")
        lease.shape = {k: v for k, v in shape.items() if k != "GPU"}
        if gpu:
            lease.shape["GPU"] = gpu
        return self.schedule()

    def _release(self, lease: Lease) -> None:
        self.leases.pop(lease.lease_id, None)
        node = self.nodes.get(lease.node_id)
        w = self.workers.get(lease.worker_id)
        blocked = w.blocked if w is not None else False
        if w is not None:
            w.lease_id = None
            w.blocked = False
            if w.actor_id is not None:
                w.job_id = "@dead-actor"  # never reused for tasks; the service kills it
        if node is None:
            return
        for k, v in lease.shape.items():
            if k == "CPU" and blocked:
                continue  # already lent back while blocked
            node.available[k] = node.available.get(k, 0.0) + v
        for g, frac in lease.gpus.items():
            node.gpus[g] = min(1.0, node.gpus.get(g, 0.0) + frac)

    # ----------------------------------------------------------------------------- placement
    def missing_resources(self, shape: dict[str, float]) -> dict[str, float] | None:
        """What no alive node has in total for ``shape`` (``None`` if some node could fit it)."""
        best: dict[str, float] | None = None
        for node in self.nodes.values():
            if not node.alive:
                continue
            missing = {k: v for k, v in shape.items() if node.total.get(k, 0.0) + EPS < v}
            if not missing:
                return None
            if best is None or len(missing) < len(best):
                best = missing
        return best if best is not None else dict(shape)

    def _fits(self, node: NodeInfo, shape: dict[str, float]) -> dict[int, float] | None:
        """GPU assignment if ``shape`` fits the node's free resources now, else ``None``."""
        for k, v in shape.items():
            if node.available.get(k, 0.0) + EPS < v:
                return None
        need = shape.get("GPU", 0.0)
        if need <= EPS:
            return {}
        if need < 1.0:
            # Fractional: share the fullest GPU that still has room (packs small requests).
            cands = [g for g, free in node.gpus.items() if free + EPS >= need]
            if not cands:
                return None
            g = min(cands, key=lambda g: (node.gpus[g], g))
            return {g: need}
        whole = [g for g, free in sorted(node.gpus.items()) if free >= 1.0 - EPS]
        if len(whole) < int(need):
            return None
        return {g: 1.0 for g in whole[: int(need)]}

    def _idle_worker(
        self, node: NodeInfo, job_id: str, gpus: dict[int, float]
    ) -> WorkerInfo | None:
        want = tuple(sorted(gpus))
        best: WorkerInfo | None = None
        best_rank = 99
        for w in node.workers.values():
            if w.lease_id is not None or w.job_id not in (None, job_id):
                continue
            if want and w.gpus is not None and w.gpus != want:
                continue  # pinned to other GPUs
            # Prefer this job's workers, then ones already pinned to these GPUs.
            rank = (0 if w.job_id == job_id else 2) + (0 if (w.gpus == want or not want) else 1)
            if rank < best_rank:
                best, best_rank = w, rank
        return best

    def schedule(self) -> list[Instruction]:
        """Place pending requests, first come first served; returns instructions."""
        out: list[Instruction] = []
        still: deque[LeaseRequest] = deque()
        want_start: dict[str, int] = {}
        for req in self.pending:
            placed = False
            feasible_now = False
            for node in self._candidate_nodes(req):
                gpus = self._fits(node, req.shape)
                if gpus is None:
                    continue
                feasible_now = True
                w = self._idle_worker(node, req.job_id, gpus)
                if w is None:
                    want_start[node.node_id] = want_start.get(node.node_id, 0) + 1
                    break
                out.append(self._grant(req, node, w, gpus))
                placed = True
                break
            if placed:
                continue
            still.append(req)
            if not feasible_now and not req.infeasible_reported:
                missing = self.missing_resources(req.shape)
                if missing is not None:
                    req.infeasible_reported = True
                    out.append(("infeasible", req.client, req.rid, missing, req.shape))
        self.pending = still
        for node_id, n in want_start.items():
            node = self.nodes[node_id]
            extra = n - node.starting
            for _ in range(max(0, extra)):
                node.starting += 1
                out.append(("start_worker", node_id))
        return out

    def _candidate_nodes(self, req: LeaseRequest) -> list[NodeInfo]:
        nodes = [n for n in self.nodes.values() if n.alive]

        # Prefer nodes with an idle worker of this job, then the least loaded.
        def key(n: NodeInfo) -> tuple[int, float]:
            has_idle = any(
                w.lease_id is None and w.job_id in (None, req.job_id) for w in n.workers.values()
            )
            cpu_total = n.total.get("CPU", 0.0) or 1.0
            return (0 if has_idle else 1, -n.available.get("CPU", 0.0) / cpu_total)

        return sorted(nodes, key=key)

    def _grant(
        self, req: LeaseRequest, node: NodeInfo, w: WorkerInfo, gpus: dict[int, float]
    ) -> Instruction:
        lease_id = f"lease-{next(self._ids)}"
        for k, v in req.shape.items():
            node.available[k] = node.available.get(k, 0.0) - v
        for g, frac in gpus.items():
            node.gpus[g] -= frac
        w.job_id = req.job_id
        w.lease_id = lease_id
        if gpus and w.gpus is None:
            w.gpus = tuple(sorted(gpus))
        lease = Lease(lease_id, req.client, req.job_id, w.worker_id, node.node_id, req.shape, gpus)
        self.leases[lease_id] = lease
        return ("grant", req.client, req.rid, lease, w)

    # ----------------------------------------------------------------------------- views
    def node_views(self) -> list[dict[str, Any]]:
        """Public description of every node (what ``nodes()`` returns)."""
        views = []
        for n in self.nodes.values():
            views.append(
                {
                    "node_id": n.node_id,
                    "name": n.name,
                    "address": n.address,
                    "alive": n.alive,
                    "pid": n.pid,
                    "resources_total": dict(n.total),
                    "resources_available": {
                        k: max(0.0, round(v, 6)) for k, v in n.available.items()
                    },
                    "workers": len(n.workers),
                    "leases": sum(1 for w in n.workers.values() if w.lease_id is not None),
                    **n.info,
                }
            )
        return views

    def validate_state(self) -> None:
        """Check invariants; raises ``AssertionError`` describing the first violation."""
        for lease in self.leases.values():
            w = self.workers.get(lease.worker_id)
            assert w is not None, f"{lease.lease_id} refers to unknown worker"
            assert w.lease_id == lease.lease_id, f"{w.worker_id} does not hold {lease.lease_id}"
        for node in self.nodes.values():
            if not node.alive:
                continue
            held: dict[str, float] = {}
            for lease in self.leases.values():
                if lease.node_id != node.node_id:
                    continue
                w = self.workers[lease.worker_id]
                for k, v in lease.shape.items():
                    if k == "CPU" and w.blocked:
                        continue
                    held[k] = held.get(k, 0.0) + v
            for k, tot in node.total.items():
                expect = tot - held.get(k, 0.0)
                got = node.available.get(k, 0.0)
                assert abs(expect - got) < 1e-6, f"{node.node_id} {k}: available {got} != {expect}"
            for g, free in node.gpus.items():
                assert -EPS <= free <= 1.0 + EPS, f"{node.node_id} GPU {g} free {free}"
        for w in self.workers.values():
            assert w.node_id in self.nodes, f"{w.worker_id} on unknown node"
