"""Cross-node object transfer: nbcluster vs Ray on the same two-node layout, and the ceiling.

Ways to run it::

    # the run.py workloads (one backend per fresh process, as every workload):
    .venv-bench/bin/python benchmarks/run.py --workloads cross_node_1gb,fanout_100mb
    # the raw speed of one ZeroMQ CURVE connection between two processes (the old ceiling):
    .venv-ci/bin/python benchmarks/cross_node.py ceiling
    # the bulk channel's ceiling: TCP streams, plain and AES-256-GCM, into a tmpfs file:
    .venv-ci/bin/python benchmarks/cross_node.py tcp --streams 1,2
    # nbcluster's agent-to-agent pull alone (no tasks), shaped by NBCLUSTER_TRANSFER_*:
    .venv-ci/bin/python benchmarks/cross_node.py store [--netns]

Layout for ``cross_node_1gb``, both backends: a head and two nodes on loopback, one with the
custom resource ``{"a": 1}`` and one with ``{"b": 1}`` (nbcluster: ``nbcluster head`` and two
``nbcluster-worker``; Ray: ``ray start --head`` and ``ray start --address``, each with its own
temp dir). A task on ``a`` makes a 1 GB float64 array and returns it (the ref stays on ``a``); a
task on ``b`` receives it and returns its sum and how long that sum took. Timed on the driver:
from submitting the consumer to its result, after the producer finished. ``transfer_mb_s`` is
1 GB over that time less the sum's own time: what moving the object cost. ``fanout_100mb``: the
same layout, 200 tasks on ``b`` read one 100 MB array made on ``a`` (cold, then warm).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
import workloads as wl  # noqa: E402  (needs the sys.path entry above)

from nbcluster.launch import free_port  # noqa: E402

SIZE = 1000 * 1000 * 1000


def _stop(procs: list[subprocess.Popen[Any]], timeout: float = 20.0) -> None:
    """Terminate ``procs`` (each the leader of its own session, with what it started)."""
    for p in reversed(procs):
        if p.poll() is None:
            with _suppress():
                os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with _suppress():
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)


@contextmanager
def _suppress() -> Iterator[None]:
    try:
        yield
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------------------------
# The two clusters
# --------------------------------------------------------------------------


@contextmanager
def nbcluster_nodes(
    resources: tuple[dict[str, float], ...],
    prestart: int | None = None,
    hosts: tuple[tuple[list[str], str], ...] | None = None,
    head_host: str = "127.0.0.1",
) -> Iterator[tuple[str, Path, list[tuple[str, str]]]]:
    """A standalone head and one agent per ``resources`` entry (1 CPU each), on loopback.

    ``hosts``: per agent, a command prefix and the address to bind (network namespaces); the
    head then listens on ``head_host``. Yields ``(head address, token file, [(store address,
    store id) per agent])``.
    """
    tmp = Path(tempfile.mkdtemp(prefix="nbc-bench-"))
    token, port = tmp / "token", free_port()
    env = {**os.environ, "NBCLUSTER_HOME": str(tmp)}
    py = sys.executable
    procs: list[subprocess.Popen[str]] = []
    try:
        cmd = [py, "-m", "nbcluster", "head", "--port", str(port), "--token-file", str(token)]
        head = subprocess.Popen(
            [*cmd, "--host", head_host],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        procs.append(head)
        assert head.stdout is not None
        for line in head.stdout:
            if line.startswith("NBCLUSTER_HEAD_READY"):
                break
        else:
            raise RuntimeError("the head exited before it was ready")
        stores = []
        for i, res in enumerate(resources):
            prefix, bind = hosts[i] if hosts else ([], "127.0.0.1")
            cmd = [*prefix, py, "-m", "nbcluster", "worker", "--address", f"{head_host}:{port}"]
            cmd += ["--bind-host", bind]
            cmd += ["--token-file", str(token), "--node-name", f"bench-{i}", "--num-cpus", "1"]
            cmd += ["--resources", json.dumps(res)]
            if prestart is not None:
                cmd += ["--prestart", str(prestart)]
            agent = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True
            )
            procs.append(agent)
            assert agent.stdout is not None
            ready = agent.stdout.readline().split()
            if not ready or ready[0] != "NBCLUSTER_AGENT_READY":
                raise RuntimeError(f"agent {i} did not start: {ready}")
            stores.append((ready[2], ready[3]))
        yield f"{head_host}:{port}", token, stores
    finally:
        _stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def ray_nodes(resources: tuple[dict[str, float], ...]) -> Iterator[str]:
    """``ray start --head`` plus one ``ray start --address`` per further entry, 1 CPU each.

    Every node blocks in its own ``ray start --block`` session, so tearing down kills exactly
    the processes this function started (``ray stop`` would stop every Ray on the host).
    """
    ray_bin = str(Path(sys.executable).with_name("ray"))
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    # A `ray start` cluster turns token auth on when ~/.ray/auth_token exists, and a driver
    # joining with ray.init(address=...) then fails unless it has the same setting: pin it
    # (disabled, as on a host without a token; it does not touch the object data path).
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Several nodes need Ray's cluster mode (the single-node workloads turn it off to stay on
    # loopback); the driver, already imported, is told too.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = True
    env = {**wl.RAY_ENV_DEFAULTS, **os.environ}
    common = ["--block", "--num-cpus", "1", "--disable-usage-stats"]
    common += ["--node-ip-address", "127.0.0.1"]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, res in enumerate(resources):
            cmd = [ray_bin, "start", *common, "--resources", json.dumps(res)]
            cmd += ["--temp-dir", str(tmp / f"n{i}")]
            if i == 0:
                cmd += ["--head", "--port", str(port), "--include-dashboard", "false"]
            else:
                cmd += ["--address", f"127.0.0.1:{port}"]
            log_path = tmp / f"start-{i}.log"
            with open(log_path, "wb") as log_file:
                procs.append(
                    subprocess.Popen(
                        cmd,
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        env=env,
                        start_new_session=True,
                    )
                )
            # The next node joins a head that is fully up (joining too early can fail).
            _wait_log(log_path, "Ray runtime started", procs[-1], 180.0)
        yield f"127.0.0.1:{port}"
    except BaseException:
        for log_path in sorted(tmp.glob("start-*.log")):
            print(f"--- {log_path.name}\n{log_path.read_text()[-3000:]}", file=sys.stderr)
        raise
    finally:
        _stop(procs, timeout=60.0)
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_log(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        if proc.poll() is not None:
            raise RuntimeError(f"{path.name}: ray start exited ({proc.returncode})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path.name}: no {text!r} after {timeout:.0f} s")
        time.sleep(0.2)


def _wait_nodes(ray: ModuleType, n: int, timeout: float) -> None:
    """Wait until ``n`` nodes are alive (a node may register a little after starting)."""
    deadline = time.monotonic() + timeout
    while sum(1 for x in ray.nodes() if x.get("Alive")) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"fewer than {n} nodes alive after {timeout:.0f} s")
        time.sleep(0.2)


# --------------------------------------------------------------------------
# The workload (run.py)
# --------------------------------------------------------------------------


def _produce(nbytes: int) -> Any:
    import numpy as np

    return np.ones(nbytes // 8, dtype=np.float64)


def _consume(arr: Any) -> tuple[float, float]:
    t0 = time.perf_counter()
    total = float(arr.sum())
    return total, time.perf_counter() - t0


@wl.workload(
    "cross_node_1gb",
    "Two nodes on loopback ({a:1}, {b:1}): a task on b sums a 1 GB array a task on a made "
    "(median of 3 fresh arrays, after a 100 MB warm-up).",
    [
        wl.Metric("transfer_mb_s", "MB/s", "higher", "1 GB / (consumer round trip - its sum)"),
        wl.Metric("consumer_s", "s", "lower", "get(consume.remote(ref)) once ref is ready"),
    ],
    tags=("objects", "throughput"),
)
def cross_node_1gb(ray: ModuleType, repeat: int = 3) -> wl.Figures:
    """Move a 1 GB object from node ``a`` to a task on node ``b``."""
    layout: tuple[dict[str, float], ...] = ({"a": 1.0}, {"b": 1.0})
    if ray.__name__.split(".")[0] == "ray":
        with ray_nodes(layout) as address:
            ray.init(address=address)
            try:
                _wait_nodes(ray, len(layout), 120.0)
                return _cross_node(ray, repeat)
            finally:
                ray.shutdown()
    with nbcluster_nodes(layout) as (address, token, _):
        ray.init(address=address, token_file=str(token))
        try:
            _wait_nodes(ray, len(layout), 120.0)
            return _cross_node(ray, repeat)
        finally:
            ray.shutdown()


def _cross_node(ray: ModuleType, repeat: int) -> wl.Figures:
    produce = ray.remote(resources={"a": 1})(_produce)
    consume = ray.remote(resources={"b": 1})(_consume)
    ray.get(consume.remote(produce.remote(100 * 1000 * 1000)), timeout=300)  # warm-up
    rates, rounds, sums = [], [], []
    for _ in range(repeat):
        ref = produce.remote(SIZE)
        ray.wait([ref], timeout=300)
        t0 = time.perf_counter()
        total, sum_s = ray.get(consume.remote(ref), timeout=300)
        dt = time.perf_counter() - t0
        assert total == SIZE // 8, total
        rounds.append(dt)
        sums.append(sum_s)
        rates.append(SIZE / max(dt - sum_s, 1e-9) / 1e6)
        del ref
    return {
        "transfer_mb_s": statistics.median(rates),
        "consumer_s": statistics.median(rounds),
        "details": {"consumer_s": rounds, "sum_s": sums, "transfer_mb_s": rates},
    }


def _peek(arr: Any) -> float:
    return float(arr[-1])


@wl.workload(
    "fanout_100mb",
    "Two nodes on loopback ({a:1}, {b:1}): 200 tasks on b each read one 100 MB array a task on "
    "a made; cold (the array is new: b must fetch it) and warm (the next 200), median of 3.",
    [
        wl.Metric("cold_s", "s", "lower", "get() of 200 readers of a fresh 100 MB object"),
        wl.Metric("warm_s", "s", "lower", "the same, for 200 more readers of the same object"),
    ],
    tags=("objects", "throughput"),
)
def fanout_100mb(ray: ModuleType, repeat: int = 3) -> wl.Figures:
    """200 tasks on node ``b`` read one 100 MB object made on node ``a``."""
    layout: tuple[dict[str, float], ...] = ({"a": 1.0}, {"b": 1.0})
    if ray.__name__.split(".")[0] == "ray":
        with ray_nodes(layout) as address:
            ray.init(address=address)
            try:
                _wait_nodes(ray, len(layout), 120.0)
                return _fanout(ray, repeat)
            finally:
                ray.shutdown()
    with nbcluster_nodes(layout) as (address, token, _):
        ray.init(address=address, token_file=str(token))
        try:
            _wait_nodes(ray, len(layout), 120.0)
            return _fanout(ray, repeat)
        finally:
            ray.shutdown()


def _fanout(ray: ModuleType, repeat: int, readers: int = 200) -> wl.Figures:
    produce = ray.remote(resources={"a": 1})(_produce)
    peek = ray.remote(resources={"b": 1})(_peek)
    ray.get([peek.remote(produce.remote(1 << 20)) for _ in range(10)], timeout=300)  # warm-up
    cold, warm = [], []
    for _ in range(repeat):
        ref = produce.remote(100 * 1000 * 1000)
        ray.wait([ref], timeout=300)
        for times in (cold, warm):
            t0 = time.perf_counter()
            out = ray.get([peek.remote(ref) for _ in range(readers)], timeout=300)
            times.append(time.perf_counter() - t0)
            assert out == [1.0] * readers
        del ref
    return {
        "cold_s": statistics.median(cold),
        "warm_s": statistics.median(warm),
        "details": {"cold_s": cold, "warm_s": warm},
    }


# --------------------------------------------------------------------------
# The ceiling: one CURVE connection between two processes
# --------------------------------------------------------------------------


def _ceiling_server(port_file: str, keys: tuple[bytes, bytes], curve: bool, streams: int) -> None:
    import zmq

    ctx = zmq.Context(io_threads=streams)  # each connection may then encrypt on its own thread
    srv = ctx.socket(zmq.ROUTER)
    srv.sndhwm = srv.rcvhwm = 0
    if curve:
        srv.curve_server = True
        srv.curve_publickey, srv.curve_secretkey = keys
    Path(port_file).write_text(str(srv.bind_to_random_port("tcp://127.0.0.1")))
    src = memoryview(os.urandom(64 << 20))
    while True:
        # One request per stream: "chunk,n,window" (n chunks for each), or "quit".
        todo: dict[bytes, int] = {}
        credits: dict[bytes, int] = {}
        chunk = 0
        while len(todo) < streams:
            ident, req = srv.recv_multipart()
            if req == b"quit":
                srv.close(0)
                ctx.term()
                return
            chunk, n, window = map(int, req.split(b","))
            todo[ident], credits[ident] = n, window
        sent = 0
        while any(todo.values()):  # the same flow control as STORE_READ: `window` ahead
            for ident in todo:
                while credits[ident] and todo[ident]:
                    off = (sent * chunk) % len(src)
                    srv.send_multipart([ident, zmq.Frame(src[off : off + chunk])])
                    todo[ident] -= 1
                    credits[ident] -= 1
                    sent += 1
            if any(todo.values()):
                ident, _ = srv.recv_multipart()
                credits[ident] += 1


def ceiling(
    size: int, chunk: int, window: int, curve: bool, write: bool, runs: int, streams: int = 1
) -> list[float]:
    """MB/s of streaming ``size`` bytes over ZeroMQ connections between two processes.

    ``write``: the receiver also writes each chunk into a tmpfs file (what a pull does).
    ``streams``: connections in parallel, each with a share of the bytes, on as many ZeroMQ io
    threads at both ends.
    """
    import multiprocessing as mp

    import zmq

    server_pub, server_sec = zmq.curve_keypair()
    client_pub, client_sec = zmq.curve_keypair()
    port_file = tempfile.mktemp(prefix="nbc-ceiling-")
    proc = mp.get_context("spawn").Process(
        target=_ceiling_server, args=(port_file, (server_pub, server_sec), curve, streams)
    )
    proc.start()
    ctx = zmq.Context(io_threads=streams)
    socks = [ctx.socket(zmq.DEALER) for _ in range(streams)]
    rates = []
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(port_file) or not Path(port_file).read_text():
            if time.monotonic() > deadline:
                raise RuntimeError("the ceiling server did not start")
            time.sleep(0.05)
        poller = zmq.Poller()
        for sock in socks:
            sock.sndhwm = sock.rcvhwm = 0
            if curve:
                sock.curve_serverkey = server_pub
                sock.curve_publickey, sock.curve_secretkey = client_pub, client_sec
            sock.connect(f"tcp://127.0.0.1:{Path(port_file).read_text()}")
            poller.register(sock, zmq.POLLIN)
        n = size // chunk // streams  # chunks per stream
        for _ in range(runs):
            path = f"/dev/shm/nbc-ceiling-{os.getpid()}"
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            # Unlinked at once: the descriptor keeps the tmpfs pages, and nothing is left in
            # /dev/shm if the run is killed (a finally block does not run on SIGKILL).
            os.unlink(path)
            try:
                os.ftruncate(fd, n * chunk * streams)
                t0 = time.perf_counter()
                for sock in socks:
                    sock.send(b"%d,%d,%d" % (chunk, n, window))
                got = dict.fromkeys(socks, 0)
                left = n * streams
                while left:
                    ready = poller.poll(60_000)
                    if not ready:
                        raise RuntimeError("the ceiling server stopped sending")
                    for sock, _ in ready:
                        frame = sock.recv(copy=False)
                        i = got[sock] // chunk
                        if i + window < n:
                            sock.send(b"c")
                        if write:
                            base = socks.index(sock) * n * chunk
                            os.pwrite(fd, frame.buffer, base + got[sock])
                        got[sock] += len(frame)
                        left -= 1
                rates.append(sum(got.values()) / (time.perf_counter() - t0) / 1e6)
            finally:
                os.close(fd)
        socks[0].send(b"quit")
        proc.join(30)
    finally:
        for sock in socks:
            sock.close(0)
        ctx.term()
        if proc.is_alive():
            proc.kill()
        with _suppress_os():
            os.unlink(port_file)
    return rates


# --------------------------------------------------------------------------
# The ceiling of the bulk channel: TCP streams, plain or sealed with AES-256-GCM
# --------------------------------------------------------------------------


def _tcp_server(port_file: str, key: bytes) -> None:
    """Serve ``size,chunk,aead`` requests on each accepted connection (a thread per stream)."""
    import threading

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(64)
    Path(port_file).write_text(str(lsock.getsockname()[1]))
    src = memoryview(os.urandom(64 << 20))

    def serve(conn: socket.socket) -> None:
        aes = AESGCM(key)
        with conn:
            while True:
                req = conn.recv(64)
                if not req or req == b"quit":
                    return
                size, chunk, aead = map(int, req.split(b","))
                out = bytearray(chunk + 16)
                for i, off in enumerate(range(0, size, chunk)):
                    n = min(chunk, size - off)
                    data = src[off % len(src) :][:n]
                    if aead:
                        aes.encrypt_into(
                            i.to_bytes(12, "big"), data, b"", memoryview(out)[: n + 16]
                        )
                        conn.sendall(memoryview(out)[: n + 16])
                    else:
                        conn.sendall(data)

    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def tcp_ceiling(
    size: int, chunk: int, aead: bool, streams: int, runs: int
) -> tuple[list[float], float, float]:
    """MB/s of ``size`` bytes over ``streams`` TCP connections between two processes, written
    into a tmpfs file; ``aead``: each chunk sealed with AES-256-GCM by the sender and opened by
    the receiver into a buffer before the write (what a bulk pull does).

    Also returns the sender's and the receiver's CPU seconds per GB (medians over the runs).
    """
    import multiprocessing as mp
    import resource
    import threading

    import psutil

    def own_cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def their_cpu() -> float:
        t = psutil.Process(proc.pid).cpu_times()
        return float(t.user + t.system)

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key = os.urandom(32)
    port_file = tempfile.mktemp(prefix="nbc-tcp-ceiling-")
    proc = mp.get_context("spawn").Process(target=_tcp_server, args=(port_file, key), daemon=True)
    proc.start()
    rates: list[float] = []
    tx_cpu: list[float] = []
    rx_cpu: list[float] = []
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(port_file) or not Path(port_file).read_text():
            if time.monotonic() > deadline:
                raise RuntimeError("the TCP ceiling server did not start")
            time.sleep(0.05)
        port = int(Path(port_file).read_text())
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(streams)]
        share = size // streams

        def pull(i: int, fd: int) -> None:
            aes = AESGCM(key)
            sealed = memoryview(bytearray(chunk + 16))
            plain = memoryview(bytearray(chunk))
            conn = socks[i]
            conn.sendall(b"%d,%d,%d" % (share, chunk, aead))
            for k, off in enumerate(range(0, share, chunk)):
                n = min(chunk, share - off)
                need = n + 16 if aead else n
                got = 0
                while got < need:
                    r = conn.recv_into(sealed[got:need])
                    if not r:
                        raise RuntimeError("the TCP ceiling server closed")
                    got += r
                if aead:
                    aes.decrypt_into(k.to_bytes(12, "big"), sealed[:need], b"", plain[:n])
                    os.pwrite(fd, plain[:n], i * share + off)
                else:
                    os.pwrite(fd, sealed[:n], i * share + off)

        for _ in range(runs):
            path = f"/dev/shm/nbc-tcp-ceiling-{os.getpid()}"
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            # Unlinked at once: the descriptor keeps the tmpfs pages, and nothing is left in
            # /dev/shm if the run is killed (a finally block does not run on SIGKILL).
            os.unlink(path)
            try:
                os.ftruncate(fd, share * streams)
                c0, s0 = own_cpu(), their_cpu()
                t0 = time.perf_counter()
                threads = [threading.Thread(target=pull, args=(i, fd)) for i in range(streams)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                rates.append(share * streams / (time.perf_counter() - t0) / 1e6)
                rx_cpu.append((own_cpu() - c0) * 1e9 / (share * streams))
                tx_cpu.append((their_cpu() - s0) * 1e9 / (share * streams))
            finally:
                os.close(fd)
        for conn in socks:
            conn.sendall(b"quit")
            conn.close()
    finally:
        proc.kill()
        proc.join(10)
        with _suppress_os():
            os.unlink(port_file)
    return rates, statistics.median(tx_cpu), statistics.median(rx_cpu)


@contextmanager
def _suppress_os() -> Iterator[None]:
    try:
        yield
    except OSError:
        pass


# --------------------------------------------------------------------------
# nbcluster's pull alone: put on one agent, read through the other
# --------------------------------------------------------------------------


def store_pull(
    size: int, runs: int, netns: bool = False
) -> tuple[list[float], list[float], list[float]]:
    """Agent-to-agent pulls of a ``size``-byte array (StoreClient put, then get).

    Returns MB/s per run, and the CPU seconds per GB the holder's and the reader's agents spent
    in each (user + system, all threads): unlike MB/s, hardly moved by other load on the host.
    ``netns``: each agent in a network namespace of its own, on a bridge (``tests/nethosts.py``;
    root only), so the bytes cross veth pairs and a bridge instead of loopback.
    """
    if netns:
        sys.path.insert(0, str(BENCH_DIR.parent))
        from tests.nethosts import namespace_net, namespaces_unavailable

        why = namespaces_unavailable()
        if why:
            raise SystemExit(f"--netns: {why}")
        with namespace_net(("h1", "h2")) as net:
            hosts = tuple((net.netns(h), net.hosts[h]) for h in ("h1", "h2"))
            return _store_pull(size, runs, hosts, net.head_ip)
    return _store_pull(size, runs, None, "127.0.0.1")


def _store_pull(
    size: int, runs: int, hosts: Any, head_host: str
) -> tuple[list[float], list[float], list[float]]:
    import numpy as np
    import psutil

    from nbcluster.protocol.security import derive_keys, read_token_file
    from nbcluster.store.client import StoreClient
    from nbcluster.transport.sockets import Transport

    def cpu(p: Any) -> float:
        t = p.cpu_times()
        return float(t.user + t.system)

    rates: list[float] = []
    holder_cpu: list[float] = []
    reader_cpu: list[float] = []
    with nbcluster_nodes(({}, {}), 0, hosts, head_host) as (_, token, stores):
        agents = [
            c for c in psutil.Process().children() if "worker" in " ".join(c.cmdline())
        ]  # in start order: the holder first
        transport = Transport(derive_keys(read_token_file(token)))
        holder, reader = StoreClient(transport, *stores[0]), StoreClient(transport, *stores[1])
        try:
            arr = np.ones(size // 8, dtype=np.float64)
            for i in range(runs + 1):  # the first one warms up
                oid = f"bench{i}.p"
                frames = holder.put(oid, arr, "bench")
                c0 = [cpu(a) for a in agents]
                t0 = time.perf_counter()
                got = reader.get(frames)
                dt = time.perf_counter() - t0
                c1 = [cpu(a) for a in agents]
                assert got.shape == arr.shape
                del got
                reader.free([oid])
                holder.free([oid])
                if i:
                    rates.append(size / dt / 1e6)
                    holder_cpu.append((c1[0] - c0[0]) * 1e9 / size)
                    reader_cpu.append((c1[1] - c0[1]) * 1e9 / size)
        finally:
            holder.close()
            reader.close()
            transport.close()
    return rates, holder_cpu, reader_cpu


def main(argv: list[str] | None = None) -> int:
    """``ceiling`` / ``store`` figures, or (with ``--backend``) the run.py workload."""
    if argv is None:
        argv = sys.argv[1:]
    if not argv or argv[0].startswith("--"):
        return wl.main(argv)  # run.py runs this file like workloads.py
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["ceiling", "tcp", "store", "both"])
    p.add_argument("--size", type=float, default=SIZE, help="bytes per transfer (default 1e9)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--chunks", default="1,4,16", help="MiB per chunk (ceiling)")
    p.add_argument("--window", type=int, default=8, help="chunks ahead of credits (ceiling)")
    p.add_argument(
        "--streams", default="1", help="parallel connections, comma-separated (ceiling, tcp)"
    )
    p.add_argument(
        "--netns", action="store_true", help="store: agents in network namespaces (root)"
    )
    args = p.parse_args(argv)
    size = int(args.size)

    def show(label: str, rates: list[float]) -> None:
        cells = " ".join(f"{r:6.0f}" for r in rates)
        print(
            f"{label:44s} median {statistics.median(rates):6.0f} MB/s   runs: {cells}", flush=True
        )

    for _ in range(1 if args.what != "both" else 2):
        if args.what in ("ceiling", "both"):
            for mib in (int(c) for c in args.chunks.split(",")):
                for curve, write in ((False, False), (True, False), (True, True)):
                    label = f"zmq {'CURVE' if curve else 'plain'} {mib} MiB x{args.window}"
                    label += " + tmpfs write" if write else ""
                    show(label, ceiling(size, mib << 20, args.window, curve, write, args.runs))
                for streams in (int(x) for x in args.streams.split(",") if int(x) > 1):
                    label = f"zmq CURVE {mib} MiB x{args.window}, {streams} streams + write"
                    rates = ceiling(size, mib << 20, args.window, True, True, args.runs, streams)
                    show(label, rates)
        if args.what in ("tcp", "both"):
            for mib in (int(c) for c in args.chunks.split(",")):
                for streams in (int(x) for x in args.streams.split(",")):
                    for aead in (False, True):
                        label = f"tcp {'AES-GCM' if aead else 'plain'} {mib} MiB, "
                        label += f"{streams} stream{'s' if streams > 1 else ''} + write"
                        rates, tx, rx = tcp_ceiling(size, mib << 20, aead, streams, args.runs)
                        show(label, rates)
                        print(f"{'  CPU s/GB: sender, receiver':44s} median {tx:.2f}, {rx:.2f}")
        if args.what in ("store", "both"):
            from nbcluster.store import bulk, transfer

            label = f"nbcluster pull {transfer.CHUNK_BYTES >> 20} MiB, "
            label += f"{bulk.STREAMS} bulk streams" if bulk.STREAMS else f"CURVE x{transfer.WINDOW}"
            rates, holder_cpu, reader_cpu = store_pull(size, args.runs, args.netns)
            label += ", netns" if args.netns else ""
            show(label, rates)
            print(
                f"{'  CPU s/GB: holder agent, reader agent':44s} "
                f"median {statistics.median(holder_cpu):.2f}, {statistics.median(reader_cpu):.2f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
