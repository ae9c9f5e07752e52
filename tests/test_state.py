"""The head's pure scheduling state: events in, instructions out."""

from __future__ import annotations

import random

from nbcluster.head.state import ClusterState

A, B = b"client-a", b"client-b"


def _node(st: ClusterState, cpus: float = 2, gpus: int = 0, prestart: int = 0, **res: float) -> str:
    resources = {"CPU": cpus, "GPU": gpus, **res}
    node_id, _ = st.add_node(
        b"agent", "n", "127.0.0.1", resources, list(range(gpus)), prestart=prestart
    )
    return node_id


def _ready(st: ClusterState, node_id: str, wid: str) -> list[tuple[object, ...]]:
    return st.worker_ready(node_id, wid, f"tcp://{wid}", f"tcp://{wid}c", 1)


def verbs(ins: list[tuple[object, ...]]) -> list[object]:
    return [i[0] for i in ins]


def test_prestart_and_grant() -> None:
    st = ClusterState()
    node_id, ins = st.add_node(b"agent", "n", "h", {"CPU": 2}, [], prestart=2)
    assert verbs(ins) == ["start_worker", "start_worker"]
    assert verbs(st.request_lease(A, "j1", 1, {"CPU": 1}, "f")) == []  # no worker yet
    ins = _ready(st, node_id, "w1")
    assert verbs(ins) == ["grant"]
    assert st.nodes[node_id].available["CPU"] == 1
    st.validate_state()


def test_request_waits_for_resources_then_gets_the_returned_worker() -> None:
    st = ClusterState()
    n = _node(st, cpus=1)
    _ready(st, n, "w1")
    (grant,) = st.request_lease(A, "j1", 1, {"CPU": 1}, "f")
    lease = grant[3]
    assert verbs(st.request_lease(A, "j1", 2, {"CPU": 1}, "f")) == []
    ins = st.return_lease(A, lease.lease_id)  # type: ignore[attr-defined]
    assert verbs(ins) == ["grant"] and ins[0][4].worker_id == "w1"
    st.validate_state()


def test_jobs_do_not_share_workers() -> None:
    st = ClusterState()
    n = _node(st, cpus=2)
    _ready(st, n, "w1")
    (g,) = st.request_lease(A, "j1", 1, {"CPU": 1}, "f")
    st.return_lease(A, g[3].lease_id)
    # w1 now belongs to job j1: job j2 needs a worker of its own.
    ins = st.request_lease(B, "j2", 1, {"CPU": 1}, "f")
    assert verbs(ins) == ["start_worker"]
    st.validate_state()


def test_infeasible_is_reported_once_and_cleared_by_a_new_node() -> None:
    st = ClusterState()
    _node(st, cpus=2)
    ins = st.request_lease(A, "j1", 1, {"GPU": 1}, "train")
    assert verbs(ins) == ["infeasible"] and ins[0][3] == {"GPU": 1}
    assert verbs(st.schedule()) == []  # not repeated
    n2, ins = st.add_node(b"agent2", "gpu-box", "h2", {"CPU": 4, "GPU": 1}, [0])
    assert "start_worker" in verbs(ins)
    assert verbs(_ready(st, n2, "w9")) == ["grant"]
    st.validate_state()


def test_gpu_ids_fractional_and_pinned_workers() -> None:
    st = ClusterState()
    n = _node(st, cpus=8, gpus=2)
    for w in ("w1", "w2", "w3"):
        _ready(st, n, w)
    (g1,) = st.request_lease(A, "j", 1, {"GPU": 1}, "f")
    (g2,) = st.request_lease(A, "j", 2, {"GPU": 0.5}, "f")
    (g3,) = st.request_lease(A, "j", 3, {"GPU": 0.5}, "f")
    assert set(g1[3].gpus) != set(g2[3].gpus)
    assert g2[3].gpus == g3[3].gpus  # two halves share one GPU
    assert verbs(st.request_lease(A, "j", 4, {"GPU": 0.5}, "f")) == []  # both GPUs full
    st.validate_state()
    # A worker pinned to GPU 0 never gets a lease for GPU 1.
    for g in (g1, g2, g3):
        st.return_lease(A, g[3].lease_id)
    pinned = {w.worker_id: w.gpus for w in st.workers.values()}
    (g,) = [i for i in st.request_lease(A, "j", 5, {"GPU": 1}, "f") if i[0] == "grant"] or [None]
    if g is not None:
        assert pinned[g[4].worker_id] in (None, tuple(sorted(g[3].gpus)))
    st.validate_state()


def test_blocked_worker_lends_its_cpu() -> None:
    st = ClusterState()
    n = _node(st, cpus=1)
    _ready(st, n, "w1")
    (_grant,) = st.request_lease(A, "j", 1, {"CPU": 1}, "parent")
    assert verbs(st.request_lease(A, "j", 2, {"CPU": 1}, "child")) == []
    ins = st.worker_blocked("w1", True)
    assert verbs(ins) == ["start_worker"]  # the child may run now
    assert verbs(_ready(st, n, "w2")) == ["grant"]
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
    assert ("lease_lost", A, g[3].lease_id, "killed by SIGKILL") in ins
    assert "start_worker" in verbs(ins)
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
    assert sorted(i[2] for i in ins if i[0] == "kill_worker") == ["w1"]
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
            st.return_lease(lease.client, lease.lease_id)
        elif op < 0.85 and st.workers:
            st.worker_died(rng.choice(list(st.workers)), "died")
        elif op < 0.95 and st.workers:
            w = rng.choice(list(st.workers.values()))
            st.worker_blocked(w.worker_id, not w.blocked)
        else:
            st.client_gone(rng.choice([A, B]), rng.choice(["j1", "j2"]), rng.random() < 0.5)
        st.validate_state()


def test_actor_directory_lifecycle() -> None:
    from nbcluster.head.actors import ActorDirectory, actor_client

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
    ins = d.on_grant("a1", grant[3], grant[4])
    assert verbs(ins) == ["actor_init"]
    d.on_ready("a1")
    assert st.nodes[n].available["CPU"] == 2  # placed with 1 CPU, holds none
    st.validate_state()
    # Names are unique while the actor lives; get_if_exists returns it.
    assert "error" in d.create(B, "j2", {**spec, "aid": "a2"}, [])[0]
    assert d.create(B, "j2", {**spec, "aid": "a3", "get_if_exists": True}, [])[0]["aid"] == "a1"
    # Its worker dies: one restart allowed.
    ins = st.worker_died("w1", "killed")
    assert ("lease_lost", actor_client("a1"), grant[3].lease_id, "killed") in ins
    ins = d.on_lost("a1", "killed")
    assert d.actors["a1"].state == "RESTARTING" and d.actors["a1"].restarts == 1
    assert "start_worker" in verbs(ins)
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
    d.on_grant("keep", g1[3], g1[4])
    _, (g2,) = d.create(A, "j", {**spec, "aid": "mine"}, [])
    d.on_grant("mine", g2[3], g2[4])
    d.on_ready("keep")
    d.on_ready("mine")
    ins = d.job_gone("j") + st.client_gone(A, "j", owns_job=True)
    killed = {i[2] for i in ins if i[0] == "kill_worker"}
    assert killed == {g2[4].worker_id}
