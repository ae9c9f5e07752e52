"""What lets a restarted head pick the cluster up again.

The head keeps its live state in memory. To survive a restart (the Jupyter server hosting it
restarts, or ``nbcluster head`` is run again) it writes a small snapshot — the actor directory,
the placement groups (bundles, strategy, name, lifetime, creator and where each bundle is), the
jobs whose drivers were connected and which nodes were alive or dead — to a file of mode 0600,
and rebuilds the rest from the peers that reconnect:

- node agents re-register with their node id and their running workers;
- drivers say hello again with their job id, the leases they hold and the actors they use.

Until every node and every job's driver of the snapshot is back (or
:data:`~nbcluster.head.restart.RECOVERY_WINDOW_S` passed) new lease requests wait, so that no
idle-looking worker is handed out while its real holder has not yet claimed it. At the end of
the window, claims nobody could honour are answered ``lease_lost``, actors whose worker did not
come back are restarted or buried, jobs whose driver did not come back end, and adopted workers
nobody claimed are recycled.

The snapshot is written at most twice a second: a head that dies within that moment of a change
restarts without it. An actor created in that moment is unknown to the restarted head, which
answers a driver naming it that it is dead (and recycles its worker); one saved before it was
placed is placed again, as a new instance.

This module holds the snapshot; :mod:`nbcluster.head.restart` decides what to do with the peers
that come back.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from nbcluster.head.actors import ActorDirectory, ActorInfo
from nbcluster.head.model import units_of
from nbcluster.head.placement import REMOVED, RESTORED, Bundle, Group, PlacementGroups
from nbcluster.protocol.messages import DEAD

_SNAPSHOT_VERSION = 1

# ActorInfo fields that are persisted (the rest is connection state rebuilt on reconnect).
_ACTOR_FIELDS = (
    "aid",
    "cls_name",
    "name",
    "namespace",
    "job_id",
    "detached",
    "shape",
    "place_shape",
    "max_restarts",
    "max_task_retries",
    "methods",
    "spec",
    "payload",
    "state",
    "restarts",
    "lease_id",
    "worker_id",
    "node_id",
    "address",
    "control_address",
    "pid",
    "no_restart",
    "death_reason",
    "created_at",
    "strategy",
    "parent",
)


@dataclass
class Snapshot:
    """What a head writes down to be restartable."""

    head_id: str = ""
    actors: list[dict[str, Any]] = field(default_factory=list)
    actor_gpus: dict[str, list[int]] = field(default_factory=dict)
    jobs: list[str] = field(default_factory=list)  # jobs with a connected driver
    nodes: dict[str, str] = field(default_factory=dict)  # alive node id -> name
    dead_nodes: list[str] = field(default_factory=list)
    groups: list[dict[str, Any]] = field(default_factory=list)  # live placement groups
    saved_at: float = 0.0


def take_snapshot(
    head_id: str, actors: ActorDirectory, jobs: list[str], dead_nodes: list[str]
) -> Snapshot:
    """Collect the restartable part of the head's state."""
    cluster = actors.cluster
    snap = Snapshot(head_id=head_id, jobs=sorted(set(jobs)), saved_at=time.time())
    for a in actors.actors.values():
        if a.state == DEAD:
            continue
        snap.actors.append({f: getattr(a, f) for f in _ACTOR_FIELDS})
        lease = cluster.leases.get(a.lease_id or "")
        if lease is not None and lease.gpus:
            snap.actor_gpus[a.aid] = sorted(lease.gpus)
    snap.groups = [_group_record(g) for g in cluster.groups.groups.values() if g.state != REMOVED]
    snap.nodes = {n.node_id: n.name for n in cluster.nodes.values() if n.alive}
    snap.dead_nodes = sorted(set(dead_nodes) | {n for n, v in cluster.nodes.items() if not v.alive})
    return snap


def save_snapshot(path: str, snap: Snapshot) -> None:
    """Write ``snap`` atomically, readable by this user only (it holds pickled classes)."""
    data = msgpack.packb(
        {
            "v": _SNAPSHOT_VERSION,
            "head_id": snap.head_id,
            "actors": snap.actors,
            "actor_gpus": snap.actor_gpus,
            "jobs": snap.jobs,
            "nodes": snap.nodes,
            "dead_nodes": snap.dead_nodes,
            "groups": snap.groups,
            "saved_at": snap.saved_at,
        },
        use_bin_type=True,
    )
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".head-state-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_snapshot(path: str) -> Snapshot | None:
    """Read a snapshot; ``None`` when there is none or it cannot be used."""
    try:
        st = os.stat(path)
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            return None  # never trust pickled classes another user could have written
        with open(path, "rb") as f:
            raw = msgpack.unpackb(f.read(), raw=False, strict_map_key=False)
    except (OSError, ValueError, msgpack.UnpackException):
        return None
    if not isinstance(raw, dict) or raw.get("v") != _SNAPSHOT_VERSION:
        return None
    return Snapshot(
        head_id=str(raw.get("head_id", "")),
        actors=list(raw.get("actors", [])),
        actor_gpus={k: list(v) for k, v in dict(raw.get("actor_gpus", {})).items()},
        jobs=list(raw.get("jobs", [])),
        nodes=dict(raw.get("nodes", {})),
        dead_nodes=list(raw.get("dead_nodes", [])),
        groups=list(raw.get("groups", [])),
        saved_at=float(raw.get("saved_at", 0.0)),
    )


def restore_actors(actors: ActorDirectory, snap: Snapshot) -> None:
    """Put the snapshot's actors back into an empty directory (not yet placed anywhere)."""
    for rec in snap.actors:
        a = ActorInfo(owner=b"", **{f: rec[f] for f in _ACTOR_FIELDS if f in rec})
        a.payload = [bytes(p) for p in a.payload]
        actors.actors[a.aid] = a
        if a.name is not None:
            actors.names[(a.namespace, a.name)] = a.aid


def _group_record(g: Group) -> dict[str, Any]:
    """A placement group as the snapshot keeps it: what it is, and where each bundle holds what
    (a bundle still waiting for its node after an earlier restart keeps that node)."""
    return {
        "pg_id": g.pg_id,
        "name": g.name,
        "namespace": g.namespace,
        "job_id": g.job_id,
        "creator_worker": g.creator_worker,
        "strategy": g.strategy,
        "detached": g.detached,
        "state": g.state,
        "bundles": [
            {"shape": b.shape, "node_id": b.node_id or b.home, "gpus": b.gpus} for b in g.bundles
        ],
    }


def restore_groups(groups: PlacementGroups, snap: Snapshot) -> None:
    """Put the snapshot's placement groups back, their bundles waiting for their nodes: each
    takes its resources and GPU ids back when its node registers again
    (:meth:`PlacementGroups.node_added`), before that node's leases are claimed."""
    for rec in snap.groups:
        bundles = [
            Bundle(
                rec["pg_id"],
                i,
                {str(k): float(v) for k, v in b["shape"].items()},
                units_of(b["shape"]),
                gpus={int(k): int(v) for k, v in dict(b.get("gpus") or {}).items()},
                home=b.get("node_id") or None,
            )
            for i, b in enumerate(rec["bundles"])
        ]
        g = Group(
            rec["pg_id"],
            rec["name"],
            rec["namespace"],
            rec["job_id"],
            RESTORED + rec["pg_id"].encode(),
            rec["strategy"],
            bool(rec["detached"]),
            bundles,
            state=rec["state"],
            creator_worker=rec.get("creator_worker") or "",
            restoring=True,
        )
        groups.groups[g.pg_id] = g


def gpu_shares(gpu_ids: list[int], shape: dict[str, float]) -> dict[int, float]:
    """What a lease holding ``shape`` takes of each of its GPUs (a fraction of one, or wholes)."""
    need = float(shape.get("GPU", 0.0))
    if not gpu_ids or need <= 0:
        return {}
    return {g: min(1.0, need / len(gpu_ids)) for g in gpu_ids}
