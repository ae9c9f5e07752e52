"""The IPython extension in real kernels of a real jupyter server hosting the cluster's head.

Kernels are started by the server (REST + kernel websocket, as JupyterLab does) and find the head
through the environment the server gives them. Tests that must watch a cell's output after it
finished, or interrupt a running cell, drive a kernel through jupyter_client directly (the
frontend's ZMQ channels) with the same environment.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from tests.conftest import wait_until
from tests.jupyter_helpers import JupyterServer, jupyter_server  # noqa: F401 (fixture)
from tests.kernels import Kernel, strip_ansi


@pytest.fixture(scope="module")
def k(jupyter_server: JupyterServer) -> Any:  # noqa: F811
    """One server kernel with the extension loaded."""
    kern = jupyter_server.start_kernel("magics.ipynb")
    kern.execute(
        "%load_ext nbcluster\nimport os\nimport nbcluster as nb", timeout=120
    ).raise_for_error()
    return kern


@pytest.fixture(scope="module")
def head_env(k: Any) -> dict[str, str]:
    """The environment the server gives its kernels to find the head."""
    r = k.execute(
        "import os; print(os.environ['NBCLUSTER_ADDRESS'], os.environ['NBCLUSTER_TOKEN_FILE'])"
    ).raise_for_error()
    address, token_file = r.stdout.split()
    return {"NBCLUSTER_ADDRESS": address, "NBCLUSTER_TOKEN_FILE": token_file}


@pytest.fixture
def zk(head_env: dict[str, str]) -> Iterator[Kernel]:
    """A kernel driven through jupyter_client (ZMQ channels), connected to the server's head."""
    kern = Kernel(head_env)
    try:
        kern.run("%load_ext nbcluster\nimport nbcluster as nb", timeout=120)
        yield kern
    finally:
        kern.close()


def _cpus_free(srv: JupyterServer) -> float:
    return float(
        sum(
            n["resources_available"].get("CPU", 0)
            for n in srv.get("nbcluster/api/cluster")["nodes"]
            if n["alive"]
        )
    )


def test_load_ext_connects_to_the_servers_head_and_twice_is_safe(k: Any) -> None:
    r = k.execute(
        "%load_ext nbcluster\n%reload_ext nbcluster\ninfo = nb.init()\n"
        "print(info.address == os.environ['NBCLUSTER_ADDRESS'], info.local)"
    ).raise_for_error()
    assert r.stdout.split()[-2:] == ["True", "False"], r.stdout


def test_line_magic_help_status_nodes_tasks_actors(k: Any) -> None:
    r = k.execute("%nbcluster").raise_for_error()
    assert "%%remote" in r.stdout and "%nbcluster status" in r.stdout
    r = k.execute("%nbcluster status").raise_for_error()
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["node", "state", "CPU"], r.stdout
    assert "alive" in r.stdout and "/2" in r.stdout  # CPUs used/total of the 2-CPU node
    r = k.execute("%nbcluster nodes").raise_for_error()
    node_ids = [n["node_id"] for n in k.server.get("nbcluster/api/cluster")["nodes"]]
    assert any(nid in r.stdout for nid in node_ids), r.stdout
    k.execute(
        "import time\n@nb.remote\ndef sleepy(s):\n    time.sleep(s)\n"
        "@nb.remote\nclass Tally:\n    def __init__(self): self.n = 0\n"
        "    def add(self, x): self.n += x; return self.n\n"
        "tally = Tally.options(name='tally').remote()\nnb.get(tally.add.remote(1))\n"
        "slow = sleepy.remote(30)"
    ).raise_for_error()
    r = k.execute("%nbcluster tasks").raise_for_error()
    assert "sleepy" in r.stdout, r.stdout
    r = k.execute("%nbcluster actors").raise_for_error()
    assert "Tally" in r.stdout and "tally" in r.stdout and "ALIVE" in r.stdout, r.stdout
    k.execute("nb.cancel(slow)").raise_for_error()
    r = k.execute("%nbcluster frobnicate")
    assert "unknown command 'frobnicate'" in r.stderr


def test_remote_cell_runs_on_the_cluster_and_brings_names_back(k: Any) -> None:
    k.execute(
        "base = 20\ndef helper(v):\n    return v + 1\nkernel_pid = os.getpid()"
    ).raise_for_error()
    r = k.execute(
        "%%remote --num-cpus 2\n"
        "import os, threading\n"
        "print('running in', os.getpid())\n"
        "total = helper(base) * 2\n"
        "lock = threading.Lock()\n"
        "where = os.getpid()\n"
        "res = nb.get_runtime_context().get_assigned_resources()\n"
        "total + 0.5"
    ).raise_for_error()
    assert "running in" in r.stdout  # the task's print, shown in this cell
    assert r.result == {"text/plain": "42.5"}
    # Names the cell bound come back (modules imported here too); unpicklable ones get a note.
    assert "not copied back: lock (TypeError: cannot pickle" in r.stderr
    r = k.execute("print(total, where != kernel_pid, res['CPU'], 'lock' in dir(), threading)")
    out = r.raise_for_error().stdout.split()
    assert out[:4] == ["42", "True", "2.0", "False"] and out[5] == "'threading'"


def test_remote_cell_bad_options_are_clear_errors(k: Any) -> None:
    r = k.execute("%%remote --num-cpu 2\nx = 1")
    assert r.error is not None and "unknown option '--num-cpu'" in r.error["evalue"]
    r = k.execute("%%remote --resources '[1]'\nx = 1")
    assert r.error is not None and "JSON object" in r.error["evalue"]
    r = k.execute("%%remote --num-gpus lots\nx = 1")
    assert r.error is not None and "expects a number" in r.error["evalue"]


def test_on_actor_runs_the_cell_in_the_actor_with_self(k: Any) -> None:
    k.execute(
        "@nb.remote\nclass Counter:\n    def __init__(self):\n        self.value = 0\n"
        "    def increment(self):\n        self.value += 1\n        return self.value\n"
        "    def pid(self):\n        return os.getpid()\n"
        "counter = Counter.remote()\nstart = 40"
    ).raise_for_error()
    r = k.execute("%%on counter\nprint('inside', os.getpid())\nself.value = start + 1\nself.value")
    r.raise_for_error()
    assert r.result == {"text/plain": "41"}
    actor_pid = int(k.execute("print(nb.get(counter.pid.remote()))").stdout)
    assert f"inside {actor_pid}" in r.stdout
    assert k.execute("print(nb.get(counter.increment.remote()))").stdout.strip() == "42"
    # By the actor's name, too; an unknown one is a clear error.
    r = k.execute("%%on tally\nself.n").raise_for_error()
    assert r.result == {"text/plain": "1"}
    r = k.execute("%%on nobody\nself")
    assert r.error is not None and "no variable or named actor called 'nobody'" in r.error["evalue"]


def test_remote_error_renders_like_a_local_traceback(k: Any) -> None:
    r = k.execute("@nb.remote\ndef divide(x):\n    return 1 / x\n\nnb.get(divide.remote(0))")
    assert r.error is not None
    tb = strip_ansi("\n".join(r.error["traceback"]))
    assert "ZeroDivisionError raised in task divide" in tb
    assert "return 1 / x" in tb  # the notebook cell's source line, like a local traceback
    assert "nbcluster/client" not in tb and "nbcluster/api.py" not in tb  # no driver internals
    r = k.execute("%%remote\nvalues = [1, 2]\nvalues[5]")
    tb = strip_ansi("\n".join(r.error["traceback"])) if r.error else ""
    assert "IndexError" in tb and "values[5]" in tb, tb


def test_late_output_appears_under_the_cell_that_submitted_it(zk: Kernel) -> None:
    first = zk.submit(
        "@nb.remote\ndef later(tag):\n    import time\n    time.sleep(1.5)\n"
        "    print('late line', tag)\nref = later.remote('A')\nprint('cell A done')"
    )
    zk.wait_idle(first)
    assert "late line" not in zk.text(first)  # the cell finished before the task printed
    second = zk.submit("import time\ntime.sleep(3)\nprint('cell B')")
    zk.wait_idle(second)
    zk.wait_for_text(first, "late line A")
    assert "late line" not in zk.text(second)
    # Actor method output is routed the same way.
    third = zk.submit(
        "@nb.remote\nclass Talker:\n    def say(self, s):\n        print('actor says', s)\n"
        "t = Talker.remote()\nnb.get(t.say.remote('hi'))"
    )
    zk.wait_idle(third)
    zk.wait_for_text(third, "actor says hi")


def test_interrupt_cancels_the_tasks_a_cell_waits_on(
    zk: Kernel,
    jupyter_server: JupyterServer,  # noqa: F811
) -> None:
    free_before = _cpus_free(jupyter_server)
    cell = zk.submit(
        "@nb.remote\ndef stuck():\n    import time\n    print('started', flush=True)\n"
        "    time.sleep(300)\nrefs = [stuck.remote() for _ in range(2)]\nnb.get(refs)"
    )
    zk.wait_for_text(cell, "started", timeout=60)
    t0 = time.monotonic()
    zk.km.interrupt_kernel()
    zk.wait_idle(cell, timeout=30)
    assert time.monotonic() - t0 < 10
    errors = [m for m in zk.outputs(cell) if m["msg_type"] == "error"]
    assert errors and errors[0]["content"]["ename"] == "KeyboardInterrupt"
    out = zk.run(
        "try:\n    nb.get(refs[0], timeout=20)\nexcept nb.exceptions.TaskCancelledError:\n"
        "    print('cancelled')"
    )
    assert "cancelled" in "".join(m["content"].get("text", "") for m in out)
    wait_until(lambda: _cpus_free(jupyter_server) >= free_before, timeout=15)


def _kernel_job_holding_resources(srv: JupyterServer) -> Any:
    """A server kernel that holds a CPU with an actor and one with a running task."""
    kern = srv.start_kernel("restart.ipynb")
    kern.execute(
        "import nbcluster as nb, time\nnb.init()\n"
        "@nb.remote(num_cpus=1)\nclass Holder:\n    def ping(self): return 1\n"
        "@nb.remote\ndef hold():\n    time.sleep(300)\n"
        "h = Holder.remote(); nb.get(h.ping.remote()); r = hold.remote()"
    ).raise_for_error()
    wait_until(lambda: _cpus_free(srv) == 0, timeout=30)
    return kern


def _actor_states(srv: JupyterServer) -> list[str]:
    body = srv.get("nbcluster/api/actors")
    actors = body["actors"] if isinstance(body, dict) else body
    return [str(a["state"]).upper() for a in actors if a.get("class_name") == "Holder"]


def test_kernel_restart_releases_its_tasks_and_actors(
    jupyter_server: JupyterServer,  # noqa: F811
) -> None:
    wait_until(lambda: _cpus_free(jupyter_server) == 2, timeout=30)
    kern = _kernel_job_holding_resources(jupyter_server)
    t0 = time.monotonic()
    kern.restart()
    wait_until(lambda: _cpus_free(jupyter_server) == 2, timeout=10)
    assert time.monotonic() - t0 < 10
    wait_until(lambda: "ALIVE" not in _actor_states(jupyter_server), timeout=10)
    kern.shutdown()


def test_killed_kernel_is_released_within_seconds(
    jupyter_server: JupyterServer,  # noqa: F811
) -> None:
    wait_until(lambda: _cpus_free(jupyter_server) == 2, timeout=30)
    kern = _kernel_job_holding_resources(jupyter_server)
    pid = kern.pid()
    assert pid is not None
    t0 = time.monotonic()
    psutil.Process(pid).kill()  # no atexit, no goodbye: the head watches the kernel's process
    wait_until(lambda: _cpus_free(jupyter_server) == 2, timeout=15)
    assert time.monotonic() - t0 < 5
    kern.shutdown()


def test_a_silent_but_alive_kernel_keeps_its_actors(
    jupyter_server: JupyterServer,  # noqa: F811
) -> None:
    """A kernel that cannot ping for a while (here: stopped, as if a cell held the GIL in C code
    for 8 s) is not taken for dead: its actor and task live on and it carries on afterwards."""
    wait_until(lambda: _cpus_free(jupyter_server) == 2, timeout=30)
    kern = _kernel_job_holding_resources(jupyter_server)
    proc = psutil.Process(kern.pid())
    proc.suspend()
    try:
        time.sleep(8)  # the silence itself is what is tested
        assert _cpus_free(jupyter_server) == 0
        assert _actor_states(jupyter_server).count("ALIVE") == 1
    finally:
        proc.resume()
    r = kern.execute("print(nb.get(h.ping.remote(), timeout=30))").raise_for_error()
    assert r.stdout.strip() == "1"
    kern.shutdown()
    wait_until(lambda: _cpus_free(jupyter_server) == 2, timeout=15)


def test_local_cluster_when_no_server() -> None:
    kern = Kernel({"NBCLUSTER_ADDRESS": "", "NBCLUSTER_TOKEN_FILE": ""})
    try:
        kern.run("%load_ext nbcluster")
        msg = kern.submit("import nbcluster as nb\nprint(nb.init().local)")
        kern.wait_idle(msg)
        assert kern.text(msg).strip() == "True"
        kern.run("%nbcluster shutdown")
        msg = kern.submit("print(nb.is_initialized())")
        kern.wait_idle(msg)
        assert kern.text(msg).strip() == "False"
    finally:
        kern.close()
