"""The head service: runs :class:`ClusterState` behind an authenticated ROUTER socket."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import time
from typing import Any, assert_never

import msgspec
import zmq

from nbcluster._version import __version__
from nbcluster.exceptions import ProtocolError
from nbcluster.head.actors import ActorDirectory, ActorInfo
from nbcluster.head.instructions import (
    ActorChanged,
    ActorInit,
    ActorRequester,
    ActorUnknown,
    AttachActor,
    Grant,
    Infeasible,
    Instruction,
    JobEnded,
    KillWorker,
    LeaseLost,
    PublishActorTo,
    StartWorker,
    Unschedulable,
)
from nbcluster.head.model import Lease, WorkerInfo
from nbcluster.head.observe import Observer
from nbcluster.head.peers import Peer, local_process, running
from nbcluster.head.recovery import load_snapshot, save_snapshot, take_snapshot
from nbcluster.head.restart import Recovery
from nbcluster.head.state import ClusterState
from nbcluster.head.trouble import WorkerTrouble
from nbcluster.protocol.codec import encode
from nbcluster.protocol.messages import DEAD, PROTOCOL_VERSION, Kind
from nbcluster.protocol.security import derive_keys
from nbcluster.protocol.validation import (
    INTERNAL,
    RateLimitedLog,
    error_reply,
    expects_reply,
    receive,
    should_answer,
)
from nbcluster.transport import Transport

log = logging.getLogger(__name__)
_malformed = RateLimitedLog(log, "dropping a malformed message")

#: A client or agent silent for this long is considered gone.
LIVENESS_TIMEOUT_S = 10.0
#: A driver on this machine (a notebook kernel of the Jupyter server hosting us) is gone as soon
#: as its process is: a killed kernel's tasks, objects and actors are released within a second or
#: two, GPUs included. Silence alone drops it only after this long (a cell can hold the GIL in C
#: code for a while; dropping a live kernel would kill its actors).
LOCAL_DRIVER_SILENCE_S = 60.0
DRAIN_REASON = "its node was drained (nbcluster-worker stopped)"
#: Agents ping every second; a node silent this long is dead (its tasks retried elsewhere).
AGENT_LIVENESS_TIMEOUT_S = 5.0


class HeadService:
    """Control plane of one cluster.

    Parameters
    ----------
    token
        The cluster secret.
    host, port
        Where to listen; ``port=0`` picks a free port.
    state_file
        Where to keep the snapshot that lets a restarted head pick the cluster up again
        (``None``: not restartable).
    """

    def __init__(
        self, token: str, host: str = "127.0.0.1", port: int = 0, state_file: str | None = None
    ) -> None:
        self._token = token
        self.host = host
        self.port = port
        self.state_file = state_file
        self.head_id = secrets.token_hex(4)
        self.state = ClusterState(id_prefix=self.head_id[:4] + "-")
        self._dead_nodes: set[str] = set()
        self._dirty = False
        self.actors = ActorDirectory(self.state)
        self.recovery = Recovery(self.state, self.actors)  # taking peers back after a restart
        self._worker_socks: dict[str, Any] = {}  # head -> actor-hosting worker connections
        self.peers: dict[bytes, Peer] = {}
        self._jobs = itertools.count(1)
        self._transport: Transport | None = None
        self._sock: Any = None
        self.address = ""
        self.started_at = time.time()
        # Views, metrics history, task table and change events for the Jupyter panel.
        self.observe = Observer(
            self.state, self.actors, started_at=self.started_at, version=__version__
        )
        self._stopped = asyncio.Event()
        self._stopping = False
        self._tasks: list[asyncio.Task[Any]] = []
        self._trouble = WorkerTrouble()  # workers that keep dying: backoff and warnings
        self._delayed: set[asyncio.Task[Any]] = set()  # worker starts held back by the backoff

    async def start(self) -> str:
        """Bind and start serving; returns ``host:port``."""
        self._transport = Transport(derive_keys(self._token))
        self._sock, endpoint = self._transport.server(zmq.ROUTER, f"tcp://{self.host}:{self.port}")
        self.port = int(endpoint.rsplit(":", 1)[1])
        self.address = f"{self.host}:{self.port}"
        self.observe.address = self.address
        snap = load_snapshot(self.state_file) if self.state_file else None
        if snap is not None and (snap.nodes or snap.actors or snap.jobs):
            self.recovery.start(snap)
            self._dead_nodes = set(snap.dead_nodes)
            log.warning(
                "restarted: waiting for %d node(s), %d actor(s), %d job(s) to reconnect",
                len(snap.nodes),
                len(snap.actors),
                len(snap.jobs),
            )
        self._tasks = [
            asyncio.create_task(self._serve(), name="head-serve"),
            asyncio.create_task(self._reaper(), name="head-reaper"),
        ]
        if self.state_file:
            self._dirty = True
            self._tasks.append(asyncio.create_task(self._persist_loop(), name="head-persist"))
        log.info("head listening on %s", self.address)
        return self.address

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def stop(self, stop_nodes: bool = True) -> None:
        """Close (idempotent: a signal and a request may race).

        With ``stop_nodes`` every agent is told to stop too and the restart snapshot is removed;
        without it the agents, their workers and actors stay up and reconnect to the next head.
        """
        if self._sock is None or self._stopping:
            return
        self._stopping = True
        if stop_nodes:
            for node in self.state.nodes.values():
                if node.alive:
                    await self._send(node.client, {"k": Kind.STOP_NODE})
            if self.state_file:
                with contextlib.suppress(OSError):
                    os.unlink(self.state_file)
        elif self.state_file:
            self._save()
        await asyncio.sleep(0.05)  # let the STOP frames leave before closing the socket
        for t in [*self._tasks, *self._delayed]:
            t.cancel()
        for t in [*self._tasks, *self._delayed]:
            with contextlib.suppress(BaseException):
                await t
        for sock in self._worker_socks.values():
            sock.close(linger=0)
        self._worker_socks.clear()
        if self._sock is not None:
            self._sock.close(linger=0)
        self._sock = None
        if self._transport is not None:
            self._transport.close()
        self._stopped.set()

    # ------------------------------------------------------------------------------ I/O
    async def _send(
        self, ident: bytes, header: dict[str, Any], payload: list[Any] | None = None
    ) -> None:
        if self._sock is None:
            return
        try:
            await self._sock.send_multipart([ident, *encode(header, payload or ())])
        except zmq.ZMQError as exc:  # peer gone (ROUTER_MANDATORY): it will be reaped
            log.debug("send to %r failed: %s", ident, exc)

    async def _serve(self) -> None:
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart(copy=True)
            ident, rest = frames[0], frames[1:]
            try:
                header, payload = receive(rest)
            except ProtocolError as exc:
                _malformed(f"from {ident!r}: {exc}")
                if should_answer(exc):
                    await self._send(ident, error_reply(exc))
                continue
            try:
                await self._handle(ident, header, payload)
            except Exception as exc:  # a bug: answer it, and keep serving everyone else
                log.exception("error handling %r", rest[:1])
                if expects_reply(header):
                    await self._send(ident, error_reply(exc, INTERNAL, header.get("rid")))

    async def _reaper(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.25 if self.recovery.active else 1.0)
            if self.recovery.over():
                await self._end_recovery()
            now = time.monotonic()
            # After the loop was blocked (e.g. a slow handler of the Jupyter server hosting us),
            # pings are queued, not missing: read them before judging anyone silent.
            stalled, last = now - last > 2.0, now
            if stalled:
                continue
            for peer in list(self.peers.values()):
                if peer.proc is not None:  # a driver on this machine: watch its process
                    if running(peer.proc) and now - peer.last_seen <= LOCAL_DRIVER_SILENCE_S:
                        continue
                    log.warning("driver pid %s exited without saying goodbye", peer.pid)
                    await self._peer_gone(peer)
                    continue
                limit = AGENT_LIVENESS_TIMEOUT_S if peer.role == "agent" else LIVENESS_TIMEOUT_S
                if now - peer.last_seen > limit:
                    log.warning(
                        "%s pid %s silent for %.0f s: dropping",
                        peer.role,
                        peer.pid,
                        now - peer.last_seen,
                    )
                    await self._peer_gone(peer)

    async def _run(self, instructions: list[Instruction]) -> None:
        """Carry out what the state, the actor directory or the recovery decided, in order.

        What concerns a lease an actor asked for goes back to the actor directory.
        """
        for ins in instructions:
            match ins:
                case Grant(requester=who, rid=rid, lease=lease, worker=w):
                    if isinstance(who, ActorRequester):
                        await self._run(self.actors.on_grant(who.aid, lease, w))
                    else:
                        await self._send(who, self._grant_msg(rid, lease, w))
                case LeaseLost(requester=who, lease_id=lease_id, reason=reason):
                    if isinstance(who, ActorRequester):
                        self._drop_worker_sock(who.aid)
                        await self._run(self.actors.on_lost(who.aid, reason))
                        continue
                    msg: dict[str, Any] = {
                        "k": Kind.LEASE_LOST,
                        "lease_id": lease_id,
                        "reason": reason,
                    }
                    if reason == DRAIN_REASON:
                        msg["drain"] = True  # not the task's fault: retry it without counting
                    await self._send(who, msg)
                case Infeasible(requester=who, rid=rid, missing=missing, shape=shape):
                    if isinstance(who, ActorRequester):
                        await self._actor_infeasible(who.aid, missing)
                        continue
                    await self._send(
                        who,
                        {
                            "k": Kind.LEASE_INFEASIBLE,
                            "rid": rid,
                            "missing": missing,
                            "shape": shape,
                        },
                    )
                case Unschedulable(requester=who, rid=rid, reason=why):
                    if isinstance(who, ActorRequester):
                        await self._run(self.actors.on_unschedulable(who.aid, why))
                    else:
                        await self._send(who, {"k": Kind.LEASE_FAILED, "rid": rid, "msg": why})
                case ActorInit(actor=a, worker=w, gpus=gpus):
                    await self._actor_init(a, w, gpus)
                case ActorChanged(actor=a):
                    self._dirty = True
                    await self._publish(a)
                    self.observe.actor_changed(a)
                case StartWorker(node_id=node_id):
                    await self._start_worker(node_id)
                case KillWorker(node_id=node_id, worker_id=worker_id):
                    target = self.state.nodes.get(node_id)
                    if target is not None and target.alive:
                        kill = {"k": Kind.KILL_WORKER, "worker_id": worker_id}
                        await self._send(target.client, kill)
                case AttachActor(actor=a, worker=w):
                    await self._attach_actor(a, w)
                case PublishActorTo(client=client, actor=a):
                    await self._publish_to(a, client)
                case ActorUnknown(client=client, aid=aid, reason=why):
                    dead = {"k": Kind.ACTOR_STATE, "aid": aid, "state": DEAD, "reason": why}
                    await self._send(client, dead)
                case JobEnded(job_id=job_id):
                    await self._job_ended(job_id)
                case _:
                    assert_never(ins)

    async def _job_ended(self, job_id: str) -> None:
        """Tell every alive node that the job ended: its stored objects are freed."""
        for node in self.state.nodes.values():
            if node.alive:
                await self._send(node.client, {"k": Kind.JOB_ENDED, "job_id": job_id})

    async def _start_worker(self, node_id: str) -> None:
        """Ask ``node_id`` for a worker: now, or after the backoff while its workers keep dying.

        The state counts the worker as starting meanwhile, so nothing asks for it twice.
        """
        delay = self._trouble.backoff(node_id)
        if delay <= 0:
            await self._send(self.state.nodes[node_id].client, {"k": Kind.START_WORKER})
            return

        async def later() -> None:
            await asyncio.sleep(delay)
            node = self.state.nodes.get(node_id)
            if node is not None and node.alive:
                await self._send(node.client, {"k": Kind.START_WORKER})

        t = asyncio.create_task(later(), name="head-start-worker-later")
        self._delayed.add(t)
        t.add_done_callback(self._delayed.discard)

    async def _worker_died(self, peer: Peer, h: dict[str, Any]) -> None:
        """An agent reports a worker that exited, or that never became ready."""
        node_id = peer.node_id or ""
        reason = str(h.get("reason") or "worker died")
        if not h.get("requested"):  # not one we asked the agent to kill
            self._trouble.died(node_id, reason)
            node = self.state.nodes.get(node_id)
            msg = self._trouble.warning(node_id, node.name if node is not None else node_id)
            if msg is not None:
                log.warning("%s", msg)
                for p in list(self.peers.values()):
                    if p.role == "driver":
                        await self._send(
                            p.ident, {"k": Kind.WARNING, "msg": msg, "code": "workers_dying"}
                        )
        if h.get("never_ready"):
            await self._run(self.state.worker_start_failed(node_id))
        await self._run(self.state.worker_died(h["worker_id"], reason))

    async def _actor_infeasible(self, aid: str, missing: dict[str, float]) -> None:
        """Tell an actor's subscribers that no node could ever place it (it keeps waiting)."""
        a = self.actors.actors.get(aid)
        if a is None:
            return
        what = ", ".join(f"{k}: {v:g}" for k, v in missing.items())
        for sub in a.subscribers:
            await self._send(
                sub,
                {
                    "k": Kind.ACTOR_STATE,
                    "aid": aid,
                    "state": a.state,
                    "infeasible": what,
                    "cls_name": a.cls_name,
                },
            )

    async def _actor_init(self, a: ActorInfo, w: WorkerInfo, gpus: list[int]) -> None:
        assert self._transport is not None
        sock = self._worker_socks.get(w.worker_id)
        if sock is None:
            sock = self._transport.client(zmq.DEALER, w.address)
            self._worker_socks[w.worker_id] = sock
            self._tasks.append(asyncio.create_task(self._read_worker(sock, a.aid)))
        header = {
            "k": Kind.ACTOR_INIT,
            "aid": a.aid,
            "job_id": a.job_id,
            "gpus": gpus,
            "cls_name": a.cls_name,
            "assigned": a.shape,
            **a.spec,
        }
        await sock.send_multipart(encode(header, a.payload))

    async def _read_worker(self, sock: Any, aid: str) -> None:
        while True:
            frames = await sock.recv_multipart()
            try:
                h, payload = receive(frames)
            except ProtocolError as exc:
                _malformed(f"from actor {aid}'s worker: {exc}")
                continue
            kind = h["k"]
            try:
                if kind == Kind.ACTOR_READY:
                    await self._run(self.actors.on_ready(aid))
                elif kind == Kind.ACTOR_FAILED:
                    await self._run(self.actors.on_failed(aid, payload))
                elif kind == Kind.ACTOR_EXIT:
                    await self._run(self.actors.exited(aid))
            except Exception:  # a bug: keep watching this actor
                log.exception("error handling %s from actor %s", kind, aid)

    def _drop_worker_sock(self, aid: str) -> None:
        a = self.actors.actors.get(aid)
        if a is not None and a.worker_id is not None:
            sock = self._worker_socks.pop(a.worker_id, None)
            if sock is not None:
                sock.close(linger=0)

    async def _publish(self, a: ActorInfo) -> None:
        h: dict[str, Any] = {
            "k": Kind.ACTOR_STATE,
            "aid": a.aid,
            "state": a.state,
            "addr": a.address,
            "control_addr": a.control_address,
            "worker_id": a.worker_id,
            "reason": a.death_reason,
            "cls_name": a.cls_name,
        }
        payload: list[Any] = []
        if a.state == DEAD and a.init_error:
            h["init_error"] = True
            payload = list(a.init_error)
        for sub in list(a.subscribers):
            if sub in self.peers:
                await self._send(sub, h, payload)

    def _grant_msg(self, rid: int, lease: Lease, w: WorkerInfo) -> dict[str, Any]:
        node = self.state.nodes[lease.node_id]
        return {
            "k": Kind.LEASE_GRANTED,
            "rid": rid,
            "lease_id": lease.lease_id,
            "worker_id": w.worker_id,
            "worker_addr": w.address,
            "control_addr": w.control_address,
            "pid": w.pid,
            "node_id": lease.node_id,
            "node_name": node.name,
            "gpus": sorted(lease.gpus),
            "shape": lease.shape,
        }

    # ------------------------------------------------------------------------------ handlers
    async def _handle(self, ident: bytes, h: dict[str, Any], payload: list[Any]) -> None:
        kind = h["k"]
        peer = self.peers.get(ident)
        if peer is not None:
            peer.last_seen = time.monotonic()
        if kind == Kind.HELLO:
            await self._hello(ident, h)
            return
        if kind == Kind.REGISTER_NODE:
            await self._register(ident, h)
            return
        if peer is None and kind in (Kind.ACTOR_READY, Kind.ACTOR_FAILED, Kind.ACTOR_EXIT):
            return  # pragma: no cover - these arrive on worker connections
        if peer is None:
            await self._send(ident, {"k": Kind.ERROR, "msg": "say hello first", "code": "nohello"})
            return
        st = self.state
        if kind in (Kind.LEASE_REQUEST, Kind.ACTOR_CREATE) and self.recovery.defer(
            (ident, h, payload)
        ):
            return  # until the old leases are claimed back, no idle-looking worker is handed out
        if kind == Kind.PING:
            if peer.node_id is not None and "store" in h:
                node = self.state.nodes.get(peer.node_id)
                if node is not None:
                    node.info["object_store"] = h["store"]
                if h.get("metrics"):
                    self.observe.on_metrics(peer.node_id, h["metrics"])
            await self._send(ident, {"k": Kind.PONG})
        elif kind == Kind.TASK_EVENTS:
            self.observe.on_task_events(ident, peer.job_id or "", list(h.get("events") or ()))
        elif kind == Kind.LEASE_REQUEST:
            assert peer.job_id is not None
            await self._run(
                st.request_lease(
                    ident,
                    peer.job_id,
                    h["rid"],
                    h["shape"],
                    h.get("name", ""),
                    strategy=h.get("strategy"),
                    locality=h.get("locality"),
                )
            )
        elif kind == Kind.LEASE_RETURN:
            await self._run(st.return_lease(ident, h["lease_id"]))
        elif kind == Kind.LEASE_CANCEL:
            await self._run(st.cancel_request(ident, h["rid"]))
        elif kind in (Kind.WORKER_BLOCKED, Kind.WORKER_UNBLOCKED):
            await self._run(st.worker_blocked(h["worker_id"], kind == Kind.WORKER_BLOCKED))
        elif kind == Kind.QUERY:
            await self._send(
                ident, {"k": Kind.QUERY_REPLY, "rid": h["rid"], "result": self._query(h)}
            )
        elif kind == Kind.WORKER_READY:
            assert peer.node_id is not None
            await self._run(
                st.worker_ready(
                    peer.node_id, h["worker_id"], h["addr"], h["control_addr"], h["pid"]
                )
            )
        elif kind == Kind.WORKER_DIED:
            await self._worker_died(peer, h)
        elif kind == Kind.ACTOR_CREATE:
            assert peer.job_id is not None
            reply, ins = self.actors.create(ident, peer.job_id, h, [bytes(f) for f in payload])
            if "error" in reply:
                await self._send(
                    ident,
                    {"k": Kind.ERROR, "rid": h["rid"], "msg": reply["error"], "code": "actor"},
                )
            else:
                await self._send(ident, {"k": Kind.ACTOR_CREATED, "rid": h["rid"], **reply})
            await self._run(ins)
            if "aid" in reply and reply["aid"] in self.actors.actors:
                self.observe.actor_changed(self.actors.actors[reply["aid"]])
            if reply.get("existing"):
                found = self.actors.actors[reply["aid"]]
                found.subscribers.add(ident)
                await self._publish_to(found, ident)
        elif kind == Kind.ACTOR_RESOLVE:
            a = self.actors.actors.get(h["aid"])
            if a is None:
                await self._send(
                    ident,
                    {
                        "k": Kind.ACTOR_STATE,
                        "aid": h["aid"],
                        "state": DEAD,
                        "reason": "no such actor (it never existed here, or the head restarted)",
                    },
                )
            else:
                a.subscribers.add(ident)
                await self._publish_to(a, ident)
        elif kind == Kind.ACTOR_KILL:
            await self._run(
                self.actors.kill(
                    h["aid"], bool(h.get("no_restart", True)), "killed by nbcluster.kill()"
                )
            )
        elif kind == Kind.ACTOR_RELEASE:
            await self._run(self.actors.release(h["aid"]))
        elif kind == Kind.GOODBYE:
            await self._peer_gone(peer, DRAIN_REASON if h.get("drain") else "")
        elif kind == Kind.SHUTDOWN_CLUSTER:
            log.info("shutdown requested by pid %s", peer.pid)
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self.stop()))
        else:
            log.warning("unexpected message kind %r from %s", kind, peer.role)

    async def _publish_to(self, a: ActorInfo, ident: bytes) -> None:
        subs = a.subscribers
        a.subscribers = {ident}
        try:
            await self._publish(a)
        finally:
            a.subscribers = subs

    async def _version_ok(self, ident: bytes, h: dict[str, Any]) -> bool:
        """Check the protocol version of a HELLO or REGISTER; answer an ERROR if it differs."""
        if h.get("v") == PROTOCOL_VERSION:
            return True
        msg = (
            f"protocol version {h.get('v')} is not supported by this head (it speaks version "
            f"{PROTOCOL_VERSION}); install the same nbcluster version everywhere"
        )
        await self._send(ident, {"k": Kind.ERROR, "code": "version", "msg": msg})
        return False

    async def _hello(self, ident: bytes, h: dict[str, Any]) -> None:
        if not await self._version_ok(ident, h):
            return
        role = str(h.get("role", "driver"))
        job_id = h.get("job_id")
        owns = bool(h.get("owns_job"))  # a driver saying hello again after a head restart
        if not job_id:
            job_id = f"{self.head_id[:4]}{next(self._jobs):04x}"
            owns = True
        peer = Peer(ident, role, int(h.get("pid", 0)), job_id, owns, h.get("worker_id"))
        peer.last_seen = time.monotonic()
        if role == "driver":
            peer.proc = local_process(peer.pid, h.get("started"))
        self.peers[ident] = peer
        self._dirty |= owns  # the snapshot lists jobs, not task-level clients
        if h.get("rejoin"):  # after a head restart: take back what it holds
            await self._run(
                self.recovery.client_rejoined(
                    ident,
                    peer.job_id,
                    peer.owns_job,
                    list(h.get("leases") or ()),
                    list(h.get("actors") or ()),
                )
            )
        if owns:
            self.observe.job_started(job_id, h)  # kernel_id / notebook: the panel's "owner"
        await self._send(
            ident,
            {"k": Kind.WELCOME, "job_id": job_id, "head_pid": os.getpid(), "head_id": self.head_id},
        )

    async def _register(self, ident: bytes, h: dict[str, Any]) -> None:
        if not await self._version_ok(ident, h):
            return
        old_id = str(h.get("node_id") or "")
        known = self.state.nodes.get(old_id)
        if old_id and known is not None and known.alive:
            # The same agent again (it lost a reply): it keeps its identity.
            self.peers.pop(known.client, None)
            known.client = ident
            peer = Peer(ident, "agent", int(h.get("pid", 0)), node_id=old_id)
            peer.last_seen = time.monotonic()
            self.peers[ident] = peer
            await self._send(
                ident, {"k": Kind.NODE_REGISTERED, "node_id": old_id, "head_id": self.head_id}
            )
            return
        # A node declared dead that comes back starts over as a new incarnation: what it ran
        # was retried elsewhere, so its old workers and objects must not be used again.
        adopt = bool(old_id) and known is None and old_id not in self._dead_nodes
        node_id, ins = self.state.add_node(
            ident,
            h["name"],
            h["address"],
            h["resources"],
            list(h.get("gpu_ids", [])),
            pid=int(h.get("pid", 0)),
            prestart=0 if adopt else int(h.get("prestart", 0)),
            info=h.get("info") or {},
            node_id=old_id if adopt else None,
        )
        self.state.nodes[node_id].prestart = int(h.get("prestart", 0))
        peer = Peer(ident, "agent", int(h.get("pid", 0)), node_id=node_id)
        peer.last_seen = time.monotonic()
        self.peers[ident] = peer
        self._dirty = True
        await self._send(
            ident,
            {
                "k": Kind.NODE_REGISTERED,
                "node_id": node_id,
                "head_id": self.head_id,
                "fresh": bool(old_id) and not adopt,
            },
        )
        if adopt:  # it outlived the old head: take over its workers and the actors in them
            ins += self.recovery.node_rejoined(node_id, list(h.get("workers") or ()))
        await self._run(ins)
        self.observe.node_changed(node_id)

    async def _peer_gone(self, peer: Peer, reason: str = "") -> None:
        self.peers.pop(peer.ident, None)
        self._dirty |= peer.role == "agent" or peer.owns_job
        if peer.role == "agent" and peer.node_id is not None:
            self._dead_nodes.add(peer.node_id)
            self._trouble.forget(peer.node_id)
            why = reason or "its node stopped answering (dead or cut off)"
            await self._run(self.state.remove_node(peer.node_id, why))
            node = self.state.nodes.get(peer.node_id)
            died = {
                "k": Kind.NODE_DIED,
                "node_id": peer.node_id,
                "store_id": node.info.get("store_id", "") if node is not None else "",
            }
            for other in list(self.peers.values()):
                if other.role != "agent":
                    await self._send(other.ident, died)
            self.observe.node_changed(peer.node_id)
        else:
            if peer.owns_job and peer.job_id is not None:
                await self._run(self.actors.job_gone(peer.job_id))
                await self._job_ended(peer.job_id)
            for a in self.actors.actors.values():
                a.subscribers.discard(peer.ident)
            await self._run(self.state.client_gone(peer.ident, peer.job_id, peer.owns_job))
            if peer.owns_job and peer.job_id is not None:
                self.observe.job_gone(peer.job_id)

    # ------------------------------------------------------------------------------ restarts
    async def _end_recovery(self) -> None:
        """Close the restart window: settle what nobody came back for, then handle the
        requests held back meanwhile."""
        ended = self.recovery.end()
        if ended is None:
            return
        ins, deferred = ended
        await self._run(ins)
        self._dirty = True
        log.warning(
            "restart complete: %d node(s), %d actor(s)",
            len(self.state.nodes),
            len(self.actors.actors),
        )
        for ident, h, payload in deferred:
            await self._handle(ident, h, payload)

    async def _attach_actor(self, a: ActorInfo, w: WorkerInfo) -> None:
        """Reconnect to an actor's worker after a restart, so that its notices reach us."""
        assert self._transport is not None
        sock = self._transport.client(zmq.DEALER, w.address)
        self._worker_socks[w.worker_id] = sock
        self._tasks.append(asyncio.create_task(self._read_worker(sock, a.aid)))
        await sock.send_multipart(encode({"k": Kind.ACTOR_ATTACH, "aid": a.aid}))

    async def _persist_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            if self._dirty and not self.recovery.active:
                self._save()

    def _save(self) -> None:
        """Write the restart snapshot (see :mod:`nbcluster.head.recovery`)."""
        if not self.state_file:
            return
        self._dirty = False
        jobs = [p.job_id for p in self.peers.values() if p.owns_job and p.job_id]
        try:
            snap = take_snapshot(self.head_id, self.actors, jobs, sorted(self._dead_nodes))
            save_snapshot(self.state_file, snap)
        except OSError as exc:
            log.warning("could not write the head's restart snapshot %s: %s", self.state_file, exc)

    # ------------------------------------------------------------------------------ panel
    async def cancel_task(self, task_id: str, force: bool = False) -> bool:
        """Ask the driver that submitted ``task_id`` to cancel it; ``False`` if not running."""
        t = self.observe.find_task(task_id)
        if t is None or t.client not in self.peers:
            return False
        await self._send(t.client, {"k": Kind.TASK_CANCEL, "tid": task_id, "force": bool(force)})
        return True

    async def kill_actor(self, aid: str) -> bool:
        """Kill an actor for good (no restart); ``False`` if there is no such live actor."""
        a = self.actors.actors.get(aid)
        if a is None or a.state == DEAD:
            return False
        await self._run(self.actors.kill(aid, True, "killed from the Jupyter panel"))
        return True

    def _query(self, h: dict[str, Any]) -> Any:
        """A driver's question: the views of :mod:`nbcluster.views` (docs/jupyter-api.md), in
        their wire form (msgspec builtins)."""
        what = h.get("what")
        obs = self.observe
        if what == "nodes":
            return msgspec.to_builtins(obs.node_views())
        if what in ("actors", "actor_views"):  # "actor_views": its old name
            return msgspec.to_builtins(obs.actor_views())
        if what == "actor":
            a = self.actors.lookup(str(h.get("name")), str(h.get("ns") or ""))
            if a is None:
                return None
            return {
                **msgspec.to_builtins(obs.actor_view(a)),
                "methods": a.methods,
                "max_task_retries": a.max_task_retries,
                "is_async": bool(a.spec.get("is_async")),
            }
        if what == "head":
            return {"address": self.address, "pid": os.getpid(), "started_at": self.started_at}
        if what == "cluster":  # the Jupyter panel's views, for widgets and `nbcluster status` too
            return msgspec.to_builtins(obs.cluster())
        if what == "tasks":
            return msgspec.to_builtins(obs.task_views())
        if what == "metrics":
            return msgspec.to_builtins(obs.history(str(h.get("node_id"))))
        if what == "demand":  # what pools grow from (nbcluster.deploy)
            return obs.demand()
        return None
