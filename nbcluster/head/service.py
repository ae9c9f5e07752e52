"""The head service: runs :class:`ClusterState` behind an authenticated ROUTER socket."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, assert_never

import msgspec

from nbcluster._version import __version__
from nbcluster.head.actors import RESOLVE_WAIT_S, ActorDirectory, ActorInfo
from nbcluster.head.groups import GroupRequests
from nbcluster.head.heartbeat import ping_interval, silence_limit
from nbcluster.head.instructions import (
    ActorChanged,
    ActorInit,
    ActorRequester,
    ActorUnknown,
    AttachActor,
    Grant,
    GroupPlaced,
    Infeasible,
    Instruction,
    JobEnded,
    KillWorker,
    LeaseLost,
    PublishActorTo,
    StartWorker,
    Unschedulable,
    Warn,
)
from nbcluster.head.logs import LogRelay
from nbcluster.head.memory import MemoryQueries
from nbcluster.head.model import Lease, WorkerInfo
from nbcluster.head.observe import Observer
from nbcluster.head.panel_actions import PanelActions
from nbcluster.head.peers import Peer, local_process, running
from nbcluster.head.recovery import load_snapshot, save_snapshot, take_snapshot
from nbcluster.head.restart import Recovery
from nbcluster.head.state import ClusterState
from nbcluster.head.trouble import WorkerTrouble
from nbcluster.protocol import schema as m
from nbcluster.protocol.codec import encode
from nbcluster.protocol.messages import DEAD, PROTOCOL_VERSION, Kind
from nbcluster.protocol.security import derive_keys
from nbcluster.scheduling import placement_fields
from nbcluster.transport import Transport
from nbcluster.transport.channel import Channel, Listener, Network, PeerUnreachable, ZmqNetwork
from nbcluster.transport.serve import Dispatcher, follow, serve

log = logging.getLogger(__name__)

#: A handler of messages from a connected peer.
PeerHandler = Callable[[Peer, Any, list[Any]], Awaitable[None]]

#: A client or agent silent for this long is considered gone.
LIVENESS_TIMEOUT_S = 10.0
#: A driver on this machine (a notebook kernel of the Jupyter server hosting us) is gone as soon
#: as its process is: a killed kernel's tasks, objects and actors are released within a second or
#: two, GPUs included. Silence alone drops it only after this long (a cell can hold the GIL in C
#: code for a while; dropping a live kernel would kill its actors).
LOCAL_DRIVER_SILENCE_S = 60.0
DRAIN_REASON = "its node was drained (nbcluster-worker stopped)"
#: Agents ping every second (less often in large clusters: head/heartbeat.py); a node silent for
#: five intervals is dead (its tasks retried elsewhere).


class HeadService(GroupRequests, PanelActions):
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
    network
        The transport (default: ZeroMQ with CURVE keys derived from ``token``; a
        :class:`~nbcluster.transport.channel.MemoryNetwork` runs the head in one process). The
        head closes only a network it made itself.
    """

    def __init__(
        self,
        token: str,
        host: str = "127.0.0.1",
        port: int = 0,
        state_file: str | None = None,
        *,
        network: Network | None = None,
    ) -> None:
        self._token = token
        self._net = network
        self._own_net = network is None  # a network handed in is closed by its owner
        self.host = host
        self.port = port
        self.state_file = state_file
        self.head_id = secrets.token_hex(4)
        GroupRequests.__init__(self)
        self.state = ClusterState(id_prefix=self.head_id[:4] + "-")
        self._dead_nodes: set[str] = set()
        self._dirty = False
        self.actors = ActorDirectory(self.state)
        self.memory = MemoryQueries(self.state, self._send)  # the stores' contents, on demand
        self.recovery = Recovery(self.state, self.actors)  # taking peers back after a restart
        self._worker_socks: dict[str, Channel] = {}  # head -> actor-hosting worker connections
        self.peers: dict[bytes, Peer] = {}
        self._jobs = itertools.count(1)
        self._sock: Listener | None = None
        self._dispatch = Dispatcher[bytes](
            self._handle, what="to the head", logger=log, answer=self._send
        )
        self._handlers: dict[type[m.Message], PeerHandler] = {
            m.Ping: self._on_ping,
            m.LeaseRequest: self._on_lease_request,
            m.LeaseReturn: self._on_lease_return,
            m.LeaseCancel: self._on_lease_cancel,
            m.TaskEvents: self._on_task_events,
            m.WorkerBlocked: self._on_blocked,
            m.WorkerUnblocked: self._on_blocked,
            m.Query: self._on_query,
            m.StoreListing: self.memory.on_listing,
            m.WorkerReady: self._on_worker_ready,
            m.WorkerDied: self._worker_died,
            m.ActorCreate: self._on_actor_create,
            m.ActorResolve: self._on_actor_resolve,
            m.ActorKill: self._on_actor_kill,
            m.ActorRelease: self._on_actor_release,
            m.Goodbye: self._on_goodbye,
            m.ShutdownCluster: self._on_shutdown,
            m.PgCreate: self._on_pg_create,
            m.PgRemove: self._on_pg_remove,
            m.PgWait: self._on_pg_wait,
        }
        self.address = ""
        self.started_at = time.time()
        # Views, metrics history, task table and change events for the Jupyter panel.
        self.observe = Observer(
            self.state, self.actors, started_at=self.started_at, version=__version__
        )
        self.logs = LogRelay(self.state, self.actors, self.observe, self._send, self._later)
        self._handlers.update({m.LogRead: self.logs.on_read, m.LogData: self.logs.on_data})
        self._stopped = asyncio.Event()
        self._stopping = False
        self._tasks: list[asyncio.Task[Any]] = []
        self._trouble = WorkerTrouble()  # workers that keep dying: backoff and warnings
        self._delayed: set[asyncio.Task[Any]] = set()  # worker starts held back by the backoff

    async def start(self) -> str:
        """Bind and start serving; returns ``host:port``."""
        if self._net is None:
            self._net = ZmqNetwork(Transport(derive_keys(self._token)))
        self._sock = self._net.listen(f"tcp://{self.host}:{self.port}")
        self.port = int(self._sock.endpoint.rsplit(":", 1)[1])
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
            sock.close()
        self._worker_socks.clear()
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        if self._net is not None and self._own_net:
            self._net.close()
        self._stopped.set()

    # ------------------------------------------------------------------------------ I/O
    async def _send(
        self, ident: bytes, header: dict[str, Any] | m.Message, payload: list[Any] | None = None
    ) -> None:
        if self._sock is None:
            return
        try:
            await self._sock.send(ident, encode(header, payload or ()))
        except PeerUnreachable as exc:  # peer gone (ROUTER_MANDATORY): it will be reaped
            log.debug("send to %r failed: %s", ident, exc)

    async def _serve(self) -> None:
        assert self._sock is not None
        await serve(self._sock, self._dispatch)  # malformed messages: see transport/serve.py

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
                agent = peer.role == "agent"
                limit = silence_limit(*peer.ping_s) if agent else LIVENESS_TIMEOUT_S
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
                case Grant(requester=who, rid=rid, lease=lease, worker=w, requested=t0):
                    self.observe.lease_waited(time.monotonic() - t0 if t0 else None)
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
                case GroupPlaced(pg_id=pg_id):
                    await self.group_placed(pg_id)
                case Warn(client=client, msg=text, code=code):
                    await self._send(client, {"k": Kind.WARNING, "msg": text, "code": code})
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
        """Tell every alive node that the job ended: its stored objects are freed (and its
        placement groups go, restored ones whose creator never came back included)."""
        await self.creator_gone(b"", job_id)
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

        self._later(later(), "head-start-worker-later")

    def _later(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``coro`` beside the receive loop (cancelled when the head stops)."""
        t = asyncio.create_task(coro, name=name)
        self._delayed.add(t)
        t.add_done_callback(self._delayed.discard)

    async def _worker_died(self, peer: Peer, h: m.WorkerDied, payload: list[Any]) -> None:
        """An agent reports a worker that exited, or that never became ready."""
        node_id = peer.node_id or ""
        reason = h.reason or "worker died"
        if not h.requested:  # not one we asked the agent to kill
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
        if h.never_ready:
            await self._run(self.state.worker_start_failed(node_id))
        await self._run(self.state.worker_died(h.worker_id, reason))

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
        sock = self._worker_socks.get(w.worker_id)
        if sock is None:
            sock = await self._connect_worker(w, a.aid)
        header = {
            "k": Kind.ACTOR_INIT,
            "aid": a.aid,
            "job_id": a.job_id,
            "gpus": gpus,
            "cls_name": a.cls_name,
            "assigned": a.shape,
            **a.spec,
            **placement_fields(a.strategy),
        }
        await sock.send(encode(header, a.payload))

    async def _connect_worker(self, w: WorkerInfo, aid: str) -> Channel:
        """Connect to the worker hosting actor ``aid``: its notices come back on it."""
        assert self._net is not None
        sock = self._worker_socks[w.worker_id] = await self._net.connect(w.address)
        watch = Dispatcher[str](
            {
                m.ActorReady: self._on_actor_ready,
                m.ActorFailed: self._on_actor_failed,
                m.ActorExit: self._on_actor_exit,
                m.Log: self._on_actor_log,
            },
            what=f"from actor {aid}'s worker",
            logger=log,
        )  # no answers: a worker waits for none of these; a bug keeps watching this actor
        self._tasks.append(asyncio.create_task(follow(sock, watch, aid)))
        return sock

    async def _on_actor_ready(self, aid: str, msg: m.ActorReady, payload: list[Any]) -> None:
        await self._run(self.actors.on_ready(aid))

    async def _on_actor_failed(self, aid: str, msg: m.ActorFailed, payload: list[Any]) -> None:
        await self._run(self.actors.on_failed(aid, payload))

    async def _on_actor_log(self, aid: str, msg: m.Log, payload: list[Any]) -> None:
        """What ``__init__`` printed: passed on to the actor's creator (it shows it, as Ray)."""
        a = self.actors.actors.get(aid)
        if a is not None and a.owner in self.peers:
            await self._send(a.owner, msg)

    async def _on_actor_exit(self, aid: str, msg: m.ActorExit, payload: list[Any]) -> None:
        await self._run(self.actors.exited(aid, msg.why))

    def _drop_worker_sock(self, aid: str) -> None:
        a = self.actors.actors.get(aid)
        if a is not None and a.worker_id is not None:
            sock = self._worker_socks.pop(a.worker_id, None)
            if sock is not None:
                sock.close()

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

    def _grant_msg(self, rid: int, lease: Lease, w: WorkerInfo) -> m.LeaseGranted:
        node = self.state.nodes[lease.node_id]
        return m.LeaseGranted(
            rid=rid,
            lease_id=lease.lease_id,
            worker_id=w.worker_id,
            worker_addr=w.address,
            control_addr=w.control_address,
            pid=w.pid,
            node_id=lease.node_id,
            node_name=node.name,
            gpus=sorted(lease.gpus),
            shape=lease.shape,
        )

    # ------------------------------------------------------------------------------ handlers
    async def _handle(self, ident: bytes, msg: m.Message, payload: list[Any]) -> None:
        """Dispatch one received message: handshakes first, then a handler per message type."""
        peer = self.peers.get(ident)
        if peer is not None:
            peer.last_seen = time.monotonic()
        if type(msg) is m.Hello:
            await self._hello(ident, msg)
            return
        if type(msg) is m.RegisterNode:
            await self._register(ident, msg)
            return
        if peer is None:
            if type(msg) not in (m.ActorReady, m.ActorFailed, m.ActorExit):  # worker notices
                nohello = {"k": Kind.ERROR, "msg": "say hello first", "code": "nohello"}
                await self._send(ident, nohello)
            return
        if type(msg) in (m.LeaseRequest, m.ActorCreate, m.PgCreate) and self.recovery.defer(
            (ident, msg, payload)
        ):
            return  # until the old leases are claimed back, no idle-looking worker is handed out
        handler = self._handlers.get(type(msg))
        if handler is None:
            # (rate-limited, as the dispatcher's own: a confused peer must not flood the log)
            self._dispatch.unexpected_log(f"{msg.__struct_config__.tag} from {peer.role}")
            return
        await handler(peer, msg, payload)

    async def _on_ping(self, peer: Peer, msg: m.Ping, payload: list[Any]) -> None:
        if peer.node_id is not None and msg.store is not None:
            node = self.state.nodes.get(peer.node_id)
            if node is not None:
                node.info["object_store"] = msg.store
            if msg.metrics:
                self.observe.on_metrics(peer.node_id, msg.metrics)
            every = ping_interval(len(self.state.select.alive()))  # fewer pings in big clusters
            if every != peer.ping_s[0] or msg.want:
                # An agent that heard from us lately needs no answer: at 1,000 agents the PONGs
                # were a third of what their pings cost us (nbcluster.head.heartbeat).
                peer.ping_s = (every, peer.ping_s[0])
                await self._send(peer.ident, {"k": Kind.PONG, "every": every})
            return
        await self._send(peer.ident, {"k": Kind.PONG})

    async def _on_task_events(self, peer: Peer, msg: m.TaskEvents, payload: list[Any]) -> None:
        self.observe.on_task_events(peer.ident, peer.job_id or "", msg.events)

    async def _on_lease_request(self, peer: Peer, msg: m.LeaseRequest, payload: list[Any]) -> None:
        assert peer.job_id is not None
        strategy = msgspec.to_builtins(msg.strategy) if msg.strategy is not None else None
        await self._run(
            self.state.request_lease(
                peer.ident,
                peer.job_id,
                msg.rid,
                msg.shape,
                msg.name,
                strategy=strategy,
                locality=msg.locality,
                env=msg.env,
            )
        )

    async def _on_lease_return(self, peer: Peer, msg: m.LeaseReturn, payload: list[Any]) -> None:
        await self._run(self.state.return_lease(peer.ident, msg.lease_id, msg.retire))

    async def _on_lease_cancel(self, peer: Peer, msg: m.LeaseCancel, payload: list[Any]) -> None:
        await self._run(self.state.cancel_request(peer.ident, msg.rid))

    async def _on_blocked(
        self, peer: Peer, msg: m.WorkerBlocked | m.WorkerUnblocked, payload: list[Any]
    ) -> None:
        await self._run(self.state.worker_blocked(msg.worker_id, type(msg) is m.WorkerBlocked))

    async def _on_query(self, peer: Peer, msg: m.Query, payload: list[Any]) -> None:
        if msg.what == "memory":  # the agents are asked: answered when they have
            return self.memory.answer(peer.ident, msg.rid, self.observe, msg.limit)
        reply = {"k": Kind.QUERY_REPLY, "rid": msg.rid, "result": self.observe.query(msg)}
        await self._send(peer.ident, reply)

    async def _on_worker_ready(self, peer: Peer, msg: m.WorkerReady, payload: list[Any]) -> None:
        assert peer.node_id is not None
        node, w = peer.node_id, msg.worker_id
        await self._run(self.state.worker_ready(node, w, msg.addr, msg.control_addr, msg.pid))

    async def _on_actor_create(self, peer: Peer, msg: m.ActorCreate, payload: list[Any]) -> None:
        assert peer.job_id is not None
        ident = peer.ident
        spec = msgspec.to_builtins(msg)  # the directory keeps it as the snapshot saves it
        frames = [bytes(f) for f in payload]
        reply, ins = self.actors.create(ident, peer.job_id, spec, frames, peer.worker_id)
        if "error" in reply:
            error = {"k": Kind.ERROR, "rid": msg.rid, "msg": reply["error"], "code": "actor"}
            await self._send(ident, error)
        else:
            await self._send(ident, {"k": Kind.ACTOR_CREATED, "rid": msg.rid, **reply})
        await self._run(ins)
        if "aid" in reply and reply["aid"] in self.actors.actors:
            self.observe.actor_changed(self.actors.actors[reply["aid"]])
        if reply.get("existing"):
            found = self.actors.actors[reply["aid"]]
            found.subscribers.add(ident)
            await self._publish_to(found, ident)

    async def _on_actor_resolve(self, peer: Peer, msg: m.ActorResolve, payload: list[Any]) -> None:
        ins = self.actors.resolve(msg.aid, peer.ident)
        if ins is not None:
            await self._run(ins)
            return

        async def expire(aid: str = msg.aid, client: bytes = peer.ident) -> None:
            await asyncio.sleep(RESOLVE_WAIT_S)  # (its ACTOR_CREATE may still be on the way)
            await self._run(self.actors.resolve_expired(aid, client))

        self._later(expire(), "head-actor-resolve")

    async def _on_actor_kill(self, peer: Peer, msg: m.ActorKill, payload: list[Any]) -> None:
        await self._run(self.actors.kill(msg.aid, msg.no_restart, "killed by nbcluster.kill()"))

    async def _on_actor_release(self, peer: Peer, msg: m.ActorRelease, payload: list[Any]) -> None:
        await self._run(self.actors.release(msg.aid))

    async def _on_goodbye(self, peer: Peer, msg: m.Goodbye, payload: list[Any]) -> None:
        await self._peer_gone(peer, DRAIN_REASON if msg.drain else "")

    async def _on_shutdown(self, peer: Peer, msg: m.ShutdownCluster, payload: list[Any]) -> None:
        log.info("shutdown requested by pid %s", peer.pid)
        asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self.stop()))

    async def _publish_to(self, a: ActorInfo, ident: bytes) -> None:
        subs = a.subscribers
        a.subscribers = {ident}
        try:
            await self._publish(a)
        finally:
            a.subscribers = subs

    async def _version_ok(self, ident: bytes, v: int) -> bool:
        """Check the protocol version of a HELLO or REGISTER; answer an ERROR if it differs."""
        if v == PROTOCOL_VERSION:
            return True
        msg = (
            f"protocol version {v} is not supported by this head (it speaks version "
            f"{PROTOCOL_VERSION}); install the same nbcluster version everywhere"
        )
        await self._send(ident, {"k": Kind.ERROR, "code": "version", "msg": msg})
        return False

    async def _hello(self, ident: bytes, h: m.Hello) -> None:
        if not await self._version_ok(ident, h.v):
            return
        role = h.role
        job_id = h.job_id
        owns = h.owns_job  # a driver saying hello again after a head restart
        if not job_id:
            job_id = f"{self.head_id[:4]}{next(self._jobs):04x}"
            owns = True
        peer = Peer(ident, role, h.pid, job_id, owns, h.worker_id)
        peer.last_seen = time.monotonic()
        if role == "driver":
            peer.proc = local_process(peer.pid, h.started)
        self.peers[ident] = peer
        self._dirty |= owns  # the snapshot lists jobs, not task-level clients
        if h.rejoin:  # after a head restart: take back what it holds
            leases = msgspec.to_builtins(h.leases)
            await self._run(
                self.recovery.client_rejoined(
                    ident, peer.job_id, peer.owns_job, leases, list(h.actors), h.worker_id or ""
                )
            )
        if owns:
            # kernel_id / notebook: the panel's "owner"
            owner = {"kernel_id": h.kernel_id, "notebook": h.notebook, "pid": h.pid}
            self.observe.job_started(job_id, owner)
        await self._send(
            ident,
            {"k": Kind.WELCOME, "job_id": job_id, "head_pid": os.getpid(), "head_id": self.head_id},
        )

    async def _register(self, ident: bytes, h: m.RegisterNode) -> None:
        if not await self._version_ok(ident, h.v):
            return
        old_id = h.node_id or ""
        known = self.state.nodes.get(old_id)
        if old_id and known is not None and known.alive:
            # The same agent again (it lost a reply): it keeps its identity.
            self.peers.pop(known.client, None)
            known.client = ident
            peer = Peer(ident, "agent", h.pid, node_id=old_id)
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
            h.name,
            h.address,
            h.resources,
            list(h.gpu_ids),
            pid=h.pid,
            prestart=0 if adopt else h.prestart,
            info=h.info,
            node_id=old_id if adopt else None,
        )
        self.state.nodes[node_id].prestart = h.prestart
        peer = Peer(ident, "agent", h.pid, node_id=node_id)
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
            ins += self.recovery.node_rejoined(node_id, msgspec.to_builtins(h.workers))
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
            await self.creator_gone(peer.ident, peer.job_id if peer.owns_job else None)
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
        sock = await self._connect_worker(w, a.aid)
        await sock.send(encode({"k": Kind.ACTOR_ATTACH, "aid": a.aid}))

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
