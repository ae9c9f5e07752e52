"""Tasks pipelined to leased workers, and work stealing (``client/leasing.py``).

A driver sends a leased worker several tasks at once; a worker that goes idle takes back the
tasks still waiting behind a long one elsewhere. Real head, agent and workers; each test starts
its own cluster (the pipeline depth is read when the client starts).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import nbcluster as nb
from nbcluster.client.leasing import PIPELINE_ENV
from nbcluster.exceptions import TaskCancelledError

TIMEOUT = 60.0

pytestmark = pytest.mark.timeout(300)


@nb.remote(max_retries=0)
def wait_for(flag: str) -> int:
    """Runs until ``flag`` exists (not in ``get``: the worker stays busy in user code)."""
    while not os.path.exists(flag):
        time.sleep(0.005)
    return os.getpid()


@nb.remote(max_retries=0)
def once(folder: str, i: int) -> int:
    """Fails if it runs twice for the same ``i`` (a task stolen *and* run where it was)."""
    os.close(os.open(os.path.join(folder, str(i)), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    return os.getpid()


@nb.remote(max_retries=0)
def make(flag: str) -> bool:
    Path(flag).touch()
    return True


@pytest.fixture
def local() -> Iterator[None]:
    nb.shutdown()
    yield
    nb.shutdown()


def test_short_tasks_behind_a_long_one_are_stolen_and_run_once(local: None, tmp_path: Path) -> None:
    nb.init(num_cpus=2)
    # Two workers leased (with another function: neither has ``once`` yet).
    nb.get([make.remote(str(tmp_path / f"warm{i}")) for i in range(8)], timeout=TIMEOUT)
    flag, done = tmp_path / "go", tmp_path / "done"
    done.mkdir()
    long = wait_for.remote(str(flag))
    # Submitted right after it: about half are pipelined behind it on its worker.
    shorts = [once.remote(str(done), i) for i in range(40)]
    pids = nb.get(shorts, timeout=TIMEOUT)  # would time out if they waited for the long one
    assert not flag.exists()
    flag.touch()
    long_pid = nb.get(long, timeout=TIMEOUT)
    assert long_pid not in pids  # all ran on the other worker (or newer ones)
    assert sorted(int(p) for p in os.listdir(done)) == list(range(40))  # each exactly once
    # The long task's worker had the function's pickle only with a task it gave back: tasks
    # sent to it now (without the pickle) still find it.
    again = tmp_path / "again"
    again.mkdir()
    pids = nb.get([once.remote(str(again), i) for i in range(40)], timeout=TIMEOUT)
    assert long_pid in pids


def test_a_task_waiting_for_one_queued_behind_it_is_not_stuck(local: None, tmp_path: Path) -> None:
    nb.init(num_cpus=2)
    warm = tmp_path / "warm"
    warm.mkdir()
    nb.get(once.remote(str(warm), 0), timeout=TIMEOUT)  # one lease, kept for the next task
    flag = str(tmp_path / "flag")
    waiter = wait_for.remote(flag)
    maker = make.remote(flag)  # pipelined behind the waiter: a second worker must steal it
    assert nb.get(maker, timeout=TIMEOUT) is True
    assert isinstance(nb.get(waiter, timeout=TIMEOUT), int)


def test_a_pipelined_task_can_be_cancelled_before_it_starts(local: None, tmp_path: Path) -> None:
    nb.init(num_cpus=1)  # one worker: everything is pipelined on it
    flag, done = tmp_path / "go", tmp_path / "done"
    done.mkdir()
    long = wait_for.remote(str(flag))
    queued = [once.remote(str(done), i) for i in range(3)]
    nb.cancel(queued[1])
    with pytest.raises(TaskCancelledError):
        nb.get(queued[1], timeout=TIMEOUT)  # at once, while the long task still runs
    assert not flag.exists()
    flag.touch()
    nb.get([long, queued[0], queued[2]], timeout=TIMEOUT)
    assert sorted(os.listdir(done)) == ["0", "2"]


@nb.remote(max_retries=0)
def started_then_wait(started: str, flag: str) -> int:
    Path(started).touch()
    while not os.path.exists(flag):
        time.sleep(0.005)
    return os.getpid()


def test_a_task_queued_on_a_worker_busy_in_user_code_is_cancelled_at_once(
    local: None, tmp_path: Path
) -> None:
    """The same, with the tasks surely on the worker (sent behind a task already running): its
    main thread reads nothing while it runs user code, so the control thread, which hears the
    CANCEL, takes the task out of the queue and answers. (The test above passed only when the
    cancel beat the lease, and timed out on a loaded machine.)"""
    nb.init(num_cpus=1)
    started, flag, done = tmp_path / "started", tmp_path / "go", tmp_path / "done"
    done.mkdir()
    long = started_then_wait.remote(str(started), str(flag))
    deadline = time.monotonic() + TIMEOUT
    while not started.exists():
        assert time.monotonic() < deadline, "the long task never started"
        time.sleep(0.01)
    queued = [once.remote(str(done), i) for i in range(3)]  # (pipelined behind it)
    nb.cancel(queued[1])
    with pytest.raises(TaskCancelledError):
        nb.get(queued[1], timeout=TIMEOUT)  # while the long task still runs
    assert not flag.exists()
    flag.touch()
    nb.get([long, queued[0], queued[2]], timeout=TIMEOUT)
    assert sorted(os.listdir(done)) == ["0", "2"]


@nb.remote(max_retries=0)
def sleepy(started: str) -> None:
    Path(started).touch()
    time.sleep(60)


def test_cancels_in_pairs_never_miss_the_task_starting_next(local: None, tmp_path: Path) -> None:
    """Cancelling the running task and the one behind it back to back: the second CANCEL often
    reaches the worker just as the first task ended and the second was taken up (out of the
    queue, not yet marked running). It must be cancelled as it starts, not run for a minute."""
    nb.init(num_cpus=1)
    started = tmp_path / "started"
    refs = [sleepy.remote(str(started)) for _ in range(300)]
    deadline = time.monotonic() + TIMEOUT
    while not started.exists():  # (the first runs, those behind it are on the worker)
        assert time.monotonic() < deadline, "the first task never started"
        time.sleep(0.01)
    for i in range(0, len(refs), 2):
        nb.cancel(refs[i])
        nb.cancel(refs[i + 1])
        for ref in refs[i : i + 2]:
            with pytest.raises(TaskCancelledError):
                nb.get(ref, timeout=15)


def test_tasks_behind_a_killed_task_run_on_its_replacement(local: None, tmp_path: Path) -> None:
    nb.init(num_cpus=1)
    done = tmp_path / "done"
    done.mkdir()
    long = wait_for.remote(str(tmp_path / "never"))
    queued = [once.remote(str(done), i) for i in range(4)]
    nb.cancel(long, force=True)  # kills its worker: the tasks behind it never started there
    with pytest.raises(TaskCancelledError):
        nb.get(long, timeout=TIMEOUT)
    pids = nb.get(queued, timeout=TIMEOUT)
    assert len(set(pids)) == 1
    assert sorted(int(p) for p in os.listdir(done)) == list(range(4))


def test_depth_one_sends_one_task_at_a_time(
    local: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PIPELINE_ENV, "1")
    nb.init(num_cpus=1)
    from nbcluster.client import current

    client = current.get()
    assert client is not None
    assert client.io.state is not None and client.io.state.leasing.depth == 1
    flag = tmp_path / "go"
    long = wait_for.remote(str(flag))
    queued = [make.remote(str(tmp_path / f"f{i}")) for i in range(3)]
    # None was sent: they wait in the driver's queue.
    rows = {r[0]: r[2] for r in client.task_rows()}
    flag.touch()
    nb.get([long, *queued], timeout=TIMEOUT)
    assert [rows[r.task_id()] for r in queued] == ["waiting"] * 3


def test_pipelined_tasks_show_as_queued_on_their_worker(local: None, tmp_path: Path) -> None:
    nb.init(num_cpus=1)
    from nbcluster.client import current

    client = current.get()
    assert client is not None
    flag = tmp_path / "go"
    long = wait_for.remote(str(flag))
    queued = [make.remote(str(tmp_path / f"f{i}")) for i in range(3)]

    def states() -> list[str]:
        rows = {r[0]: r[2] for r in client.task_rows()}
        return [rows.get(r.task_id(), "done") for r in [long, *queued]]

    deadline = time.monotonic() + TIMEOUT
    while states() != ["running", *["queued on worker"] * 3]:  # sent as the lease came
        assert time.monotonic() < deadline, states()
        time.sleep(0.02)
    # The cluster's views say the same: one running, three pending (events come in batches).
    from nbcluster.util.state import list_tasks

    def head_states() -> list[str]:
        by_id = {t.task_id: t.state for t in list_tasks()}
        return [by_id.get(r.task_id(), "?") for r in [long, *queued]]

    while head_states() != ["RUNNING", *["PENDING_NODE_ASSIGNMENT"] * 3]:
        assert time.monotonic() < deadline, head_states()
        time.sleep(0.05)
    flag.touch()
    nb.get([long, *queued], timeout=TIMEOUT)


def test_tasks_asked_back_before_they_reach_their_worker_are_given_back(
    local: None, tmp_path: Path
) -> None:
    # No warm-up: the tasks are pipelined on the first worker leased and stolen as more come,
    # often before the busy worker has read them (the ask comes on its other socket).
    nb.init(num_cpus=3)
    for round_ in range(5):
        stop, flag = tmp_path / f"stop{round_}", str(tmp_path / f"flag{round_}")
        long = wait_for.remote(str(stop))
        waiter = wait_for.remote(flag)
        maker = make.remote(flag)
        assert nb.get(maker, timeout=TIMEOUT) is True
        nb.get(waiter, timeout=TIMEOUT)
        stop.touch()
        nb.get(long, timeout=TIMEOUT)


def test_the_worker_gives_back_asked_tasks_queued_or_still_on_the_way(local: None) -> None:
    """At the protocol level: a worker busy in a long task gives back, at once, a task waiting
    in its socket; and a task asked back before it arrived is given back when it comes."""
    from nbcluster.protocol.messages import PROTOCOL_VERSION, Kind
    from nbcluster.protocol.security import derive_keys, read_token_file
    from tests.test_protocol_fuzz import Client, Peer, _result, _task

    info = nb.init(num_cpus=1)
    keys = derive_keys(read_token_file(Path(info.session_dir or "") / "token"))
    driver = Client(keys, f"tcp://{info.address}")
    driver.send({"k": Kind.HELLO, "v": PROTOCOL_VERSION, "pid": os.getpid(), "role": "driver"})
    welcome, _ = driver.wait_for(lambda h: h["k"] == Kind.WELCOME)
    driver.send({"k": Kind.LEASE_REQUEST, "rid": 1, "shape": {"CPU": 1.0}, "name": "steal"})
    grant, _ = driver.wait_for(lambda h: h["k"] == Kind.LEASE_GRANTED)
    worker = Peer(keys, grant["worker_addr"])
    control = Peer(keys, grant["control_addr"])
    try:
        worker.send({"k": Kind.BIND, "job_id": welcome["job_id"], "sys_path": []})
        code = "print('running', flush=True)\nimport time\ntime.sleep(120)"
        long, long_payload = _task(exec, code)
        worker.send(long, long_payload)
        worker.wait_for(lambda h: h["k"] == Kind.LOG and h["lines"] == ["running"])
        queued, queued_payload = _task(pow, 2, 3)
        later, later_payload = _task(pow, 2, 4)
        worker.send(queued, queued_payload)  # waits in the socket: the main thread is busy
        control.send({"k": Kind.STEAL, "tids": [queued["tid"], later["tid"]]})  # later: not sent
        h, _ = worker.wait_for(lambda h: h["k"] == Kind.STOLEN)
        assert h["tids"] == [queued["tid"]]  # at once, while the long task still runs
        worker.send(later, later_payload)  # asked back already: given back when it is read
        control.send({"k": Kind.CANCEL, "tid": long["tid"], "force": False})
        h, _ = _result(worker, long["tid"])
        assert h["err"] == "cancelled"
        h, _ = worker.wait_for(lambda h: h["k"] in (Kind.STOLEN, Kind.RESULT))
        assert h["k"] == Kind.STOLEN and h["tids"] == [later["tid"]]
        last, last_payload = _task(pow, 2, 10)
        worker.send(last, last_payload)
        # Results come in order: neither given-back task ran before this one.
        h, _ = worker.wait_for(lambda h: h["k"] == Kind.RESULT)
        assert h["tid"] == last["tid"] and h["ok"]
        # A task cancelled while it waits behind a long one (the control thread hears of it;
        # the main thread reads nothing while it runs user code) is answered cancelled while
        # the long one still runs, never run; then the long one is cancelled too.
        long2, long2_payload = _task(exec, code)
        worker.send(long2, long2_payload)
        worker.wait_for(lambda h: h["k"] == Kind.LOG and h["lines"] == ["running"])
        behind, behind_payload = _task(pow, 2, 5)
        worker.send(behind, behind_payload)
        control.send({"k": Kind.CANCEL, "tid": behind["tid"], "force": False})
        h, _ = worker.wait_for(lambda h: h["k"] == Kind.RESULT)
        assert (h["tid"], h["err"]) == (behind["tid"], "cancelled")
        control.send({"k": Kind.CANCEL, "tid": long2["tid"], "force": False})
        h, _ = _result(worker, long2["tid"])
        assert h["err"] == "cancelled"
    finally:
        worker.close()
        control.close()
        driver.send({"k": Kind.GOODBYE})
        driver.close()
