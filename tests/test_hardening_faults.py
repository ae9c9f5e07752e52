"""Fault semantics under pressure: kill() is final at once, worker-death storms, head restarts.

Every test runs the real head, agents and workers; faults are real signals to real processes.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import nbcluster as nb
from nbcluster.exceptions import ActorDiedError, ConnectionFailedError
from nbcluster.head.instructions import Grant, StartWorker
from nbcluster.head.state import ClusterState
from nbcluster.head.trouble import MAX_BACKOFF_S, WorkerTrouble
from tests.conftest import descendants, wait_until
from tests.multinode import Procs, free_port, node_alive


@nb.remote
class Box:
    def __init__(self) -> None:
        self.n = 0

    def incr(self) -> int:
        self.n += 1
        return self.n

    def slow(self, seconds: float) -> str:
        time.sleep(seconds)
        return "finished"


@nb.remote
def square(x: int) -> int:
    time.sleep(0.01)
    return x * x


def worker_pids() -> list[int]:
    """Pids of this test's worker processes (children of the local node agent)."""
    out = []
    for p in descendants():
        try:
            if "nbcluster.worker" in " ".join(p.cmdline()):
                out.append(p.pid)
        except psutil.Error:
            continue
    return out


@pytest.fixture
def two_cpus() -> Iterator[nb.ClusterInfo]:
    nb.shutdown()
    info = nb.init(num_cpus=2)
    yield info
    nb.shutdown()


# ------------------------------------------------------------------------------ pure state
def test_failed_starts_are_planned_again() -> None:
    """A worker that dies while starting leaves a waiting request and a short pool: both ask
    for another start (before, nothing did, and the node stayed without workers for good)."""
    st = ClusterState()
    n, ins = st.add_node(b"agent", "n", "h", {"CPU": 2}, [], prestart=2)
    assert [type(i) for i in ins] == [StartWorker, StartWorker]
    st.request_lease(b"driver", "j", 1, {"CPU": 1}, "f")
    for _ in range(2):  # both prestarted workers die while starting
        ins = st.worker_start_failed(n)
        assert [type(i) for i in ins] == [StartWorker]
    assert st.nodes[n].starting == 2
    ins = st.worker_ready(n, "w9", "tcp://w9", "tcp://w9c", 1)
    assert [type(i) for i in ins] == [Grant]
    st.validate_state()


def test_restart_backoff_grows_is_capped_and_warns_with_the_reason() -> None:
    tr = WorkerTrouble()
    delays = []
    for i in range(40):
        tr.died("n1", "worker pid 7 was killed by SIGKILL", now=100.0 + i * 0.01)
        delays.append(tr.backoff("n1", now=100.0 + i * 0.01))
    assert delays[0] == 0.0  # a few deaths are normal
    assert delays == sorted(delays) and max(delays) == MAX_BACKOFF_S  # never "never"
    msg = tr.warning("n1", "box", now=101.0)
    assert msg is not None and "40 died in the last 10 s" in msg and "SIGKILL" in msg
    assert tr.warning("n1", "box", now=101.5) is None  # not repeated at once
    assert tr.backoff("n1", now=200.0) == 0.0  # the storm is over: start at once again
    assert tr.backoff("n2", now=200.0) == 0.0  # per node


# ------------------------------------------------------------------------------ kill() is final
def test_every_call_after_kill_raises(two_cpus: nb.ClusterInfo) -> None:
    """The worker hosting a killed actor may still run for a moment: nothing it answers after
    kill() returned may reach the caller, with other actors alive (they keep workers busy)."""
    others = [Box.remote() for _ in range(3)]
    assert nb.get([o.incr.remote() for o in others], timeout=60) == [1, 1, 1]
    for _ in range(20):
        a = Box.remote()
        assert nb.get(a.incr.remote(), timeout=60) == 1
        nb.kill(a)
        t0 = time.monotonic()
        with pytest.raises(ActorDiedError, match=r"killed by nbcluster\.kill"):
            nb.get(a.incr.remote(), timeout=30)
        assert time.monotonic() - t0 < 5  # decided here, not after the worker's death
    assert nb.get([o.incr.remote() for o in others], timeout=60) == [2, 2, 2]


def test_call_in_flight_at_kill_fails(two_cpus: nb.ClusterInfo) -> None:
    a = Box.remote()
    assert nb.get(a.incr.remote(), timeout=60) == 1
    running = a.slow.remote(1.0)
    queued = a.incr.remote()
    time.sleep(0.2)  # let the first call start on the worker (it finishes after kill returns)
    nb.kill(a)
    for ref in (running, queued):
        with pytest.raises(ActorDiedError, match=r"killed by nbcluster\.kill"):
            nb.get(ref, timeout=30)


# ------------------------------------------------------------------------------ death storms
class Killer(threading.Thread):
    """SIGKILLs worker processes from a background thread until stopped."""

    def __init__(self, every: float, starting_only: int = 0) -> None:
        super().__init__(daemon=True)
        self.every = every
        self.starting_only = starting_only  # > 0: kill only that many brand-new workers
        self.known = set(worker_pids())
        self.kills = 0
        self.stop = threading.Event()

    def run(self) -> None:
        rng = random.Random(11)
        while not self.stop.wait(self.every):
            pids = worker_pids()
            if self.starting_only:
                # A worker unknown so far is still importing: kill it before it is ready.
                pids = [p for p in pids if p not in self.known]
                self.known.update(pids)
            if not pids:
                continue
            pid = rng.choice(pids)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.kills += 1
            if self.starting_only and self.kills >= self.starting_only:
                return


def test_workers_killed_while_starting_are_replaced(two_cpus: nb.ClusterInfo) -> None:
    """A failed start makes the head plan again: the waiting task gets the next worker."""
    killer = Killer(0.005, starting_only=4)
    old = worker_pids()
    killer.start()
    for pid in old:  # the pool refills: the killer gets its replacements while they start
        os.kill(pid, signal.SIGKILL)
    ref = square.options(max_retries=5).remote(7)
    killer.join(60)
    assert killer.kills == 4
    assert nb.get(ref, timeout=60) == 49
    assert nb.get(square.remote(8), timeout=30) == 64


def test_worker_death_storm_recovers(
    two_cpus: nb.ClusterInfo, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGKILL a random worker every 50 ms for a while: every result is still exact, the
    pool is back afterwards, and the driver was told why workers keep dying."""
    caplog.set_level(logging.WARNING, logger="nbcluster")
    n = 400
    refs = [square.options(max_retries=100).remote(i) for i in range(n)]
    killer = Killer(0.05)
    killer.start()
    time.sleep(5.0)  # the storm's length (what is measured is what happens after it)
    killer.stop.set()
    killer.join(10)
    assert killer.kills >= 5  # fewer than 100: the backoff spaces out the new workers
    assert nb.get(refs, timeout=90) == [i * i for i in range(n)]
    t0 = time.monotonic()
    assert nb.get(square.remote(12), timeout=30) == 144
    assert time.monotonic() - t0 < 30
    wait_until(lambda: len(worker_pids()) >= 1, timeout=30)
    warnings = [r.getMessage() for r in caplog.records if "keep dying" in r.getMessage()]
    assert warnings, [r.getMessage() for r in caplog.records][-20:]
    assert "SIGKILL" in warnings[0] and "died in the last" in warnings[0], warnings[0]


# ------------------------------------------------------------------------------ head restarts
@nb.remote
class Keeper:
    def hello(self) -> str:
        return "hi"


def test_queries_right_after_a_head_restart_wait_for_the_reconnect(procs: Procs) -> None:
    procs.start_head()
    a = procs.join("a", "--num-cpus", "1")
    nb.init(address=procs.address, token_file=str(procs.token_file))
    keeper = Keeper.options(name="keeper", lifetime="detached").remote()
    assert nb.get(keeper.hello.remote(), timeout=60) == "hi"
    procs.wait_saved(actors=1, jobs=1)
    procs.kill_head()
    procs.start_head()
    time.sleep(0.2)
    t0 = time.monotonic()
    # Both were asked while this driver did not know yet that the head had restarted.
    assert isinstance(nb.nodes(), list)
    assert nb.get(nb.get_actor("keeper").hello.remote(), timeout=30) == "hi"
    assert time.monotonic() - t0 < 15
    wait_until(lambda: node_alive(a) is True, timeout=20)


def test_actor_newer_than_the_heads_snapshot_fails_clearly(procs: Procs) -> None:
    """The head saves its state a moment after a change; killed in between, it restarts
    without the newest actors. Calls to one of those must fail with a clear error (they hung:
    the restarted head recycled the worker as unclaimed and told nobody)."""
    procs.start_head()
    procs.join("a", "--num-cpus", "2")
    nb.init(address=procs.address, token_file=str(procs.token_file))
    known = Box.remote()
    assert nb.get(known.incr.remote(), timeout=60) == 1
    procs.wait_saved(actors=1, jobs=1)
    before = procs.state_file.read_bytes()
    late = Box.remote()
    assert nb.get(late.incr.remote(), timeout=60) == 1
    procs.wait_saved(actors=2, jobs=1)
    procs.kill_head()
    procs.state_file.write_bytes(before)  # as if it died before saving the newest state
    procs.start_head()

    def died() -> ActorDiedError | None:
        try:
            nb.get(late.incr.remote(), timeout=30)  # answered until this driver rejoins
        except ActorDiedError as exc:
            return exc
        return None

    err = wait_until(died, timeout=30)
    assert "no record of this actor" in str(err), err
    assert nb.get(known.incr.remote(), timeout=30) == 2


DRIVER = """
import os, sys, time
import nbcluster as nb

@nb.remote
class Counter:
    def __init__(self):
        self.n = 0
    def incr(self):
        self.n += 1
        return self.n

nb.init(address=sys.argv[1], token_file=sys.argv[2])
c = Counter.remote()
print("FIRST", nb.get(c.incr.remote(), timeout=60), flush=True)
while not os.path.exists(sys.argv[3]):
    time.sleep(0.02)
try:
    print("SECOND", nb.get(c.incr.remote(), timeout=30), flush=True)
except Exception as exc:
    print("FAILED", type(exc).__name__, exc, flush=True)
"""


def test_a_driver_slower_than_its_nodes_keeps_its_job_across_a_head_restart(
    procs: Procs, tmp_path: Path
) -> None:
    """The recovery window closed as soon as the nodes were back: a driver that reconnected a
    moment later found its job ended and its actors killed."""
    procs.start_head()
    a = procs.join("a", "--num-cpus", "2")
    go = tmp_path / "go"
    out = tmp_path / "driver.out"
    with open(out, "wb") as f:
        driver = subprocess.Popen(
            [sys.executable, "-c", DRIVER, procs.address, str(procs.token_file), str(go)],
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: "FIRST 1" in out.read_text(), 60)
        procs.wait_saved(actors=1, jobs=1)
        driver.send_signal(signal.SIGSTOP)  # it will reconnect late
        procs.kill_head()
        procs.start_head()
        nb.init(address=procs.address, token_file=str(procs.token_file))  # another job
        wait_until(lambda: node_alive(a) is True, 20)
        time.sleep(1.0)  # room for the old behaviour: the window closed within 0.25 s here
        driver.send_signal(signal.SIGCONT)
        go.touch()
        wait_until(lambda: "SECOND" in out.read_text() or "FAILED" in out.read_text(), 60)
        assert "SECOND 2" in out.read_text(), out.read_text()
    finally:
        driver.send_signal(signal.SIGCONT)
        driver.kill()
        driver.wait(10)


def test_init_with_nothing_listening_fails_at_once(tmp_path: Path) -> None:
    nb.shutdown()
    token = tmp_path / "token"
    token.write_text("x" * 32)
    token.chmod(0o600)
    address = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(ConnectionFailedError, match="nothing is listening") as err:
        nb.init(address=address, token_file=str(token))
    assert time.monotonic() - t0 < 5
    assert address in str(err.value)


def test_a_worker_at_a_reused_address_gets_a_fresh_connection(two_cpus: nb.ClusterInfo) -> None:
    """Found by the 30-minute chaos run: a new worker process listening at a dead worker's
    port was reached through the old connection, never bound to the job nor sent the
    functions, and failed every task with KeyError. Connections belong to a worker process."""
    import concurrent.futures

    from nbcluster.client import current

    assert nb.get(square.remote(3), timeout=30) == 9
    client = current.get()
    io = client.io
    assert io.loop is not None and io.state is not None
    conns = io.state.conns
    old = next(iter(conns.by_addr.values()))
    assert old.worker_id and old.fns_sent  # the function was sent on it

    def conn_for(worker_id: str) -> Any:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def make() -> None:
            fut.set_result(conns.conn(old.addr, old.control_addr, worker_id))

        io.loop.call_soon_threadsafe(make)  # connections are the I/O thread's
        return fut.result(10)

    assert conn_for(old.worker_id) is old  # the same process: kept
    new = conn_for("another-process")
    assert new is not old and new.fns_sent == set() and conns.by_addr[old.addr] is new
