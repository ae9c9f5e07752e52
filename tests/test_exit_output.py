"""What tasks printed reaches a script's stdout before its driver exits, awaited or not (as in
Ray, which flushes task output at shutdown but does not wait for unfinished tasks)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from tests.conftest import ROOT, run_script

SCRIPT = """
import os, sys, threading, time
import nbcluster as nb

marks = sys.argv[1] if len(sys.argv) > 1 else {marks!r}
nb.init(num_cpus=3)

def mark(name):
    open(os.path.join(marks, name), "w").close()

def wait_marks(names, timeout=60):
    deadline = time.monotonic() + timeout
    while not all(os.path.exists(os.path.join(marks, n)) for n in names):
        assert time.monotonic() < deadline, "tasks never printed"
        time.sleep(0.005)

@nb.remote
def say(i):
    for j in range(40):
        print(f"say{{i}} line{{j}}")
    mark(f"say{{i}}")

@nb.remote
def other():
    wait_marks([f"say{{i}}" for i in range(2)])
    return "other"

@nb.remote
def still_running():
    def chat():  # a task's own thread printing while the task runs
        for j in range(20):
            print(f"thread line{{j}}")
    t = threading.Thread(target=chat)
    t.start()
    t.join()
    for j in range(20):
        print(f"main line{{j}}", flush=True)
    mark("running")
    time.sleep(120)  # still running when the driver exits: not waited for

refs = [say.remote(i) for i in range(2)]  # never awaited
r = still_running.remote()
print(f"got {{nb.get(other.remote(), timeout=60)}}")  # (one write: task lines come between writes)
wait_marks(["running"])
print("driver done")
"""


def test_prints_of_unawaited_and_running_tasks_appear_before_exit(tmp_path: Path) -> None:
    code = textwrap.dedent(SCRIPT.format(marks=str(tmp_path)))
    proc = run_script(code, timeout=90, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    # (the driver's own print writes its newline apart: a task's line may come between)
    out = proc.stdout.splitlines()
    assert "got other" in proc.stdout and "driver done" in proc.stdout
    for prefix, n in (("say0 line", 40), ("say1 line", 40), ("thread line", 20), ("main line", 20)):
        nums = [
            int(m.group(1))
            for ln in out
            if (m := re.fullmatch(rf".*\((?:say|still_running) pid=\d+\) {prefix}(\d+)", ln))
        ]
        assert nums == list(range(n)), (prefix, nums, proc.stdout[-2000:])
