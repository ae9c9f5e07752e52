"""Worker crashes, retries, cancellation, resources and task output."""

from __future__ import annotations

import itertools
import logging
import os
import re
import signal
import time
from pathlib import Path

import pytest

import nbcluster as nb
from nbcluster.exceptions import TaskCancelledError, TaskError, WorkerCrashedError
from tests.conftest import wait_until


def _bump(path: Path) -> int:
    """Count attempts across worker processes (a file survives a crash)."""
    n = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(n))
    return n


def test_worker_exit_is_retried_then_fails(cluster: nb.ClusterInfo, tmp_path: Path) -> None:
    counter = tmp_path / "n"

    @nb.remote(max_retries=2)
    def dies(path: Path) -> None:
        _bump(path)
        os._exit(3)

    with pytest.raises(WorkerCrashedError, match="exited with code 3") as info:
        nb.get(dies.remote(counter), timeout=60)
    assert "max_retries=2" in str(info.value)
    assert counter.read_text() == "3"  # first run + 2 retries


@pytest.mark.parametrize("how", ["sigkill", "segfault"])
def test_crash_once_then_succeed(cluster: nb.ClusterInfo, tmp_path: Path, how: str) -> None:
    counter = tmp_path / "n"

    @nb.remote
    def flaky(path: Path, how: str) -> int:
        n = _bump(path)
        if n == 1:
            if how == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            else:
                import ctypes

                ctypes.string_at(0)  # segmentation fault
        return n

    assert nb.get(flaky.remote(counter, how), timeout=60) == 2


def test_crash_does_not_affect_other_tasks(cluster: nb.ClusterInfo) -> None:
    @nb.remote(max_retries=0)
    def die() -> None:
        os._exit(1)

    @nb.remote
    def ok(i: int) -> int:
        time.sleep(0.05)
        return i

    others = [ok.remote(i) for i in range(10)]
    bad = die.remote()
    more = [ok.remote(i) for i in range(10, 20)]
    with pytest.raises(WorkerCrashedError):
        nb.get(bad, timeout=60)
    assert nb.get(others + more, timeout=60) == list(range(20))


def test_retry_exceptions(cluster: nb.ClusterInfo, tmp_path: Path) -> None:
    counter = tmp_path / "n"

    @nb.remote(retry_exceptions=True, max_retries=3)
    def flaky(path: Path) -> int:
        n = _bump(path)
        if n < 3:
            raise ConnectionError("transient")
        return n

    assert nb.get(flaky.remote(counter), timeout=60) == 3

    counter2 = tmp_path / "m"

    @nb.remote(retry_exceptions=[KeyError], max_retries=3)
    def wrong_type(path: Path) -> None:
        _bump(path)
        raise ValueError("not retried")

    with pytest.raises(ValueError):
        nb.get(wrong_type.remote(counter2), timeout=60)
    assert counter2.read_text() == "1"

    # Application errors are not retried by default.
    counter3 = tmp_path / "k"

    @nb.remote
    def once(path: Path) -> None:
        _bump(path)
        raise RuntimeError("no retry")

    with pytest.raises(RuntimeError):
        nb.get(once.remote(counter3), timeout=60)
    assert counter3.read_text() == "1"


def test_cancel_queued_task(cluster: nb.ClusterInfo) -> None:
    @nb.remote(num_cpus=2)
    def hog(seconds: float) -> str:
        time.sleep(seconds)
        return "done"

    first = hog.remote(1.5)
    queued = hog.remote(0)  # waits for both CPUs
    nb.cancel(queued)
    with pytest.raises(TaskCancelledError):
        nb.get(queued, timeout=30)
    assert nb.get(first, timeout=30) == "done"


def test_cancel_running_task_interrupts_it(cluster: nb.ClusterInfo, tmp_path: Path) -> None:
    started = tmp_path / "started"

    @nb.remote
    def long(marker: Path) -> str:
        marker.touch()
        time.sleep(60)
        return "finished"

    ref = long.remote(started)
    wait_until(started.exists, timeout=30)
    t0 = time.monotonic()
    nb.cancel(ref)
    with pytest.raises(TaskCancelledError):
        nb.get(ref, timeout=30)
    assert time.monotonic() - t0 < 10

    @nb.remote
    def ping() -> str:
        return "pong"

    assert nb.get(ping.remote(), timeout=30) == "pong"  # the worker lives on


def test_force_cancel_kills_the_worker(cluster: nb.ClusterInfo, tmp_path: Path) -> None:
    started = tmp_path / "started"

    @nb.remote
    def stubborn(marker: Path) -> int:
        marker.touch()
        while True:
            try:
                time.sleep(60)
            except KeyboardInterrupt:
                continue  # ignores polite cancellation

    @nb.remote
    def pid() -> int:
        return os.getpid()

    ref = stubborn.remote(started)
    wait_until(started.exists, timeout=30)
    nb.cancel(ref, force=True)
    with pytest.raises(TaskCancelledError):
        nb.get(ref, timeout=30)
    assert isinstance(nb.get(pid.remote(), timeout=30), int)


def test_cancel_finished_task_is_a_no_op(cluster: nb.ClusterInfo) -> None:
    @nb.remote
    def quick() -> int:
        return 5

    ref = quick.remote()
    assert nb.get(ref, timeout=30) == 5
    nb.cancel(ref)
    assert nb.get(ref, timeout=30) == 5


def test_gpu_tasks_see_their_gpu(cluster: nb.ClusterInfo, tmp_path: Path) -> None:
    @nb.remote(num_gpus=1)
    def visible(me: str) -> tuple[str | None, list[int]]:
        # Both tasks must hold a GPU at once: each waits here for the other (a fixed sleep let
        # the first finish before a busy machine started the second's worker, which then
        # reused the first one's lease and GPU 0).
        (tmp_path / me).touch()
        deadline = time.monotonic() + 30
        while len(list(tmp_path.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        return os.environ.get("CUDA_VISIBLE_DEVICES"), nb.get_gpu_ids()

    @nb.remote
    def cpu_only() -> str | None:
        return os.environ.get("CUDA_VISIBLE_DEVICES")

    a, b = nb.get([visible.remote("a"), visible.remote("b")], timeout=60)
    assert {a[0], b[0]} == {"0", "1"}  # two GPUs, one each, at the same time
    assert sorted([a[1][0], b[1][0]]) == [0, 1]
    assert nb.get(cpu_only.remote(), timeout=30) in (None, os.environ.get("CUDA_VISIBLE_DEVICES"))


def test_tasks_wait_for_resources(cluster: nb.ClusterInfo) -> None:
    @nb.remote(resources={"custom": 1})
    def exclusive() -> tuple[float, float]:
        t0 = time.time()
        time.sleep(0.4)
        return t0, time.time()

    spans = sorted(nb.get([exclusive.remote() for _ in range(3)], timeout=60))
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end - 0.01  # never two at once


def test_infeasible_request_warns_and_stays_pending(
    cluster: nb.ClusterInfo, caplog: pytest.LogCaptureFixture
) -> None:
    @nb.remote(num_gpus=4)
    def needs_four_gpus() -> int:
        return 1

    caplog.set_level(logging.WARNING, logger="nbcluster")
    ref = needs_four_gpus.remote()
    wait_until(lambda: "needs_four_gpus" in caplog.text, timeout=5)
    assert re.search(r"missing GPU: 4", caplog.text)
    ready, _ = nb.wait([ref], timeout=1)
    assert ready == []  # pending, not failed
    nb.cancel(ref)
    with pytest.raises(TaskCancelledError):
        nb.get(ref, timeout=10)

    @nb.remote(resources={"tpu": 1})
    def needs_tpu() -> int:
        return 1

    ref2 = needs_tpu.remote()
    wait_until(lambda: "missing tpu: 1" in caplog.text, timeout=5)
    nb.cancel(ref2)


def test_prints_reach_the_driver_whole_lines(
    cluster: nb.ClusterInfo, capfd: pytest.CaptureFixture[str]
) -> None:
    @nb.remote
    def chatty(tag: str) -> int:
        import sys

        for i in range(200):
            print(f"{tag} line {i} " + "x" * 50)
        print("to stderr", file=sys.stderr)
        print("no newline at the end", end="")
        return os.getpid()

    # Output frames travel ahead of the result on the same connection: printed before get returns.
    pids = nb.get([chatty.remote("A"), chatty.remote("B")], timeout=60)
    out, err = capfd.readouterr()
    for tag, pid in zip("AB", pids, strict=True):
        lines = [ln for ln in out.splitlines() if f" {tag} line " in ln]
        assert len(lines) == 200
        for ln in lines:  # whole lines, each with its prefix
            assert re.fullmatch(rf"\(chatty pid={pid}\) {tag} line \d+ x{{50}}", ln), ln
        assert f"(chatty pid={pid}) no newline at the end" in out
        assert f"(chatty pid={pid}) to stderr" in err


def test_error_traceback_in_failed_dependency_chain(cluster: nb.ClusterInfo) -> None:
    @nb.remote
    def boom() -> None:
        raise ZeroDivisionError("division")

    @nb.remote
    def after(x: object) -> object:
        return x

    with pytest.raises(ZeroDivisionError) as info:
        nb.get(after.remote(after.remote(boom.remote())), timeout=30)
    assert isinstance(info.value, TaskError)
    assert "in boom" in str(info.value)
