"""Authenticated peers sending malformed messages of every kind stop nothing.

A fuzzer holding the cluster secret connects to every listening socket of a real local cluster
(the head, the node agent's store socket, a task worker's task and control sockets, an actor's
worker, the driver's owner socket) and, acting as a head, to a real node agent and (through a
proxy in front of the real head) to a real driver. It sends thousands of hypothesis-generated
messages that each fail their kind's schema: a required field missing, a field of the wrong type
(nested garbage, huge integers, NaN), the wrong number of payload frames, an unknown or
non-string kind, frame 0 not msgpack or not a map. Afterwards
every process still serves (a task on the fuzzed worker, a cancel through its control thread, an
actor call, a task of the driver, store and head requests), and nothing leaked: the same
processes, no more file descriptors, no new /dev/shm files, resident memory within a bound.
"""

from __future__ import annotations

import contextlib
import operator
import os
import queue
import subprocess
import sys
import threading
import time
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import msgspec
import psutil
import pytest
import zmq
from hypothesis import HealthCheck, assume, given, seed, settings
from hypothesis import strategies as st

import nbcluster as nb
from nbcluster.protocol.codec import decode, encode
from nbcluster.protocol.messages import PROTOCOL_VERSION, Kind
from nbcluster.protocol.schema import SCHEMAS, Message
from nbcluster.protocol.security import (
    CurveKeys,
    derive_keys,
    new_token,
    read_token_file,
    write_token_file,
)
from nbcluster.protocol.validation import validate
from nbcluster.serialization import dumps, loads
from nbcluster.serialization.pickling import dumps_args
from nbcluster.store.segment import SHM_DIR
from nbcluster.transport import Transport
from tests.conftest import descendants, ready_line, stop_processes, wait_until

#: Examples per fuzzed socket; each sends 1-8 messages (a few thousand in all).
EXAMPLES = int(os.environ.get("NBCLUSTER_FUZZ_EXAMPLES", "300"))
#: Resident memory a process may gain while fuzzed.
RSS_BOUND = 64 << 20
TIMEOUT = 60.0

pytestmark = pytest.mark.timeout(600)


# ---------------------------------------------------------------------------- message strategies
def _valid(tp: Any) -> Any:
    """A value of type ``tp`` that its schema accepts."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:  # with its constraints met (lengths, lower bounds)
        base, *metas = typing.get_args(tp)
        value = _valid(base)
        for meta in metas:
            if not isinstance(meta, msgspec.Meta):
                continue
            if meta.min_length is not None and isinstance(value, bytes | str):
                value = value * max(1, meta.min_length)
                value = value[: meta.max_length or len(value)]
            if meta.ge is not None and isinstance(value, int) and value < meta.ge:
                value = int(meta.ge)
        return value
    if origin in (typing.Union, types.UnionType):
        return _valid(next(a for a in typing.get_args(tp) if a is not type(None)))
    if origin is list:
        return [_valid(typing.get_args(tp)[0])]
    if origin is dict:
        return {"CPU": 1.0} if typing.get_args(tp)[1] is float else {"a": 1}
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return _valid_struct(tp)
    return {str: "x", int: 1, float: 1.0, bool: True, bytes: b"x" * 16}.get(tp)


def _valid_struct(cls: type[msgspec.Struct]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    config = cls.__struct_config__
    if config.tag_field is not None:
        out[config.tag_field] = config.tag
    for f in msgspec.structs.fields(cls):
        if f.required:
            out[f.encode_name] = _valid(f.type)
    return out


def valid_message(kind: str) -> tuple[dict[str, Any], list[bytes]]:
    """A minimal valid message of ``kind``: its required fields and its payload frames."""
    header = _valid_struct(SCHEMAS[kind])
    for field in ("nargs", "n", "deps"):  # keep frame counts small
        if field in header:
            header[field] = [1] if isinstance(header[field], list) else 1
    want = msgspec.convert(header, SCHEMAS[kind]).frames()
    return header, [b"f"] * (want or 0)


_ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what msgpack can carry
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    _ints,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.binary(max_size=12),
)
garbage = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=6), _ints), inner, max_size=4),
    ),
    max_leaves=12,
)
deep = st.integers(min_value=20, max_value=120).map(lambda n: _nest(n))


def _nest(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = [value]
    return value


def _is_malformed(frames: list[bytes]) -> bool:
    try:
        header, payload = decode(frames)
        validate(header, payload)
    except Exception:
        return True
    return False


def _pack(value: Any) -> bytes:
    return bytes(msgpack.packb(value, use_bin_type=True))


@st.composite
def malformed(draw: st.DrawFn, kinds: list[str]) -> list[bytes]:
    """One message (its frames) of one of ``kinds`` that fails validation."""
    kind = draw(st.sampled_from(kinds))
    header, payload = valid_message(kind)
    fields = msgspec.structs.fields(SCHEMAS[kind])
    required = [f.encode_name for f in fields if f.required]
    how = draw(st.sampled_from(["missing", "wrong", "wrong", "deep", "frames", "kind", "junk"]))
    if how == "missing" and required:
        del header[draw(st.sampled_from(required))]
    elif how in ("wrong", "deep") and fields:
        name = draw(st.sampled_from([f.encode_name for f in fields]))
        header[name] = draw(garbage if how == "wrong" else deep)
    elif how == "frames":
        payload = [b"x"] * draw(st.integers(0, 6).filter(lambda n: n != len(payload)))
    elif how == "kind":
        header["k"] = draw(st.one_of(garbage, st.text(min_size=1, max_size=10)))
    else:
        junk = draw(st.one_of(st.binary(max_size=40), garbage.map(_pack)))
        frames = [junk, *draw(st.lists(st.binary(max_size=8), max_size=3))]
        assume(_is_malformed(frames))
        return frames
    if draw(st.booleans()):  # undeclared fields (ignored by the schema) with nested garbage
        extra = draw(st.dictionaries(st.text(min_size=1, max_size=6), garbage, max_size=3))
        header.update({k: v for k, v in extra.items() if k not in header and k != "k"})
    frames = [_pack(header), *payload]
    assume(_is_malformed(frames))
    return frames


ALL_KINDS = [k.value for k in Kind]


# ---------------------------------------------------------------------------- sockets
class Peer:
    """A DEALER with the cluster's client keys (what any secret holder can open)."""

    def __init__(self, keys: CurveKeys, endpoint: str) -> None:
        self.sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.CURVE_SECRETKEY, keys.client_secret)
        self.sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.client_public)
        self.sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
        self.sock.connect(endpoint)
        self.endpoint = endpoint

    def send(self, header: dict[str, Any], payload: list[Any] | None = None) -> None:
        self.sock.send_multipart(encode(header, payload or []))

    def drain(self) -> int:
        """Throw away what arrived (answers to malformed messages); returns how many."""
        n = 0
        while self.sock.poll(0):
            self.sock.recv_multipart()
            n += 1
        return n

    def wait_for(
        self, match: Callable[[dict[str, Any]], bool], timeout: float = TIMEOUT
    ) -> tuple[dict[str, Any], list[bytes]]:
        """The next message ``match`` accepts (others are dropped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0 and self.sock.poll(int(left * 1000)), f"no answer from {self.endpoint}"
            h, payload = decode(self.sock.recv_multipart())
            if match(h):
                return h, payload

    def close(self) -> None:
        self.sock.close(linger=0)


class Client(Peer):
    """A peer that said HELLO: it must ping, or the head drops it (and its job's workers)."""

    last_ping = 0.0

    def keepalive(self) -> None:
        if time.monotonic() - self.last_ping > 1.0:
            self.last_ping = time.monotonic()
            self.send({"k": Kind.PING})


def _task(fn: Callable[..., Any], *args: Any) -> tuple[dict[str, Any], list[Any]]:
    """A valid TASK calling ``fn(*args)`` (a stdlib function: the worker imports it)."""
    frames, _ = dumps_args(fn.__name__, args, {}, lambda _v: False)
    blob = dumps((fn, ""))[0]
    header: dict[str, Any] = {"k": Kind.TASK, "tid": f"fuzz{time.monotonic_ns()}"}
    header["fn"] = f"fuzz-{fn.__name__}"
    header.update(fnb=1, name=fn.__name__, nargs=len(frames), nret=1)
    return header, [blob, *frames]


def _result(peer: Peer, tid: str) -> tuple[dict[str, Any], Any]:
    h, payload = peer.wait_for(lambda h: h.get("k") == Kind.RESULT and h.get("tid") == tid)
    return h, loads(payload)


@dataclass
class Snapshot:
    """What the cluster's processes hold: to compare before and after the fuzzing."""

    fds: dict[int, int]
    rss: dict[int, int]
    shm: set[str]

    @classmethod
    def take(cls, store_id: str) -> Snapshot:
        fds, rss = {}, {}
        for p in descendants():
            with contextlib.suppress(psutil.Error):
                fds[p.pid], rss[p.pid] = p.num_fds(), p.memory_info().rss
        return cls(fds, rss, {n for n in os.listdir(SHM_DIR) if store_id in n})


def _logs(info: nb.ClusterInfo) -> str:
    """The end of the head's and the agent's logs (the agent's holds its workers' stderr)."""
    out = []
    for log in sorted(Path(info.session_dir or "").glob("*.log")):
        out.append(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")
    return "\n".join(out)


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


# ---------------------------------------------------------------------------- the cluster
@nb.remote
def double(x: int) -> int:
    return 2 * x


@dataclass
class Fuzzed:
    info: nb.ClusterInfo
    keys: CurveKeys
    client: Client  # a protocol-level driver holding one lease
    job_id: str
    lease_id: str
    worker_addr: str
    control_addr: str
    actor: Any
    actor_addr: str
    actor_control: str
    store_address: str
    store_id: str
    owner_address: str
    ref: Any


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[Fuzzed]:
    nb.shutdown()
    info = nb.init(num_cpus=3)
    keys = derive_keys(read_token_file(Path(info.session_dir or "") / "token"))
    client = Client(keys, f"tcp://{info.address}")
    try:
        hello = {"k": Kind.HELLO, "v": PROTOCOL_VERSION, "pid": os.getpid(), "role": "driver"}
        client.send(hello)
        welcome, _ = client.wait_for(lambda h: h["k"] == Kind.WELCOME)
        client.send({"k": Kind.LEASE_REQUEST, "rid": 1, "shape": {"CPU": 1.0}, "name": "fuzz"})
        grant, _ = client.wait_for(lambda h: h["k"] == Kind.LEASE_GRANTED)

        @nb.remote(num_cpus=1)
        class Counter:
            def __init__(self) -> None:
                self.n = 0

            def add(self, k: int) -> int:
                self.n += k
                return self.n

        actor = Counter.remote()  # type: ignore[attr-defined]
        assert nb.get(actor.add.remote(1), timeout=TIMEOUT) == 1
        client.send({"k": Kind.QUERY, "rid": 2, "what": "actors"})
        views, _ = client.wait_for(lambda h: h["k"] == Kind.QUERY_REPLY and h["rid"] == 2)
        (aid,) = [a["actor_id"] for a in views["result"] if a["class_name"] == "Counter"]
        client.send({"k": Kind.ACTOR_RESOLVE, "aid": aid})
        state, _ = client.wait_for(lambda h: h["k"] == Kind.ACTOR_STATE and h["state"] == "ALIVE")
        (node,) = nb.nodes()
        ref = nb.put(b"kept by its owner")
        assert nb.get(double.remote(1), timeout=TIMEOUT) == 2  # its worker: before the baseline
        yield Fuzzed(
            info,
            keys,
            client,
            welcome["job_id"],
            grant["lease_id"],
            grant["worker_addr"],
            grant["control_addr"],
            actor,
            state["addr"],
            state["control_addr"],
            node["store_address"],
            node["store_id"],
            ref.owner_address,
            ref,
        )
    finally:
        with contextlib.suppress(zmq.ZMQError):
            client.send({"k": Kind.GOODBYE})
        client.close()
        nb.shutdown()


def _fuzz(peers: list[Peer], kinds: list[str], keepalive: Callable[[], None]) -> int:
    """Send ``EXAMPLES`` batches of malformed messages to each of ``peers``; returns the count."""
    sent = [0]

    @seed(20261130)
    @settings(
        max_examples=EXAMPLES * len(peers),
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        target=st.integers(0, len(peers) - 1),
        batch=st.lists(malformed(kinds), min_size=1, max_size=8),
    )
    def run(target: int, batch: list[list[bytes]]) -> None:
        keepalive()
        peer = peers[target]
        for frames in batch:
            peer.sock.send_multipart(frames)
            sent[0] += 1
        peer.drain()

    run()
    return sent[0]


def test_malformed_messages_stop_nothing(fuzzed: Fuzzed) -> None:
    f = fuzzed
    before = Snapshot.take(f.store_id)
    targets = {
        "head": f"tcp://{f.info.address}",
        "store": f.store_address,
        "worker": f.worker_addr,
        "worker control": f.control_addr,
        "actor": f.actor_addr,
        "actor control": f.actor_control,
        "owner": f.owner_address,
    }
    peers = {name: Peer(f.keys, addr) for name, addr in targets.items()}
    try:
        sent = _fuzz(list(peers.values()), ALL_KINDS, f.client.keepalive)
        assert sent >= 1000
        for pid in before.fds:
            assert _alive(pid), f"process {pid} died while fuzzed:\n{_logs(f.info)}"

        # Every loop read everything sent before an answered request of the same connection.
        peers["head"].send({"k": Kind.QUERY, "rid": 7, "what": "head"})
        peers["head"].wait_for(lambda h: h["k"] == Kind.ERROR and h.get("code") == "nohello")
        peers["store"].send({"k": Kind.STORE_STATS, "rid": 7})
        stats, _ = peers["store"].wait_for(lambda h: h.get("rid") == 7)
        assert stats["k"] == Kind.STORE_REPLY and stats["ok"], stats
        peers["owner"].send({"k": Kind.GET_OBJECT, "oid": f.ref.oid})
        obj, frames = peers["owner"].wait_for(lambda h: h["k"] == Kind.OBJECT)
        assert obj["ok"] and loads(frames) == b"kept by its owner"
        for name in ("worker", "actor"):  # a malformed call is answered with its result
            peers[name].send({"k": Kind.TASK, "tid": "bad-call", "nargs": "one"})
            h, err = _result(peers[name], "bad-call")
            assert not h["ok"] and "malformed task message" in str(err)
    finally:
        for peer in peers.values():
            peer.close()

    # The fuzzed task worker still runs tasks, and its control thread still cancels them.
    worker = Peer(f.keys, f.worker_addr)
    control = Peer(f.keys, f.control_addr)
    try:
        worker.send({"k": Kind.BIND, "job_id": f.job_id, "sys_path": []})
        header, payload = _task(operator.pow, 2, 10)
        worker.send(header, payload)
        h, value = _result(worker, header["tid"])
        assert h["ok"] and value == 1024
        # Once it runs (it says so), only the control thread can interrupt it.
        header, payload = _task(exec, "print('running', flush=True)\nimport time\ntime.sleep(120)")
        worker.send(header, payload)
        worker.wait_for(lambda h: h["k"] == Kind.LOG and h["lines"] == ["running"])
        control.send({"k": Kind.CANCEL, "tid": header["tid"], "force": False})
        h, _ = _result(worker, header["tid"])
        assert not h["ok"] and h["err"] == "cancelled"
    finally:
        worker.close()
        control.close()

    # The driver still runs tasks and actor calls; the head and the store still answer.
    assert nb.get(double.remote(21), timeout=TIMEOUT) == 42
    assert nb.get(f.actor.add.remote(2), timeout=TIMEOUT) == 3
    assert nb.nodes()[0]["alive"]

    # Nothing leaked: the same processes, their descriptors, memory and shared-memory files.
    after = Snapshot.take(f.store_id)
    for pid in before.fds:
        assert _alive(pid), f"process {pid} died while fuzzed"
    assert set(after.fds) == set(before.fds), "processes were started or ended"

    def settled() -> bool:
        now = Snapshot.take(f.store_id)
        return all(now.fds.get(pid, 0) <= n + 2 for pid, n in before.fds.items())

    wait_until(settled, timeout=30)
    now = Snapshot.take(f.store_id)
    for pid, rss in before.rss.items():
        assert now.rss[pid] - rss < RSS_BOUND, f"process {pid} grew by {now.rss[pid] - rss} bytes"
    assert now.shm <= before.shm, f"new /dev/shm files: {now.shm - before.shm}"


# ---------------------------------------------------------------------------- a driver's head side
class _HeadProxy(threading.Thread):
    """Stands between one driver and the real head, forwarding both ways, and sends the driver
    the malformed messages put on ``inject`` as if its head had sent them."""

    def __init__(self, transport: Transport, head: str) -> None:
        super().__init__(name="fuzz-head-proxy", daemon=True)
        self.front, self.endpoint = transport.server(zmq.ROUTER, "tcp://127.0.0.1:0", aio=False)
        self.back = transport.client(zmq.DEALER, head, aio=False)
        self.inject: queue.Queue[list[bytes]] = queue.Queue()
        self.injected = 0
        self.done = threading.Event()
        self.peer: bytes | None = None

    def run(self) -> None:  # (the sockets are used by this thread only)
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        try:
            while not self.done.is_set():
                for sock, _ in poller.poll(10):
                    if sock is self.front:
                        self.peer, *frames = self.front.recv_multipart()
                        self.back.send_multipart(frames)
                    elif self.peer is not None:
                        self.front.send_multipart([self.peer, *self.back.recv_multipart()])
                while self.peer is not None and not self.inject.empty():
                    self.front.send_multipart([self.peer, *self.inject.get_nowait()])
                    self.injected += 1
        finally:
            self.front.close(linger=0)
            self.back.close(linger=0)


DRIVER = """
import sys
import nbcluster as nb
from nbcluster.launch import free_port
nb.init(address=sys.argv[1], token_file=sys.argv[2])
print("DRIVER_READY", flush=True)
sys.stdin.readline()  # the fuzzing is over

@nb.remote
def inc(x):
    return x + 1

print("DRIVER_RESULT", nb.get(inc.remote(41), timeout=60), flush=True)
nb.shutdown()
"""


def test_driver_survives_malformed_messages_from_its_head(fuzzed: Fuzzed, tmp_path: Path) -> None:
    """A driver whose head connection brings malformed messages of every kind drops them (and
    logs that it did), and still runs a task through that connection afterwards."""
    f = fuzzed
    transport = Transport(f.keys)
    proxy = _HeadProxy(transport, f"tcp://{f.info.address}")
    proxy.start()
    token_file = Path(f.info.session_dir or "") / "token"
    err = tmp_path / "driver.err"
    cmd = [sys.executable, "-c", DRIVER, proxy.endpoint[len("tcp://") :], str(token_file)]
    with err.open("w") as stderr:
        driver = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True
        )
    try:
        assert driver.stdout is not None and driver.stdin is not None
        ready_line(driver.stdout, "DRIVER_READY")
        sent = [0]

        @seed(20261130)
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(batch=st.lists(malformed(ALL_KINDS), min_size=1, max_size=8))
        def run(batch: list[list[bytes]]) -> None:
            for frames in batch:
                proxy.inject.put(frames)
                sent[0] += 1

        run()
        assert sent[0] >= 300
        wait_until(lambda: proxy.injected == sent[0], timeout=TIMEOUT)
        driver.stdin.write("go\n")
        driver.stdin.flush()
        line = ready_line(driver.stdout, "DRIVER_RESULT")
        assert line.split() == ["DRIVER_RESULT", "42"], err.read_text()[-3000:]
        assert driver.wait(TIMEOUT) == 0, err.read_text()[-3000:]
        assert "dropping a malformed message from the head" in err.read_text()
    finally:
        stop_processes([driver])
        proxy.done.set()
        proxy.join(10)
        transport.close()


# ---------------------------------------------------------------------------- an agent's head side


def test_agent_survives_malformed_messages_from_its_head(tmp_path: Path) -> None:
    """The fuzzer plays the head of a real node agent: it registers it, then fuzzes it."""
    token_file = tmp_path / "token"
    write_token_file(token_file, new_token())
    transport = Transport(derive_keys(read_token_file(token_file)))
    head, endpoint = transport.server(zmq.ROUTER, "tcp://127.0.0.1:0", aio=False)
    cmd = [sys.executable, "-m", "nbcluster", "worker", "--address", endpoint[len("tcp://") :]]
    cmd += ["--token-file", str(token_file), "--prestart", "0", "--num-cpus", "1"]
    agent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def recv(kind: str) -> tuple[bytes, dict[str, Any]]:
        deadline = time.monotonic() + TIMEOUT
        while True:
            left = deadline - time.monotonic()
            assert left > 0 and head.poll(int(left * 1000)), f"the agent sent no {kind}"
            ident, *frames = head.recv_multipart()
            h, _ = decode(frames)
            if h["k"] == kind:
                return ident, h

    try:
        ident, reg = recv(Kind.REGISTER_NODE)
        validate(reg)
        head.send_multipart([ident, *encode({"k": Kind.NODE_REGISTERED, "node_id": "fz"})])
        assert agent.stdout is not None
        line = ready_line(agent.stdout)
        store_id = line.split()[3]
        rss = psutil.Process(agent.pid).memory_info().rss
        sent = [0]

        @seed(20261130)
        @settings(
            max_examples=EXAMPLES * 2,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(batch=st.lists(malformed(ALL_KINDS), min_size=1, max_size=8))
        def run(batch: list[list[bytes]]) -> None:
            for frames in batch:
                head.send_multipart([ident, *frames])
                sent[0] += 1
            while head.poll(0):  # its pings
                head.recv_multipart()

        run()
        assert sent[0] >= 300
        # In order after the fuzz: it still starts and kills workers, and stops when told.
        head.send_multipart([ident, *encode({"k": Kind.START_WORKER})])
        _, ready = recv(Kind.WORKER_READY)
        validate(ready)
        assert agent.poll() is None and _alive(ready["pid"])
        assert psutil.Process(agent.pid).memory_info().rss - rss < RSS_BOUND
        head.send_multipart(
            [ident, *encode({"k": Kind.KILL_WORKER, "worker_id": ready["worker_id"]})]
        )
        _, died = recv(Kind.WORKER_DIED)
        assert died["worker_id"] == ready["worker_id"]
        head.send_multipart([ident, *encode({"k": Kind.STOP_NODE})])
        assert agent.wait(TIMEOUT) == 0
        assert [n for n in os.listdir(SHM_DIR) if store_id in n] == []
    finally:
        stop_processes([agent])
        head.close(linger=0)
        transport.close()


def test_valid_examples_are_valid() -> None:
    """The fuzzer's starting points are valid, so each mutation is what makes it malformed."""
    for kind in ALL_KINDS:
        header, payload = valid_message(kind)
        msg = validate(header, payload)
        assert isinstance(msg, Message) and msg.frames() in (None, len(payload))
