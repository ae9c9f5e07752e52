"""Cost of the head's pure scheduling state (no sockets): lease grant + return, and a burst.

8 nodes of 16 CPUs and 2 GPUs, 16 idle workers each. ``cycle_us``: one ``{"CPU": 1}`` lease
requested, granted and returned (the steady state of a task stream); ``burst_ms``: 200 requests
at once (128 granted, 72 pending), then every lease returned, re-granting the pending ones.
Best of 5. Compare with an older ``state.py`` (typed instructions or the tuples before them) by
passing its path::

    .venv-ci/bin/python benchmarks/scheduler_state.py
    git show 8f4aaaf^:nbcluster/head/state.py > /tmp/old_state.py
    .venv-ci/bin/python benchmarks/scheduler_state.py /tmp/old_state.py
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

DEFAULT = Path(__file__).resolve().parent.parent / "nbcluster" / "head" / "state.py"


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("state_under_test", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _accessors(m: ModuleType) -> tuple[Callable[[Any], bool], Callable[[Any], str]]:
    """(is a grant, its lease id) for the state's instructions: typed, or older tuples."""
    if hasattr(m, "Grant"):
        grant = m.Grant
        return (lambda x: type(x) is grant), (lambda x: x.lease.lease_id)
    return (lambda x: x[0] == "grant"), (lambda x: x[3].lease_id)


def measure(path: Path) -> dict[str, float]:
    m = _load(path)
    is_grant, lease_of = _accessors(m)
    best = {"cycle_us": float("inf"), "burst_ms": float("inf")}
    for _ in range(5):
        st = m.ClusterState()
        for i in range(8):
            nid, _ = st.add_node(b"a%d" % i, f"n{i}", "h", {"CPU": 16, "GPU": 2}, [0, 1])
            for w in range(16):
                st.worker_ready(nid, f"{nid}-w{w}", "a", "c", 1)
        n = 20_000
        t = time.perf_counter()
        for i in range(n):
            ins = st.request_lease(b"c", "j", i, {"CPU": 1}, "f")
            st.return_lease(b"c", lease_of(ins[0]))
        best["cycle_us"] = min(best["cycle_us"], (time.perf_counter() - t) / n * 1e6)
        t = time.perf_counter()
        leases = []
        for i in range(200):
            ins = st.request_lease(b"c", "j", n + i, {"CPU": 1}, "f")
            leases += [lease_of(x) for x in ins if is_grant(x)]
        while leases:
            leases += [lease_of(x) for x in st.return_lease(b"c", leases.pop()) if is_grant(x)]
        best["burst_ms"] = min(best["burst_ms"], (time.perf_counter() - t) * 1e3)
    return {k: round(v, 2) for k, v in best.items()}


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    print(target, measure(target))
