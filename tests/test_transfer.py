"""Objects between nodes: agent-to-agent streaming pulls, once per node, and a holder that dies.

Real processes only: a standalone head and node agents (``nbcluster head``, ``nbcluster worker``)
on loopback. The test process plays a local process of each node through the real
:class:`~nbcluster.store.client.StoreClient` (what workers use): it puts on one node and reads
through another, whose agent pulls the object from the first one.
"""

from __future__ import annotations

import glob
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zmq

import nbcluster as nb
from nbcluster.exceptions import ObjectLostError
from nbcluster.launch import free_port
from nbcluster.protocol.codec import decode, encode
from nbcluster.protocol.messages import Kind
from nbcluster.protocol.security import derive_keys, read_token_file
from nbcluster.store.client import StoreClient
from nbcluster.store.errors import ObjectExistsError, ObjectStoreFullError
from nbcluster.store.manager import cleanup_store
from nbcluster.store.segment import SHM_DIR
from nbcluster.transport.sockets import Transport
from tests.conftest import ready_line, stop_processes, wait_until

np = pytest.importorskip("numpy")

MB = 1 << 20


@dataclass
class Node:
    proc: subprocess.Popen[str]
    store_address: str
    store_id: str


@dataclass
class Cluster:
    address: str
    token_file: Path
    transport: Transport
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)

    def join(self, name: str, *flags: str, env: dict[str, str] | None = None) -> Node:
        """Start a node agent (no prestarted workers) and wait until it is registered."""
        cmd = [sys.executable, "-m", "nbcluster", "worker", "--address", self.address]
        cmd += ["--token-file", str(self.token_file), "--node-name", name, "--prestart", "0"]
        proc = subprocess.Popen(
            [*cmd, *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        line = ready_line(proc.stdout)
        _, _, addr, store_id = line.split()
        node = Node(proc, addr, store_id)
        self.nodes.append(node)
        return node

    def client(self, node: Node) -> StoreClient:
        return StoreClient(self.transport, node.store_address, node.store_id)


def _start_cluster(tmp: Path) -> Cluster:
    token_file, port = tmp / "token", free_port()
    cmd = [sys.executable, "-m", "nbcluster", "head", "--port", str(port)]
    head = subprocess.Popen(
        [*cmd, "--token-file", str(token_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert head.stdout is not None
    for line in head.stdout:
        if line.startswith("NBCLUSTER_HEAD_READY"):
            break
    transport = Transport(derive_keys(read_token_file(token_file)))
    return Cluster(f"127.0.0.1:{port}", token_file, transport, [head])


def _stop_cluster(c: Cluster) -> None:
    c.transport.close()
    stop_processes(c.procs)
    for node in c.nodes:  # a killed agent cannot clean up after itself: we do
        cleanup_store(node.store_id)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = _start_cluster(tmp_path_factory.mktemp("transfer"))
    try:
        c.join("holder")
        c.join("reader")
        yield c
    finally:
        _stop_cluster(c)
    for node in c.nodes:  # the agents removed every segment they had
        assert _files(node.store_id) == []


#: Object files only: freed segments kept for reuse (``.pool-<n>``) are not objects.
OBJECTS = "[!.]*"


def _files(store_id: str, oid: str = "*") -> list[str]:
    return glob.glob(os.path.join(SHM_DIR, f"nbc-{store_id}-{oid}"))


def _stats(c: Cluster, node: Node) -> dict[str, int]:
    """The node's store and transfer figures (``STORE_STATS`` on its store socket)."""
    sock = c.transport.client(zmq.DEALER, node.store_address, aio=False)
    try:
        sock.send_multipart(encode({"k": Kind.STORE_STATS, "rid": 1}))
        assert sock.poll(30_000), "no answer to STORE_STATS"
        reply, _ = decode(sock.recv_multipart())
    finally:
        sock.close(linger=0)
    assert reply["ok"], reply
    return dict(reply["stats"])


def _digest(arr: Any) -> str:
    return hashlib.sha256(memoryview(arr).cast("B")).hexdigest()


def test_large_object_crosses_nodes_intact(two_nodes: Cluster) -> None:
    c = two_nodes
    holder, reader = c.nodes
    arr = np.random.default_rng(5).integers(0, 1 << 62, 200 * MB // 8, dtype=np.int64)
    before_out, before_in = _stats(c, holder), _stats(c, reader)
    put, get = c.client(holder), c.client(reader)
    try:
        frames = put.put("big.p", arr, "job1")
        got = get.get(frames)
        assert got.dtype == arr.dtype and got.shape == arr.shape
        assert _digest(got) == _digest(arr)
        assert not got.flags.writeable  # a view of the reader's own shared memory
        assert len(_files(reader.store_id, "big.p")) == 1
        again = get.get(frames)  # the node has it now: no second pull
        assert _digest(again) == _digest(arr)
        out, into = _stats(c, holder), _stats(c, reader)
        assert out["streams_served"] - before_out["streams_served"] == 1
        assert into["pulls"] - before_in["pulls"] == 1
        size = os.path.getsize(_files(reader.store_id, "big.p")[0])
        assert into["bytes_in"] - before_in["bytes_in"] == size
        assert out["bytes_out"] - before_out["bytes_out"] == size
        del got, again
    finally:
        put.free(["big.p"])
        get.free(["big.p"])
        put.close()
        get.close()
    wait_until(
        lambda: not _files(reader.store_id, "big.p") and not _files(holder.store_id, OBJECTS)
    )


def test_concurrent_readers_on_one_node_fetch_once(two_nodes: Cluster) -> None:
    c = two_nodes
    holder, reader = c.nodes
    arr = np.random.default_rng(6).random(100 * MB // 8)
    expected = _digest(arr)
    put = c.client(holder)
    readers = [c.client(reader) for _ in range(4)]
    before_out, before_in = _stats(c, holder), _stats(c, reader)
    start = threading.Barrier(len(readers))
    digests: list[str] = []
    errors: list[BaseException] = []

    def read(client: StoreClient, frames: list[Any]) -> None:
        try:
            start.wait(30)
            digests.append(_digest(client.get(frames)))
        except BaseException as exc:
            errors.append(exc)

    try:
        frames = put.put("shared.p", arr, "job2")
        threads = [threading.Thread(target=read, args=(r, frames)) for r in readers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        assert errors == [] and digests == [expected] * len(readers)
        assert _stats(c, holder)["streams_served"] - before_out["streams_served"] == 1
        assert _stats(c, reader)["pulls"] - before_in["pulls"] == 1
    finally:
        put.free(["shared.p"])
        readers[0].free(["shared.p"])
        for client in (put, *readers):
            client.close()


def test_object_missing_on_the_holder_is_lost(two_nodes: Cluster) -> None:
    c = two_nodes
    holder, reader = c.nodes
    put, get = c.client(holder), c.client(reader)
    try:
        frames = put.put("gone.p", np.zeros(MB), "job3")
        put.free(["gone.p"])
        wait_until(lambda: not _files(holder.store_id, "gone.p"))
        t0 = time.monotonic()
        with pytest.raises(ObjectLostError, match=r"gone\.p"):
            get.get(frames)
        assert time.monotonic() - t0 < 10
        assert _files(reader.store_id, "gone.p") == []
    finally:
        put.close()
        get.close()


def test_an_object_whose_file_went_after_its_lookup_is_lost_not_an_error(
    two_nodes: Cluster,
) -> None:
    """The books still list the object but its file is gone: what a read that races a free
    meets (the holder rejoined as a new incarnation and dropped everything between locating the
    object and mapping it). Readers, remote and local, get ``ObjectLostError``, which their
    owner answers by rebuilding the object; it used to be an ``ObjectStoreError`` (a
    ``FileNotFoundError`` from the holder) that failed the reading task for good."""
    c = two_nodes
    holder, reader = c.nodes
    put, get = c.client(holder), c.client(reader)
    try:
        frames = put.put("racy.p", np.ones(2 * MB), "job5")
        [path] = _files(holder.store_id, "racy.p")
        os.unlink(path)  # behind the store's back: it still counts the object
        with pytest.raises(ObjectLostError, match=r"racy\.p.*freed on the node that holds it"):
            get.get(frames)
        with pytest.raises(ObjectLostError, match=r"racy\.p was freed on this node"):
            put.get(frames)
        assert _files(reader.store_id, "racy.p") == []
        put.free(["racy.p"])
    finally:
        put.close()
        get.close()


def test_a_retried_task_finds_its_value_already_stored(two_nodes: Cluster) -> None:
    """Return values are named after their task: a second attempt on the node where the first
    one stored its value keeps that value (ids are immutable) instead of failing."""
    c = two_nodes
    store = c.client(c.nodes[0])
    try:
        first = np.arange(MB // 8, dtype=np.int64)
        store.put("rerun.0", first, "job4")
        again = store.put("rerun.0", np.zeros(2 * MB // 8), "job4")  # a nondeterministic rerun
        assert np.array_equal(store.get(again), first)
        # One still being written is not taken for the value.
        store._request({"k": "sreserve", "oid": "half.0", "size": MB, "job": "job4"})
        with pytest.raises(ObjectExistsError, match="still being written"):
            store.put("half.0", np.zeros(MB // 8), "job4")
        store.free(["rerun.0", "half.0"])
    finally:
        store.close()


def test_reader_node_without_room_says_so(two_nodes: Cluster) -> None:
    c = two_nodes
    holder = c.nodes[0]
    small = c.join("small", "--object-store-memory", str(16 * MB), "--spill-limit", "0")
    put, get = c.client(holder), c.client(small)
    try:
        frames = put.put("roomy.p", np.ones(64 * MB // 8), "job5")
        t0 = time.monotonic()
        with pytest.raises(ObjectStoreFullError):
            get.get(frames)
        assert time.monotonic() - t0 < 30
        assert _files(small.store_id, OBJECTS) == [] and _stats(c, small)["objects"] == 0
        # The holder still serves it (to a node with room).
        roomy = c.client(c.nodes[1])
        assert _digest(roomy.get(frames)) == _digest(np.ones(64 * MB // 8))
        roomy.free(["roomy.p"])
        roomy.close()
    finally:
        put.free(["roomy.p"])
        put.close()
        get.close()


def test_holder_killed_mid_transfer(tmp_path: Path) -> None:
    c = _start_cluster(tmp_path)
    try:
        holder = c.join("holder")
        # Small chunks, one in flight: the pull takes long enough to be caught in the middle.
        slow = {"NBCLUSTER_TRANSFER_CHUNK_BYTES": str(64 << 10), "NBCLUSTER_TRANSFER_WINDOW": "1"}
        reader = c.join("reader", env=slow)
        put, get = c.client(holder), c.client(reader)
        frames = put.put("doomed.p", np.ones(256 * MB // 8), "job4")
        other = put.put("other.p", np.ones(MB), "job4")
        put.close()
        outcome: list[BaseException | None] = []
        t = threading.Thread(target=lambda: outcome.append(_get_error(get, frames)))
        t.start()
        # Stop the holder once the reader's copy is under way, check it is partial, then kill.
        wait_until(lambda: _files(reader.store_id, "doomed.p"), timeout=60, interval=0.001)
        # A second reader arrives mid-transfer: it waits for the same pull (its object is
        # reserved, not sealed yet), and shares its outcome.
        late = c.client(reader)
        t2 = threading.Thread(target=lambda: outcome.append(_get_error(late, frames)))
        t2.start()
        seen = _stats(c, reader)["bytes_in"]
        wait_until(lambda: _stats(c, reader)["bytes_in"] > seen + 4 * MB, timeout=60)
        holder.proc.send_signal(signal.SIGSTOP)
        size = os.path.getsize(_files(reader.store_id, "doomed.p")[0])  # preallocated
        assert t.is_alive() and 0 < _stats(c, reader)["bytes_in"] < size
        t0 = time.monotonic()
        holder.proc.kill()
        t.join(30)
        t2.join(30)
        assert not t.is_alive() and not t2.is_alive()
        assert time.monotonic() - t0 < 15
        assert len(outcome) == 2
        for exc in outcome:
            assert isinstance(exc, ObjectLostError), outcome
            assert "doomed.p" in str(exc) and "went away" in str(exc)
        late.close()
        # The partial segment is gone, and the store's books are back to nothing.
        assert _files(reader.store_id, OBJECTS) == []
        assert _stats(c, reader)["objects"] == 0
        # A holder that is already gone: the pull fails too, within the connect timeout.
        t0 = time.monotonic()
        with pytest.raises(ObjectLostError, match=r"other\.p"):
            get.get(other)
        assert time.monotonic() - t0 < 20
        assert _files(reader.store_id, OBJECTS) == []
        get.close()
    finally:
        _stop_cluster(c)
    assert all(_files(n.store_id) == [] for n in c.nodes)


def _get_error(client: StoreClient, frames: list[Any]) -> BaseException | None:
    try:
        client.get(frames)
    except BaseException as exc:
        return exc
    return None


def test_tasks_read_a_large_object_made_on_another_node(tmp_path: Path) -> None:
    """End to end: a worker on node b reads (and sums) 200 MB that a worker on a returned."""
    c = _start_cluster(tmp_path)
    try:
        c.join("box-a", "--num-cpus", "1", "--resources", '{"a": 1}')
        c.join("box-b", "--num-cpus", "2", "--resources", '{"b": 2}')
        nb.init(address=c.address, token_file=str(c.token_file))

        @nb.remote(resources={"a": 1})
        def produce() -> Any:
            return np.arange(200 * MB // 8, dtype=np.float64)

        @nb.remote(resources={"b": 1})
        def consume(arr: Any) -> tuple[str, float]:
            return nb.get_runtime_context().get_node_id(), float(arr.sum())

        ref = produce.remote()
        results = nb.get([consume.remote(ref), consume.remote(ref)], timeout=120)
        n = 200 * MB // 8
        assert [total for _, total in results] == [float(n * (n - 1) // 2)] * 2
        b_id = next(x["node_id"] for x in nb.nodes() if x.get("name") == "box-b")
        assert {node for node, _ in results} == {b_id}
    finally:
        nb.shutdown()
        _stop_cluster(c)
    assert all(_files(n.store_id) == [] for n in c.nodes)
