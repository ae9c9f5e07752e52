"""Workers' logs kept on their nodes: by actor, task and worker, ``--follow``, death reports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import nbcluster as nb
from nbcluster.agent import logs as node_logs
from nbcluster.agent.logs import NodeLogs, format_line, tag
from nbcluster.util.logs import LogNotFoundError
from nbcluster.util.state import get_log
from tests.conftest import wait_until
from tests.multinode import Procs

TIMEOUT = 60


@nb.remote(num_cpus=0)
class Chatty:
    def __init__(self, greeting: str) -> None:
        print(f"init says {greeting}")

    def say(self, text: str) -> int:
        print(f"say {text}")
        print(f"warn {text}", file=sys.stderr)
        os.write(2, f"raw fd write {text}\n".encode())  # as a C extension would
        return os.getpid()

    def chatter(self, n: int) -> None:
        for i in range(n):
            print(f"tick {i}")
            time.sleep(0.05)


@nb.remote(max_retries=0)
def shout(word: str) -> str:
    print(f"shout {word}")
    return word


@nb.remote(max_retries=0)
def crash(word: str) -> None:
    print(f"last words {word}", flush=True)
    os.kill(os.getpid(), signal.SIGSEGV)


def _cli(procs: Procs, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nbcluster", "logs", "--address", procs.address, *args],
        env={**os.environ, "NBCLUSTER_TOKEN_FILE": str(procs.token_file)},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def test_logs_of_an_actor_a_task_and_a_dead_worker(procs: Procs) -> None:
    procs.start_head()
    procs.join("box", "--num-cpus", "2")
    nb.init(address=procs.address, token_file=str(procs.token_file))
    actor = Chatty.options(name="chatty").remote("hello")
    pid = nb.get(actor.say.remote("one"), timeout=TIMEOUT)

    # The actor's whole worker log: its __init__, its calls (stdout and stderr, tagged with the
    # call), and what the process wrote to its file descriptors directly.
    def actor_log() -> list[str] | None:
        lines = list(get_log(actor_id="chatty", timeout=TIMEOUT))
        return lines if any("raw fd write one" in ln for ln in lines) else None

    lines = wait_until(actor_log, timeout=TIMEOUT)
    assert lines is not None
    text = "\n".join(lines)
    assert "init says hello" in text and "] stdout: say one" in text
    assert "] stderr: warn one" in text and "[worker] raw fd write one" in text
    said = next(ln for ln in lines if ln.endswith("stdout: say one"))
    assert "[task " in said and " Chatty] " in said
    # The same through the command line.
    r = _cli(procs, "--actor", "chatty")
    assert r.returncode == 0, r.stderr
    assert "say one" in r.stdout and "init says hello" in r.stdout

    # A task's own lines only.
    refs = [shout.remote(w) for w in ("alpha", "beta")]
    assert nb.get(refs, timeout=TIMEOUT) == ["alpha", "beta"]

    def task_log() -> list[str] | None:
        try:  # task events reach the head in batches
            return list(get_log(task_id=refs[1].task_id(), timeout=TIMEOUT)) or None
        except LogNotFoundError:
            return None

    got = wait_until(task_log, timeout=TIMEOUT)
    assert got is not None and len(got) == 1 and got[0].endswith("stdout: shout beta"), got
    r = _cli(procs, "--task", refs[0].task_id())
    assert r.returncode == 0 and r.stdout.strip().endswith("stdout: shout alpha"), r

    # A worker that dies: the error the driver sees carries its last output, and its log stays.
    bad = crash.remote("goodbye")
    with pytest.raises(nb.exceptions.WorkerCrashedError) as err:
        nb.get(bad, timeout=TIMEOUT)
    assert "SIGSEGV" in str(err.value) and "last words goodbye" in str(err.value)
    assert "Fatal Python error: Segmentation fault" in str(err.value)  # faulthandler's dump

    def dead_log() -> list[str] | None:
        try:
            return list(get_log(task_id=bad.task_id(), timeout=TIMEOUT)) or None
        except LogNotFoundError:
            return None

    dead = wait_until(dead_log, timeout=TIMEOUT)
    assert dead is not None and dead[-1].endswith("stdout: last words goodbye")

    # Unknown names: a clear error, here and on the command line.
    with pytest.raises(LogNotFoundError, match="no actor named 'nope'"):
        list(get_log(actor_id="nope"))
    r = _cli(procs, "--actor", "nope")
    assert r.returncode == 1 and "no actor named 'nope'" in r.stderr
    assert pid > 0


def test_follow_yields_new_lines_until_the_worker_ends(procs: Procs) -> None:
    procs.start_head()
    procs.join("box", "--num-cpus", "1")
    nb.init(address=procs.address, token_file=str(procs.token_file))
    actor = Chatty.options(name="ticker").remote("x")
    nb.get(actor.say.remote("start"), timeout=TIMEOUT)
    seen: list[str] = []
    reading, ended = threading.Event(), threading.Event()

    def reader() -> None:
        # tail=1: the last line so far, then only new ones (the first read is done once it
        # yielded, so the ticks below all come after it).
        for line in get_log(actor_id="ticker", follow=True, tail=1, _interval=0.1):
            seen.append(line)
            reading.set()
        ended.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    assert reading.wait(TIMEOUT)
    nb.get(actor.chatter.remote(20), timeout=TIMEOUT)
    wait_until(lambda: any(ln.endswith("stdout: tick 19") for ln in seen), timeout=TIMEOUT)
    ticks = [ln.rsplit(" ", 1)[1] for ln in seen if "stdout: tick" in ln]
    assert ticks == [str(i) for i in range(20)]  # in order, none twice, none before tail=0
    assert "start" in seen[0]  # the one tail line: the last that "say" wrote
    nb.kill(actor)
    assert ended.wait(TIMEOUT), "follow did not end with its worker"


def test_node_logs_rotate_and_keep_the_newest_dead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(node_logs, "MAX_BYTES", 4096)
    monkeypatch.setattr(node_logs, "KEEP_DEAD", 3)
    logs = NodeLogs.create(str(tmp_path / "logs"))
    assert (tmp_path / "logs").stat().st_mode & 0o077 == 0  # private to the user
    w = logs.open("n-w1")
    for i in range(500):
        w.write(tag("t1", "f", "stdout", [f"line {i}"]), time.time())
    # Rotated: the current file and one previous, never more than twice the limit.
    files = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert files == ["n-w1.log", "n-w1.log.1"]
    assert all((tmp_path / "logs" / f).stat().st_size <= 4096 for f in files)
    r = logs.read("n-w1", limit=1 << 20)
    assert r["text"].splitlines()[-1].endswith("[task t1 f] stdout: line 499")
    first = int(r["text"].splitlines()[0].rsplit(" ", 1)[1])
    assert 0 < first < 499  # the oldest lines are gone with the older rotation
    # Follow from the returned offset: only what comes after.
    w.write(b"raw\n", time.time())
    r2 = logs.read("n-w1", offset=r["offset"])
    assert r2["text"].endswith("[worker] raw\n") and r2["text"].count("\n") == 1
    # Dead workers: the newest KEEP_DEAD logs stay.
    for i in range(2, 7):
        logs.open(f"n-w{i}").write(b"x\n", time.time())
    for i in range(1, 7):
        logs.closed(f"n-w{i}")
    assert sorted(logs.logs) == ["n-w4", "n-w5", "n-w6"]
    assert "error" in logs.read("n-w1") and not (tmp_path / "logs" / "n-w1.log").exists()
    logs.close()
    assert not (tmp_path / "logs").exists()


def test_format_line_marks_task_lines() -> None:
    line = format_line(tag("abc.1", "mod.fn", "stderr", ["oops"]), 0.0)
    assert line.endswith(b" [task abc.1 mod.fn] stderr: oops\n")
    assert format_line(b"plain\n", 0.0).endswith(b" [worker] plain\n")
