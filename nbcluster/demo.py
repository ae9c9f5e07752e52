"""``python -m nbcluster demo``: Ray's introductory examples on a local cluster."""

from __future__ import annotations

import importlib.util
import time
from typing import Any

import nbcluster as nb


def run_demo() -> int:
    """Start a local cluster, run the examples, print what they return."""
    t0 = time.perf_counter()
    info = nb.init()
    print(f"local cluster up in {time.perf_counter() - t0:.2f} s at {info.address}")
    print(f"resources: {nb.cluster_resources()}")

    @nb.remote
    def f(x: int) -> int:
        return x * x

    futures = [f.remote(i) for i in range(4)]
    print("[f.remote(i) for i in range(4)] ->", nb.get(futures))  # [0, 1, 4, 9]

    @nb.remote(num_cpus=1)
    def where() -> str:
        ctx = nb.get_runtime_context()
        print(f"running task {ctx.get_task_id()} on {ctx.get_node_id()}")
        return ctx.get_node_id()

    print("task ran on node", nb.get(where.remote()))

    data = nb.put(list(range(10)))

    @nb.remote
    def total(xs: Any) -> Any:
        return xs.sum() if hasattr(xs, "sum") else sum(xs)

    print("sum of a put() object ->", nb.get(total.remote(data)))

    @nb.remote
    def fan_out(n: int) -> list[int]:
        values: list[int] = nb.get([f.remote(i) for i in range(n)])  # tasks can submit tasks
        return values

    print("nested tasks ->", nb.get(fan_out.remote(5)))

    @nb.remote
    def fails() -> None:
        raise ValueError("bad input")

    try:
        nb.get(fails.remote())
    except ValueError as exc:
        print("a remote ValueError is caught as ValueError:", str(exc).splitlines()[0])

    class Counter:  # the seed's actor: state lives between calls
        def __init__(self) -> None:
            self.value = 0

        def increment(self) -> int:
            self.value += 1
            return self.value

    # nb.remote(Counter) is what @nb.remote does; written out because mypy ignores what class
    # decorators return.
    counter = nb.remote(Counter).remote()
    print("Counter actor ->", nb.get([counter.increment.remote() for _ in range(3)]))

    if importlib.util.find_spec("numpy") is not None:  # numpy is optional
        import numpy as np

        big = nb.put(np.ones(10_000_000))  # 80 MB: lives in the node's shared-memory store
        print("sum of an 80 MB array in a task ->", nb.get(total.remote(big)))

    t1 = time.perf_counter()
    nb.get([f.remote(i) for i in range(1000)])
    print(f"1,000 tasks in {time.perf_counter() - t1:.2f} s")
    nb.shutdown()
    print("cluster stopped")
    return 0
