"""Locality figure: what placing a consumer next to its large argument saves.

A head and two nodes (``box-a``, ``box-b``) on loopback. A task pinned to ``box-b`` makes a
200 MB float64 array (it stays in ``box-b``'s store). A consumer of it is then submitted twice:
with the DEFAULT strategy, which the locality hint places on ``box-b`` (the array is read in
place), and pinned to ``box-a`` (the array is pulled across first). Timed on the driver, from
submitting the consumer to its result; medians over 5 objects, after one warm-up::

    .venv-ci/bin/python benchmarks/locality.py
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np

import nbcluster as nb
from nbcluster.scheduling import NodeAffinitySchedulingStrategy

N = 25_000_000  # float64: 200 MB


def _start(cmd: list[str], ready: str, procs: list[subprocess.Popen[str]]) -> None:
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    procs.append(p)
    assert p.stdout is not None
    stream = p.stdout
    deadline = time.monotonic() + 120
    while not stream.readline().startswith(ready):
        if p.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{cmd[3]} did not start")
    threading.Thread(target=lambda: [None for _ in stream], daemon=True).start()


def main() -> None:
    tmp = tempfile.mkdtemp(prefix="nbc-locality-")
    token = os.path.join(tmp, "token")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    py = [sys.executable, "-m", "nbcluster"]
    procs: list[subprocess.Popen[str]] = []
    try:
        _start(
            [*py, "head", "--port", str(port), "--token-file", token], "NBCLUSTER_HEAD_READY", procs
        )
        for name in ("box-a", "box-b"):
            cmd = [*py, "worker", "--address", address, "--token-file", token]
            cmd += ["--node-name", name, "--num-cpus", "2", "--prestart", "1"]
            _start(cmd, "NBCLUSTER_AGENT_READY", procs)
        nb.init(address=address, token_file=token)
        ids = {n["name"]: n["node_id"] for n in nb.nodes()}

        @nb.remote(num_cpus=0.5)
        def produce(i: int) -> Any:
            return np.full(N, float(i))

        @nb.remote(num_cpus=0.5)
        def consume(a: Any) -> tuple[str, float]:
            return nb.get_runtime_context().get_node_id(), float(a[-1])

        placements: dict[str, dict[str, Any]] = {
            "DEFAULT (locality: runs on box-b)": {},
            "pinned to box-a (pulls the array)": {
                "scheduling_strategy": NodeAffinitySchedulingStrategy(ids["box-a"])
            },
        }
        times: dict[str, list[float]] = {k: [] for k in placements}
        for i in range(6):
            on_b = NodeAffinitySchedulingStrategy(ids["box-b"])
            big = produce.options(scheduling_strategy=on_b).remote(i)
            nb.wait([big], timeout=120)
            for label, opts in placements.items():
                t = time.perf_counter()
                where, last = nb.get(consume.options(**opts).remote(big), timeout=120)
                if i > 0:  # the first round starts workers
                    times[label].append((time.perf_counter() - t) * 1e3)
                assert last == float(i)
                if not opts:
                    assert where == ids["box-b"], f"locality placed it on {where}"
            del big
        for label, ms in times.items():
            print(f"{label}: median {statistics.median(ms):.0f} ms ({len(ms)} runs, 200 MB arg)")
    finally:
        nb.shutdown()
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(20)


if __name__ == "__main__":
    main()
