"""Ray's actor semantics on a real local cluster: exits, fate sharing, kill races, cancelling
running calls, concurrency groups."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import nbcluster as nb
from nbcluster.exceptions import ActorDiedError, TaskCancelledError
from tests.conftest import all_gone, wait_until


@pytest.fixture(scope="module")
def cluster() -> Iterator[nb.ClusterInfo]:
    nb.shutdown()
    info = nb.init(num_cpus=4)
    yield info
    nb.shutdown()


def _state(aid: str) -> str:
    return str(next(a for a in nb.actors() if a["actor_id"] == aid)["state"])


# ---------------------------------------------------------------------------- exits
@nb.remote
class Exiter:
    def pid(self) -> int:
        return os.getpid()

    def sys_exit(self, code: int | None = None) -> None:
        sys.exit(code)

    def exit_actor(self) -> None:
        nb.exit_actor()


@nb.remote
class AsyncExiter:
    async def pid(self) -> int:
        return os.getpid()

    async def sys_exit(self, code: int | None = None) -> None:
        await asyncio.sleep(0)
        sys.exit(code)

    async def exit_actor(self) -> None:
        nb.exit_actor()


@pytest.mark.parametrize("kind", ["seq", "thr", "aio"])
@pytest.mark.parametrize("how", ["sys_exit", "exit_actor"])
def test_exit_inside_a_method_ends_the_actor(cluster: nb.ClusterInfo, kind: str, how: str) -> None:
    if kind == "aio":
        a = AsyncExiter.remote()
    else:
        a = Exiter.options(max_concurrency=3 if kind == "thr" else 1).remote()
    pid = nb.get(a.pid.remote(), timeout=30)
    t0 = time.monotonic()
    # As in Ray: the call that exits, and every later one, see the actor's death.
    pattern = r"sys\.exit\(3\)" if how == "sys_exit" else "exit_actor"
    call = getattr(a, how)
    with pytest.raises(ActorDiedError, match=pattern):
        nb.get(call.remote(3) if how == "sys_exit" else call.remote(), timeout=30)
    with pytest.raises(ActorDiedError, match=pattern):
        nb.get(a.pid.remote(), timeout=30)
    assert time.monotonic() - t0 < 15  # never a hang
    wait_until(lambda: all_gone([pid]), timeout=15)  # its process is gone
    assert wait_until(lambda: _state(a.actor_id) == "DEAD", timeout=15)
    assert os.getpid() != pid  # and the driver is alive to check


def test_sys_exit_in_init_kills_the_actor(cluster: nb.ClusterInfo) -> None:
    @nb.remote
    class Quits:
        def __init__(self) -> None:
            sys.exit(0)

        def ping(self) -> str:
            return "pong"

    q = Quits.remote()
    for _ in range(2):
        with pytest.raises(ActorDiedError, match=r"exited in __init__ \(called sys\.exit\(0\)\)"):
            nb.get(q.ping.remote(), timeout=30)


def test_sys_exit_in_a_task_only_fails_the_task(cluster: nb.ClusterInfo) -> None:
    @nb.remote
    def quits() -> None:
        sys.exit(2)

    with pytest.raises(SystemExit):
        nb.get(quits.remote(), timeout=30)


# ---------------------------------------------------------------------------- kill, then call
@nb.remote
class Pinger:
    def ping(self) -> str:
        return "pong"


def test_a_call_right_after_kill_raises_actor_died(cluster: nb.ClusterInfo) -> None:
    others = [Pinger.remote() for _ in range(4)]  # the report: "when other actors exist"
    assert nb.get([o.ping.remote() for o in others], timeout=60) == ["pong"] * 4
    answered = []
    for i in range(50):
        victim = Pinger.remote()
        if i % 2:  # half alive and serving, half still being placed when killed
            assert nb.get(victim.ping.remote(), timeout=30) == "pong"
        nb.kill(victim)
        ref = victim.ping.remote()
        try:
            answered.append(nb.get(ref, timeout=30))
        except ActorDiedError:
            pass
        # the others are unaffected
        assert nb.get(others[i % 4].ping.remote(), timeout=30) == "pong"
    assert answered == []


@nb.remote
class Caller:
    def call(self, handle: nb.ActorHandle) -> str:
        try:
            return str(nb.get(handle.ping.remote(), timeout=30))
        except ActorDiedError:
            return "died"


def test_a_call_from_elsewhere_after_kill_raises_actor_died(cluster: nb.ClusterInfo) -> None:
    # The head buries a killed actor at once: a process that looks it up after the kill reached
    # the head never reaches the dying worker.
    callers = [Caller.remote() for _ in range(2)]
    answers = []
    for i in range(20):
        victim = Pinger.remote()
        assert nb.get(victim.ping.remote(), timeout=30) == "pong"
        nb.kill(victim)
        answers.append(nb.get(callers[i % 2].call.remote(victim), timeout=60))
    assert answers == ["died"] * 20


# ---------------------------------------------------------------------------- fate sharing
@nb.remote
class Leaf:
    def pid(self) -> int:
        return os.getpid()

    def ping(self) -> str:
        return "pong"


@nb.remote
class Parent:
    def __init__(self) -> None:
        self.kids = [Leaf.remote()]  # made in __init__

    def spawn(self, tag: str) -> dict[str, str]:
        self.kids.append(Leaf.remote())  # made in a method
        self.kids.append(Parent.remote())  # a child with a child of its own
        detached = Leaf.options(name=f"free-{tag}", lifetime="detached").remote()
        nb.get([k.ping.remote() for k in [*self.kids, detached]], timeout=60)
        return {
            "init": self.kids[0].actor_id,
            "method": self.kids[1].actor_id,
            "child": self.kids[2].actor_id,
            "grandchild": nb.get(self.kids[2].first.remote(), timeout=60),
            "detached": detached.actor_id,
        }

    def first(self) -> str:
        assert nb.get(self.kids[0].ping.remote(), timeout=60) == "pong"
        return str(self.kids[0].actor_id)

    def ping(self) -> str:
        return "pong"

    def quit(self) -> None:
        sys.exit(0)


def _pid(aid: str) -> int:
    return int(next(a for a in nb.actors() if a["actor_id"] == aid)["pid"] or 0)


@pytest.mark.parametrize("how", ["kill", "sys_exit", "kill_restartable"])
def test_actors_created_by_an_actor_die_with_it(cluster: nb.ClusterInfo, how: str) -> None:
    p = Parent.options(max_restarts=1 if how == "kill_restartable" else 0).remote()
    kids = nb.get(p.spawn.remote(how), timeout=90)
    assert all(_state(aid) == "ALIVE" for aid in kids.values())
    pids = [_pid(aid) for name, aid in kids.items() if name != "detached"]
    assert all(pids)
    if how == "sys_exit":
        with pytest.raises(ActorDiedError):
            nb.get(p.quit.remote(), timeout=30)
    else:
        nb.kill(p, no_restart=how != "kill_restartable")
    doomed = [aid for name, aid in kids.items() if name != "detached"]
    assert wait_until(lambda: all(_state(aid) == "DEAD" for aid in doomed), timeout=30)
    assert wait_until(lambda: all_gone(pids), timeout=30)
    reasons = {str(a["death_reason"]) for a in nb.actors() if a["actor_id"] in doomed}
    assert all("the actor that created it" in r for r in reasons), reasons
    # As in Ray, a detached actor outlives its creator.
    free = nb.get_actor(f"free-{how}")
    assert nb.get(free.pid.remote(), timeout=30) > 0
    assert _state(kids["detached"]) == "ALIVE"
    nb.kill(free)
    if how == "kill_restartable":  # the parent itself came back, without its old children
        assert nb.get(p.ping.remote(), timeout=60) == "pong"
        nb.kill(p)


# ---------------------------------------------------------------------------- cancelling
@nb.remote
class AsyncSleeper:
    def __init__(self) -> None:
        self.cancelled = 0
        self.started = asyncio.Event()

    async def sleep(self, seconds: float) -> str:
        self.started.set()
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return "slept"

    async def wait_started(self) -> None:
        await asyncio.wait_for(self.started.wait(), 30)
        self.started.clear()

    async def count(self) -> int:
        return self.cancelled


@nb.remote(max_concurrency=2)
class ThreadedSleeper:
    def __init__(self) -> None:
        import threading

        self.started = threading.Event()
        self.release = threading.Event()
        self.finished = 0

    def block(self) -> str:
        self.started.set()
        assert self.release.wait(30)
        self.finished += 1
        return "done"

    def wait_started(self) -> bool:
        ok = self.started.wait(30)
        self.started.clear()
        return ok

    def let_go(self) -> None:
        self.release.set()

    def count(self) -> int:
        return self.finished


def test_cancel_a_running_async_call(cluster: nb.ClusterInfo) -> None:
    a = AsyncSleeper.remote()
    for i in range(3):
        ref = a.sleep.remote(60)
        nb.get(a.wait_started.remote(), timeout=30)  # it runs now
        t0 = time.monotonic()
        nb.cancel(ref)
        with pytest.raises(TaskCancelledError):
            nb.get(ref, timeout=30)
        assert time.monotonic() - t0 < 10
        # its coroutine was cancelled (CancelledError at its await), and the actor serves on
        assert nb.get(a.count.remote(), timeout=30) == i + 1
    assert nb.get(a.sleep.remote(0), timeout=30) == "slept"


def test_cancel_a_running_threaded_call(cluster: nb.ClusterInfo) -> None:
    t = ThreadedSleeper.remote()
    ref = t.block.remote()
    assert nb.get(t.wait_started.remote(), timeout=30)
    nb.cancel(ref)
    with pytest.raises(TaskCancelledError):
        nb.get(ref, timeout=30)  # at once, while the thread still runs
    assert nb.get(t.count.remote(), timeout=30) == 0
    nb.get(t.let_go.remote(), timeout=30)
    # as in Ray, a running thread is not interrupted: it finishes, its result is dropped
    assert wait_until(lambda: nb.get(t.count.remote(), timeout=30) == 1, timeout=30)
    assert nb.get(t.block.remote(), timeout=30) == "done"  # and the actor serves on


def test_cancel_a_running_sequential_call(cluster: nb.ClusterInfo, tmp_path: Path) -> None:
    @nb.remote
    class Slow:
        def __init__(self) -> None:
            self.interrupted = 0

        def sleep(self, marker: str) -> str:
            Path(marker).write_text("started")
            try:
                time.sleep(60)
            except KeyboardInterrupt:
                self.interrupted += 1
                raise
            return "slept"

        def count(self) -> int:
            return self.interrupted

    s = Slow.remote()
    marker = tmp_path / "started"
    ref = s.sleep.remote(str(marker))
    assert wait_until(marker.exists, timeout=30)
    nb.cancel(ref)
    with pytest.raises(TaskCancelledError):
        nb.get(ref, timeout=30)
    assert nb.get(s.count.remote(), timeout=30) == 1


# ---------------------------------------------------------------------------- concurrency groups
@nb.remote(concurrency_groups={"io": 2, "compute": 4, "admin": 1})
class AsyncGroups:
    def __init__(self) -> None:
        self.running: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.gate = asyncio.Event()

    async def _hold(self, tag: str) -> str:
        self.running[tag] = self.running.get(tag, 0) + 1
        self.peak[tag] = max(self.peak.get(tag, 0), self.running[tag])
        await asyncio.wait_for(self.gate.wait(), 30)
        self.running[tag] -= 1
        return tag

    @nb.method(concurrency_group="io")
    async def io(self) -> str:
        return await self._hold("io")

    @nb.method(concurrency_group="compute")
    async def compute(self) -> str:
        return await self._hold("compute")

    async def default(self) -> str:
        return await self._hold("default")

    @nb.method(concurrency_group="io")  # called with options(concurrency_group="admin")
    async def state(self) -> dict[str, int]:
        return dict(self.running)

    @nb.method(concurrency_group="admin")
    async def open_gate(self) -> dict[str, int]:
        self.gate.set()
        return dict(self.peak)


@nb.remote(concurrency_groups={"io": 2, "compute": 3, "admin": 1})
class ThreadedGroups:
    def __init__(self) -> None:
        import threading

        self.lock = threading.Lock()
        self.running: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.gate = threading.Event()

    def _hold(self, tag: str) -> str:
        import threading

        with self.lock:
            self.running[tag] = self.running.get(tag, 0) + 1
            self.peak[tag] = max(self.peak.get(tag, 0), self.running[tag])
        assert self.gate.wait(30)
        with self.lock:
            self.running[tag] -= 1
        return threading.current_thread().name

    @nb.method(concurrency_group="io")
    def io(self) -> str:
        return self._hold("io")

    @nb.method(concurrency_group="compute")
    def compute(self) -> str:
        return self._hold("compute")

    def default(self) -> str:
        return self._hold("default")

    @nb.method(concurrency_group="io")  # called with options(concurrency_group="admin")
    def state(self) -> dict[str, int]:
        with self.lock:
            return dict(self.running)

    @nb.method(concurrency_group="admin")
    def thread(self) -> str:
        import threading

        return threading.current_thread().name

    @nb.method(concurrency_group="admin")
    def open_gate(self) -> dict[str, int]:
        self.gate.set()
        return dict(self.peak)


def test_concurrency_groups_of_an_async_actor(cluster: nb.ClusterInfo) -> None:
    a = AsyncGroups.remote()
    refs = [a.io.remote() for _ in range(5)] + [a.compute.remote() for _ in range(6)]
    refs += [a.default.remote() for _ in range(3)]  # default group: max_concurrency (1000)
    want = {"io": 2, "compute": 4, "default": 3}
    # "state" belongs to "io", which is full: the call's option runs it in "admin" instead.
    state = a.state.options(concurrency_group="admin")
    assert wait_until(lambda: nb.get(state.remote(), timeout=30) == want, timeout=30)
    # every group ran at its own limit at once, and never above it
    assert nb.get(a.open_gate.remote(), timeout=30) == want
    assert sorted(nb.get(refs, timeout=30)) == sorted(
        ["io"] * 5 + ["compute"] * 6 + ["default"] * 3
    )


def test_concurrency_groups_of_a_threaded_actor(cluster: nb.ClusterInfo) -> None:
    t = ThreadedGroups.remote()  # default group: max_concurrency=1 thread
    refs = [t.io.remote() for _ in range(4)] + [t.compute.remote() for _ in range(5)]
    refs += [t.default.remote() for _ in range(2)]
    want = {"io": 2, "compute": 3, "default": 1}
    state = t.state.options(concurrency_group="admin")
    assert wait_until(lambda: nb.get(state.remote(), timeout=30) == want, timeout=30)
    assert "-admin" in nb.get(t.thread.remote(), timeout=30)  # each group has its own threads
    assert nb.get(t.open_gate.remote(), timeout=30) == want
    names = nb.get(refs, timeout=30)
    assert all("-io" in n for n in names[:4]) and all("-compute" in n for n in names[4:9])
    assert all("-call" in n for n in names[9:])
    with pytest.raises(ValueError, match="no concurrency group 'nope'"):
        nb.get(t.thread.options(concurrency_group="nope").remote(), timeout=30)


def test_concurrency_group_misuse_is_reported(cluster: nb.ClusterInfo) -> None:
    class Bad:
        @nb.method(concurrency_group="io")
        def f(self) -> None:
            pass

    with pytest.raises(ValueError, match="does not declare"):
        nb.remote(Bad)
    with pytest.raises(ValueError, match="positive integer"):
        nb.remote(concurrency_groups={"io": 0})(Bad)
    with pytest.raises(ValueError, match="non-empty string"):
        nb.method(concurrency_group="")


# ---------------------------------------------------------------------------- output
def test_init_prints_reach_the_creator(
    cluster: nb.ClusterInfo, capfd: pytest.CaptureFixture[str]
) -> None:
    @nb.remote
    class Loud:
        def __init__(self) -> None:
            print("loading the model")
            print("no newline at the end", end="")

        def pid(self) -> int:
            return os.getpid()

    capfd.readouterr()
    loud = Loud.remote()
    pid = nb.get(loud.pid.remote(), timeout=30)
    seen = ""

    def printed() -> bool:
        nonlocal seen
        seen += capfd.readouterr().out
        return f"(Loud pid={pid}) no newline at the end" in seen

    assert wait_until(printed, timeout=15), seen
    assert f"(Loud pid={pid}) loading the model\n" in seen


def test_cancel_a_threaded_call_waiting_for_a_thread(cluster: nb.ClusterInfo) -> None:
    @nb.remote(max_concurrency=2, concurrency_groups={"admin": 1})
    class Busy:
        def __init__(self) -> None:
            import threading

            self.lock = threading.Lock()
            self.started = 0
            self.release = threading.Event()

        def block(self) -> str:
            with self.lock:
                self.started += 1
            assert self.release.wait(30)
            return "done"

        @nb.method(concurrency_group="admin")
        def count(self) -> int:
            with self.lock:
                return self.started

        @nb.method(concurrency_group="admin")
        def let_go(self) -> None:
            self.release.set()

    b = Busy.remote()
    running = [b.block.remote(), b.block.remote()]
    queued = b.block.remote()  # waits for one of the two threads
    assert wait_until(lambda: nb.get(b.count.remote(), timeout=30) == 2, timeout=30)
    nb.cancel(queued)
    with pytest.raises(TaskCancelledError):
        nb.get(queued, timeout=30)
    nb.get(b.let_go.remote(), timeout=30)
    assert nb.get(running, timeout=30) == ["done", "done"]
    assert nb.get(b.count.remote(), timeout=30) == 2  # the cancelled call never ran
