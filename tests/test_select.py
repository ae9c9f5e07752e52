"""Node selection on wide clusters (head/select.py) and the agents' ping interval."""

from __future__ import annotations

from nbcluster.head.heartbeat import ping_interval, silence_limit
from nbcluster.head.instructions import Grant, StartWorker
from nbcluster.head.state import ClusterState


def _cluster(nodes: int, cpus: int, workers: int) -> tuple[ClusterState, list[str]]:
    st = ClusterState()
    ids = []
    for i in range(nodes):
        nid, _ = st.add_node(b"a%d" % i, f"n{i}", "h", {"CPU": cpus}, [])
        for w in range(workers):
            st.worker_ready(nid, f"{nid}-w{w}", "a", "c", 1)
        ids.append(nid)
    return st, ids


def test_spread_starts_a_worker_on_every_node_of_a_cold_cluster() -> None:
    st, ids = _cluster(128, 1, 0)
    starts: list[str] = []
    for rid in range(256):
        out = st.request_lease(b"c", "j", rid, {"CPU": 1}, "f", strategy={"t": "spread"})
        starts += [x.node_id for x in out if isinstance(x, StartWorker)]
    assert sorted(starts) == sorted(ids)  # each node once, none twice
    granted = set()
    for i, nid in enumerate(starts):
        out = st.worker_ready(nid, f"w{i}", "a", "c", 1)
        granted |= {x.lease.node_id for x in out if isinstance(x, Grant)}
    assert granted == set(ids)
    st.validate_state()


def test_a_full_cluster_regrants_freed_cpus_first_come_first_served() -> None:
    st, _ = _cluster(64, 2, 2)
    held: dict[int, str] = {}
    for rid in range(128 + 40):
        for x in st.request_lease(b"c", "j", rid, {"CPU": 1}, "f"):
            assert isinstance(x, Grant)
            held[rid] = x.lease.lease_id
    assert len(held) == 128 and [r.rid for r in st.pending] == list(range(128, 168))
    for n in range(40):
        out = st.return_lease(b"c", held.pop(n))
        assert [x.rid for x in out if isinstance(x, Grant)] == [128 + n]  # the oldest waiter
        st.validate_state()
    # A bigger shape that fits nowhere does not hold up a smaller one behind it.
    st.request_lease(b"c", "j", 500, {"CPU": 2}, "f")
    out = st.return_lease(b"c", held.pop(40))
    assert [x.rid for x in out if isinstance(x, Grant)] == []
    st.request_lease(b"c", "j", 501, {"CPU": 1}, "f")
    assert [r.rid for r in st.pending] == [500]


def test_ping_interval_grows_past_250_agents_and_liveness_with_it() -> None:
    assert ping_interval(1) == ping_interval(250) == 1.0
    assert ping_interval(1000) == 4.0
    assert silence_limit(1.0, 1.0) == 5.0
    assert silence_limit(1.0, 4.0) == 20.0  # it may still sleep the longer one once
