"""The node agent: one per host, connects to the head and runs worker processes for it."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import signal
import socket
import sys
import time
from typing import Any

import psutil

from nbcluster._private_fs import user_dir
from nbcluster.agent import memory
from nbcluster.agent.logs import TAIL_LINES, NodeLogs, WorkerLog
from nbcluster.agent.resources import detect_gpus, node_resources
from nbcluster.exceptions import NbclusterError, ProtocolError
from nbcluster.metrics import MetricsThread
from nbcluster.protocol import schema as m
from nbcluster.protocol.codec import Header, encode
from nbcluster.protocol.messages import OOM_REASON, PROTOCOL_VERSION, REJOIN_AGAIN_S, Kind
from nbcluster.protocol.security import TOKEN_ENV, TOKEN_FILE_ENV, derive_keys
from nbcluster.protocol.validation import receive_message
from nbcluster.store import orphans
from nbcluster.store.bulk import BulkServer
from nbcluster.store.manager import StoreManager, cleanup_store, default_capacity
from nbcluster.store.segment import SHM_DIR
from nbcluster.store.service import StoreService
from nbcluster.store.transfer import ObjectPuller
from nbcluster.transport import Transport
from nbcluster.transport.channel import Channel, Listener, Network, ZmqNetwork
from nbcluster.transport.serve import Dispatcher, answer_on, follow, serve

log = logging.getLogger(__name__)

WORKER_START_TIMEOUT_S = 60.0
#: Default seconds without a word from the head after which an agent gives up and exits.
HEAD_TIMEOUT_S = 120.0
#: Exit status of an agent that gave up on its head, or left because its owning job ended.
EXIT_GAVE_UP = 3


class NodeAgent:
    """Supervises this host's worker processes on behalf of the head.

    Parameters
    ----------
    head_address
        ``host:port`` of the head.
    token
        The cluster secret.
    token_file
        Where workers read the secret from (passed by path, never by value, when given).
    network
        The transport (default: ZeroMQ with CURVE keys derived from ``token``). On a
        :class:`~nbcluster.transport.channel.MemoryNetwork` the node cannot pull objects from
        other nodes.
    head_timeout
        Exit (:attr:`stopped` set, :attr:`exit_code` 3) when nothing came from the head for this
        many seconds (``0``: never): a batch job whose head is gone ends instead of idling.
    labels
        Reported in the node's info (``nodes()`` shows them); pools find their jobs by them.
    exit_with_job
        Drain and exit when the head says this job ended (the driver that owns a pool left).
    """

    def __init__(
        self,
        head_address: str,
        token: str,
        *,
        token_file: str | None = None,
        name: str | None = None,
        bind_host: str = "127.0.0.1",
        num_cpus: float | None = None,
        num_gpus: float | None = None,
        resources: dict[str, float] | None = None,
        prestart: int | None = None,
        worker_env: dict[str, str] | None = None,
        worker_cwd: str | None = None,
        object_store_memory: int | None = None,
        spill_dir: str | None = None,
        spill_limit: int | None = None,
        network: Network | None = None,
        head_timeout: float = HEAD_TIMEOUT_S,
        labels: dict[str, str] | None = None,
        exit_with_job: str | None = None,
    ) -> None:
        self.head_address = head_address
        self._net = network
        self._own_net = network is None  # a network handed in is closed by its owner
        self.head_timeout = head_timeout
        self.labels = dict(labels or {})
        self.exit_with_job = exit_with_job
        self.exit_code = 0
        self.exit_reason = ""
        self._last_heard = time.monotonic()
        self._ping_s = 1.0  # seconds between pings: the head says (PONG's ``every``)
        self._token = token
        self._token_file = token_file
        self.name = name or socket.gethostname()
        self.bind_host = bind_host
        self.gpus = detect_gpus()
        self.resources = node_resources(num_cpus, num_gpus, resources, self.gpus)
        cpus = int(self.resources.get("CPU", 0))
        self.prestart = min(cpus, 8) if prestart is None else prestart
        self.worker_env = worker_env or {}
        self.worker_cwd = worker_cwd
        self.store_id = secrets.token_hex(6)
        _sweep_dead_stores()
        self.store = StoreManager(
            self.store_id,
            object_store_memory if object_store_memory is not None else default_capacity(),
            spill_dir=spill_dir,
            disk_limit_bytes=spill_limit,
        )
        self._store_service = StoreService(self.store)  # its puller needs the transport
        # Workers' output, kept per worker on this node (nbcluster logs, the panel).
        self.logs = NodeLogs.create(os.path.join(user_dir(), f"logs-{self.store_id}"))
        self._store_sock: Listener | None = None
        self.store_address = ""
        self.node_id = ""
        self._sock: Channel | None = None
        self._from_head = Dispatcher[None](
            {
                m.StartWorker: self._on_start_worker,
                m.KillWorker: self._on_kill_worker,
                m.JobEnded: self._on_job_ended,
                m.StopNode: self._on_stop,
                m.LogFetch: self._on_log_fetch,
                m.StoreList: self._on_store_list,
                m.Pong: self._on_pong,
                m.NodeRegistered: self._registered_again,
                m.Error: self._on_error,
            },
            what="from the head",
            logger=log,
        )  # no answers: an ERROR to the head could only start a ping-pong of errors
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.stopped = asyncio.Event()
        self._started_workers = 0
        self._prestarted = asyncio.Event()
        self._workers: dict[str, dict[str, Any]] = {}  # ready workers, reported on rejoin
        self._killing: set[str] = set()  # workers killed on purpose (their death is no trouble)
        # The memory monitor: which task each worker runs (each writes it in its slot), and
        # why it killed the workers it killed (their death reports say it).
        self._slots: dict[str, memory.TaskSlot] = {}
        self._oom: dict[str, str] = {}
        self._rejoining = False
        self._rejoin_sent = 0.0
        self._leaving = False
        self._metrics = MetricsThread(1.0)  # psutil + NVML, off the event loop

    async def start(self) -> None:
        """Connect and register with the head (raises on a wrong secret or version)."""
        if self._net is None:
            self._net = ZmqNetwork(Transport(derive_keys(self._token)))
        self._store_sock = self._net.listen(f"tcp://{self.bind_host}:0")
        self.store_address = self._store_sock.endpoint
        if isinstance(self._net, ZmqNetwork):  # pulls open sockets of their own
            self._store_service.puller = ObjectPuller(self._net.transport, self.store)
            # Objects leave this node on the bulk channel (AES-GCM over TCP, keyed per transfer).
            self._store_service.bulk = BulkServer(self.bind_host)
        self._sock = await self._net.connect(f"tcp://{self.head_address}", verify_timeout=30.0)
        await self._send(self._register_msg())
        reply, _ = receive_message(await asyncio.wait_for(self._sock.recv(), 30.0))
        if isinstance(reply, m.Error):
            raise ProtocolError(reply.msg or "the head refused this node")
        if not isinstance(reply, m.NodeRegistered):
            raise ProtocolError(f"the head answered {reply.__struct_config__.tag} to REGISTER")
        self.node_id = reply.node_id
        self._spawn(self._serve(), "agent-serve")
        self._metrics.start()
        self._spawn(self._heartbeat(), "agent-heartbeat")
        threshold, interval = memory.settings()
        if interval > 0:
            self._spawn(self._watch_memory(threshold, interval), "agent-memory")
        self._spawn(self._serve_store(), "agent-store")
        log.info("registered as %s with %s", self.node_id, self.resources)

    def _register_msg(self) -> dict[str, Any]:
        gpu_ids = [g["index"] for g in self.gpus]
        ngpu = int(self.resources.get("GPU", 0))
        if ngpu > len(gpu_ids):  # logical GPUs declared beyond the physical ones
            gpu_ids = list(range(ngpu))
        msg: dict[str, Any] = {
            "k": Kind.REGISTER_NODE,
            "v": PROTOCOL_VERSION,
            "name": self.name,
            "address": self.bind_host,
            "resources": self.resources,
            "gpu_ids": gpu_ids[:ngpu],
            "pid": os.getpid(),
            "prestart": self.prestart,
            "info": {
                "gpus": self.gpus[:ngpu] if self.gpus else [],
                "store_address": self.store_address,
                "store_id": self.store_id,
                "object_store": self.store.stats(),
                "labels": self.labels,
            },
        }
        if self.node_id:
            # Re-registering with a restarted head: what this node still runs.
            msg["node_id"] = self.node_id
            msg["workers"] = list(self._workers.values())
        return msg

    async def _rejoin(self) -> None:
        """The head does not know us (it restarted, or declared us dead): register again."""
        if self._leaving or self.stopped.is_set():
            return
        if self._rejoining and time.monotonic() - self._rejoin_sent < REJOIN_AGAIN_S:
            return
        # (Sent again when unanswered: the head that got it may have died before answering.)
        self._rejoining = True
        self._rejoin_sent = time.monotonic()
        log.warning("the head does not know this node any more: registering again")
        await self._send(self._register_msg())

    async def _registered_again(self, _: None, h: m.NodeRegistered, payload: list[Any]) -> None:
        self._rejoining = False
        if h.fresh:
            # We were declared dead meanwhile: what ran here was retried elsewhere. Start over.
            log.warning("rejoined as a new incarnation %s (was %s)", h.node_id, self.node_id)
            for wid in list(self._procs):
                self._kill(wid)
            self._workers.clear()
            self._store_service.drop_all()
        else:
            log.info("re-registered %s with the restarted head", h.node_id)
        self.node_id = h.node_id

    async def drain(self) -> None:
        """Leave the cluster on purpose: the head reschedules what ran here right away."""
        self._leaving = True  # the head forgets us now: do not register again
        if self._sock is not None and self.node_id:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._send({"k": Kind.GOODBYE, "drain": True}), 2.0)
                await asyncio.sleep(0.05)  # let the frame leave before the workers die

    def _give_up(self, reason: str) -> None:
        """Stop this agent for good (the caller's ``stopped`` wait ends, then ``close()``)."""
        log.error("%s", reason)
        self.exit_reason = reason
        self.exit_code = EXIT_GAVE_UP
        self.stopped.set()

    async def wait_prestarted(self, timeout: float) -> bool:
        """Wait until the first ``prestart`` workers are up (so the first task need not wait)."""
        if self.prestart <= 0:
            return True
        try:
            await asyncio.wait_for(self._prestarted.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        t = asyncio.create_task(coro, name=name)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    async def _send(self, header: Header) -> None:
        if self._sock is not None:
            await self._sock.send(encode(header))

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self._ping_s)
            # The heartbeat carries the store's usage: nodes() reports it.
            silent = time.monotonic() - self._last_heard
            if self.head_timeout > 0 and silent > self.head_timeout:
                self._give_up(
                    f"no word from the head at {self.head_address} for {silent:.0f} s "
                    f"(--head-timeout {self.head_timeout:g}): exiting"
                )
                return
            ping: dict[str, Any] = {"k": Kind.PING, "store": self.store.stats()}
            if not wants_pong(silent, self.head_timeout):
                ping["want"] = False  # the head answers only if our interval changes
            if self._metrics.latest is not None:
                ping["metrics"] = self._with_worker_ids(self._metrics.latest)
            await self._send(ping)

    def _with_worker_ids(self, sample: dict[str, Any]) -> dict[str, Any]:
        """``sample`` with each GPU process that is one of our workers (or a child of one:
        a data loader, a ``multiprocessing`` child) marked with that worker's id."""
        gpus = sample.get("gpus") or []
        if not any(g.get("processes") for g in gpus):
            return sample
        by_pid = {int(w["pid"]): wid for wid, w in self._workers.items()}
        marked = []
        for g in gpus:
            procs = [{**p, "worker_id": worker_of(int(p["pid"]), by_pid)} for p in g["processes"]]
            marked.append({**g, "processes": procs})
        return {**sample, "gpus": marked}

    async def _serve_store(self) -> None:
        """Serve the store's requests; those that copy files run concurrently (the manager
        serializes its books)."""
        sock = self._store_sock
        assert sock is not None

        def send(frames: list[Any]) -> None:
            sock.send_nowait(frames[0], frames[1:])

        async def request(ident: bytes, msg: m.Message, payload: list[Any]) -> None:
            await self._store_service.handle(send, ident, msg)

        store = Dispatcher[bytes](
            request,
            what="to the store",
            logger=log,
            answer=answer_on(sock),
            spawn=lambda coro: self._spawn(coro, "agent-store-request"),
        )
        await serve(sock, store)

    async def _serve(self) -> None:
        assert self._sock is not None
        await follow(self._sock, self._from_head, None, on_receive=self._heard_from_head)

    def _heard_from_head(self) -> None:
        self._last_heard = time.monotonic()  # any frame: the head is there

    async def _on_start_worker(self, _: None, msg: m.StartWorker, payload: list[Any]) -> None:
        self._spawn(self._start_worker(), "agent-start-worker")

    async def _on_kill_worker(self, _: None, msg: m.KillWorker, payload: list[Any]) -> None:
        self._kill(msg.worker_id)

    async def _on_job_ended(self, _: None, msg: m.JobEnded, payload: list[Any]) -> None:
        n = self._store_service.job_ended(msg.job_id)
        log.info("job %s ended: freed %d objects", msg.job_id, n)
        if self.exit_with_job and msg.job_id == self.exit_with_job:
            await self.drain()
            self._give_up(f"job {msg.job_id}, which owns this node, ended: exiting")

    async def _on_store_list(self, _: None, msg: m.StoreList, payload: list[Any]) -> None:
        objects, total = self._store_service.listing(msg.limit)
        reply = {"k": Kind.STORE_LISTING, "rid": msg.rid, "objects": objects, "total": total}
        await self._send({**reply, "stats": self._store_service.stats()})

    async def _on_stop(self, _: None, msg: m.StopNode, payload: list[Any]) -> None:
        log.info("stop requested by the head")
        self.stopped.set()

    async def _on_pong(self, _: None, msg: m.Pong, payload: list[Any]) -> None:
        if msg.every > 0:  # a large cluster: the head asks for fewer pings
            self._ping_s = min(max(msg.every, 0.1), 60.0)

    async def _on_error(self, _: None, msg: m.Error, payload: list[Any]) -> None:
        if msg.code == "nohello":
            await self._rejoin()
        else:
            log.error("head says: %s", msg.msg)

    async def _start_worker(self) -> None:
        worker_id = f"{self.node_id}-w{next(self._ids)}"
        env = dict(os.environ)
        env.update(self.worker_env)
        env.update(
            {
                "NBCLUSTER_HEAD": self.head_address,
                "NBCLUSTER_NODE_ID": self.node_id,
                "NBCLUSTER_NODE_NAME": self.name,
                "NBCLUSTER_WORKER_ID": worker_id,
                "NBCLUSTER_AGENT_PID": str(os.getpid()),
                "NBCLUSTER_BIND_HOST": self.bind_host,
                "NBCLUSTER_STORE": self.store_address,
                "NBCLUSTER_STORE_ID": self.store_id,
                "PYTHONUNBUFFERED": "1",
            }
        )
        try:  # where it says which task it runs (the memory monitor reads it)
            path = os.path.join(self.logs.folder, f"{worker_id}.task")
            self._slots[worker_id] = memory.TaskSlot(path, create=True)
            env[memory.SLOT_ENV] = path
        except OSError as exc:
            log.warning(
                "no task slot for %s (the memory monitor cannot see it): %s", worker_id, exc
            )
        if self._token_file:
            env[TOKEN_FILE_ENV] = self._token_file
            env.pop(TOKEN_ENV, None)
        else:
            env[TOKEN_ENV] = self._token
        proc = None
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "nbcluster.worker",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,  # one pipe: the node's log of this worker
                env=env,
                cwd=self.worker_cwd,
                start_new_session=True,
            )
            self._procs[worker_id] = proc  # so that close() kills it even while starting
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), WORKER_START_TIMEOUT_S)
            parts = line.decode().split()
            if len(parts) != 4 or parts[0] != "NBCLUSTER_WORKER_READY":
                raise NbclusterError(f"worker did not start: {line!r}")
            self._started_workers += 1
            if self._started_workers >= self.prestart:
                self._prestarted.set()
        except Exception as exc:
            reason = await self._start_failure(proc, exc)
            log.error("could not start a worker: %s", reason)
            self._procs.pop(worker_id, None)
            self._drop_slot(worker_id)
            self._store_service.writer_died(worker_id)
            # The head must hear of it whatever happened: it plans another start from this.
            await self._send(
                {
                    "k": Kind.WORKER_DIED,
                    "worker_id": worker_id,
                    "never_ready": True,
                    "requested": self._was_killed(worker_id),
                    "reason": f"worker failed to start: {reason}",
                }
            )
            return
        ready = {
            "worker_id": worker_id,
            "addr": parts[1],
            "control_addr": parts[2],
            "pid": proc.pid,
        }
        self._workers[worker_id] = ready
        await self._send({"k": Kind.WORKER_READY, **ready})
        wlog = self.logs.open(worker_id)
        pump = self._spawn(self._pump_stdout(worker_id, proc, wlog), "agent-pump")
        rc = await proc.wait()
        with contextlib.suppress(Exception):  # its last words: read to the end of the pipe
            await asyncio.wait_for(asyncio.shield(pump), 2.0)
        requested = self._was_killed(worker_id)
        self._drop_slot(worker_id)
        reason = self._oom.pop(worker_id, "") or describe_exit(proc.pid, rc)
        if not requested and rc != 0 and not reason.startswith(OOM_REASON):
            tail = self.logs.tail(worker_id)
            if tail:
                reason += "; its last output:\n  " + "\n  ".join(tail)
        self.logs.closed(worker_id)
        self._procs.pop(worker_id, None)
        self._workers.pop(worker_id, None)
        freed = self._store_service.writer_died(worker_id)
        if freed:
            log.info("freed %d object(s) worker %s died writing", freed, worker_id)
        if not self.stopped.is_set():
            await self._send(
                {
                    "k": Kind.WORKER_DIED,
                    "worker_id": worker_id,
                    "requested": requested,
                    "reason": reason,
                }
            )

    async def _start_failure(self, proc: asyncio.subprocess.Process | None, exc: Exception) -> str:
        """Why a worker did not start (with its exit status), once it is surely gone."""
        if proc is None:
            return str(exc)
        if proc.returncode is None:
            # It closed its stdout or printed something else: give it a moment to exit.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), 1.0)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            return f"{exc} (killed it)"
        said = b""
        if proc.stdout is not None:  # e.g. the traceback of an import that failed
            with contextlib.suppress(Exception):
                said = await asyncio.wait_for(proc.stdout.read(8192), 1.0)
        lines = said.decode(errors="replace").strip().splitlines()[-TAIL_LINES:]
        output = "; its output:\n  " + "\n  ".join(lines) if lines else ""
        return f"{exc} ({describe_exit(proc.pid, proc.returncode)}){output}"

    def _drop_slot(self, worker_id: str) -> None:
        slot = self._slots.pop(worker_id, None)
        if slot is not None:
            slot.close(unlink=True)

    def _was_killed(self, worker_id: str) -> bool:
        if worker_id in self._killing:
            self._killing.discard(worker_id)
            return True
        return False

    async def _pump_stdout(
        self, worker_id: str, proc: asyncio.subprocess.Process, wlog: WorkerLog
    ) -> None:
        # Everything the worker writes to its file descriptors: tasks' prints (tagged, also sent
        # to their drivers), its own log, C extensions, faulthandler. All go to its log file;
        # untagged lines also to ours, as before the node kept logs.
        assert proc.stdout is not None
        async for line in proc.stdout:
            with contextlib.suppress(OSError):  # a full disk must not stop the pump
                wlog.write(line, time.time())
            if not line.startswith(b"\x1e"):
                sys.stderr.write(f"({worker_id} pid={proc.pid}) {line.decode(errors='replace')}")

    async def _watch_memory(self, threshold: float, interval: float) -> None:
        """Kill the newest retriable task's worker when the node's memory runs out (see
        :mod:`nbcluster.agent.memory`); one at a time, each given time to free its memory."""
        while True:
            await asyncio.sleep(interval)
            if self._oom:  # the last one is still dying
                continue
            used, total = memory.node_usage()
            if used <= threshold * total:
                continue
            running = {w: t for w, slot in self._slots.items() if (t := slot.read()) is not None}
            victim = memory.choose(running)
            proc = self._procs.get(victim) if victim is not None else None
            if victim is None or proc is None or proc.returncode is not None:
                continue
            task = running[victim]
            rss = memory.rss_of(proc.pid)
            self._oom[victim] = (
                f"{OOM_REASON}: the node's memory was {memory.gib(used)} of {memory.gib(total)} "
                f"({used / total:.0%}, above the threshold {threshold:.0%}), so the memory "
                f"monitor killed the worker running task {task.name} ({task.tid}), which used "
                f"{memory.gib(rss)}; it was the newest "
                f"{'retriable' if task.retriable else '(none was retriable)'} task on node "
                f"{self.name}. Give the task more memory= (so fewer run at once), or raise "
                f"{memory.THRESHOLD_ENV}"
            )
            log.warning("%s", self._oom[victim])
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    async def _on_log_fetch(self, _: None, msg: m.LogFetch, payload: list[Any]) -> None:
        result = self.logs.read(msg.worker_id, msg.task, msg.offset, msg.limit)
        await self._send({"k": Kind.LOG_DATA, "rid": msg.rid, "result": result})

    def _kill(self, worker_id: str) -> None:
        proc = self._procs.get(worker_id)
        if proc is not None and proc.returncode is None:
            self._killing.add(worker_id)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    async def close(self) -> None:
        """Kill every worker, leave the cluster and close the socket."""
        self.stopped.set()
        self._metrics.stop()
        for proc in list(self._procs.values()):
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGKILL)
        for proc in list(self._procs.values()):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), 5.0)
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._store_service.puller is not None:
            self._store_service.puller.close()
        if self._store_service.bulk is not None:
            self._store_service.bulk.close()
        if self._store_sock is not None:
            self._store_sock.close()
            self._store_sock = None
        # No segment or spilled file outlives the node; nor do the workers' logs.
        self.store.cleanup()
        self.logs.close()
        if self._net is not None and self._own_net:
            self._net.close()


def _sweep_dead_stores() -> None:
    """Remove what stores of agents that died without cleaning up (SIGKILL) left in /dev/shm."""
    for store_id in orphans.dead_stores(SHM_DIR):
        n = cleanup_store(store_id)
        if n:
            log.warning("removed %d file(s) left by the dead object store %s", n, store_id)


def wants_pong(silent: float, head_timeout: float) -> bool:
    """Whether a ping asks the head for a ``PONG`` although our interval did not change.

    Once we have not heard from the head for a quarter of ``head_timeout`` (every ping when that
    is a few seconds), so that a live head is heard from well before we give up on it. Without
    a timeout, no answer is needed: the head says when it does not know us (``nohello``).
    """
    return head_timeout > 0 and silent >= head_timeout / 4


def worker_of(pid: int, by_pid: dict[int, str]) -> str | None:
    """The worker ``pid`` is, or descends from; ``None`` for any other process."""
    if pid in by_pid:
        return by_pid[pid]
    try:
        for parent in psutil.Process(pid).parents():
            if parent.pid in by_pid:
                return by_pid[parent.pid]
    except (psutil.Error, OSError):  # gone, or in another PID namespace
        return None
    return None


def describe_exit(pid: int | None, rc: int | None) -> str:
    """Human wording of a worker's exit status."""
    if rc is None:
        return f"worker pid {pid} exited"
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"worker pid {pid} was killed by {name}"
    return f"worker pid {pid} exited with code {rc}"
