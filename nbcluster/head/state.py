"""Pure scheduling state of the head: events in, instructions out, no sockets.

The head service feeds events (a node registered, a worker became ready, a client asked for a
lease, ...) into :class:`ClusterState`; each call returns the instructions the service must carry
out (grant a lease, start a worker, ...). Keeping this free of I/O makes it unit-testable and lets
:meth:`ClusterState.validate_state` check its invariants after any sequence of events.

The records it keeps (nodes, workers, requests, leases; resources in exact integer units) are
in :mod:`nbcluster.head.model`, the instructions in :mod:`nbcluster.head.instructions`.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Any

from nbcluster.head.instructions import (
    Grant,
    Infeasible,
    Instruction,
    KillWorker,
    LeaseLost,
    Requester,
    StartWorker,
    Unschedulable,
)
from nbcluster.head.model import (
    UNIT,
    Lease,
    LeaseRequest,
    NodeInfo,
    WorkerInfo,
    WorkerState,
    to_units,
    units_of,
)
from nbcluster.head.placement import Bundle, PlacementGroups, group_of
from nbcluster.head.select import Pass, Selector, fits, idle_worker


class ClusterState:
    """Nodes, workers, leases and pending lease requests."""

    def __init__(self, id_prefix: str = "") -> None:
        self.nodes: dict[str, NodeInfo] = {}
        self.workers: dict[str, WorkerInfo] = {}
        self.leases: dict[str, Lease] = {}
        self.pending: deque[LeaseRequest] = deque()
        self._ids = itertools.count(1)
        # Ids of a restarted head must not collide with the ones its peers still hold.
        self._id_prefix = id_prefix
        self.select = Selector(self.nodes)  # where a request goes (policies, per-pass indexes)
        self.groups = PlacementGroups(self.nodes, self.leases)  # placement groups' bundles

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
        node_id: str | None = None,
    ) -> tuple[str, list[Instruction]]:
        """Register a node; returns its id and instructions (prestarting workers).

        ``node_id`` keeps the id a node had before the head restarted. GPUs are whole devices:
        the node has one GPU unit per id in ``gpu_ids`` (ids ``0..n-1`` when none are given).
        """
        node_id = node_id or f"node-{self._id_prefix}{next(self._ids)}"
        total = {k: v for k, v in units_of(resources).items() if v > 0}
        ids = list(gpu_ids) or list(range(total.get("GPU", 0) // UNIT))
        total.pop("GPU", None)
        if ids:
            total["GPU"] = len(ids) * UNIT
        node = NodeInfo(
            node_id=node_id,
            name=name,
            address=address,
            client=client,
            total_u=total,
            avail_u=dict(total),
            gpu_free_u={g: UNIT for g in ids},
            pid=pid,
            prestart=prestart,
            info=info or {},
        )
        self.nodes[node_id] = node
        self.select.nodes_changed()
        self.select.freed(node_id, total)
        out: list[Instruction] = []
        for _ in range(prestart):
            node.starting += 1
            out.append(StartWorker(node_id))
        # A new node may make waiting requests feasible.
        for req in self.pending:
            req.infeasible_reported = False
        self.groups.node_added(node_id)
        out += self.schedule()
        return node_id, out

    def remove_node(self, node_id: str, reason: str) -> list[Instruction]:
        """A node left or died: its workers and leases are gone."""
        node = self.nodes.get(node_id)
        if node is None or not node.alive:
            return []
        node.alive = False
        self.select.nodes_changed()
        for req in self.pending:
            req.could_fit = False  # fewer nodes: judged again
        out: list[Instruction] = []
        for wid in list(node.workers):
            out += self.worker_died(wid, reason)
        node.starting = 0
        self.groups.node_removed(node_id)
        out += self.schedule()
        return out

    # ----------------------------------------------------------------------------- workers
    def worker_ready(
        self, node_id: str, worker_id: str, address: str, control_address: str, pid: int
    ) -> list[Instruction]:
        """An agent reports a started worker; it joins the idle pool."""
        node = self.nodes.get(node_id)
        if node is None or not node.alive:
            return [KillWorker(node_id, worker_id)]
        node.starting = max(0, node.starting - 1)
        w = WorkerInfo(worker_id, node_id, address, control_address, pid)
        node.workers[worker_id] = w
        self.workers[worker_id] = w
        return self.schedule()

    def worker_start_failed(self, node_id: str) -> list[Instruction]:
        """A worker the node was asked for never became ready: plan again.

        The requests it was started for still wait, and the node's pool is still short: both
        ask for another worker now (the service spaces the starts out when they keep failing).
        """
        node = self.nodes.get(node_id)
        if node is None:
            return []
        node.starting = max(0, node.starting - 1)
        out = self.schedule()
        if node.alive:
            out += self._refill(node)
        return out

    def worker_died(self, worker_id: str, reason: str) -> list[Instruction]:
        """A worker process exited; its lease (if any) is lost and its resources freed."""
        w = self.workers.get(worker_id)
        if w is None:
            return []
        out: list[Instruction] = []
        if w.lease_id is not None:
            lease = self.leases.get(w.lease_id)
            if lease is not None:
                self._release(lease)  # while the worker is known: a blocked one lent its CPUs
                out.append(LeaseLost(lease.requester, lease.lease_id, reason))
        self.workers.pop(worker_id, None)
        node = self.nodes.get(w.node_id)
        if node is not None:
            node.workers.pop(worker_id, None)
        out += self.schedule()
        if node is not None and node.alive:
            out += self._refill(node)
        return out

    def _refill(self, node: NodeInfo) -> list[Instruction]:
        """Keep ``prestart`` fresh workers ready, so that the next job starts without waiting."""
        fresh = sum(
            1 for w in node.workers.values() if w.job_id is None and w.state is WorkerState.IDLE
        )
        out: list[Instruction] = []
        while fresh + node.starting < node.prestart:
            node.starting += 1
            out.append(StartWorker(node.node_id))
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
        pool = self._pool(lease)  # a placement group's bundle lends to that bundle
        cpus = lease.units.get("CPU", 0)
        w.blocked = blocked
        if cpus > 0 and pool is not None:
            pool.avail_u["CPU"] = pool.avail_u.get("CPU", 0) + (cpus if blocked else -cpus)
            if blocked:
                self.select.freed(lease.node_id, ("CPU",))
        return self.schedule() if blocked else []

    # ----------------------------------------------------------------------------- leases
    def request_lease(
        self,
        requester: Requester,
        job_id: str,
        rid: int,
        shape: dict[str, float],
        name: str,
        strategy: dict[str, Any] | None = None,
        locality: dict[str, int] | None = None,
        env: str = "",
    ) -> list[Instruction]:
        """Queue a lease request and try to place it.

        ``strategy`` is a scheduling strategy in its wire form (:mod:`nbcluster.scheduling`),
        ``locality`` the bytes of the task's stored arguments per node store, ``env`` the key of
        the task's runtime_env (a worker runs one environment for life). A request that
        can never be placed (a malformed shape or strategy) is answered :class:`Unschedulable`.
        """
        error = _check_request(shape, strategy)
        if error is not None:
            return [Unschedulable(requester, rid, error)]
        req = LeaseRequest(
            rid,
            requester,
            job_id,
            dict(shape),
            name,
            units=units_of(shape),
            strategy=strategy,
            locality=_clean_locality(locality),
            env=env if isinstance(env, str) else "",
        )
        self.pending.append(req)
        return self.schedule()

    def cancel_request(self, requester: Requester, rid: int) -> list[Instruction]:
        self.pending = deque(
            r for r in self.pending if not (r.requester == requester and r.rid == rid)
        )
        return []

    def return_lease(
        self, requester: Requester, lease_id: str, retire: bool = False
    ) -> list[Instruction]:
        """The holder is done with a lease: free its resources, its worker becomes idle (with
        ``retire``, its task's ``max_calls`` are used up: it is ended instead, as planned)."""
        lease = self.leases.get(lease_id)
        if lease is None or lease.requester != requester:
            return []
        self._release(lease)
        w = self.workers.get(lease.worker_id)
        if not retire or w is None:
            return self.schedule()
        w.state = WorkerState.RETIRED
        return [KillWorker(w.node_id, w.worker_id), *self.schedule()]

    def client_gone(self, client: bytes, job_id: str | None, owns_job: bool) -> list[Instruction]:
        """A client disconnected: drop its requests and leases.

        When it was the driver of ``job_id``, every worker of that job is stopped too (a job's
        workers run its code and must not outlive it).
        """
        self.pending = deque(r for r in self.pending if r.requester != client)
        out: list[Instruction] = []
        for lease in [ls for ls in self.leases.values() if ls.requester == client]:
            self._release(lease)
            w = self.workers.get(lease.worker_id)
            if w is not None and not owns_job:
                # The worker may still run a task for the gone client: recycle it.
                out.append(KillWorker(w.node_id, w.worker_id))
        if owns_job and job_id is not None:
            for w in [w for w in self.workers.values() if w.job_id == job_id and not w.detached]:
                out.append(KillWorker(w.node_id, w.worker_id))
        return out + self.schedule()

    def create_group(
        self, creator: bytes, job_id: str, pg_id: str, **spec: Any
    ) -> tuple[str | None, list[Instruction]]:
        """Create a placement group (:meth:`PlacementGroups.create`: the error, or ``None``)
        and place it if it fits now."""
        error = self.groups.create(creator, job_id, pg_id, **spec)
        return error, ([] if error else self.schedule())

    def remove_group(self, pg_id: str, reason: str) -> list[Instruction] | None:
        """Remove a placement group (``None``: unknown); requests waiting for it fail."""
        out = self.groups.remove(pg_id, reason)
        self.select.forget()  # its bundles' free part went back to their nodes
        return None if out is None else out + self.schedule()

    def resize_lease(self, lease_id: str, shape: dict[str, float]) -> list[Instruction]:
        """Change what a lease holds (an actor keeps less once placed); frees the difference."""
        lease = self.leases.get(lease_id)
        if lease is None:
            return []
        node = self._pool(lease)
        w = self.workers.get(lease.worker_id)
        blocked = w.blocked if w is not None else False
        new = units_of(shape)
        for k in set(lease.units) | set(new):
            if k == "GPU":
                continue  # GPU assignments do not change
            if k == "CPU" and blocked:
                continue
            delta = lease.units.get(k, 0) - new.get(k, 0)
            if node is not None:
                node.avail_u[k] = node.avail_u.get(k, 0) + delta
                if delta > 0:
                    self.select.freed(lease.node_id, (k,))
        gpu, gpu_u = lease.shape.get("GPU"), lease.units.get("GPU")
        lease.shape = {k: v for k, v in shape.items() if k != "GPU"}
        lease.units = {k: v for k, v in new.items() if k != "GPU"}
        if gpu_u:
            lease.units["GPU"] = gpu_u
            lease.shape["GPU"] = float(gpu or 0.0)
        return self.schedule()

    def _pool(self, lease: Lease) -> NodeInfo | Bundle | None:
        """Where a lease's resources go back to: its placement group bundle, else its node."""
        return self.groups.pool_of(lease) or self.nodes.get(lease.node_id)

    def _release(self, lease: Lease) -> None:
        node = self._pool(lease)
        self.leases.pop(lease.lease_id, None)
        w = self.workers.get(lease.worker_id)
        blocked = w.blocked if w is not None else False
        if w is not None:
            w.lease_id = None
            w.blocked = False
            # An actor's worker is never reused for tasks; the service kills it.
            w.state = WorkerState.IDLE if w.actor_id is None else WorkerState.RETIRED
        if node is None:
            return
        self.select.freed(lease.node_id, lease.units)
        for k, v in lease.units.items():
            if k == "CPU" and blocked:
                continue  # already lent back while blocked
            node.avail_u[k] = node.avail_u.get(k, 0) + v
        for g, u in lease.gpu_units.items():
            node.gpu_free_u[g] = min(UNIT, node.gpu_free_u.get(g, 0) + u)

    # ----------------------------------------------------------------------------- placement
    def missing_resources(self, shape: dict[str, float]) -> dict[str, float] | None:
        """What no alive node has in total for ``shape`` (``None`` if some node could fit it)."""
        want = units_of(shape)
        best: dict[str, float] | None = None
        for node in self.nodes.values():
            if not node.alive:
                continue
            missing = {k: shape[k] for k, v in want.items() if node.total_u.get(k, 0) < v}
            if not missing:
                return None
            if best is None or len(missing) < len(best):
                best = missing
        return best if best is not None else dict(shape)

    def schedule(self) -> list[Instruction]:
        """Place pending requests, first come first served; returns instructions.

        A request that fits a node without an idle worker there has a worker started for it
        and keeps what it needs reserved for the rest of this pass, so that later requests
        look at other nodes instead of all queueing for the same one.
        """
        out: list[Instruction] = self.groups.place() if self.groups.waiting() else []
        if not self.pending:
            return out
        still: deque[LeaseRequest] = deque()
        plan = Pass()
        want_start: dict[str, int] = {}
        want_envs: dict[str, set[tuple[str, str]]] = {}  # node id -> (job, env) waiting there
        for req in self.pending:
            bundle: Bundle | None = None
            found: tuple[NodeInfo, dict[int, int]] | None = None
            if group_of(req.strategy) is not None:  # only its group's bundles
                pairs, error = self.groups.candidates(req)
                feasible_now = True  # a group not placed yet is what it waits for
                for node, b in pairs:
                    gpus = fits(b or node, req.units, plan)
                    if gpus is not None:
                        found, bundle = (node, gpus), b
                        break
            else:
                node_or_none, gpus_or_none, error, feasible_now = self.select.choose(req, plan)
                if node_or_none is not None and gpus_or_none is not None:
                    found = (node_or_none, gpus_or_none)
            if error is not None:
                out.append(Unschedulable(req.requester, req.rid, error))
                continue
            if found is not None:
                node, gpus = found
                plan.placed[node.node_id] = plan.placed.get(node.node_id, 0) + 1
                w = idle_worker(node, req.job_id, gpus, req.env)
                if w is not None:
                    out.append(self._grant(req, node, w, gpus, bundle))
                    continue
                want_start[node.node_id] = want_start.get(node.node_id, 0) + 1
                want_envs.setdefault(node.node_id, set()).add((req.job_id, req.env))
                plan.reserve((bundle or node).key, req.units, gpus)
                req.waiting_on = node.node_id
            still.append(req)
            if not feasible_now and not req.infeasible_reported and not req.could_fit:
                key = tuple(sorted(req.shape.items()))
                if key not in plan.missing:  # once per shape and pass: it scans every node
                    plan.missing[key] = self.missing_resources(req.shape)
                missing = plan.missing[key]
                req.could_fit = missing is None
                if missing is not None:
                    req.infeasible_reported = True
                    out.append(Infeasible(req.requester, req.rid, missing, req.shape))
        self.pending = still
        for node_id, n in want_start.items():
            node = self.nodes[node_id]
            extra = n - node.starting
            for _ in range(max(0, extra)):
                node.starting += 1
                out.append(StartWorker(node_id))
            if extra > 0:
                out += self._retire_other_envs(node, want_envs.get(node_id, set()))
        return out

    def _retire_other_envs(self, node: NodeInfo, wanted: set[tuple[str, str]]) -> list[Instruction]:
        """Stop idle workers a job bound to another runtime_env, beyond the node's CPU count.

        A job waiting for a worker of one environment while its idle workers serve others
        (code edited and shipped again, ...) would otherwise gather a process per environment
        it ever used; as Ray stops idle workers above its soft limit, the oldest go first.
        """
        limit = max(node.total_u.get("CPU", 0) // UNIT, node.prestart, 1)
        retired = WorkerState.RETIRED  # already on their way out: not counted
        excess = sum(1 for w in node.workers.values() if w.state is not retired)
        excess += node.starting - limit
        jobs = {job for job, _ in wanted}
        out: list[Instruction] = []
        for w in list(node.workers.values()):
            if excess <= 0:
                break
            if (
                w.state is WorkerState.IDLE
                and w.job_id in jobs
                and w.actor_id is None
                and (w.job_id, w.env) not in wanted
            ):
                w.state = WorkerState.RETIRED  # never leased again; gone when the agent says so
                out.append(KillWorker(node.node_id, w.worker_id))
                excess -= 1
        return out

    def _grant(
        self,
        req: LeaseRequest,
        node: NodeInfo,
        w: WorkerInfo,
        gpus: dict[int, int],
        bundle: Bundle | None = None,
    ) -> Grant:
        lease_id = f"lease-{self._id_prefix}{next(self._ids)}"
        pool = bundle or node
        for k, v in req.units.items():
            pool.avail_u[k] = pool.avail_u.get(k, 0) - v
        for g, u in gpus.items():
            pool.gpu_free_u[g] -= u
        if w.job_id is None:
            w.env = req.env
        w.job_id = req.job_id
        w.lease_id = lease_id
        w.state = WorkerState.LEASED
        if gpus and w.gpus is None:
            w.gpus = tuple(sorted(gpus))
        lease = Lease(
            lease_id,
            req.requester,
            req.job_id,
            w.worker_id,
            node.node_id,
            req.shape,
            {g: u / UNIT for g, u in gpus.items()},
            units=dict(req.units),
            gpu_units=dict(gpus),
            bundle=(bundle.pg_id, bundle.index) if bundle is not None else None,
        )
        self.leases[lease_id] = lease
        return Grant(req.requester, req.rid, lease, w, req.created)

    # ----------------------------------------------------------------------------- recovery
    def adopt_worker(
        self, node_id: str, worker_id: str, address: str, control_address: str, pid: int
    ) -> None:
        """A re-registering agent reports a worker started before the head restarted.

        It joins the node :attr:`~WorkerState.ADOPTED`: unleased, and given to nobody until its
        holder claims it back (:meth:`claim_lease`).
        """
        node = self.nodes.get(node_id)
        if node is None:
            return
        w = WorkerInfo(worker_id, node_id, address, control_address, pid, state=WorkerState.ADOPTED)
        node.workers[worker_id] = w
        self.workers[worker_id] = w

    def claim_lease(
        self,
        requester: Requester,
        job_id: str,
        lease_id: str,
        worker_id: str,
        shape: dict[str, float],
        gpus: dict[int, float],
        env: str = "",
        pg: tuple[str, int] | None = None,
    ) -> bool:
        """Re-create a lease its holder still uses after a head restart; ``False`` if it can't.

        ``env`` is the runtime_env key the worker was leased for (it serves that one only);
        ``pg`` the placement group (id, bundle index) it runs in: it is carved from there.
        """
        w = self.workers.get(worker_id)
        claimable = (WorkerState.IDLE, WorkerState.ADOPTED)
        if w is None or w.state not in claimable or lease_id in self.leases:
            return False
        node = self.nodes[w.node_id]
        lease = Lease(lease_id, requester, job_id, worker_id, w.node_id, shape, gpus)
        for k, v in ({} if self.groups.carve(lease, pg) else lease.units).items():
            node.avail_u[k] = node.avail_u.get(k, 0) - v
        for g, u in ({} if lease.bundle else lease.gpu_units).items():
            node.gpu_free_u[g] = node.gpu_free_u.get(g, UNIT) - u
        if w.job_id is None:
            w.env = env
        w.job_id = job_id
        w.lease_id = lease_id
        w.state = WorkerState.LEASED
        if gpus and w.gpus is None:
            w.gpus = tuple(sorted(gpus))
        self.leases[lease_id] = lease
        return True

    # ----------------------------------------------------------------------------- views
    def demand(self) -> list[dict[str, Any]]:
        """Pending requests that no alive node has room for now, grouped by resource shape.

        Each entry is ``{"shape": {...}, "count": n, "infeasible": bool}`` (``infeasible``: no
        alive node has that much in total). Requests that fit somewhere (waiting for a worker
        to start, or for the next pass) are not counted. Pools grow from this
        (:meth:`nbcluster.deploy.pool.Pool.adapt`).
        """
        plan = Pass()
        alive = [n for n in self.nodes.values() if n.alive]
        groups: dict[tuple[tuple[str, float], ...], dict[str, Any]] = {}
        for req in self.pending:
            fitted = False
            for node in alive:
                gpus = fits(node, req.units, plan)
                if gpus is not None:
                    plan.reserve(node.node_id, req.units, gpus)
                    fitted = True
                    break
            if fitted:
                continue
            key = tuple(sorted((k, float(v)) for k, v in req.shape.items() if v))
            g = groups.get(key)
            if g is None:
                infeasible = self.missing_resources(req.shape) is not None
                g = groups[key] = {"shape": dict(key), "count": 0, "infeasible": infeasible}
            g["count"] += 1
        return list(groups.values())

    def node_busy(self, node_id: str) -> bool:
        """Whether the node runs anything: a lease (a task or an actor's worker), or a worker
        kept from before a head restart and not claimed yet. Unknown or dead nodes are not."""
        node = self.nodes.get(node_id)
        if node is None or not node.alive:
            return False
        return any(
            w.lease_id is not None or w.state == WorkerState.ADOPTED for w in node.workers.values()
        )

    # ------------------------------------------------------------------------------ checks
    def validate_state(self) -> None:
        """Check invariants; raises ``AssertionError`` describing the first violation."""
        for lease in self.leases.values():
            w = self.workers.get(lease.worker_id)
            assert w is not None, f"{lease.lease_id} refers to unknown worker"
            assert w.lease_id == lease.lease_id, f"{w.worker_id} does not hold {lease.lease_id}"
            assert w.node_id == lease.node_id, f"{lease.lease_id} on the wrong node"
            gpu_need = lease.units.get("GPU", 0)
            assert sum(lease.gpu_units.values()) == gpu_need, f"{lease.lease_id} GPU ids"
            if gpu_need > UNIT:
                assert all(u == UNIT for u in lease.gpu_units.values()), "whole GPUs expected"
        for node in self.nodes.values():
            if not node.alive:
                continue
            held, gpu_held = self.groups.reserved_on(node.node_id)  # bundles hold apart
            for lease in self.leases.values():
                if lease.node_id != node.node_id or self.groups.pool_of(lease) is not None:
                    continue
                w = self.workers[lease.worker_id]
                for k, v in lease.units.items():
                    if k == "CPU" and w.blocked:
                        continue
                    held[k] = held.get(k, 0) + v
                for g, u in lease.gpu_units.items():
                    gpu_held[g] = gpu_held.get(g, 0) + u
            for k in set(node.total_u) | set(node.avail_u):
                expect = node.total_u.get(k, 0) - held.get(k, 0)
                got = node.avail_u.get(k, 0)
                assert expect == got, f"{node.node_id} {k}: available {got} != {expect} units"
            for g, free in node.gpu_free_u.items():
                assert 0 <= free <= UNIT, f"{node.node_id} GPU {g} free {free} units"
                assert free + gpu_held.get(g, 0) == UNIT, f"{node.node_id} GPU {g} accounting"
            assert set(gpu_held) <= set(node.gpu_free_u), f"{node.node_id}: unknown GPU id held"
            assert sum(node.gpu_free_u.values()) == node.avail_u.get("GPU", 0), (
                f"{node.node_id}: free GPU ids disagree with available GPU"
            )
        for w in self.workers.values():
            assert w.node_id in self.nodes, f"{w.worker_id} on unknown node"
            leased = w.state is WorkerState.LEASED
            assert leased == (w.lease_id is not None), f"{w.worker_id} {w.state} {w.lease_id}"
            assert not w.blocked or leased, f"{w.worker_id} blocked without a lease"
            if w.state is WorkerState.ADOPTED:
                assert w.job_id is None, f"adopted {w.worker_id} bound to {w.job_id}"
        for req in self.pending:
            assert req.units == units_of(req.shape), f"request {req.rid}: units drifted"
        blocked = {w.lease_id for w in self.workers.values() if w.blocked and w.lease_id}
        self.groups.validate(blocked)


def _check_request(shape: dict[str, float], strategy: dict[str, Any] | None) -> str | None:
    """Why a lease request can never be placed (bad input from the wire), or ``None``."""
    if not isinstance(shape, dict):
        return f"resource shape must be a mapping, got {type(shape).__name__}"
    for k, v in shape.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or v != v or v < 0:
            return f"resource {k!r} must be a non-negative number, got {v!r}"
    gpu = to_units(shape.get("GPU", 0))
    if gpu > UNIT and gpu % UNIT:
        return f"num_gpus above 1 must be a whole number, got {shape['GPU']:g}"
    if strategy is None:
        return None
    kind = strategy.get("t") if isinstance(strategy, dict) else None
    if kind == "spread":
        return None
    if kind == "node" and isinstance(strategy.get("node"), str) and strategy["node"]:
        return None
    if kind == "pg" and group_of(strategy) and isinstance(strategy.get("bundle", -1), int):
        return None
    return f"invalid scheduling strategy {strategy!r}"


def _clean_locality(raw: Any) -> dict[str, int]:
    """A locality hint from the wire, with anything malformed left out (it is only a hint)."""
    if not isinstance(raw, dict):
        return {}
    return {
        k: v
        for k, v in raw.items()
        if isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v > 0
    }
