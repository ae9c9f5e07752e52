"""Placement groups: gang reservations of resource bundles on nodes (Ray's placement groups).

Pure, like :class:`~nbcluster.head.state.ClusterState` (which owns a :class:`PlacementGroups`
and shares its node and lease tables with it): events in, instructions out.

A group's bundles are reserved all at once or not at all: a group that does not fit the free
resources now stays :data:`PENDING` (and is placed by a later pass, when resources free up or a
node joins); one that could never fit the nodes' totals is reported to its creator once, as an
infeasible task is. A placed bundle holds its resources apart from its node's: the node's free
amounts no longer count them, and only leases asked for with a placement group strategy
(``{"t": "pg", "pg": id, "bundle": i}``) are carved out of them, from the bundle's own
``avail_u``/``gpu_free_u`` (specific GPU ids). Removing a group gives its bundles' free part back
at once; leases still running in it are killed and count against the node until they end.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from nbcluster.head.instructions import GroupPlaced, Instruction, KillWorker, Warn
from nbcluster.head.model import UNIT, Lease, LeaseRequest, NodeInfo, to_units, units_of

PENDING = "PENDING"  # not placed (yet): waiting for resources
CREATED = "CREATED"  # every bundle reserved
RESCHEDULING = "RESCHEDULING"  # a node holding some of its bundles died: placing those again
REMOVED = "REMOVED"

#: Removed groups still listed (``placement_group_table``, views), newest last.
REMOVED_KEPT = 100

#: The most bundles a group may have (each placement pass is linear in them).
MAX_BUNDLES = 10_000

#: Ray's strategies.
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")

#: The creator of a group restored from a restart snapshot until its creator says hello again
#: (no client's identity starts so).
RESTORED = b"(restored)"


@dataclass
class Bundle:
    """One bundle of a group: what it asks for, and once placed, its node and free part."""

    pg_id: str
    index: int
    shape: dict[str, float]
    units: dict[str, int]
    node_id: str | None = None
    avail_u: dict[str, int] = field(default_factory=dict)
    gpu_free_u: dict[int, int] = field(default_factory=dict)
    gpus: dict[int, int] = field(default_factory=dict)  # the GPU ids (units) it reserved
    home: str | None = None  # after a head restart: the node it held, until that node is back

    @property
    def key(self) -> str:
        """Its key in a scheduling pass's reservations (nodes use their id)."""
        return f"{self.pg_id}#{self.index}"


@dataclass
class Group:
    """A placement group as the head keeps it."""

    pg_id: str
    name: str
    namespace: str
    job_id: str
    creator: bytes
    strategy: str
    detached: bool
    bundles: list[Bundle]
    state: str = PENDING
    infeasible_reported: bool = False
    feasible: bool = False  # its nodes' totals could hold it (judged again when nodes change)
    removal_reason: str = ""
    creator_worker: str = ""  # the worker whose task or actor created it ("": a driver)
    restoring: bool = False  # from a restart snapshot: its bundles wait for their nodes


def group_of(strategy: dict[str, Any] | None) -> str | None:
    """The group id of a placement group strategy's wire form (``None`` for other strategies)."""
    if isinstance(strategy, dict) and strategy.get("t") == "pg":
        pg = strategy.get("pg")
        return pg if isinstance(pg, str) else None
    return None


class PlacementGroups:
    """Every placement group of the cluster, and the resources their bundles hold."""

    def __init__(self, nodes: dict[str, NodeInfo], leases: dict[str, Lease]) -> None:
        self.nodes = nodes  # ClusterState's tables, shared
        self.leases = leases
        self.groups: dict[str, Group] = {}

    # ------------------------------------------------------------------------------ events
    def create(
        self,
        creator: bytes,
        job_id: str,
        pg_id: str,
        bundles: Any,
        strategy: str,
        name: str = "",
        namespace: str = "",
        detached: bool = False,
        creator_worker: str = "",
    ) -> str | None:
        """Record a new group (placed by the next :meth:`place`); the error, or ``None``.

        Asking again for an id that exists is answered ``None`` (a request resent after a
        reconnect creates nothing twice).
        """
        if pg_id in self.groups:
            return None
        error = _check_group(bundles, strategy)
        if error is not None:
            return error
        if name and any(
            g.name == name and g.namespace == namespace and g.state != REMOVED
            for g in self.groups.values()
        ):
            return f"a placement group named {name!r} already exists in namespace {namespace!r}"
        specs = [
            Bundle(pg_id, i, {k: float(v) for k, v in b.items()}, units_of(b))
            for i, b in enumerate(bundles)
        ]
        self.groups[pg_id] = Group(
            pg_id, name, namespace, job_id, creator, strategy, detached, specs
        )
        self.groups[pg_id].creator_worker = creator_worker
        return None

    def waiting(self) -> bool:
        """Whether some group waits to be placed."""
        return any(g.state in (PENDING, RESCHEDULING) for g in self.groups.values())

    def place(self) -> list[Instruction]:
        """Place the waiting groups that fit now, oldest first; report the ones that never can."""
        out: list[Instruction] = []
        free: dict[str, int] | None = None
        for g in self.groups.values():
            if g.state not in (PENDING, RESCHEDULING) or g.restoring:
                continue
            if g.infeasible_reported:
                continue  # until a node joins (node_added): this runs after every release
            if free is None:
                free = self._free_total()
            need = _sum_units(b.units for b in g.bundles if b.node_id is None)
            fits = all(free.get(k, 0) >= v for k, v in need.items())  # a cheap first test
            plan = self._plan(g, totals=False) if fits else None
            if plan is not None:
                for b in g.bundles:
                    if b.node_id is None:
                        self._reserve(b, *plan[b.index])
                g.state = CREATED
                g.infeasible_reported = False
                out.append(GroupPlaced(g.pg_id))
                continue
            if not g.feasible:
                g.feasible = self._plan(g, totals=True, fresh=True) is not None
            if not g.feasible and not g.infeasible_reported:
                g.infeasible_reported = True
                shapes = ", ".join(_fmt(b.shape) for b in g.bundles)
                out.append(
                    Warn(
                        g.creator,
                        f"placement group {g.name or g.pg_id} ({g.strategy} of {shapes}) cannot "
                        "be placed: no set of alive nodes has that much in total; it waits for "
                        "nodes to join",
                        "pg_infeasible",
                    )
                )
        return out

    def _free_total(self) -> dict[str, int]:
        return _sum_units(n.avail_u for n in self.nodes.values() if n.alive)

    def node_added(self, node_id: str = "") -> None:
        """A node joined: groups reported infeasible are judged again; after a head restart,
        the bundles it held take their resources (and GPU ids) back at once."""
        for g in self.groups.values():
            g.infeasible_reported = g.feasible = False
            for b in g.bundles:
                if g.restoring and b.home == node_id and b.home:
                    b.home = None
                    node = self.nodes[node_id]
                    free = all(node.gpu_free_u.get(i, 0) >= u for i, u in b.gpus.items())
                    if free and _within(b.units, node.avail_u):
                        self._reserve(b, node_id, b.gpus)
            if g.restoring and all(b.node_id for b in g.bundles):
                g.restoring = False

    def restored(self) -> None:
        """The restart window closed: bundles whose node did not come back are placed again."""
        for g in self.groups.values():
            if g.restoring:
                g.restoring = False
                if g.state != PENDING and any(b.node_id is None for b in g.bundles):
                    g.state = RESCHEDULING
                for b in g.bundles:
                    b.home = None

    def rebind(self, client: bytes, job_id: str | None, owns_job: bool, worker_id: str) -> None:
        """A client said hello again after a head restart: the groups it created are its
        again (they die with it, unless detached)."""
        for g in self.groups.values():
            mine = g.creator_worker == worker_id if g.creator_worker else owns_job
            if g.creator.startswith(RESTORED) and mine and g.job_id == job_id:
                g.creator = client

    def carve(self, lease: Lease, pg: tuple[str, int] | None) -> bool:
        """Take a lease re-created after a head restart out of the bundle it ran in: one of
        group ``pg`` = (id, index or -1) on its node with room (``False``: none)."""
        g = self.groups.get(pg[0]) if pg is not None else None
        if g is None or pg is None or g.state == REMOVED:
            return False
        for b in g.bundles:
            if b.node_id != lease.node_id or pg[1] not in (-1, b.index):
                continue
            gpus_ok = all(b.gpu_free_u.get(i, 0) >= u for i, u in lease.gpu_units.items())
            if _within(lease.units, b.avail_u) and gpus_ok:
                for k, v in lease.units.items():
                    b.avail_u[k] -= v
                for i, u in lease.gpu_units.items():
                    b.gpu_free_u[i] -= u
                lease.bundle = (g.pg_id, b.index)
                return True
        return False

    def node_removed(self, node_id: str) -> None:
        """A node died: its bundles lost their reservation and are placed again."""
        for g in self.groups.values():
            g.feasible = False  # fewer nodes: judged again
            if g.state == REMOVED:
                continue
            for b in g.bundles:
                if b.node_id == node_id:
                    b.node_id = None
                    b.avail_u, b.gpu_free_u = {}, {}
                    g.state = RESCHEDULING

    def remove(self, pg_id: str, reason: str) -> list[Instruction] | None:
        """Remove a group (``None`` when unknown): the free part of its bundles goes back to
        their nodes, and the workers of the task leases still in it are killed (actors are the
        actor directory's to kill)."""
        g = self.groups.get(pg_id)
        if g is None:
            return None
        if g.state == REMOVED:
            return []
        out: list[Instruction] = []
        for lease in self.leases.values():
            in_group = lease.bundle is not None and lease.bundle[0] == pg_id
            if in_group and isinstance(lease.requester, bytes):
                out.append(KillWorker(lease.node_id, lease.worker_id))
        for b in g.bundles:
            node = self.nodes.get(b.node_id or "")
            if node is not None and node.alive:
                for k, v in b.avail_u.items():
                    node.avail_u[k] = node.avail_u.get(k, 0) + v
                for gid, u in b.gpu_free_u.items():
                    node.gpu_free_u[gid] = node.gpu_free_u.get(gid, 0) + u
            b.avail_u, b.gpu_free_u = {}, {}
        g.state = REMOVED
        g.removal_reason = reason
        removed = [r.pg_id for r in self.groups.values() if r.state == REMOVED]
        for old in removed[: max(0, len(removed) - REMOVED_KEPT)]:
            del self.groups[old]  # the table keeps the newest removed ones, as Ray's does
        return out

    def of_creator(self, client: bytes, job_id: str | None = None) -> list[str]:
        """The ids of the live groups that die with a client that left (not detached): the
        ones it created, and with ``job_id`` (its job ended) every one of that job."""
        return [
            g.pg_id
            for g in self.groups.values()
            if (g.creator == client or (job_id is not None and g.job_id == job_id))
            and not g.detached
            and g.state != REMOVED
        ]

    def actors_in(self, pg_id: str, pending: list[LeaseRequest]) -> list[str]:
        """Ids of the actors placed in the group or waiting for a place in it."""
        aids: list[str] = []
        for lease in self.leases.values():
            if lease.bundle is not None and lease.bundle[0] == pg_id:
                aid = getattr(lease.requester, "aid", None)
                if aid is not None:
                    aids.append(aid)
        for req in pending:
            aid = getattr(req.requester, "aid", None)
            if aid is not None and group_of(req.strategy) == pg_id:
                aids.append(aid)
        return aids

    def demand(self) -> list[dict[str, Any]]:
        """The unplaced bundles of groups that do not fit now, as entries of
        :meth:`~nbcluster.head.state.ClusterState.demand` (what pools grow from): a
        ``STRICT_PACK`` group's bundles as one shape (they need one node), others one by one."""
        out: list[dict[str, Any]] = []
        for g in self.groups.values():
            if g.state not in (PENDING, RESCHEDULING):
                continue
            todo = [b.shape for b in g.bundles if b.node_id is None]
            if g.strategy == "STRICT_PACK":
                packed: dict[str, float] = {}
                for shape in todo:
                    for k, v in shape.items():
                        packed[k] = packed.get(k, 0.0) + v
                todo = [packed]
            for shape in todo:
                out.append({"shape": dict(shape), "count": 1, "infeasible": g.infeasible_reported})
        return out

    # ------------------------------------------------------------------------------ leases
    def pool_of(self, lease: Lease) -> Bundle | None:
        """The bundle a lease was carved from, while its group lives."""
        if lease.bundle is None:
            return None
        g = self.groups.get(lease.bundle[0])
        if g is None or g.state == REMOVED:
            return None
        b = g.bundles[lease.bundle[1]]
        return b if b.node_id == lease.node_id else None

    def candidates(self, req: LeaseRequest) -> tuple[list[tuple[NodeInfo, Bundle]], str | None]:
        """The placed bundles a request with a placement group strategy may use, or why it
        never can (unknown or removed group, bad index, more than any bundle holds)."""
        spec = req.strategy or {}
        pg_id = group_of(spec) or ""
        what = req.name or "the task"
        g = self.groups.get(pg_id)
        if g is None:
            return [], (
                f"{what} asks for placement group {pg_id}, which does not exist (it was never "
                "created here, or the head restarted since)"
            )
        if g.state == REMOVED:
            return [], f"{what} asks for placement group {pg_id}, which was removed"
        index = spec.get("bundle", -1)
        if not isinstance(index, int) or not -1 <= index < len(g.bundles):
            return [], (
                f"{what}: placement_group_bundle_index {index!r} is out of range for a group of "
                f"{len(g.bundles)} bundle(s)"
            )
        bundles = g.bundles if index == -1 else [g.bundles[index]]
        if not any(_within(req.units, b.units) for b in bundles):
            where = "any bundle" if index == -1 else f"bundle {index}"
            return [], (
                f"{what} needs {_fmt(req.shape)}, more than {where} of placement group "
                f"{g.name or pg_id} holds ({', '.join(_fmt(b.shape) for b in bundles)})"
            )
        out = []
        for b in bundles:
            node = self.nodes.get(b.node_id or "")
            if node is not None and node.alive:
                out.append((node, b))
        return out, None

    # ------------------------------------------------------------------------------ placing
    def _reserve(self, b: Bundle, node_id: str, gpus: dict[int, int]) -> None:
        node = self.nodes[node_id]
        for k, v in b.units.items():
            node.avail_u[k] = node.avail_u.get(k, 0) - v
        for gid, u in gpus.items():
            node.gpu_free_u[gid] -= u
        b.node_id = node_id
        b.avail_u = dict(b.units)
        b.gpu_free_u = dict(gpus)
        b.gpus = dict(gpus)

    def _plan(
        self, g: Group, totals: bool, fresh: bool = False
    ) -> dict[int, tuple[str, dict[int, int]]] | None:
        """Where the group's unplaced bundles go (index -> node id, GPU ids), or ``None``.

        ``totals``: against the nodes' total resources (can it ever fit?); ``fresh``: as if
        no bundle were placed yet.
        """
        alive = [n for n in self.nodes.values() if n.alive]
        # The nodes' own tables, read only: a node's are copied when a bundle is taken there.
        avail = {n.node_id: n.total_u if totals else n.avail_u for n in alive}
        gfree = {
            n.node_id: {gid: UNIT for gid in n.gpu_free_u} if totals else n.gpu_free_u
            for n in alive
        }
        fixed = {} if fresh else {b.index: b.node_id for b in g.bundles if b.node_id}
        todo = [b for b in g.bundles if b.index not in fixed]
        used = [n for n in fixed.values() if n is not None]
        ids = [n.node_id for n in alive]
        if g.strategy == "STRICT_PACK" or (g.strategy == "PACK" and not used):
            # PACK tries one node first, as STRICT_PACK must.
            for nid in [used[0]] if used else ids:
                if nid not in avail:
                    continue
                trial = _one_node(todo, avail[nid], gfree[nid])
                if trial is not None:
                    return {i: (nid, gpus) for i, gpus in trial.items()}
            if g.strategy == "STRICT_PACK":
                return None
        if g.strategy == "STRICT_SPREAD":
            free_ids = [n for n in ids if n not in used]
            return _spread_strictly(todo, free_ids, avail, gfree)
        plan: dict[int, tuple[str, dict[int, int]]] = {}
        copied: set[str] = set()
        for b in todo:
            if g.strategy == "SPREAD":  # nodes holding fewest bundles of this group first
                order = sorted(ids, key=lambda n: used.count(n))
            else:  # PACK: nodes already holding its bundles first
                order = sorted(ids, key=lambda n: n not in used)
            for nid in order:
                if fit_gpus(avail[nid], gfree[nid], b.units) is None:
                    continue
                if nid not in copied:
                    avail[nid], gfree[nid] = dict(avail[nid]), dict(gfree[nid])
                    copied.add(nid)
                gpus = _take(avail[nid], gfree[nid], b.units)
                assert gpus is not None
                plan[b.index] = (nid, gpus)
                used.append(nid)
                break
            else:
                return None
        return plan

    # ------------------------------------------------------------------------------ checks
    def validate(self, blocked: set[str]) -> None:
        """Check the bundles' accounting (``blocked``: ids of the leases whose worker lent its
        CPUs back); raises ``AssertionError`` on the first violation."""
        held: dict[str, dict[str, int]] = {}
        held_g: dict[str, dict[int, int]] = {}
        blocked_cpu: dict[str, int] = {}
        for lease in self.leases.values():
            b = self.pool_of(lease)
            if b is None:
                continue
            h = held.setdefault(b.key, {})
            for k, v in lease.units.items():
                h[k] = h.get(k, 0) + v
            hg = held_g.setdefault(b.key, {})
            for gid, u in lease.gpu_units.items():
                hg[gid] = hg.get(gid, 0) + u
            if lease.lease_id in blocked:
                blocked_cpu[b.key] = blocked_cpu.get(b.key, 0) + lease.units.get("CPU", 0)
        for g in self.groups.values():
            for b in g.bundles:
                if g.state == REMOVED or b.node_id is None:
                    assert not b.avail_u and not b.gpu_free_u, f"{b.key} holds without a place"
                    continue
                if g.state == CREATED:
                    assert b.node_id in self.nodes, f"{b.key} on an unknown node"
                h = held.get(b.key, {})
                for k in set(b.units) | set(b.avail_u) | set(h):
                    lent = blocked_cpu.get(b.key, 0) if k == "CPU" else 0
                    expect = b.units.get(k, 0) - h.get(k, 0) + lent
                    got = b.avail_u.get(k, 0)
                    assert got == expect, f"{b.key} {k}: available {got} != {expect} units"
                hg = held_g.get(b.key, {})
                gpu_total = sum(b.gpu_free_u.values()) + sum(hg.values())
                assert gpu_total == b.units.get("GPU", 0), f"{b.key}: GPU ids disagree"
                assert all(u >= 0 for u in b.gpu_free_u.values()), f"{b.key}: GPU below 0"
            if g.restoring:
                continue  # some bundles wait for their node
            if g.state == CREATED and g.strategy == "STRICT_PACK":
                assert len({b.node_id for b in g.bundles}) == 1, f"{g.pg_id} not packed"
            if g.state == CREATED and g.strategy == "STRICT_SPREAD":
                nodes = [b.node_id for b in g.bundles]
                assert len(set(nodes)) == len(nodes), f"{g.pg_id} not spread"

    def reserved_on(self, node_id: str) -> tuple[dict[str, int], dict[int, int]]:
        """What live bundles hold on a node in total (for the node's accounting check)."""
        units: dict[str, int] = {}
        gpus: dict[int, int] = {}
        for g in self.groups.values():
            if g.state == REMOVED:
                continue
            for b in g.bundles:
                if b.node_id == node_id:
                    for k, v in b.units.items():
                        units[k] = units.get(k, 0) + v
                    for lease in self.leases.values():  # its leases' GPUs are the bundle's
                        if self.pool_of(lease) is b:
                            for gid, u in lease.gpu_units.items():
                                gpus[gid] = gpus.get(gid, 0) + u
                    for gid, u in b.gpu_free_u.items():
                        gpus[gid] = gpus.get(gid, 0) + u
        return units, gpus


# ---------------------------------------------------------------------------------- helpers
def _take(
    avail: dict[str, int], gfree: dict[int, int], units: dict[str, int]
) -> dict[int, int] | None:
    """Take ``units`` out of ``avail``/``gfree`` if they fit (returns the GPU ids taken)."""
    gpus = fit_gpus(avail, gfree, units)
    if gpus is None:
        return None
    for k, v in units.items():
        avail[k] = avail.get(k, 0) - v
    for gid, u in gpus.items():
        gfree[gid] -= u
    return gpus


def fit_gpus(
    avail: dict[str, int], gfree: dict[int, int], units: dict[str, int]
) -> dict[int, int] | None:
    """The GPU ids (id -> units) ``units`` would take, if they fit ``avail``/``gfree``."""
    for k, v in units.items():
        if avail.get(k, 0) < v:
            return None
    need = units.get("GPU", 0)
    if need <= 0:
        return {}
    if need < UNIT:
        cands = [gid for gid, u in gfree.items() if u >= need]
        if not cands:
            return None
        gid = min(cands, key=lambda i: (gfree[i], i))
        return {gid: need}
    whole = [gid for gid, u in sorted(gfree.items()) if u >= UNIT]
    if need % UNIT or len(whole) < need // UNIT:
        return None
    return {gid: UNIT for gid in whole[: need // UNIT]}


def _one_node(
    todo: list[Bundle], avail: dict[str, int], gfree: dict[int, int]
) -> dict[int, dict[int, int]] | None:
    a, gf = dict(avail), dict(gfree)
    out: dict[int, dict[int, int]] = {}
    for b in todo:
        gpus = _take(a, gf, b.units)
        if gpus is None:
            return None
        out[b.index] = gpus
    return out


def _spread_strictly(
    todo: list[Bundle],
    ids: list[str],
    avail: dict[str, dict[str, int]],
    gfree: dict[str, dict[int, int]],
) -> dict[int, tuple[str, dict[int, int]]] | None:
    """Each bundle on a node of its own: a matching of bundles to the nodes ``ids`` each fits
    (one bundle per node, so the bundles never compete for a node's resources)."""
    if len(todo) > len(ids):
        return None
    fits: dict[int, dict[str, dict[int, int]]] = {}  # bundle index -> node -> GPU ids
    for b in todo:
        fits[b.index] = {}
        for nid in ids:
            gpus = fit_gpus(avail[nid], gfree[nid], b.units)
            if gpus is not None:
                fits[b.index][nid] = gpus
        if not fits[b.index]:
            return None
    owner: dict[str, int] = {}  # node -> bundle index matched to it

    def augment(i: int, seen: set[str]) -> bool:  # Kuhn's augmenting paths
        for nid in fits[i]:
            if nid in seen:
                continue
            seen.add(nid)
            if nid not in owner or augment(owner[nid], seen):
                owner[nid] = i
                return True
        return False

    for b in todo:
        if not augment(b.index, set()):
            return None
    return {i: (nid, fits[i][nid]) for nid, i in owner.items()}


def _sum_units(shapes: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for units in shapes:
        for k, v in units.items():
            total[k] = total.get(k, 0) + v
    return total


def _within(units: dict[str, int], holds: dict[str, int]) -> bool:
    return all(holds.get(k, 0) >= v for k, v in units.items())


def _fmt(shape: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shape.items())) + "}"


def _check_group(bundles: Any, strategy: Any) -> str | None:
    """Why a group can never be created (bad input from the wire), or ``None``."""
    if strategy not in STRATEGIES:
        return f"invalid placement strategy {strategy!r}: use one of {', '.join(STRATEGIES)}"
    if not isinstance(bundles, list) or not bundles:
        return "a placement group needs a non-empty list of bundles"
    if len(bundles) > MAX_BUNDLES:
        return f"a placement group has at most {MAX_BUNDLES} bundles, got {len(bundles)}"
    for i, b in enumerate(bundles):
        if not isinstance(b, dict) or not b:
            return f"bundle {i} must be a non-empty mapping of resources, got {b!r}"
        for k, v in b.items():
            if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int | float):
                return f"bundle {i}: resource {k!r} must be a number, got {v!r}"
            if v != v or v < 0:
                return f"bundle {i}: resource {k!r} must be non-negative, got {v!r}"
        if not any(to_units(v) > 0 for v in b.values()):
            return f"bundle {i} asks for no resources ({b!r}): every bundle must hold something"
        gpu = to_units(b.get("GPU", 0))
        if gpu > UNIT and gpu % UNIT:
            return f"bundle {i}: GPU above 1 must be a whole number, got {b['GPU']:g}"
    return None
