"""Ray's ``max_calls``: a worker that ran a function that many times exits, as planned, and the
next calls go to fresh workers; GPU functions default to ``max_calls=1`` (Ray 2.x's rule).

A real head and node agent; the agent sees one GPU through the fake NVML module."""

from __future__ import annotations

import logging
import os
from collections import Counter

import pytest

import nbcluster as nb
from nbcluster.testing import fake_nvml
from tests.multinode import Procs

TIMEOUT = 60.0

pytestmark = pytest.mark.timeout(300)


@nb.remote(max_calls=2, max_retries=0)  # no retries: a lost task would fail, not re-run
def twice(i: int) -> tuple[int, int]:
    print(f"call {i}")
    return i, os.getpid()


@nb.remote(max_retries=0)
def plain() -> int:
    return os.getpid()


@nb.remote(num_gpus=1, max_retries=0)
def on_gpu() -> tuple[int, str | None]:
    return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES")


@nb.remote(num_gpus=1, max_calls=0, max_retries=0)
def on_gpu_kept() -> int:
    return os.getpid()


def test_max_calls_recycles_workers_as_planned(
    procs: Procs, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    gpus = [{"name": "NVIDIA H100", "memory_used": 0, "memory_total": 80_000}]
    for k, v in fake_nvml.environment(gpus, procs.tmp / "gpus.json").items():
        monkeypatch.setenv(k, v)  # the agent (a child) detects the GPU through it
    procs.start_head()
    procs.join("a", "--num-cpus", "2", "--prestart", "2")
    nb.init(address=procs.address, token_file=str(procs.token_file))
    assert nb.cluster_resources().get("GPU") == 1.0
    caplog.set_level(logging.WARNING)

    # One at a time (each call may reuse the lease of the one before), then all at once.
    for run in (
        [nb.get(twice.remote(i), timeout=TIMEOUT) for i in range(6)],
        nb.get([twice.remote(i) for i in range(6)], timeout=TIMEOUT),
    ):
        assert [i for i, _ in run] == list(range(6))  # every task ran, once, no error
        per_pid = Counter(pid for _, pid in run)
        assert len(per_pid) >= 3 and max(per_pid.values()) <= 2, per_pid

    # .options() cannot change max_calls (Ray's rule): the decorator's 2 holds.
    opts = [nb.get(twice.options(max_calls=10).remote(i), timeout=TIMEOUT) for i in range(4)]
    assert max(Counter(pid for _, pid in opts).values()) <= 2

    # Without max_calls a CPU function's worker is reused.
    assert len({nb.get(plain.remote(), timeout=TIMEOUT) for _ in range(4)}) == 1

    # GPU functions default to max_calls=1: a fresh process, so GPU memory, for each call.
    runs = [nb.get(on_gpu.remote(), timeout=TIMEOUT) for _ in range(3)]
    assert len({pid for pid, _ in runs}) == 3 and {dev for _, dev in runs} == {"0"}
    assert len({nb.get(on_gpu_kept.remote(), timeout=TIMEOUT) for _ in range(3)}) == 1

    # Planned exits: not counted as deaths (no backoff, no warning), although well over
    # the few deaths a node may have in its window before drivers are warned.
    head_log = (procs.tmp / "head.log").read_text(errors="replace")
    assert "keep dying" not in head_log and "keep dying" not in caplog.text
    assert "retrying" not in caplog.text


def test_max_calls_is_checked() -> None:
    with pytest.raises(ValueError, match="max_calls must be an integer >= 0"):
        nb.remote(max_calls=-1)(lambda: 1)
    with pytest.raises(ValueError, match="max_calls must be an integer >= 0"):
        twice.options(max_calls="2")
    with pytest.raises(ValueError, match="Invalid option keyword max_calls for actors"):

        @nb.remote(max_calls=1)
        class A:
            pass
