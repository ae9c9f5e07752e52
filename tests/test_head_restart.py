"""The head's recovery after a restart, as a pure component: events in, instructions out.

An "old head" (a real :class:`ClusterState` and :class:`ActorDirectory`) runs an actor and a
driver's task lease and writes its snapshot; a new head's :class:`Recovery` then gets the nodes
and drivers that come back. No processes, no sockets.
"""

from __future__ import annotations

from typing import Any

from nbcluster.head.actors import ActorDirectory
from nbcluster.head.instructions import (
    ActorChanged,
    ActorRequester,
    ActorUnknown,
    AttachActor,
    Grant,
    Instruction,
    JobEnded,
    KillWorker,
    LeaseLost,
    PublishActorTo,
)
from nbcluster.head.model import WorkerState
from nbcluster.head.placement import CREATED, RESCHEDULING
from nbcluster.head.recovery import Snapshot, take_snapshot
from nbcluster.head.restart import (
    NODE_NOT_BACK,
    RECOVERY_WINDOW_S,
    UNKNOWN_AFTER_RESTART,
    Recovery,
)
from nbcluster.head.state import ClusterState

DRIVER = b"driver-after-restart"
WORKERS = [
    {"worker_id": w, "addr": f"tcp://{w}", "control_addr": f"tcp://{w}c", "pid": i}
    for i, w in enumerate(["w-actor", "w-task", "w-spare"], start=10)
]


def _old_head(max_restarts: int = 0) -> tuple[Snapshot, str, str]:
    """A head with an actor on ``w-actor`` and a task lease on ``w-task``: (snapshot, node id,
    task lease id)."""
    st = ClusterState(id_prefix="old-")
    node_id, _ = st.add_node(b"agent", "n", "h", {"CPU": 4}, [])
    for w in WORKERS:
        st.worker_ready(node_id, w["worker_id"], w["addr"], w["control_addr"], w["pid"])
    d = ActorDirectory(st)
    spec = {"cls_name": "C", "shape": {}, "place_shape": {"CPU": 1}, "ns": "", "aid": "a1"}
    _, ins = d.create(b"old-driver", "j1", {**spec, "max_restarts": max_restarts}, [b"cls"])
    (grant,) = ins
    assert isinstance(grant, Grant) and grant.requester == ActorRequester("a1")
    assert grant.worker.worker_id == "w-actor"
    d.on_grant("a1", grant.lease, grant.worker)
    d.on_ready("a1")
    (task,) = st.request_lease(b"old-driver", "j1", 7, {"CPU": 1}, "f")
    assert isinstance(task, Grant) and task.worker.worker_id == "w-task"
    return take_snapshot("oldhead", d, ["j1"], []), node_id, task.lease.lease_id


def _new_head(snap: Snapshot) -> tuple[ClusterState, ActorDirectory, Recovery]:
    st = ClusterState(id_prefix="new-")
    actors = ActorDirectory(st)
    rec = Recovery(st, actors)
    rec.start(snap, now=0.0)
    return st, actors, rec


def _node_back(st: ClusterState, rec: Recovery, node_id: str) -> list[Instruction]:
    # What the service does for a node that outlived the old head: same id, no prestart.
    st.add_node(b"agent-again", "n", "h", {"CPU": 4}, [], node_id=node_id)
    return rec.node_rejoined(node_id, WORKERS)


def _claim(lease_id: str, worker_id: str = "w-task") -> dict[str, Any]:
    return {"lease_id": lease_id, "worker_id": worker_id, "shape": {"CPU": 1}, "gpus": []}


def test_window_waits_for_the_nodes_and_the_jobs_drivers() -> None:
    snap, node_id, lease_id = _old_head()
    st, _, rec = _new_head(snap)
    assert rec.active and not rec.over(now=1.0)
    _node_back(st, rec, node_id)
    assert not rec.over(now=1.0)  # the job's driver is not back yet
    rec.client_rejoined(DRIVER, "j1", True, [_claim(lease_id)], ["a1"])
    assert rec.over(now=1.0)
    # ... or it times out.
    _, _, rec2 = _new_head(snap)
    assert not rec2.over(now=RECOVERY_WINDOW_S - 0.1)
    assert rec2.over(now=RECOVERY_WINDOW_S + 0.1)


def test_node_back_gives_actors_their_workers_and_adopts_the_rest() -> None:
    snap, node_id, _ = _old_head()
    st, actors, rec = _new_head(snap)
    ins = _node_back(st, rec, node_id)
    a = actors.actors["a1"]
    w = st.workers["w-actor"]
    assert ins == [AttachActor(a, w), ActorChanged(a)]
    assert w.state is WorkerState.LEASED and w.actor_id == "a1" and w.lease_id == a.lease_id
    assert st.leases[a.lease_id or ""].requester == ActorRequester("a1")
    # Nobody claimed the others yet: no job may be given them meanwhile.
    assert st.workers["w-task"].state is WorkerState.ADOPTED
    assert st.workers["w-spare"].state is WorkerState.ADOPTED
    st.request_lease(b"other", "j2", 1, {"CPU": 1}, "f")
    assert not st.leases.keys() - {a.lease_id}
    st.validate_state()


def test_driver_back_before_its_node_gets_its_lease_when_the_node_is() -> None:
    snap, node_id, lease_id = _old_head()
    st, actors, rec = _new_head(snap)
    ins = rec.client_rejoined(DRIVER, "j1", True, [_claim(lease_id)], ["a1"])
    assert ins == [PublishActorTo(DRIVER, actors.actors["a1"])]  # the claim waits for the node
    assert actors.actors["a1"].owner == DRIVER and DRIVER in actors.actors["a1"].subscribers
    _node_back(st, rec, node_id)
    lease = st.leases[lease_id]
    assert lease.requester == DRIVER and lease.worker_id == "w-task"
    assert st.workers["w-task"].state is WorkerState.LEASED
    assert st.nodes[node_id].avail_u["CPU"] == 3 * 10_000  # the actor holds no CPU once placed
    st.validate_state()
    # The window closes with nothing to settle but the unclaimed spare worker.
    assert rec.over(now=1.0)
    ended = rec.end()
    assert ended is not None
    assert ended[0] == [KillWorker(node_id, "w-spare")] and ended[1] == []
    assert not rec.active and rec.end() is None


def test_driver_after_its_node_claims_at_once_and_hears_of_its_actors() -> None:
    snap, node_id, lease_id = _old_head()
    st, actors, rec = _new_head(snap)
    _node_back(st, rec, node_id)
    ins = rec.client_rejoined(DRIVER, "j1", True, [_claim(lease_id)], ["a1", "ghost"])
    assert ins == [
        PublishActorTo(DRIVER, actors.actors["a1"]),
        ActorUnknown(DRIVER, "ghost", UNKNOWN_AFTER_RESTART),  # not in the snapshot: dead
    ]
    assert st.leases[lease_id].requester == DRIVER
    # A repeated rejoin (its first HELLO went unanswered) keeps what it claimed.
    again = b"driver-said-hello-again"
    assert rec.client_rejoined(again, "j1", True, [_claim(lease_id)], []) == []
    assert st.leases[lease_id].requester == again
    st.validate_state()


def test_a_claim_the_head_cannot_honour_is_lost() -> None:
    snap, node_id, lease_id = _old_head()
    st, _, rec = _new_head(snap)
    _node_back(st, rec, node_id)
    taken = _claim("lease-two", worker_id="w-actor")  # the actor holds that worker
    elsewhere = _claim("lease-far", worker_id="w-far")  # on a node not back (yet)
    ins = rec.client_rejoined(DRIVER, "j1", True, [taken, elsewhere, _claim(lease_id)], [])
    assert ins == [LeaseLost(DRIVER, "lease-two", "head restarted")]
    st.validate_state()
    # The window closes without w-far's node: that claim is lost then.
    ended = rec.end()
    assert ended is not None
    assert ended[0] == [
        LeaseLost(DRIVER, "lease-far", NODE_NOT_BACK),
        KillWorker(node_id, "w-spare"),  # adopted, claimed by nobody: recycled
    ]


def test_end_settles_what_did_not_come_back() -> None:
    snap, _, lease_id = _old_head(max_restarts=1)
    st, actors, rec = _new_head(snap)
    rec.client_rejoined(DRIVER, "j1", True, [_claim(lease_id)], ["a1"])
    assert rec.defer((DRIVER, {"k": "LEASE_REQUEST", "rid": 3}, []))
    assert not rec.over(now=1.0)  # the node is missing
    assert rec.over(now=RECOVERY_WINDOW_S + 1)
    ended = rec.end()
    assert ended is not None
    ins, deferred = ended
    a = actors.actors["a1"]
    # The claim is lost first, then the actor restarts elsewhere (here: nowhere yet).
    assert ins[:2] == [LeaseLost(DRIVER, lease_id, NODE_NOT_BACK), ActorChanged(a)]
    assert a.state == "RESTARTING" and a.restarts == 1 and a.death_reason == NODE_NOT_BACK
    assert deferred == [(DRIVER, {"k": "LEASE_REQUEST", "rid": 3}, [])]
    assert not rec.defer((DRIVER, {}, []))  # closed: requests are handled at once
    st.validate_state()


def test_end_ends_jobs_whose_driver_did_not_come_back() -> None:
    snap, node_id, _ = _old_head()
    st, actors, rec = _new_head(snap)
    _node_back(st, rec, node_id)
    ended = rec.end()
    assert ended is not None
    ins, _ = ended
    a = actors.actors["a1"]
    # Nodes hear that the job ended before its workers are killed (as before).
    assert ins[0] == JobEnded("j1")
    # The actor's worker is killed; it is buried when its agent reports the exit.
    assert a.no_restart and a.death_reason == "the driver that owns the actor exited"
    killed = {i.worker_id for i in ins if isinstance(i, KillWorker)}
    assert killed == {"w-actor", "w-task", "w-spare"}
    st.validate_state()


def test_rejoin_without_a_window_takes_back_what_it_can() -> None:
    st = ClusterState()
    actors = ActorDirectory(st)
    rec = Recovery(st, actors)  # a head without a snapshot: no window
    assert not rec.active and not rec.over(now=1e9) and rec.end() is None
    assert not rec.defer((DRIVER, {}, []))
    node_id, _ = st.add_node(b"agent", "n", "h", {"CPU": 2}, [], node_id="node-old")
    rec.node_rejoined(node_id, WORKERS[:1])
    spec = {"cls_name": "C", "shape": {}, "place_shape": {"CPU": 8}, "ns": "", "aid": "big"}
    actors.create(DRIVER, "j1", spec, [])  # cannot be placed: stays PENDING
    ins = rec.client_rejoined(
        DRIVER, "j1", True, [_claim("lease-1", "w-actor"), _claim("lease-2", "w-x")], ["big"]
    )
    assert ins == [
        LeaseLost(DRIVER, "lease-2", "head restarted"),  # no window to wait for its node
        PublishActorTo(DRIVER, actors.actors["big"]),  # published even while PENDING
    ]
    assert st.workers["w-actor"].state is WorkerState.LEASED
    st.validate_state()


def _old_head_with_group() -> tuple[Snapshot, dict[str, str], Grant]:
    """A head with a placement group over nodes a (with 2 GPUs) and b, and a task lease in its
    GPU bundle: (snapshot, node ids by name, the task's grant)."""
    st = ClusterState(id_prefix="old-")
    ids = {
        "a": st.add_node(b"agent-a", "a", "h", {"CPU": 2, "GPU": 2}, [])[0],
        "b": st.add_node(b"agent-b", "b", "h", {"CPU": 2}, [])[0],
    }
    for w in WORKERS:
        st.worker_ready(ids["a"], w["worker_id"], w["addr"], w["control_addr"], w["pid"])
    bundles = [{"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0}]
    error, _ = st.create_group(
        b"old-driver", "j1", "g1", bundles=bundles, strategy="STRICT_SPREAD", name="kept"
    )
    assert error is None and st.groups.groups["g1"].state == CREATED
    in_group = {"t": "pg", "pg": "g1", "bundle": 0}
    (task,) = st.request_lease(b"old-driver", "j1", 7, {"CPU": 1, "GPU": 1}, "f", in_group)
    assert isinstance(task, Grant) and task.lease.bundle == ("g1", 0)
    return take_snapshot("oldhead", ActorDirectory(st), ["j1"], []), ids, task


def test_groups_come_back_with_their_reservations_and_running_leases() -> None:
    snap, ids, task = _old_head_with_group()
    (saved,) = snap.groups
    assert saved["name"] == "kept" and [b["node_id"] for b in saved["bundles"]] == [
        ids["a"],
        ids["b"],
    ]
    st, _, rec = _new_head(snap)
    g = st.groups.groups["g1"]
    assert g.state == CREATED and g.restoring and not any(b.node_id for b in g.bundles)
    # Node a is back: its bundle takes its CPU and its very GPU back before any lease is claimed.
    st.add_node(b"agent-a2", "a", "h", {"CPU": 2, "GPU": 2}, [], node_id=ids["a"])
    rec.node_rejoined(ids["a"], WORKERS)
    b0 = g.bundles[0]
    assert b0.node_id == ids["a"] and b0.gpus == dict.fromkeys(task.lease.gpus, 10_000)
    assert st.nodes[ids["a"]].avail_u["CPU"] == 10_000
    # The driver claims the task's lease: carved from the bundle, not from the node again.
    claim = {
        "lease_id": task.lease.lease_id,
        "worker_id": task.worker.worker_id,
        "shape": {"CPU": 1, "GPU": 1},
        "gpus": task.lease.gpus,
        "pg": "g1",
        "bundle": 0,
    }
    assert rec.client_rejoined(DRIVER, "j1", True, [claim], []) == []
    assert st.leases[task.lease.lease_id].bundle == ("g1", 0)
    assert st.nodes[ids["a"]].avail_u["CPU"] == 10_000 and b0.avail_u.get("CPU") == 0
    assert g.creator == DRIVER  # it dies with this driver again
    st.validate_state()
    # Node b never comes back: at the window's end its bundle is placed again, when it can be.
    ended = rec.end()
    assert ended is not None
    assert not g.restoring and g.state == RESCHEDULING and g.bundles[1].node_id is None
    st.validate_state()
    c, _ = st.add_node(b"agent-c", "c", "h", {"CPU": 2}, [])
    assert g.state == CREATED and g.bundles[1].node_id == c
    st.validate_state()
