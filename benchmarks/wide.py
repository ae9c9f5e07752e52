"""A wide cluster: 1,000 simulated node agents on a real head; head CPU, grants, SPREAD.

The head is the real one (``python -m nbcluster.head``, ZeroMQ with CURVE). The agents are
light: a few processes holding 250 DEALER sockets each, speaking the real protocol (register,
ping as often as the head says with store figures and a metrics sample as a real agent does
(asking for an answer only as a real agent does, :func:`nbcluster.agent.agent.wants_pong`),
answer ``START_WORKER`` with ``WORKER_READY`` after a delay). The driver side is played by
this script. Measures:

``turn``
    :class:`~nbcluster.head.state.ClusterState` alone: N nodes of 4 CPUs, every CPU leased and
    ``--backlog`` requests waiting; one turn = a lease returned and the freed CPU re-granted.
``idle``
    Head CPU (process user + system time over ``--window`` seconds, ZeroMQ threads included)
    with N idle agents pinging.
``grants``
    Lease latency p50/p99 with 64 requests in flight (each granted lease returned at once), and
    grants/s with the cluster full and ``--backlog`` requests waiting.
``spread``
    2,000 SPREAD tasks of 1 ms on N one-CPU nodes, starting cold, with the driver's policy of
    :mod:`nbcluster.client.leasing` (16 requests in flight per class, a lease runs the class's
    queued tasks one at a time and lingers 0.5 s, requests withdrawn once the queue is empty):
    distinct nodes used, most tasks on one node, workers started, and started but never leased.

Run (``before``: the same on a checkout of main)::

    PYTHONPATH=$PWD python benchmarks/wide.py turn --nodes 128 512 1000
    PYTHONPATH=$PWD python benchmarks/wide.py idle --agents 128 1000
    PYTHONPATH=$PWD python benchmarks/wide.py grants --agents 1000
    PYTHONPATH=$PWD python benchmarks/wide.py spread --agents 128
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import zmq

from nbcluster.agent.agent import HEAD_TIMEOUT_S, wants_pong
from nbcluster.protocol import schema as m
from nbcluster.protocol.codec import Header, encode
from nbcluster.protocol.messages import PROTOCOL_VERSION, Kind
from nbcluster.protocol.security import derive_keys
from nbcluster.protocol.validation import receive_message
from nbcluster.transport.sockets import Transport

TOKEN = "wide-benchmark-token-0123456789abcdef"
STORE = {"capacity": 1 << 30, "used": 0, "spilled": 0, "objects": 0, "streams_served": 0}


# ------------------------------------------------------------------------------ ClusterState
def turn(nodes: int, backlog: int, turns: int = 300) -> dict[str, float]:
    """Median cost of one return + re-grant on a full cluster of ``nodes`` 4-CPU nodes."""
    from nbcluster.head.instructions import Grant
    from nbcluster.head.state import ClusterState

    best = float("inf")
    for _ in range(3):
        st = ClusterState()
        for i in range(nodes):
            nid, _ = st.add_node(b"a%d" % i, f"n{i}", "h", {"CPU": 4}, [])
            for w in range(4):
                st.worker_ready(nid, f"{nid}-w{w}", "a", "c", 1)
        held: list[str] = []
        rid = 0
        for _ in range(nodes * 4 + backlog):
            rid += 1
            ins = st.request_lease(b"c%d" % (rid % 64), "j", rid, {"CPU": 1}, "f")
            held += [x.lease.lease_id for x in ins if type(x) is Grant]
        assert len(held) == nodes * 4 and len(st.pending) == backlog
        t = time.perf_counter()
        for _ in range(turns):
            lid = held.pop(0)
            lease = st.leases[lid]
            ins = st.return_lease(lease.requester, lid)
            got = [x.lease.lease_id for x in ins if type(x) is Grant]
            assert len(got) == 1, ins
            held += got
            rid += 1  # the client asks again: the backlog stays as it was
            st.request_lease(b"c%d" % (rid % 64), "j", rid, {"CPU": 1}, "f")
        best = min(best, (time.perf_counter() - t) / turns)
    return {"nodes": nodes, "turn_ms": round(best * 1e3, 3), "grants_per_s": round(1 / best)}


# ------------------------------------------------------------------------------ simulated agents
async def _agents(address: str, count: int, cpus: float, start_ms: float, first: int) -> None:
    """``count`` agents in this process; prints ``ready`` once all registered, and on SIGTERM
    a JSON line of what they did."""
    transport = Transport(derive_keys(TOKEN))
    started = 0
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    registered = 0
    all_in = asyncio.Event()

    async def one(i: int) -> None:
        nonlocal started, registered
        sock = transport.client(zmq.DEALER, f"tcp://{address}")
        name = f"sim-{first + i}"

        async def send(h: Header) -> None:
            await sock.send_multipart(encode(h))

        await send(
            {
                "k": Kind.REGISTER_NODE,
                "v": PROTOCOL_VERSION,
                "name": name,
                "address": "127.0.0.1",
                "resources": {"CPU": cpus},
                "pid": os.getpid(),
            }
        )
        msg, _ = receive_message(await sock.recv_multipart())
        assert isinstance(msg, m.NodeRegistered), msg
        registered += 1
        if registered == count:
            all_in.set()
        workers = 0
        every = 1.0  # as the head says in PONG (where it does)
        heard = time.monotonic()  # when the head last said anything

        async def ready(wid: str) -> None:
            await asyncio.sleep(start_ms / 1000)
            await send(
                {
                    "k": Kind.WORKER_READY,
                    "worker_id": wid,
                    "addr": "x",
                    "control_addr": "y",
                    "pid": 1,
                }
            )

        async def pings() -> None:
            await asyncio.sleep(random.random())  # agents do not start in lockstep
            while True:
                metrics = {
                    "time": time.time(),
                    "cpu_percent": random.random() * 10,
                    "memory_used": 1 << 30,
                    "memory_total": 16 << 30,
                    "gpus": [],
                }
                ping: Header = {"k": Kind.PING, "store": STORE, "metrics": metrics}
                if not wants_pong(time.monotonic() - heard, HEAD_TIMEOUT_S):
                    ping["want"] = False  # as a real agent: no answer needed
                await send(ping)
                await asyncio.sleep(every)

        pinger = asyncio.create_task(pings())
        spawned: set[asyncio.Task[None]] = set()
        try:
            while True:
                msg, _ = receive_message(await sock.recv_multipart())
                heard = time.monotonic()
                if isinstance(msg, m.Pong):
                    every = getattr(msg, "every", 0.0) or 1.0
                elif isinstance(msg, m.StartWorker):
                    started += 1
                    workers += 1
                    t = asyncio.create_task(ready(f"{name}-w{workers}"))
                    spawned.add(t)
                    t.add_done_callback(spawned.discard)
                elif isinstance(msg, m.KillWorker):
                    await send(
                        {"k": Kind.WORKER_DIED, "worker_id": msg.worker_id, "requested": True}
                    )
        finally:
            pinger.cancel()

    tasks = [asyncio.create_task(one(i)) for i in range(count)]
    await all_in.wait()
    print("ready", flush=True)
    await done.wait()
    for t in tasks:
        t.cancel()
    print(json.dumps({"started": started}), flush=True)
    transport.close()


class Cluster:
    """A real head process and simulated agents in ``procs`` processes."""

    def __init__(self, agents: int, cpus: float = 1, start_ms: float = 20, per_proc: int = 250):
        self.n, self.cpus, self.start_ms, self.per_proc = agents, cpus, start_ms, per_proc
        self.head: subprocess.Popen[str] | None = None
        self.sims: list[subprocess.Popen[str]] = []
        self.address = ""

    def __enter__(self) -> Cluster:
        tmp = Path(tempfile.mkdtemp(prefix="nbc-wide-"))
        token = tmp / "token"
        token.write_text(TOKEN)
        token.chmod(0o600)
        env = dict(os.environ, NBCLUSTER_LOG_LEVEL="WARNING")
        self.head = subprocess.Popen(
            [sys.executable, "-m", "nbcluster.head", "--token-file", str(token)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.head.stdout is not None
        line = self.head.stdout.readline()
        assert line.startswith("NBCLUSTER_HEAD_READY"), line
        self.address = line.split()[1].removeprefix("tcp://")
        for first in range(0, self.n, self.per_proc):
            count = min(self.per_proc, self.n - first)
            args = [self.address, str(count), str(self.cpus), str(self.start_ms), str(first)]
            self.sims.append(
                subprocess.Popen(
                    [sys.executable, __file__, "_agents", *args], stdout=subprocess.PIPE, text=True
                )
            )
        for p in self.sims:
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "ready"
        return self

    def head_cpu(self) -> float:
        assert self.head is not None
        t = psutil.Process(self.head.pid).cpu_times()
        return float(t.user + t.system)

    def started(self) -> int:
        """Stop the agents; how many workers they were asked to start."""
        total = 0
        for p in self.sims:
            p.send_signal(signal.SIGTERM)
        for p in self.sims:
            out, _ = p.communicate(timeout=30)
            total += json.loads(out.strip().splitlines()[-1])["started"]
        self.sims = []
        return total

    def __exit__(self, *exc: object) -> None:
        for p in self.sims:
            p.kill()
        if self.head is not None:
            self.head.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.head.wait(10)
            self.head.kill()


# ------------------------------------------------------------------------------ driver
class Driver:
    """A driver speaking the protocol to the head (the lease part of the client)."""

    def __init__(self, address: str) -> None:
        self.transport = Transport(derive_keys(TOKEN))
        self.sock = self.transport.client(zmq.DEALER, f"tcp://{address}")
        self.rid = 0
        self.grants: asyncio.Queue[m.LeaseGranted] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    async def hello(self) -> None:
        await self.send(
            {"k": Kind.HELLO, "v": PROTOCOL_VERSION, "pid": os.getpid(), "role": "driver"}
        )
        msg, _ = receive_message(await self.sock.recv_multipart())
        assert isinstance(msg, m.Welcome), msg
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            msg, _ = receive_message(await self.sock.recv_multipart())
            if isinstance(msg, m.LeaseGranted):
                self.grants.put_nowait(msg)

    async def send(self, h: Header) -> None:
        await self.sock.send_multipart(encode(h))

    async def request(self, strategy: dict[str, Any] | None = None) -> int:
        self.rid += 1
        h: Header = {"k": Kind.LEASE_REQUEST, "rid": self.rid, "shape": {"CPU": 1}, "name": "f"}
        if strategy is not None:
            h["strategy"] = strategy
        await self.send(h)
        return self.rid

    async def ret(self, lease_id: str) -> None:
        await self.send({"k": Kind.LEASE_RETURN, "lease_id": lease_id})

    async def grant(self, timeout: float = 60.0) -> m.LeaseGranted:
        return await asyncio.wait_for(self.grants.get(), timeout)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self.transport.close()


def idle(agents: int, window: float) -> dict[str, float]:
    with Cluster(agents) as c:
        time.sleep(3.0)  # registrations and first pings settle
        t0, c0 = time.monotonic(), c.head_cpu()
        time.sleep(window)
        pct = (c.head_cpu() - c0) / (time.monotonic() - t0) * 100
    return {
        "agents": agents,
        "head_cpu_pct": round(pct, 2),
        "per_agent_pct": round(pct / agents, 4),
    }


def grants(agents: int, backlog: int, n: int = 2000) -> dict[str, Any]:
    async def scenario(c: Cluster) -> dict[str, Any]:
        d = Driver(c.address)
        await d.hello()
        # Warm: a worker on every node (all CPUs leased at once, then returned).
        for _ in range(agents):
            await d.request()
        held = [(await d.grant()).lease_id for _ in range(agents)]
        for lid in held:
            await d.ret(lid)
        await asyncio.sleep(1.0)
        # Latency: 64 requests in flight, each grant returned at once.
        sent: dict[int, float] = {}
        lat: list[float] = []
        for _ in range(64):
            sent[await d.request()] = time.perf_counter()
        while len(lat) < n:
            g = await d.grant()
            lat.append(time.perf_counter() - sent.pop(g.rid))
            await d.ret(g.lease_id)
            sent[await d.request()] = time.perf_counter()
        for _ in range(64):
            await d.ret((await d.grant()).lease_id)
        lat.sort()
        # Full: every CPU leased, ``backlog`` waiting; return one at a time as grants come.
        for _ in range(agents + backlog):
            await d.request()
        held = [(await d.grant()).lease_id for _ in range(agents)]
        t = time.perf_counter()
        for _ in range(n):
            await d.ret(held.pop(0))
            held.append((await d.grant()).lease_id)
            await d.request()
        full = n / (time.perf_counter() - t)
        d.close()
        return {
            "agents": agents,
            "p50_ms": round(lat[len(lat) // 2] * 1e3, 2),
            "p99_ms": round(lat[int(len(lat) * 0.99)] * 1e3, 2),
            "free_grants_per_s": round(n / sum(lat) * 64),
            "full_grants_per_s": round(full),
        }

    with Cluster(agents) as c:
        t0, c0 = time.monotonic(), c.head_cpu()
        out = asyncio.run(scenario(c))
        out["head_cpu_pct_during"] = round((c.head_cpu() - c0) / (time.monotonic() - t0) * 100)
    return out


def spread(agents: int, tasks: int = 2000, task_ms: float = 1.0) -> dict[str, Any]:
    """The client's lease policy (nbcluster.client.leasing) for one SPREAD class."""
    from nbcluster.client import leasing

    strategy = {"t": "spread"}
    cap = getattr(leasing, "request_cap", lambda _: leasing.MAX_LEASE_REQUESTS)(strategy)
    linger = leasing.LEASE_LINGER_S

    async def one_round(d: Driver) -> dict[str, Any]:
        queue = tasks
        outstanding: set[int] = set()
        per_node: Counter[str] = Counter()
        leased_workers: set[str] = set()
        running: set[asyncio.Task[None]] = set()
        finished = asyncio.Event()
        done_count = 0

        async def pump() -> None:
            want = min(queue, cap) - len(outstanding)
            for _ in range(want):
                outstanding.add(await d.request(strategy))
            if not queue and outstanding:
                for rid in outstanding:
                    await d.send({"k": Kind.LEASE_CANCEL, "rid": rid})
                outstanding.clear()

        async def use(g: m.LeaseGranted) -> None:
            nonlocal queue, done_count
            while True:
                if queue:
                    queue -= 1
                    await pump()
                    await asyncio.sleep(task_ms / 1000)
                    per_node[g.node_id] += 1
                    done_count += 1
                    if done_count == tasks:
                        finished.set()
                    continue
                await asyncio.sleep(linger)
                if not queue:
                    await d.ret(g.lease_id)
                    return

        await pump()
        t = time.perf_counter()
        while not finished.is_set():
            get = asyncio.ensure_future(d.grant(120))
            fin = asyncio.ensure_future(finished.wait())
            await asyncio.wait([get, fin], return_when=asyncio.FIRST_COMPLETED)
            fin.cancel()
            if not get.done():
                get.cancel()
                break
            g = get.result()
            outstanding.discard(g.rid)
            if not queue:
                await d.ret(g.lease_id)  # granted after the queue ran dry: given back
                continue
            leased_workers.add(g.worker_id)
            task = asyncio.create_task(use(g))
            running.add(task)
            task.add_done_callback(running.discard)
            await pump()
        elapsed = time.perf_counter() - t
        await asyncio.gather(*running)
        return {
            "agents": agents,
            "tasks": tasks,
            "task_ms": task_ms,
            "s": round(elapsed, 2),
            "nodes_used": len(per_node),
            "max_per_node": max(per_node.values()),
            "leased_workers": len(leased_workers),
        }

    async def scenario(c: Cluster) -> dict[str, Any]:
        d = Driver(c.address)
        await d.hello()
        cold = await one_round(d)  # no worker anywhere yet
        await asyncio.sleep(1.0)  # the leases lingered and went back
        warm = await one_round(d)
        d.close()
        cold["warm"] = {k: warm[k] for k in ("s", "nodes_used", "max_per_node")}
        return cold

    with Cluster(agents, start_ms=100) as c:
        out = asyncio.run(scenario(c))
        time.sleep(0.5)
        out["workers_started"] = c.started()
        out["started_never_leased"] = out["workers_started"] - out["leased_workers"]
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_agents":
        addr, count, cpus, start_ms, first = sys.argv[2:7]
        asyncio.run(_agents(addr, int(count), float(cpus), float(start_ms), int(first)))
        return
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["turn", "idle", "grants", "spread"])
    p.add_argument("--nodes", type=int, nargs="+", default=[128, 512, 1000])
    p.add_argument("--agents", type=int, nargs="+", default=[128, 1000])
    p.add_argument("--backlog", type=int, default=256)
    p.add_argument("--window", type=float, default=20.0)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--task-ms", type=float, default=1.0, help="spread: each task's duration")
    a = p.parse_args()
    for _ in range(a.rounds):
        if a.what == "turn":
            for n in a.nodes:
                print(json.dumps(turn(n, a.backlog)), flush=True)
        else:
            for n in a.agents:
                if a.what == "idle":
                    r = idle(n, a.window)
                elif a.what == "grants":
                    r = grants(n, a.backlog)
                else:
                    r = spread(n, task_ms=a.task_ms)
                print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
