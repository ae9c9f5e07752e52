"""Choosing a node for a lease request within one scheduling pass of the head.

:class:`~nbcluster.head.state.ClusterState` asks :class:`Selector` where a request goes; what
a pass has given out or set aside so far is in its :class:`Pass`. A pass never sorts the
cluster: it picks the best node that fits (a minimum over the nodes that have any of the
request's scarcest resource free, collected once per pass), and remembers the shapes that
fit nowhere, so that a long queue on a full cluster costs a lookup per waiting request.

Within a pass resources only shrink (grants and reservations take, nothing gives back), which is
what makes both the per-pass node lists and the memory of failed shapes valid until its end.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from nbcluster.head.model import UNIT, LeaseRequest, NodeInfo, WorkerInfo, WorkerState
from nbcluster.head.placement import Bundle


@dataclass
class Pass:
    """Bookkeeping of one scheduling pass: what requests waiting for a worker will take, and
    what the pass has learned about the nodes."""

    reserved: dict[str, dict[str, int]] = field(default_factory=dict)
    reserved_gpus: dict[str, dict[int, int]] = field(default_factory=dict)
    placed: dict[str, int] = field(default_factory=dict)  # node id -> requests put there
    # (scope, units) that fit no candidate in this pass: later ones of the same kind wait too.
    failed: set[tuple[str, tuple[tuple[str, int], ...]]] = field(default_factory=set)
    missing: dict[tuple[tuple[str, float], ...], dict[str, float] | None] = field(
        default_factory=dict
    )  # shape -> what no node has in total (the infeasible check, once per shape)
    open: dict[str, list[NodeInfo]] = field(default_factory=dict)  # resource -> nodes with some
    leases: dict[str, int] = field(default_factory=dict)  # node id -> leases (for SPREAD)

    def reserve(self, node_id: str, units: dict[str, int], gpus: dict[int, int]) -> None:
        res = self.reserved.setdefault(node_id, {})
        for k, v in units.items():
            res[k] = res.get(k, 0) + v
        rg = self.reserved_gpus.setdefault(node_id, {})
        for g, u in gpus.items():
            rg[g] = rg.get(g, 0) + u


def fits(
    node: NodeInfo | Bundle, units: dict[str, int], plan: Pass | None = None
) -> dict[int, int] | None:
    """GPU assignment (id -> units) if ``units`` fit the free resources of a node (or of a
    placement group's bundle) now, less what ``plan`` set aside; ``None`` if they do not."""
    held = plan.reserved.get(node.key, {}) if plan is not None else {}
    for k, v in units.items():
        if node.avail_u.get(k, 0) - held.get(k, 0) < v:
            return None
    need = units.get("GPU", 0)
    if need <= 0:
        return {}
    held_g = plan.reserved_gpus.get(node.key, {}) if plan is not None else {}
    free = {g: u - held_g.get(g, 0) for g, u in node.gpu_free_u.items()}
    if need < UNIT:
        # Fractional: share the fullest GPU that still has room (packs small requests).
        cands = [g for g, u in free.items() if u >= need]
        if not cands:
            return None
        g = min(cands, key=lambda g: (free[g], g))
        return {g: need}
    whole = [g for g, u in sorted(free.items()) if u >= UNIT]
    if need % UNIT or len(whole) < need // UNIT:
        return None
    return {g: UNIT for g in whole[: need // UNIT]}


def could_fit(node: NodeInfo, units: dict[str, int]) -> bool:
    """Whether the node has enough in total (idle) for ``units``."""
    return all(node.total_u.get(k, 0) >= v for k, v in units.items())


def idle_worker(
    node: NodeInfo, job_id: str, gpus: dict[int, int], env: str = ""
) -> WorkerInfo | None:
    """The idle worker of ``node`` to lease for this job (its own first, then a fresh one)."""
    want = tuple(sorted(gpus))
    best: WorkerInfo | None = None
    best_rank = 99
    idle = WorkerState.IDLE  # a local: the hot path reads it once per worker
    for w in node.workers.values():
        if w.state is not idle or w.job_id not in (None, job_id):
            continue
        if w.job_id is not None and w.env != env:
            continue  # it runs another runtime_env (its sys.path, cwd, variables)
        if want and w.gpus is not None and w.gpus != want:
            continue  # pinned to other GPUs
        # Prefer this job's workers, then ones already pinned to these GPUs.
        rank = (0 if w.job_id == job_id else 2) + (0 if (w.gpus == want or not want) else 1)
        if rank < best_rank:
            best, best_rank = w, rank
    return best


class Selector:
    """Where lease requests go: policies (affinity, locality, SPREAD, the default) over the
    nodes of one :class:`~nbcluster.head.state.ClusterState`."""

    def __init__(self, nodes: dict[str, NodeInfo]) -> None:
        self.nodes = nodes
        self.spread_turn = 0  # rotates SPREAD's tie-break among equally loaded nodes
        self._alive: list[NodeInfo] | None = None  # in registration order, kept between passes
        self._index: dict[str, int] = {}  # node id -> its place in ``_alive``
        # resource -> ids of the nodes that may have some of it free (a superset, pruned as
        # passes find them full; a node is added back whenever it gets some back: freed()).
        self._maybe: dict[str, set[str]] = {}

    def nodes_changed(self) -> None:
        """A node joined or died."""
        self._alive = None

    def freed(self, node_id: str, resources: Iterable[str]) -> None:
        """The node got some of ``resources`` back (a lease returned, resized, lent)."""
        for k in resources:
            got = self._maybe.get(k)
            if got is not None:
                got.add(node_id)

    def forget(self) -> None:
        """Resources came back by a path that does not say where: look at every node again."""
        self._maybe.clear()

    def alive(self) -> list[NodeInfo]:
        """The alive nodes, in registration order."""
        if self._alive is None:
            self._alive = [n for n in self.nodes.values() if n.alive]
            self._index = {n.node_id: i for i, n in enumerate(self._alive)}
        return self._alive

    def _open(self, units: dict[str, int], plan: Pass) -> list[NodeInfo]:
        """Nodes that had some of the request's first resource free, in registration order (a
        superset of those it fits: the list is made once per pass, and resources only shrink
        in a pass)."""
        if not units:
            return self.alive()
        k = "CPU" if "CPU" in units else next(iter(units))
        got = plan.open.get(k)
        if got is not None:
            return got
        alive = self.alive()
        maybe = self._maybe.get(k)
        if maybe is None:
            maybe = self._maybe[k] = {n.node_id for n in alive}
        nodes, index = self.nodes, self._index
        found: list[tuple[int, NodeInfo]] = []
        for nid in list(maybe):
            n = nodes.get(nid)
            i = index.get(nid)
            if n is None or i is None or not n.alive or n.avail_u.get(k, 0) <= 0:
                maybe.discard(nid)  # full (or gone): added back when it frees some
                continue
            found.append((i, n))
        found.sort(key=lambda x: x[0])
        got = plan.open[k] = [n for _, n in found]
        return got

    def choose(
        self, req: LeaseRequest, plan: Pass
    ) -> tuple[NodeInfo | None, dict[int, int] | None, str | None, bool]:
        """``(node, gpus, error, feasible_now)`` for a request not in a placement group.

        ``node`` is the best node it fits now (``None``: it waits), ``error`` why it can never
        run (a hard affinity to a node that cannot hold it), ``feasible_now`` whether some
        candidate has room (else the caller checks whether any node could ever hold it).
        """
        spec = req.strategy
        kind = spec.get("t") if spec else None
        units = req.units
        key = ("", tuple(sorted(units.items())))  # every alive node is a candidate
        if kind != "node":  # the common case first: it waits where a worker starts for it
            if key in plan.failed:
                return None, None, None, False
            waited = self.nodes.get(req.waiting_on) if req.waiting_on else None
            if waited is not None and waited.alive:
                gpus = fits(waited, units, plan)
                if gpus is not None:
                    return waited, gpus, None, True
        first: list[NodeInfo] = []  # tried in this order before the policy's best
        if spec is not None and kind == "node":
            target = self.nodes.get(str(spec.get("node")))
            usable = target is not None and target.alive and could_fit(target, units)
            if target is not None and usable:
                if not (spec.get("soft") and spec.get("spill")):
                    gpus = fits(target, units, plan)
                    return (
                        (target, gpus, None, True)
                        if gpus is not None
                        else (None, None, None, False)
                    )
                first.append(target)  # then anywhere
            elif not spec.get("soft"):
                return None, None, _affinity_error(req, str(spec.get("node")), target), False
        if key in plan.failed:
            return None, None, None, False
        for node in first:
            gpus = fits(node, units, plan)
            if gpus is not None:
                return node, gpus, None, True
        if kind == "spread":
            best = self._spread_best(units, plan)
        else:
            local = self._locality_node(req, plan) if kind != "node" else None
            if local is not None:
                gpus = fits(local, units, plan)
                if gpus is not None:
                    return local, gpus, None, True
            best = self._default_best(req, plan)
        if best is None:
            plan.failed.add(key)
            return None, None, None, False
        return best[0], best[1], None, True

    def _fitting(
        self, units: dict[str, int], plan: Pass
    ) -> Iterable[tuple[NodeInfo, dict[int, int]]]:
        for n in self._open(units, plan):
            if n.alive:
                gpus = fits(n, units, plan)
                if gpus is not None:
                    yield n, gpus

    def _default_best(
        self, req: LeaseRequest, plan: Pass
    ) -> tuple[NodeInfo, dict[int, int]] | None:
        """A node with an idle worker of this job (or a fresh one) first, then the least
        loaded; the first such node in registration order among equals."""
        idle = WorkerState.IDLE  # locals, and loops rather than any(): this is the hot path
        job_id = req.job_id
        env = req.env
        best: tuple[NodeInfo, dict[int, int]] | None = None
        best_key: tuple[int, float] = (2, 0.0)
        for n, gpus in self._fitting(req.units, plan):
            busy = 1
            for w in n.workers.values():
                if w.state is idle and (w.job_id is None or (w.job_id == job_id and w.env == env)):
                    busy = 0
                    break
            if busy > best_key[0]:
                continue
            cpu_total = n.total_u.get("CPU", 0) or 1
            k = (busy, -n.avail_u.get("CPU", 0) / cpu_total)
            if k < best_key:
                best, best_key = (n, gpus), k
        return best

    def _spread_best(
        self, units: dict[str, int], plan: Pass
    ) -> tuple[NodeInfo, dict[int, int]] | None:
        """Fewest leases first (counting the requests put there in this pass); ties rotate."""
        alive = self.alive()
        if not alive:
            return None
        leases = plan.leases
        size = len(alive)
        self.spread_turn = (self.spread_turn + 1) % size
        turn = self.spread_turn
        best: tuple[NodeInfo, dict[int, int]] | None = None
        best_key = (1 << 62, 0)
        for n, gpus in self._fitting(units, plan):
            nid = n.node_id
            held = leases.get(nid)
            if held is None:  # leases held when the pass first looked at the node
                held = leases[nid] = sum(1 for w in n.workers.values() if w.lease_id is not None)
            k = (held + plan.placed.get(nid, 0), (self._index[nid] - turn) % size)
            if k < best_key:
                best, best_key = (n, gpus), k
        return best

    def _locality_node(self, req: LeaseRequest, plan: Pass) -> NodeInfo | None:
        """The node whose store holds most bytes of the request's arguments, if it could run it."""
        if not req.locality:
            return None
        by_store = {n.store_id: n for n in self.alive() if n.store_id}
        best: NodeInfo | None = None
        best_bytes = 0
        for store, size in sorted(req.locality.items()):
            node = by_store.get(store)
            if node is not None and size > best_bytes and could_fit(node, req.units):
                best, best_bytes = node, size
        return best


def _affinity_error(req: LeaseRequest, node_id: str, node: NodeInfo | None) -> str:
    what = f"{req.name or 'the task'} has a hard NodeAffinitySchedulingStrategy for node {node_id}"
    if node is None:
        return f"{what}, which is not part of the cluster (see nodes() for the node ids)"
    if not node.alive:
        return f"{what} ({node.name}), which is dead"
    have = ", ".join(f"{k}: {v:g}" for k, v in sorted(node.total.items()))
    need = ", ".join(f"{k}: {v:g}" for k, v in sorted(req.shape.items()))
    return f"{what} ({node.name}), which has {{{have}}} in total, less than {{{need}}}"
