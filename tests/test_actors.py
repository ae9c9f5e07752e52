"""Actors against a real local cluster: state, ordering, resources, names, lifetime, failures."""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path

import pytest

import nbcluster as nb
from nbcluster.exceptions import ActorDiedError, RayActorError, TaskError
from tests.conftest import ROOT, all_gone, run_script, wait_until


@nb.remote
class Counter:
    def __init__(self, start: int = 0) -> None:
        self.value = start

    def increment(self, by: int = 1) -> int:
        self.value += by
        return self.value

    def get(self) -> int:
        return self.value

    def pid(self) -> int:
        return os.getpid()

    @nb.method(num_returns=2)
    def pair(self) -> tuple[int, int]:
        return self.value, -self.value

    def fail(self) -> None:
        raise ValueError(f"bad state {self.value}")

    def say(self, text: str) -> None:
        print(text)

    def env(self) -> str | None:
        return os.environ.get("CUDA_VISIBLE_DEVICES")


def _actor(aid: str) -> dict[str, object]:
    return next(a for a in nb.actors() if a["actor_id"] == aid)


def test_state_and_order(cluster: nb.ClusterInfo) -> None:
    c = Counter.remote(10)
    refs = [c.increment.remote() for _ in range(100)]
    assert isinstance(refs[0], nb.ObjectRef)
    assert nb.get(refs, timeout=30) == list(range(11, 111))  # one caller: submission order
    assert nb.get(c.get.remote(), timeout=30) == 110
    a, b = c.pair.remote()
    assert nb.get([a, b], timeout=30) == [110, -110]
    x, y, z = c.increment.options(num_returns=1).remote(), *c.pair.options(num_returns=2).remote()
    assert nb.get([x, y, z], timeout=30) == [111, 111, -111]


def test_misuse_is_reported(cluster: nb.ClusterInfo) -> None:
    with pytest.raises(TypeError, match=r"Counter\.remote"):
        Counter(1)
    c = Counter.remote()
    with pytest.raises(TypeError, match=r"\.increment\.remote"):
        c.increment()
    with pytest.raises(AttributeError, match="no method 'nope'"):
        c.nope  # noqa: B018
    with pytest.raises(ValueError, match="max_concurency"):
        Counter.options(max_concurency=2)


def test_refs_as_arguments_and_handles_passed_around(cluster: nb.ClusterInfo) -> None:
    c = Counter.remote()

    @nb.remote
    def bump_via(handle: nb.ActorHandle, n: int) -> int:
        return nb.get([handle.increment.remote() for _ in range(n)], timeout=30)[-1]

    @nb.remote
    class Relay:
        def __init__(self, target: nb.ActorHandle) -> None:
            self.target = target

        def forward(self, by: int) -> int:
            return nb.get(self.target.increment.remote(by), timeout=30)

    assert nb.get(bump_via.remote(c, 5), timeout=60) == 5
    relay = Relay.remote(c)
    assert nb.get(relay.forward.remote(10), timeout=60) == 15
    assert nb.get(c.increment.remote(nb.put(100)), timeout=30) == 115  # a ref argument
    assert nb.get(c.get.remote(), timeout=30) == 115


def test_actor_resources(cluster: nb.ClusterInfo) -> None:
    default = Counter.remote()
    nb.get(default.get.remote(), timeout=30)
    # Placed with 1 CPU, holds none while it lives.
    wait_until(lambda: nb.available_resources().get("CPU") == 2, timeout=10)
    assert _actor(default.actor_id)["resources"] == {}

    holder = Counter.options(num_cpus=1, resources={"custom": 1}).remote()
    nb.get(holder.get.remote(), timeout=30)
    avail = nb.available_resources()
    assert avail.get("CPU") == 1 and "custom" not in avail
    nb.kill(holder)
    wait_until(lambda: nb.available_resources().get("custom") == 1, timeout=10)
    wait_until(lambda: nb.available_resources().get("CPU") == 2, timeout=10)


def test_gpu_actor_sees_its_gpu(cluster: nb.ClusterInfo) -> None:
    g = Counter.options(num_gpus=1).remote()
    assert nb.get(g.env.remote(), timeout=30) in ("0", "1")
    assert nb.available_resources().get("GPU") == 1
    nb.kill(g)
    wait_until(lambda: nb.available_resources().get("GPU") == 2, timeout=10)


def test_named_actors(cluster: nb.ClusterInfo) -> None:
    a = Counter.options(name="shared-counter").remote(5)
    nb.get(a.increment.remote(), timeout=30)
    b = nb.get_actor("shared-counter")
    assert nb.get(b.get.remote(), timeout=30) == 6
    with pytest.raises(ValueError, match="already exists"):
        Counter.options(name="shared-counter").remote()
    same = Counter.options(name="shared-counter", get_if_exists=True).remote()
    assert nb.get(same.get.remote(), timeout=30) == 6
    with pytest.raises(ValueError, match="no actor named 'missing'"):
        nb.get_actor("missing")
    other = Counter.options(name="shared-counter", namespace="elsewhere").remote(1)
    assert (
        nb.get(nb.get_actor("shared-counter", namespace="elsewhere").get.remote(), timeout=30) == 1
    )
    info = _actor(a.actor_id)
    assert info["name"] == "shared-counter" and info["state"] == "ALIVE"
    nb.kill(a)
    nb.kill(other)
    wait_until(lambda: _actor(a.actor_id)["state"] == "DEAD", timeout=10)
    with pytest.raises(ValueError):
        nb.get_actor("shared-counter")  # a dead actor's name is free again


def test_handles_out_of_scope_terminate_the_actor(cluster: nb.ClusterInfo) -> None:
    c = Counter.remote()
    pid = nb.get(c.pid.remote(), timeout=30)
    aid = c.actor_id
    ref = c.increment.remote()
    del c  # the pending call still completes
    assert nb.get(ref, timeout=30) == 1
    wait_until(lambda: _actor(aid)["state"] == "DEAD", timeout=10)
    assert "out of scope" in str(_actor(aid)["death_reason"])
    wait_until(lambda: all_gone([pid]), timeout=10)


def test_kill_and_calls_after_death(cluster: nb.ClusterInfo) -> None:
    c = Counter.remote()
    pid = nb.get(c.pid.remote(), timeout=30)
    nb.kill(c)
    wait_until(lambda: all_gone([pid]), timeout=10)
    t0 = time.monotonic()
    with pytest.raises(ActorDiedError, match=r"killed by nbcluster\.kill"):
        nb.get(c.get.remote(), timeout=30)
    assert time.monotonic() - t0 < 5  # promptly, never a hang
    assert issubclass(ActorDiedError, RayActorError)


def test_exit_actor(cluster: nb.ClusterInfo) -> None:
    @nb.remote
    class Quitter:
        def work(self) -> str:
            return "ok"

        def quit(self) -> None:
            nb.exit_actor()

    q = Quitter.remote()
    assert nb.get(q.work.remote(), timeout=30) == "ok"
    # As in Ray: the call that exits sees the actor's death, and so does every later call.
    with pytest.raises(ActorDiedError, match="exit_actor"):
        nb.get(q.quit.remote(), timeout=30)
    with pytest.raises(ActorDiedError, match="exit_actor"):
        nb.get(q.work.remote(), timeout=30)
    with pytest.raises(TypeError):
        nb.exit_actor()  # not inside an actor


def test_method_exception_keeps_actor_alive(cluster: nb.ClusterInfo) -> None:
    c = Counter.remote(3)
    with pytest.raises(ValueError, match="bad state 3") as info:
        nb.get(c.fail.remote(), timeout=30)
    assert isinstance(info.value, TaskError)
    assert "in fail" in str(info.value)
    assert nb.get(c.increment.remote(), timeout=30) == 4


def test_init_error_fails_every_call(cluster: nb.ClusterInfo) -> None:
    @nb.remote
    class Broken:
        def __init__(self) -> None:
            raise RuntimeError("cannot load model")

        def predict(self) -> int:
            return 1

    b = Broken.remote()
    for _ in range(2):
        with pytest.raises(RuntimeError, match="cannot load model") as info:
            nb.get(b.predict.remote(), timeout=30)
        assert "__init__" in str(info.value)


def test_restart_reruns_init_and_retries_calls(cluster: nb.ClusterInfo, tmp_path: Path) -> None:
    marker = tmp_path / "crashed"

    @nb.remote(max_restarts=1, max_task_retries=1)
    class Phoenix:
        def __init__(self) -> None:
            self.inits = 1 if not marker.exists() else 2

        def crash_once(self) -> int:
            if not marker.exists():
                marker.touch()
                os._exit(1)
            return self.inits

        def crash(self) -> None:
            os._exit(1)

    p = Phoenix.remote()
    assert nb.get(p.crash_once.remote(), timeout=60) == 2  # retried on the restarted actor
    assert _actor(p.actor_id)["restarts"] == 1
    with pytest.raises(ActorDiedError):
        nb.get(p.crash.remote(), timeout=60)  # restarts used up
    wait_until(lambda: _actor(p.actor_id)["state"] == "DEAD", timeout=10)
    with pytest.raises(ActorDiedError):
        nb.get(p.crash_once.remote(), timeout=10)


def test_no_task_retries_means_call_fails_but_actor_restarts(cluster: nb.ClusterInfo) -> None:
    @nb.remote(max_restarts=2)
    class Fragile:
        def crash(self) -> None:
            os._exit(1)

        def ok(self) -> str:
            return "back"

    f = Fragile.remote()
    with pytest.raises(ActorDiedError, match="max_task_retries=0"):
        nb.get(f.crash.remote(), timeout=60)
    assert nb.get(f.ok.remote(), timeout=60) == "back"


def test_async_methods_run_concurrently(cluster: nb.ClusterInfo) -> None:
    @nb.remote
    class AsyncWorker:
        def __init__(self) -> None:
            self.running = 0
            self.peak = 0

        async def slow(self, i: int) -> int:
            self.running += 1
            self.peak = max(self.peak, self.running)
            await asyncio.sleep(0.5)
            self.running -= 1
            return i

        async def peak_seen(self) -> int:
            return self.peak

    w = AsyncWorker.remote()
    t0 = time.monotonic()
    assert nb.get([w.slow.remote(i) for i in range(10)], timeout=30) == list(range(10))
    assert time.monotonic() - t0 < 3
    assert nb.get(w.peak_seen.remote(), timeout=30) == 10


def test_max_concurrency_threads(cluster: nb.ClusterInfo) -> None:
    @nb.remote(max_concurrency=4)
    class Threaded:
        def __init__(self) -> None:
            import threading

            self.lock = threading.Lock()
            self.running = 0
            self.peak = 0

        def slow(self) -> None:
            with self.lock:
                self.running += 1
                self.peak = max(self.peak, self.running)
            time.sleep(0.4)
            with self.lock:
                self.running -= 1

        def peak_seen(self) -> int:
            return self.peak

    t = Threaded.remote()
    nb.get([t.slow.remote() for _ in range(8)], timeout=30)
    assert nb.get(t.peak_seen.remote(), timeout=30) == 4

    seq = Counter.remote()  # default: one call at a time
    nb.get([seq.increment.remote() for _ in range(20)], timeout=30)
    assert nb.get(seq.get.remote(), timeout=30) == 20


def test_actor_prints_are_prefixed(
    cluster: nb.ClusterInfo, capfd: pytest.CaptureFixture[str]
) -> None:
    c = Counter.remote()
    pid = nb.get(c.pid.remote(), timeout=30)
    nb.get(c.say.remote("hello from the actor"), timeout=30)
    out, _ = capfd.readouterr()
    assert f"(Counter pid={pid}) hello from the actor" in out


def test_runtime_context_in_actor(cluster: nb.ClusterInfo) -> None:
    @nb.remote
    class Who:
        def ids(self) -> tuple[str | None, str]:
            ctx = nb.get_runtime_context()
            return ctx.get_actor_id(), ctx.get_job_id()

    w = Who.remote()
    assert nb.get(w.ids.remote(), timeout=30) == (w.actor_id, cluster.job_id)


def test_driver_exit_takes_its_actors_but_not_detached_ones(cluster: nb.ClusterInfo) -> None:
    token_file = Path(cluster.session_dir or "") / "token"
    code = f"""
import os, nbcluster as nb
nb.init(address={cluster.address!r}, token_file={str(token_file)!r}, namespace="persist")

@nb.remote
class Keeper:
    def pid(self):
        return os.getpid()
    def hello(self):
        return "still here"

mine = Keeper.remote()
kept = Keeper.options(name="keeper", lifetime="detached").remote()
print("PIDS", nb.get(mine.pid.remote()), nb.get(kept.pid.remote()), flush=True)
"""
    proc = run_script(code, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("PIDS"))
    mine_pid, kept_pid = (int(x) for x in line.split()[1:])
    wait_until(lambda: all_gone([mine_pid]), timeout=15)
    kept = nb.get_actor("keeper", namespace="persist")
    assert nb.get(kept.hello.remote(), timeout=30) == "still here"
    assert nb.get(kept.pid.remote(), timeout=30) == kept_pid
    nb.kill(kept)
    wait_until(lambda: all_gone([kept_pid]), timeout=10)


def test_introspection(cluster: nb.ClusterInfo) -> None:
    c = Counter.options(name="inspect-me", num_cpus=0.5).remote()
    nb.get(c.get.remote(), timeout=30)
    info = _actor(c.actor_id)
    assert info["class_name"] == "Counter"
    assert info["state"] == "ALIVE"
    assert info["node_id"] == cluster.node_id
    assert info["job_id"] == cluster.job_id
    assert info["resources"] == {"CPU": 0.5}
    assert re.fullmatch(r"\d+", str(info["pid"]))
    nb.kill(c)


def test_large_constructor_argument_survives_the_callers_ref(cluster: nb.ClusterInfo) -> None:
    np = pytest.importorskip("numpy")

    @nb.remote(max_restarts=1)
    class Model:
        def __init__(self, weights: object) -> None:
            self.total = float(weights.sum())  # type: ignore[attr-defined]

        def get(self) -> float:
            return self.total

        def resources(self) -> dict[str, float]:
            return nb.get_runtime_context().get_assigned_resources()

    weights = nb.put(np.ones(1_000_000))  # 8 MB: in the object store
    m = Model.options(num_cpus=1).remote(weights)
    del weights  # the actor still gets (and, on restart, gets again) its argument
    assert nb.get(m.get.remote(), timeout=30) == 1_000_000
    assert nb.get(m.resources.remote(), timeout=30) == {"CPU": 1.0}


def test_results_sent_from_many_threads_all_arrive(cluster: nb.ClusterInfo) -> None:
    # A threaded actor's calls answer from their own threads, through the main thread's
    # outbox and wake-up pipe: none may be left there (a lost wake-up hangs the caller).
    @nb.remote(max_concurrency=8)
    class Many:
        def call(self, i: int) -> int:
            time.sleep(0.001 * (i % 3))
            return i

    m = Many.remote()
    for _ in range(10):
        assert nb.get([m.call.remote(i) for i in range(100)], timeout=30) == list(range(100))
