"""The head's placement groups, pure: gang reservation, strategies, leases carved from bundles."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

from nbcluster.head.instructions import (
    ActorRequester,
    Grant,
    Instruction,
    KillWorker,
    Unschedulable,
    Warn,
)
from nbcluster.head.placement import (
    CREATED,
    MAX_BUNDLES,
    PENDING,
    REMOVED,
    REMOVED_KEPT,
    RESCHEDULING,
)
from nbcluster.head.state import ClusterState

A = b"client-a"
_wids = itertools.count()


def _node(st: ClusterState, cpus: float = 2, gpus: int = 0, **res: float) -> str:
    node_id, _ = st.add_node(b"agent", "n", "h", {"CPU": cpus, "GPU": gpus, **res}, [])
    return node_id


def _workers(st: ClusterState, node_id: str, n: int) -> list[Instruction]:
    out: list[Instruction] = []
    for _ in range(n):
        wid = f"{node_id}-w{next(_wids)}"
        out += st.worker_ready(node_id, wid, f"tcp://{wid}", f"tcp://{wid}c", 1)
    return out


def _pg(pg: str, bundle: int = -1) -> dict[str, Any]:
    return {"t": "pg", "pg": pg, "bundle": bundle, "capture": False}


def _create(st: ClusterState, pg: str, bundles: list[dict[str, float]], strategy: str) -> str:
    error, _ = st.create_group(A, "j1", pg, bundles=bundles, strategy=strategy)
    assert error is None
    return st.groups.groups[pg].state


def _nodes_of(st: ClusterState, pg: str) -> list[str | None]:
    return [b.node_id for b in st.groups.groups[pg].bundles]


def test_strict_spread_one_bundle_per_node_or_nothing() -> None:
    st = ClusterState()
    n1, n2 = _node(st), _node(st)
    assert _create(st, "g1", [{"CPU": 1}] * 2, "STRICT_SPREAD") == CREATED
    assert sorted(_nodes_of(st, "g1")) == sorted([n1, n2])  # type: ignore[type-var]
    assert st.nodes[n1].available["CPU"] == 1 and st.nodes[n2].available["CPU"] == 1
    # Three bundles on two nodes can never be spread strictly: reported once, kept pending.
    error, ins = st.create_group(
        A, "j1", "g2", bundles=[{"CPU": 0.1}] * 3, strategy="STRICT_SPREAD"
    )
    assert error is None and [type(i) for i in ins] == [Warn]
    assert st.groups.groups["g2"].state == PENDING and _nodes_of(st, "g2") == [None] * 3
    assert st.schedule() == []  # reported once
    n3 = _node(st)  # a third node makes it fit
    assert st.groups.groups["g2"].state == CREATED
    assert len(set(_nodes_of(st, "g2"))) == 3 and n3 in _nodes_of(st, "g2")
    st.validate_state()


def test_strict_spread_matches_bundles_to_nodes_that_fit_them() -> None:
    st = ClusterState()
    gpu_node = _node(st, cpus=1, gpus=1)  # listed first: a greedy pass would put bundle 0 here
    cpu_node = _node(st, cpus=1)
    assert _create(st, "g", [{"CPU": 1}, {"GPU": 1}], "STRICT_SPREAD") == CREATED
    assert _nodes_of(st, "g") == [cpu_node, gpu_node]
    st.validate_state()


def test_strict_pack_needs_one_node_and_pack_falls_back_to_several() -> None:
    st = ClusterState()
    n1, n2 = _node(st, cpus=2), _node(st, cpus=2)
    assert _create(st, "sp", [{"CPU": 1}] * 2, "STRICT_PACK") == CREATED
    assert len(set(_nodes_of(st, "sp"))) == 1
    _, ins = st.create_group(A, "j1", "big", bundles=[{"CPU": 1}] * 3, strategy="STRICT_PACK")
    assert [type(i) for i in ins] == [Warn]  # no node has 3 CPUs in total
    assert _create(st, "pk1", [{"CPU": 1}] * 2, "PACK") == CREATED  # fits the other node
    assert len(set(_nodes_of(st, "pk1"))) == 1
    st.remove_group("sp", "removed")
    st.remove_group("pk1", "removed")
    assert _create(st, "spr", [{"CPU": 1}] * 2, "SPREAD") == CREATED  # one CPU left on each
    assert len(set(_nodes_of(st, "spr"))) == 2
    assert _create(st, "pk", [{"CPU": 1}] * 2, "PACK") == CREATED  # no node has 2: split
    assert sorted(_nodes_of(st, "pk")) == sorted([n1, n2])  # type: ignore[type-var]
    st.validate_state()


def test_gang_reservation_is_all_or_nothing_and_frees_nothing_for_others() -> None:
    st = ClusterState()
    n = _node(st, cpus=2)
    _workers(st, n, 2)
    (grant,) = [i for i in st.request_lease(A, "j1", 1, {"CPU": 1}, "f") if isinstance(i, Grant)]
    # Two bundles of 1 CPU do not fit the one free CPU: nothing is reserved.
    assert _create(st, "g", [{"CPU": 1}, {"CPU": 1}], "PACK") == PENDING
    assert st.nodes[n].available["CPU"] == 1
    # ... so another task still gets the free CPU.
    assert any(isinstance(i, Grant) for i in st.request_lease(A, "j1", 2, {"CPU": 1}, "g"))
    st.validate_state()
    # Both tasks return their leases: the group is placed whole.
    st.return_lease(A, grant.lease.lease_id)
    assert st.groups.groups["g"].state == PENDING
    other = next(ls for ls in st.leases.values())
    st.return_lease(A, other.lease_id)
    assert st.groups.groups["g"].state == CREATED
    assert st.nodes[n].available["CPU"] == 0
    st.validate_state()


def test_leases_are_carved_from_their_bundle_only() -> None:
    st = ClusterState()
    n1, n2 = _node(st, cpus=2), _node(st, cpus=2)
    _workers(st, n1, 3)
    _workers(st, n2, 3)
    _create(st, "g", [{"CPU": 1}, {"CPU": 1}], "STRICT_SPREAD")
    b1_node = _nodes_of(st, "g")[1]
    (g,) = [
        i
        for i in st.request_lease(A, "j1", 1, {"CPU": 1}, "f", _pg("g", 1))
        if isinstance(i, Grant)
    ]
    assert g.lease.node_id == b1_node and g.lease.bundle == ("g", 1)
    assert st.nodes[b1_node].available["CPU"] == 1  # taken from the bundle, not the node
    # Bundle 1 is full now: a second request for it waits, though its node has a free CPU.
    assert st.request_lease(A, "j1", 2, {"CPU": 1}, "f", _pg("g", 1)) == []
    # Plain tasks use the free CPUs outside the group and never the reserved ones.
    got = [i for i in st.request_lease(A, "j1", 3, {"CPU": 2}, "f") if isinstance(i, Grant)]
    assert got == []
    st.validate_state()
    st.return_lease(A, g.lease.lease_id)  # the waiting request gets bundle 1 now
    assert [ls.bundle for ls in st.leases.values()] == [("g", 1)]
    st.validate_state()


def test_requests_too_big_for_the_bundle_or_unknown_group_fail() -> None:
    st = ClusterState()
    _node(st, cpus=4)
    _create(st, "g", [{"CPU": 1}], "PACK")
    (u,) = st.request_lease(A, "j1", 1, {"CPU": 2}, "f", _pg("g"))
    assert isinstance(u, Unschedulable) and "more than any bundle" in u.reason
    (u,) = st.request_lease(A, "j1", 2, {"CPU": 1}, "f", _pg("g", 3))
    assert isinstance(u, Unschedulable) and "out of range" in u.reason
    (u,) = st.request_lease(A, "j1", 3, {"CPU": 1}, "f", _pg("nope"))
    assert isinstance(u, Unschedulable) and "does not exist" in u.reason


def test_bad_groups_are_refused() -> None:
    st = ClusterState()
    for bundles, strategy, why in [
        ([], "PACK", "non-empty list"),
        ([{}], "PACK", "non-empty mapping"),
        ([{"CPU": 0}], "PACK", "no resources"),
        ([{"CPU": -1}], "PACK", "non-negative"),
        ([{"CPU": "1"}], "PACK", "must be a number"),
        ([{"GPU": 1.5}], "PACK", "whole number"),
        ([{"CPU": 1}], "PACKED", "invalid placement strategy"),
        ([{"CPU": 1}] * (MAX_BUNDLES + 1), "PACK", "at most"),
    ]:
        error, ins = st.create_group(A, "j1", "g", bundles=bundles, strategy=strategy)
        assert error is not None and why in error and ins == []
    assert (
        st.create_group(A, "j1", "g1", bundles=[{"CPU": 1}], strategy="PACK", name="x")[0] is None
    )
    error, _ = st.create_group(A, "j1", "g2", bundles=[{"CPU": 1}], strategy="PACK", name="x")
    assert error is not None and "already exists" in error
    # The same id again (a resent request) creates nothing new.
    assert st.create_group(A, "j1", "g1", bundles=[{"CPU": 1}], strategy="PACK")[0] is None
    assert list(st.groups.groups) == ["g1"]


def test_gpu_bundles_reserve_specific_gpus() -> None:
    st = ClusterState()
    n = _node(st, cpus=4, gpus=2)
    _workers(st, n, 2)
    _create(st, "g", [{"GPU": 1, "CPU": 1}], "PACK")
    (b,) = st.groups.groups["g"].bundles
    assert len(b.gpu_free_u) == 1
    gpu = next(iter(b.gpu_free_u))
    assert st.nodes[n].gpu_free_u[gpu] == 0
    (g,) = [
        i
        for i in st.request_lease(A, "j1", 1, {"GPU": 1, "CPU": 1}, "f", _pg("g", 0))
        if isinstance(i, Grant)
    ]
    assert list(g.lease.gpus) == [gpu]
    # A plain GPU task gets the other GPU, never the reserved one.
    (g2,) = [i for i in st.request_lease(A, "j1", 2, {"GPU": 1}, "f") if isinstance(i, Grant)]
    assert list(g2.lease.gpus) != [gpu]
    st.validate_state()


def test_removal_kills_task_workers_fails_waiters_and_frees_bundles() -> None:
    st = ClusterState()
    n = _node(st, cpus=2)
    _workers(st, n, 2)
    _create(st, "g", [{"CPU": 1}], "PACK")
    (g,) = [
        i for i in st.request_lease(A, "j1", 1, {"CPU": 1}, "f", _pg("g")) if isinstance(i, Grant)
    ]
    assert st.request_lease(A, "j1", 2, {"CPU": 1}, "f", _pg("g")) == []  # waits in the group
    actor_req = ActorRequester("a1")
    assert st.request_lease(actor_req, "j1", 3, {"CPU": 1}, "A", _pg("g")) == []
    assert st.groups.actors_in("g", list(st.pending)) == ["a1"]
    ins = st.remove_group("g", "removed")
    assert ins is not None
    assert KillWorker(n, g.lease.worker_id) in ins
    failed = {i.rid for i in ins if isinstance(i, Unschedulable)}
    assert failed == {2, 3}
    assert st.groups.groups["g"].state == REMOVED
    assert st.nodes[n].available["CPU"] == 1  # the bundle's free part is back; the task's CPU
    st.validate_state()  # ... counts against the node until its worker is gone
    st.worker_died(g.lease.worker_id, "killed")
    assert st.nodes[n].available["CPU"] == 2
    assert st.remove_group("nope", "x") is None
    st.validate_state()


def test_blocked_worker_in_a_bundle_lends_to_the_bundle() -> None:
    st = ClusterState()
    n = _node(st, cpus=2)
    _workers(st, n, 2)
    _create(st, "g", [{"CPU": 1}], "PACK")
    (g,) = [
        i for i in st.request_lease(A, "j1", 1, {"CPU": 1}, "f", _pg("g")) if isinstance(i, Grant)
    ]
    st.worker_blocked(g.worker.worker_id, True)
    assert st.groups.groups["g"].bundles[0].avail_u["CPU"] == 10_000
    assert st.nodes[n].available["CPU"] == 1
    st.validate_state()
    st.remove_group("g", "removed")  # removed while blocked: what it lent goes to the node
    st.validate_state()
    st.worker_blocked(g.worker.worker_id, False)
    st.validate_state()


def test_node_death_reschedules_its_bundles() -> None:
    st = ClusterState()
    n1, n2 = _node(st), _node(st)
    _create(st, "g", [{"CPU": 2}], "PACK")
    (where,) = _nodes_of(st, "g")
    st.remove_node(where or "", "dead")
    assert st.groups.groups["g"].state == CREATED  # placed again on the other node
    assert _nodes_of(st, "g") == [n2 if where == n1 else n1]
    st.remove_node(_nodes_of(st, "g")[0] or "", "dead")
    assert st.groups.groups["g"].state == RESCHEDULING
    st.validate_state()


def test_removed_groups_are_forgotten_beyond_a_bound() -> None:
    st = ClusterState()
    _node(st, cpus=1)
    for i in range(REMOVED_KEPT + 5):
        assert _create(st, f"g{i}", [{"CPU": 1}], "PACK") == CREATED
        st.remove_group(f"g{i}", "removed")
    assert len(st.groups.groups) == REMOVED_KEPT
    assert "g0" not in st.groups.groups and f"g{REMOVED_KEPT + 4}" in st.groups.groups
    assert st.nodes[next(iter(st.nodes))].available["CPU"] == 1
    st.validate_state()


def test_waiting_groups_count_as_demand() -> None:
    st = ClusterState()
    _node(st, cpus=2)
    _create(st, "fits", [{"CPU": 2}], "PACK")
    assert st.groups.demand() == []  # placed: nothing to grow for
    _create(st, "packed", [{"CPU": 1}, {"CPU": 1}], "STRICT_PACK")
    _create(st, "spread", [{"CPU": 4}, {"CPU": 1, "GPU": 1}], "SPREAD")
    assert st.groups.demand() == [
        {"shape": {"CPU": 2.0}, "count": 1, "infeasible": False},
        {"shape": {"CPU": 4.0}, "count": 1, "infeasible": True},
        {"shape": {"CPU": 1.0, "GPU": 1.0}, "count": 1, "infeasible": True},
    ]


@pytest.mark.parametrize("seed", range(8))
def test_random_sequences_keep_invariants(seed: int) -> None:
    rng = random.Random(seed)
    st = ClusterState()
    nodes = [_node(st, cpus=rng.choice([1, 2, 4]), gpus=rng.choice([0, 1, 2])) for _ in range(3)]
    groups: list[str] = []
    strategies = ["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
    for step in range(600):
        op = rng.random()
        rid = step + 1
        if op < 0.15:
            pg = f"g{step}"
            bundles = [
                {"CPU": rng.choice([0.5, 1, 2]), "GPU": rng.choice([0, 0, 0.5, 1])}
                for _ in range(rng.randint(1, 3))
            ]
            st.create_group(A, "j1", pg, bundles=bundles, strategy=rng.choice(strategies))
            groups.append(pg)
        elif op < 0.22 and groups:
            st.remove_group(rng.choice(groups), "removed")
        elif op < 0.5:
            strategy = (
                _pg(rng.choice(groups), rng.choice([-1, 0]))
                if groups and rng.random() < 0.7
                else None
            )
            who: bytes | ActorRequester = A if rng.random() < 0.8 else ActorRequester(f"a{step}")
            st.request_lease(
                who,
                "j1",
                rid,
                {"CPU": rng.choice([0, 0.5, 1]), "GPU": rng.choice([0, 0, 0.5])},
                "f",
                strategy,
            )
        elif op < 0.62:
            alive = [n for n in nodes if st.nodes[n].alive]
            if alive:
                _workers(st, rng.choice(alive), 1)
        elif op < 0.8 and st.leases:
            lease = rng.choice(list(st.leases.values()))
            st.return_lease(lease.requester, lease.lease_id)
        elif op < 0.88 and st.leases:
            lease = rng.choice(list(st.leases.values()))
            st.worker_blocked(lease.worker_id, rng.random() < 0.5)
        elif op < 0.93 and st.workers:
            st.worker_died(rng.choice(list(st.workers)), "died")
        elif op < 0.96:
            alive = [n for n in nodes if st.nodes[n].alive]
            if len(alive) > 1:
                st.remove_node(rng.choice(alive), "dead")
        elif op < 0.98:
            nodes.append(_node(st, cpus=rng.choice([1, 2]), gpus=rng.choice([0, 1])))
        else:
            st.client_gone(A, "j1", owns_job=False)
        st.validate_state()
