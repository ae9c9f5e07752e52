"""The head's pure scheduling state: events in, instructions out."""

from __future__ import annotations

import random
from typing import Any

from nbcluster.head.instructions import (
    ActorInit,
    ActorRequester,
    Grant,
    Infeasible,
    Instruction,
    KillWorker,
    LeaseLost,
    StartWorker,
    Unschedulable,
)
from nbcluster.head.state import ClusterState

A, B = b"client-a", b"client-b"


def _node(st: ClusterState, cpus: float = 2, gpus: int = 0, prestart: int = 0, **res: float) -> str:
    resources = {"CPU": cpus, "GPU": gpus, **res}
    node_id, _ = st.add_node(
        b"agent", "n", "127.0.0.1", resources, list(range(gpus)), prestart=prestart
    )
    return node_id


def _ready(st: ClusterState, node_id: str, wid: str) -> list[Instruction]:
    return st.worker_ready(node_id, wid, f"tcp://{wid}", f"tcp://{wid}c", 1)


def kinds(ins: list[Instruction]) -> list[type]:
    return [type(i) for i in ins]


def grants(ins: list[Instruction]) -> list[Grant]:
    return [i for i in ins if isinstance(i, Grant)]


def test_prestart_and_grant() -> None:
    st = ClusterState()
    node_id, ins = st.add_node(b"agent", "n", "h", {"CPU": 2}, [], prestart=2)
    assert kinds(ins) == [StartWorker, StartWorker]
    assert kinds(st.request_lease(A, "j1", 1, {"CPU": 1}, "f")) == []  # no worker yet
    ins = _ready(st, node_id, "w1")
    assert kinds(ins) == [Grant]
    assert st.nodes[node_id].available["CPU"] == 1
    st.validate_state()


def test_request_waits_for_resources_then_gets_the_returned_worker() -> None:
    st = ClusterState()
    n = _node(st, cpus=1)
    _ready(st, n, "w1")
    (grant,) = st.request_lease(A, "j1", 1, {"CPU": 1}, "f")
    lease = grant.lease
    assert kinds(st.request_lease(A, "j1", 2, {"CPU": 1}, "f")) == []
    ins = st.return_lease(A, lease.lease_id)  # type: ignore[attr-defined]
    assert kinds(ins) == [Grant] and ins[0].worker.worker_id == "w1"
    st.validate_state()


def test_jobs_do_not_share_workers() -> None:
    st = ClusterState()
    n = _node(st, cpus=2)
    _ready(st, n, "w1")
    (g,) = st.request_lease(A, "j1", 1, {"CPU": 1}, "f")
    st.return_lease(A, g.lease.lease_id)
    # w1 now belongs to job j1: job j2 needs a worker of its own.
    ins = st.request_lease(B, "j2", 1, {"CPU": 1}, "f")
    assert kinds(ins) == [StartWorker]
    st.validate_state()


def test_infeasible_is_reported_once_and_cleared_by_a_new_node() -> None:
    st = ClusterState()
    _node(st, cpus=2)
    ins = st.request_lease(A, "j1", 1, {"GPU": 1}, "train")
    assert kinds(ins) == [Infeasible] and ins[0].missing == {"GPU": 1}
    assert kinds(st.schedule()) == []  # not repeated
    n2, ins = st.add_node(b"agent2", "gpu-box", "h2", {"CPU": 4, "GPU": 1}, [0])
    assert StartWorker in kinds(ins)
    assert kinds(_ready(st, n2, "w9")) == [Grant]
    st.validate_state()


def test_gpu_ids_fractional_and_pinned_workers() -> None:
    st = ClusterState()
    n = _node(st, cpus=8, gpus=2)
    for w in ("w1", "w2", "w3"):
        _ready(st, n, w)
    (g1,) = st.request_lease(A, "j", 1, {"GPU": 1}, "f")
    (g2,) = st.request_lease(A, "j", 2, {"GPU": 0.5}, "f")
    (g3,) = st.request_lease(A, "j", 3, {"GPU": 0.5}, "f")
    assert set(g1.lease.gpus) != set(g2.lease.gpus)
    assert g2.lease.gpus == g3.lease.gpus  # two halves share one GPU
    assert kinds(st.request_lease(A, "j", 4, {"GPU": 0.5}, "f")) == []  # both GPUs full
    st.validate_state()
    # A worker pinned to GPU 0 never gets a lease for GPU 1.
    for g in (g1, g2, g3):
        st.return_lease(A, g.lease.lease_id)
    pinned = {w.worker_id: w.gpus for w in st.workers.values()}
    (g,) = grants(st.request_lease(A, "j", 5, {"GPU": 1}, "f")) or [None]
    if g is not None:
        assert pinned[g.worker.worker_id] in (None, tuple(sorted(g.lease.gpus)))
    st.validate_state()


def test_blocked_worker_lends_its_cpu() -> None:
    st = ClusterState()
    n = _node(st, cpus=1)
    _ready(st, n, "w1")
    (_grant,) = st.request_lease(A, "j", 1, {"CPU": 1}, "parent")
    assert kinds(st.request_lease(A, "j", 2, {"CPU": 1}, "child")) == []
    ins = st.worker_blocked("w1", True)
    assert kinds(ins) == [StartWorker]  # the child may run now
    assert kinds(_ready(st, n, "w2")) == [Grant]
    st.validate_state()
    st.worker_blocked("w1", False)  # oversubscribed until the child finishes
    assert st.nodes[n].available["CPU"] == -1
    st.validate_state()


def test_worker_death_loses_lease_and_refills_pool() -> None:
    st = ClusterState()
    n, _ = st.add_node(b"agent", "n", "h", {"CPU": 1}, [], prestart=1)
    _ready(st, n, "w1")
    (g,) = st.request_lease(A, "j", 1, {"CPU": 1}, "f")
    ins = st.worker_died("w1", "killed by SIGKILL")
    assert LeaseLost(A, g.lease.lease_id, "killed by SIGKILL") in ins
    assert StartWorker in kinds(ins)
    assert st.nodes[n].available["CPU"] == 1
    st.validate_state()


def test_driver_leaving_kills_its_workers() -> None:
    st = ClusterState()
    n = _node(st, cpus=2)
    _ready(st, n, "w1")
    _ready(st, n, "w2")
    st.request_lease(A, "j", 1, {"CPU": 1}, "f")
    st.request_lease(A, "j", 2, {"CPU": 10}, "f")  # pending, infeasible
    ins = st.client_gone(A, "j", owns_job=True)
    assert sorted(i.worker_id for i in ins if isinstance(i, KillWorker)) == ["w1"]
    assert not st.pending and not st.leases
    st.validate_state()


def test_random_event_sequences_keep_invariants() -> None:
    rng = random.Random(7)
    st = ClusterState()
    nodes = [_node(st, cpus=rng.choice([1, 2, 4]), gpus=rng.choice([0, 1, 2])) for _ in range(3)]
    wid = 0
    rid = 0
    for _ in range(2000):
        op = rng.random()
        if op < 0.25:
            wid += 1
            st.worker_ready(rng.choice(nodes), f"w{wid}", "a", "c", 1)
        elif op < 0.55:
            rid += 1
            shape = rng.choice([{"CPU": 1}, {"CPU": 2}, {"GPU": 0.5}, {"GPU": 1, "CPU": 1}, {}])
            st.request_lease(rng.choice([A, B]), rng.choice(["j1", "j2"]), rid, shape, "f")
        elif op < 0.75 and st.leases:
            lease = rng.choice(list(st.leases.values()))
            st.return_lease(lease.requester, lease.lease_id)
        elif op < 0.85 and st.workers:
            st.worker_died(rng.choice(list(st.workers)), "died")
        elif op < 0.95 and st.workers:
            w = rng.choice(list(st.workers.values()))
            st.worker_blocked(w.worker_id, not w.blocked)
        else:
            st.client_gone(rng.choice([A, B]), rng.choice(["j1", "j2"]), rng.random() < 0.5)
        st.validate_state()


def test_actor_directory_lifecycle() -> None:
    from nbcluster.head.actors import ActorDirectory

    st = ClusterState()
    n = _node(st, cpus=2)
    _ready(st, n, "w1")
    d = ActorDirectory(st)
    spec = {
        "aid": "a1",
        "cls_name": "Model",
        "shape": {},
        "place_shape": {"CPU": 1},
        "max_restarts": 1,
        "name": "m",
        "ns": "x",
    }
    reply, ins = d.create(A, "j", spec, [b"cls"])
    assert reply["aid"] == "a1" and not reply["existing"]
    (grant,) = ins
    ins = d.on_grant("a1", grant.lease, grant.worker)
    assert kinds(ins) == [ActorInit]
    d.on_ready("a1")
    assert st.nodes[n].available["CPU"] == 2  # placed with 1 CPU, holds none
    st.validate_state()
    # Names are unique while the actor lives; get_if_exists returns it.
    assert "error" in d.create(B, "j2", {**spec, "aid": "a2"}, [])[0]
    assert d.create(B, "j2", {**spec, "aid": "a3", "get_if_exists": True}, [])[0]["aid"] == "a1"
    # Its worker dies: one restart allowed.
    ins = st.worker_died("w1", "killed")
    assert LeaseLost(ActorRequester("a1"), grant.lease.lease_id, "killed") in ins
    ins = d.on_lost("a1", "killed")
    assert d.actors["a1"].state == "RESTARTING" and d.actors["a1"].restarts == 1
    assert StartWorker in kinds(ins)
    # Killed before it found a worker again: dead, name free.
    d.kill("a1", True, "killed by test")
    assert d.actors["a1"].state == "DEAD"
    assert d.lookup("m", "x") is None
    st.validate_state()


def test_detached_actor_workers_survive_their_driver() -> None:
    from nbcluster.head.actors import ActorDirectory

    st = ClusterState()
    n = _node(st, cpus=2)
    _ready(st, n, "w1")
    _ready(st, n, "w2")
    d = ActorDirectory(st)
    spec = {"cls_name": "S", "shape": {}, "place_shape": {"CPU": 1}, "ns": "x"}
    _, (g1,) = d.create(A, "j", {**spec, "aid": "keep", "name": "svc", "detached": True}, [])
    d.on_grant("keep", g1.lease, g1.worker)
    _, (g2,) = d.create(A, "j", {**spec, "aid": "mine"}, [])
    d.on_grant("mine", g2.lease, g2.worker)
    d.on_ready("keep")
    d.on_ready("mine")
    ins = d.job_gone("j") + st.client_gone(A, "j", owns_job=True)
    killed = {i.worker_id for i in ins if isinstance(i, KillWorker)}
    assert killed == {g2.worker.worker_id}


# --------------------------------------------------------------------------- scheduling (issue 5)
SPREAD = {"t": "spread"}


def _affinity(node_id: str, soft: bool = False, spill: bool = False) -> dict[str, object]:
    return {"t": "node", "node": node_id, "soft": soft, "spill": spill}


def _storage_node(st: ClusterState, name: str, cpus: float = 2) -> str:
    node_id, _ = st.add_node(
        name.encode(), name, "h", {"CPU": cpus}, [], info={"store_id": f"store-{name}"}
    )
    return node_id


def _granted_node(ins: list[Instruction]) -> str:
    (grant,) = grants(ins)
    return grant.lease.node_id


def test_fractional_gpus_pack_exactly_and_never_overcommit() -> None:
    st = ClusterState()
    n = _node(st, cpus=8, gpus=1)
    for w in ("w1", "w2", "w3"):
        _ready(st, n, w)
    (g1,) = st.request_lease(A, "j", 1, {"GPU": 0.5}, "half")
    (g2,) = st.request_lease(A, "j", 2, {"GPU": 0.5}, "half")
    assert g1.lease.gpus == g2.lease.gpus == {0: 0.5}
    assert g1.worker.worker_id != g2.worker.worker_id
    assert st.nodes[n].gpu_free_u == {0: 0}
    assert kinds(st.request_lease(A, "j", 3, {"GPU": 0.5}, "half")) == []  # the GPU is full
    st.validate_state()
    # 0.5 + 0.75 do not fit one GPU: the 0.75 waits for the whole GPU to have room.
    st.return_lease(A, g1.lease.lease_id)  # (3 takes its place)
    st.return_lease(A, g2.lease.lease_id)
    assert kinds(st.request_lease(A, "j", 4, {"GPU": 0.75}, "big")) == []
    st.validate_state()


def test_half_and_three_quarters_go_to_different_gpus() -> None:
    st = ClusterState()
    n = _node(st, cpus=8, gpus=2)
    for w in ("w1", "w2"):
        _ready(st, n, w)
    (g1,) = st.request_lease(A, "j", 1, {"GPU": 0.5}, "f")
    (g2,) = st.request_lease(A, "j", 2, {"GPU": 0.75}, "f")
    assert set(g1.lease.gpus) != set(g2.lease.gpus)
    st.validate_state()


def test_no_float_drift_in_resource_accounting() -> None:
    st = ClusterState()
    n = _node(st, cpus=1, gpus=1)
    for i in range(12):
        _ready(st, n, f"w{i}")
    # Ten 0.1-CPU leases fill one CPU exactly (0.1 * 10 != 1.0 in floats); the 11th waits.
    grants = [st.request_lease(A, "j", i, {"CPU": 0.1}, "f") for i in range(10)]
    assert all(kinds(g) == [Grant] for g in grants)
    assert kinds(st.request_lease(A, "j", 10, {"CPU": 0.1}, "f")) == []
    assert st.nodes[n].avail_u["CPU"] == 0
    st.cancel_request(A, 10)
    for g in grants:
        st.return_lease(A, g[0].lease.lease_id)
    # Many odd fractions granted and returned leave exactly what the node had.
    for i in range(300):
        shape = {"CPU": [0.1, 0.3, 0.7, 1 / 3][i % 4], "GPU": [0.1, 0.2, 0.3][i % 3]}
        (one,) = st.request_lease(A, "j", 100 + i, shape, "f")
        st.return_lease(A, one.lease.lease_id)
    node = st.nodes[n]
    assert node.avail_u == node.total_u and node.gpu_free_u == {0: 10_000}
    assert node.available == {"CPU": 1.0, "GPU": 1.0}
    st.validate_state()


def test_bad_requests_are_answered_unschedulable() -> None:
    st = ClusterState()
    _node(st, cpus=2, gpus=2)
    (ins,) = st.request_lease(A, "j", 1, {"GPU": 1.5}, "f")
    assert isinstance(ins, Unschedulable) and "whole number" in ins.reason
    (ins,) = st.request_lease(A, "j", 2, {"CPU": -1}, "f")
    assert isinstance(ins, Unschedulable) and "non-negative" in ins.reason
    (ins,) = st.request_lease(A, "j", 3, {"CPU": 1}, "f", strategy={"t": "pack"})
    assert isinstance(ins, Unschedulable) and "invalid scheduling strategy" in ins.reason
    (ins,) = st.request_lease(A, "j", 4, {"CPU": 1}, "f", strategy={"t": "node", "node": 7})
    assert isinstance(ins, Unschedulable)
    # A malformed locality hint is only a hint: ignored.
    bad: Any = {"s": "lots", 3: 4, "t": True}
    assert kinds(st.request_lease(A, "j", 5, {"CPU": 1}, "f", locality=bad)) == [StartWorker]
    assert st.pending[0].locality == {}
    st.cancel_request(A, 5)
    assert not st.pending
    st.validate_state()


def test_spread_places_requests_on_different_nodes() -> None:
    st = ClusterState()
    nodes = [_node(st, cpus=4) for _ in range(3)]
    for i, n in enumerate(nodes):
        _ready(st, n, f"w{i}a")
        _ready(st, n, f"w{i}b")
    placed = [_granted_node(st.request_lease(A, "j", i, {"CPU": 1}, "f", SPREAD)) for i in range(3)]
    assert sorted(placed) == sorted(nodes)
    # The next three go round again: each node holds two.
    placed += [
        _granted_node(st.request_lease(A, "j", i, {"CPU": 1}, "f", SPREAD)) for i in range(3, 6)
    ]
    assert all(placed.count(n) == 2 for n in nodes)
    st.validate_state()


def test_spread_starts_workers_on_different_nodes() -> None:
    st = ClusterState()
    nodes = [_node(st, cpus=4) for _ in range(3)]
    started = []
    for i in range(3):
        started += [x.node_id for x in st.request_lease(A, "j", i, {"CPU": 1}, "f", SPREAD)]
    assert sorted(started) == sorted(nodes)
    # Waiting requests stay with their node: later passes start nothing more.
    for _ in range(5):
        assert st.schedule() == []
    assert {r.waiting_on for r in st.pending} == set(nodes)


def test_default_does_not_queue_everything_on_one_full_node() -> None:
    st = ClusterState()
    n1, n2 = _node(st, cpus=1), _node(st, cpus=1)
    started = []
    for i in range(2):
        started += [x.node_id for x in st.request_lease(A, "j", i, {"CPU": 1}, "f")]
    assert sorted(started) == sorted([n1, n2])  # what waits for n1 keeps n1's CPU reserved


def test_hard_affinity_runs_only_on_its_node() -> None:
    st = ClusterState()
    n1, n2 = _node(st, cpus=2), _node(st, cpus=2)
    _ready(st, n1, "w1")  # an idle worker elsewhere does not tempt it
    ins = st.request_lease(A, "j", 1, {"CPU": 1}, "f", _affinity(n2))
    assert ins == [StartWorker(n2)]
    assert _granted_node(_ready(st, n2, "w2")) == n2
    # Busy: the next one waits for n2 rather than running on n1.
    st.request_lease(A, "j", 2, {"CPU": 2}, "f", _affinity(n2))
    assert st.pending and st.pending[0].rid == 2
    st.validate_state()


def test_hard_affinity_to_unknown_dead_or_small_node_fails() -> None:
    st = ClusterState()
    n1, n2 = _node(st, cpus=2), _node(st, cpus=1)
    (ins,) = st.request_lease(A, "j", 1, {"CPU": 1}, "f", _affinity("node-bogus"))
    assert isinstance(ins, Unschedulable) and (ins.requester, ins.rid) == (A, 1)
    assert "not part of the cluster" in ins.reason
    (ins,) = st.request_lease(A, "j", 2, {"CPU": 2}, "f", _affinity(n2))
    assert isinstance(ins, Unschedulable) and "less than" in ins.reason
    # Waiting for its node when the node dies: the request fails then.
    _ready(st, n1, "w1")
    st.request_lease(B, "j", 3, {"CPU": 2}, "hog", _affinity(n1))
    assert kinds(st.request_lease(A, "j", 4, {"CPU": 1}, "f", _affinity(n1))) == []
    out = st.remove_node(n1, "node died")
    assert (A, 4) in [(i.requester, i.rid) for i in out if isinstance(i, Unschedulable)]
    assert not st.pending
    st.validate_state()


def test_soft_affinity_falls_back() -> None:
    st = ClusterState()
    n1, n2 = _node(st, cpus=1), _node(st, cpus=1)
    _ready(st, n1, "w1")
    _ready(st, n2, "w2")
    # Unknown node: anywhere.
    assert kinds(st.request_lease(A, "j", 1, {"CPU": 1}, "f", _affinity("x", soft=True))) == [Grant]
    st.return_lease(A, next(iter(st.leases)))
    # Its node is busy: waited for (as Ray), unless spilling is allowed.
    st.request_lease(B, "k", 2, {"CPU": 1}, "hog", _affinity(n2))
    assert kinds(st.request_lease(A, "j", 3, {"CPU": 1}, "f", _affinity(n2, soft=True))) == []
    st.cancel_request(A, 3)
    ins = st.request_lease(A, "j", 4, {"CPU": 1}, "f", _affinity(n2, soft=True, spill=True))
    assert _granted_node(ins) == n1
    # Its node dies: a soft request still runs.
    st.return_lease(A, ins[0].lease.lease_id)
    st.remove_node(n2, "died")
    assert _granted_node(st.request_lease(A, "j", 5, {"CPU": 1}, "f", _affinity(n2, True))) == n1
    st.validate_state()


def test_locality_prefers_the_node_holding_the_arguments() -> None:
    st = ClusterState()
    n1, n2 = _storage_node(st, "a", cpus=1), _storage_node(st, "b", cpus=1)
    _ready(st, n1, "w1")  # the default order would pick n1 (it has an idle worker)
    locality = {"store-b": 50_000_000, "store-a": 1_000_000}
    ins = st.request_lease(A, "j", 1, {"CPU": 1}, "consume", locality=locality)
    assert ins == [StartWorker(n2)]  # a worker is started there rather than moving data
    assert _granted_node(_ready(st, n2, "w2")) == n2
    # n2 is full now: the next one runs where it can.
    ins = st.request_lease(A, "j", 2, {"CPU": 1}, "consume", locality=locality)
    assert _granted_node(ins) == n1
    # Unknown stores and stores of nodes that are too small are ignored.
    st.return_lease(A, ins[0].lease.lease_id)
    ins = st.request_lease(A, "j", 3, {"CPU": 1}, "f", locality={"store-zzz": 10**9})
    assert _granted_node(ins) == n1
    st.validate_state()


def test_actor_with_hard_affinity_to_a_bogus_node_dies_with_the_reason() -> None:
    from nbcluster.head.actors import ActorDirectory

    st = ClusterState()
    _node(st, cpus=2)
    d = ActorDirectory(st)
    spec = {"cls_name": "S", "shape": {}, "place_shape": {"CPU": 1}, "ns": "x", "aid": "a1"}
    _, out = d.create(A, "j", {**spec, "strategy": _affinity("node-404")}, [])
    (ins,) = out
    assert isinstance(ins, Unschedulable) and ins.requester == ActorRequester("a1")
    d.on_unschedulable("a1", ins.reason)
    assert d.actors["a1"].state == "DEAD" and "node-404" in d.actors["a1"].death_reason


def test_random_scheduling_keeps_invariants() -> None:
    rng = random.Random(11)
    st = ClusterState()
    nodes = [_node(st, cpus=rng.choice([1, 2, 4]), gpus=rng.choice([0, 1, 2])) for _ in range(4)]
    shapes: list[dict[str, float]] = [
        {"CPU": 0.5},
        {"CPU": 1},
        {"GPU": 0.25},
        {"GPU": 0.5},
        {"GPU": 2, "CPU": 1},
        {},
    ]
    wid = rid = 0
    for _ in range(3000):
        op = rng.random()
        if op < 0.2:
            wid += 1
            st.worker_ready(rng.choice(nodes), f"w{wid}", "a", "c", 1)
        elif op < 0.5:
            rid += 1
            strategy = rng.choice(
                [None, SPREAD, _affinity(rng.choice(nodes), soft=rng.random() < 0.5)]
            )
            st.request_lease(A, "j", rid, rng.choice(shapes), "f", strategy)
        elif op < 0.75 and st.leases:
            st.return_lease(A, rng.choice(list(st.leases)))
        elif op < 0.85 and st.workers:
            st.worker_died(rng.choice(list(st.workers)), "died")
        elif op < 0.95 and st.workers:
            w = rng.choice(list(st.workers.values()))
            st.worker_blocked(w.worker_id, not w.blocked)
        elif op < 0.96:
            st.remove_node(rng.choice(nodes), "died")
        st.validate_state()
        check_demand(st)


def check_demand(st: ClusterState) -> None:
    """``demand()`` and ``node_busy()`` agree with the state they describe."""
    demand = st.demand()
    assert sum(d["count"] for d in demand) <= len(st.pending)
    pending_shapes = [{k: float(v) for k, v in r.shape.items() if v} for r in st.pending]
    for d in demand:
        assert d["count"] >= 1 and d["shape"] in pending_shapes, d
        assert d["infeasible"] == (st.missing_resources(d["shape"]) is not None), d
        if d["infeasible"]:  # nothing alive could ever hold it: every such request counts
            assert d["count"] == pending_shapes.count(d["shape"])
    leased = {lease.node_id for lease in st.leases.values()}
    for node_id, node in st.nodes.items():
        if node.alive and node_id in leased:
            assert st.node_busy(node_id), node_id
        if not node.alive:
            assert not st.node_busy(node_id)
    if not st.pending:
        assert demand == []


def test_demand_counts_what_no_node_has_room_for_by_shape() -> None:
    st = ClusterState()
    n = _node(st, cpus=2)
    assert st.demand() == [] and not st.node_busy(n)
    _ready(st, n, "w1")
    _ready(st, n, "w2")
    for rid in (1, 2):
        st.request_lease(A, "j", rid, {"CPU": 1}, "f")
    assert st.node_busy(n)
    assert st.demand() == []  # both placed
    st.request_lease(A, "j", 3, {"CPU": 1}, "f")
    st.request_lease(A, "j", 4, {"CPU": 1}, "f")
    st.request_lease(A, "j", 5, {"CPU": 1, "GPU": 1}, "f")
    assert st.demand() == [
        {"shape": {"CPU": 1.0}, "count": 2, "infeasible": False},
        {"shape": {"CPU": 1.0, "GPU": 1.0}, "count": 1, "infeasible": True},
    ]
    for lease_id in list(st.leases):
        st.return_lease(A, lease_id)
    # The two CPU requests got the returned workers: only the GPU one is left wanting.
    assert [d["shape"] for d in st.demand()] == [{"CPU": 1.0, "GPU": 1.0}]
    st.validate_state()


def test_blocked_worker_dying_does_not_free_its_cpu_twice() -> None:
    st = ClusterState()
    n = _node(st, cpus=1)
    _ready(st, n, "w1")
    st.request_lease(A, "j", 1, {"CPU": 1}, "parent")
    st.worker_blocked("w1", True)  # lends its CPU
    st.worker_died("w1", "killed")
    assert st.nodes[n].avail_u["CPU"] == 10_000  # not 20_000
    st.validate_state()


def test_gpu_shares_of_a_claimed_lease_match_what_placement_took() -> None:
    from nbcluster.head.recovery import gpu_shares

    for shape in ({"GPU": 0.5}, {"GPU": 2.0}, {"CPU": 1.0}):
        st = ClusterState()
        node_id, _ = st.add_node(b"agent", "n", "127.0.0.1", {"CPU": 4, "GPU": 2}, [0, 1])
        st.worker_ready(node_id, "w1", "addr", "ctrl", 1)
        st.request_lease(b"c", "job", 1, shape, "t")
        (lease,) = st.leases.values()
        # What a restarted head rebuilds from the GPU ids alone equals what was taken.
        assert gpu_shares(sorted(lease.gpus), shape) == lease.gpus


def test_random_actors_and_adopted_workers_keep_invariants() -> None:
    """Actors, adopted workers and claimed leases mixed with tasks: besides the resource
    invariants, no retired (ex-actor) or adopted worker is ever granted, and actors' workers
    never go to tasks."""
    from nbcluster.head.actors import ActorDirectory
    from nbcluster.head.model import WorkerState

    rng = random.Random(5)
    st = ClusterState()
    d = ActorDirectory(st)
    nodes = [_node(st, cpus=rng.choice([2, 4]), gpus=rng.choice([0, 1])) for _ in range(3)]
    never_granted: set[str] = set()  # retired or adopted when last seen

    def run(ins: list[Instruction]) -> None:
        # What the service does with lease instructions of actors (no sockets here).
        for i in ins:
            if isinstance(i, Grant):
                assert i.worker.worker_id not in never_granted, i
                if isinstance(i.requester, ActorRequester):
                    run(d.on_grant(i.requester.aid, i.lease, i.worker))
                else:
                    assert i.worker.actor_id is None, i
            elif isinstance(i, LeaseLost) and isinstance(i.requester, ActorRequester):
                run(d.on_lost(i.requester.aid, i.reason))
            elif isinstance(i, Unschedulable) and isinstance(i.requester, ActorRequester):
                run(d.on_unschedulable(i.requester.aid, i.reason))

    wid = rid = aid = 0
    for _ in range(3000):
        op = rng.random()
        if op < 0.15:
            wid += 1
            run(st.worker_ready(rng.choice(nodes), f"w{wid}", "a", "c", 1))
        elif op < 0.2:
            wid += 1
            st.adopt_worker(rng.choice(nodes), f"w{wid}", "a", "c", 1)
        elif op < 0.25 and st.workers:
            w = rng.choice(list(st.workers.values()))
            rid += 1
            ok = st.claim_lease(A, "j1", f"claimed-{rid}", w.worker_id, {"CPU": 0.5}, {})
            assert ok == (w.worker_id in st.workers and w.lease_id == f"claimed-{rid}")
        elif op < 0.45:
            rid += 1
            shape = rng.choice([{"CPU": 1}, {"CPU": 0.5}, {"GPU": 0.5}, {}])
            run(st.request_lease(rng.choice([A, B]), rng.choice(["j1", "j2"]), rid, shape, "f"))
        elif op < 0.55:
            aid += 1
            spec = {"aid": f"a{aid}", "cls_name": "C", "shape": {}, "ns": "", "max_restarts": 1}
            run(d.create(A, "j1", {**spec, "place_shape": {"CPU": 1}}, [])[1])
        elif op < 0.6 and d.actors:
            a = rng.choice(list(d.actors.values()))
            run(d.on_ready(a.aid))
        elif op < 0.65 and d.actors:
            run(d.kill(rng.choice(list(d.actors)), rng.random() < 0.5, "killed"))
        elif op < 0.8 and st.leases:
            lease = rng.choice(list(st.leases.values()))
            run(st.return_lease(lease.requester, lease.lease_id))
        elif op < 0.9 and st.workers:
            run(st.worker_died(rng.choice(list(st.workers)), "died"))
        elif op < 0.97 and st.workers:
            w = rng.choice(list(st.workers.values()))
            run(st.worker_blocked(w.worker_id, not w.blocked))
        else:
            run(d.job_gone("j2") + st.client_gone(B, "j2", True))
        st.validate_state()
        check_demand(st)
        never_granted = {
            w.worker_id
            for w in st.workers.values()
            if w.state in (WorkerState.RETIRED, WorkerState.ADOPTED)
        }
        for w in st.workers.values():
            if w.actor_id is not None:
                assert w.state in (WorkerState.LEASED, WorkerState.RETIRED), w
    states = {w.state for w in st.workers.values()}
    assert WorkerState.LEASED in states and WorkerState.IDLE in states


def test_runtime_envs_do_not_share_workers_and_old_ones_make_room() -> None:
    st = ClusterState()
    n = _node(st, cpus=1)
    _ready(st, n, "w1")
    (g,) = grants(st.request_lease(A, "j1", 1, {"CPU": 1}, "f", env="envA"))
    assert st.workers["w1"].env == "envA"
    st.return_lease(A, g.lease.lease_id)
    # Same job, no environment: the envA worker is idle but will not do; a new one starts,
    # and the idle envA worker (beyond the node's 1 CPU) is stopped.
    ins = st.request_lease(A, "j1", 2, {"CPU": 1}, "f")
    assert kinds(ins) == [StartWorker, KillWorker]
    assert not grants(ins)
    (g2,) = grants(_ready(st, n, "w2"))
    assert g2.lease.worker_id == "w2" and st.workers["w2"].env == ""
    st.validate_state()
    # A head restart's claim keeps the worker's environment.
    st2 = ClusterState()
    n2 = _node(st2, cpus=1)
    st2.adopt_worker(n2, "w9", "tcp://w9", "tcp://w9c", 1)
    assert st2.claim_lease(A, "j1", "lease-x", "w9", {"CPU": 1}, {}, env="envB")
    assert st2.workers["w9"].env == "envB"
    st2.validate_state()
