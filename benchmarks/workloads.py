"""Benchmark workloads for nbcluster vs Ray.

Each workload is a function that takes the backend module (``import ray`` or
``import nbcluster as ray``) and returns a dict of figures.  Run one
(backend, workload) pair per fresh process::

    python benchmarks/workloads.py --backend ray --workload startup

The result is printed as a single JSON line on stdout; everything else (Ray's
logs, worker output, tracebacks) goes to stderr.  ``benchmarks/run.py``
drives this script and aggregates the results.

To add a workload, write ``def my_workload(ray: ModuleType) -> Figures`` and
decorate it with ``@workload(...)`` declaring its metrics.  It must call
``ray.init(**INIT_KWARGS)`` (or :func:`init_backend`) itself and should call
``ray.shutdown()`` at the end; :func:`main` calls ``shutdown`` again as a
safety net if the workload raised.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Literal

Figures = dict[str, Any]
WorkloadFn = Callable[[ModuleType], Figures]

#: Module name imported for each backend (always bound to the name ``ray``).
BACKENDS: dict[str, str] = {"ray": "ray", "nbcluster": "nbcluster"}

#: Attributes a backend module must have to be benchmarked.
REQUIRED_API: tuple[str, ...] = ("init", "remote", "get", "shutdown")

#: Keyword arguments passed to ``ray.init`` for every backend.
INIT_KWARGS: dict[str, Any] = {"num_cpus": 2}

#: Environment defaults applied before importing Ray (override by exporting
#: them).  They do not change Ray's performance-relevant settings: they keep
#: all of Ray's traffic on loopback (on Linux Ray otherwise picks the primary
#: interface's address as node IP) and stop the usage-stats reporter from
#: trying to reach usage-stats.ray.io.
RAY_ENV_DEFAULTS: dict[str, str] = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


@dataclass(frozen=True)
class Metric:
    """A figure reported by a workload and shown in the comparison table."""

    key: str
    unit: str
    better: Literal["lower", "higher"] = "lower"
    description: str = ""


@dataclass(frozen=True)
class Workload:
    """A registered workload: the function plus the metrics it reports."""

    name: str
    fn: WorkloadFn
    description: str
    metrics: tuple[Metric, ...]
    tags: tuple[str, ...] = field(default_factory=tuple)


REGISTRY: dict[str, Workload] = {}


def workload(
    name: str,
    description: str,
    metrics: list[Metric],
    tags: tuple[str, ...] = (),
) -> Callable[[WorkloadFn], WorkloadFn]:
    """Register ``fn`` as workload ``name`` reporting ``metrics``."""

    def decorator(fn: WorkloadFn) -> WorkloadFn:
        if name in REGISTRY:
            raise ValueError(f"duplicate workload name: {name}")
        REGISTRY[name] = Workload(name, fn, description, tuple(metrics), tags)
        return fn

    return decorator


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def init_backend(ray: ModuleType, **overrides: Any) -> None:
    """Call ``ray.init`` with the common settings (plus ``overrides``)."""
    ray.init(**{**INIT_KWARGS, **overrides})


def shutdown_backend(ray: ModuleType) -> None:
    """Shut the backend down if it looks initialised (idempotent)."""
    is_initialized = getattr(ray, "is_initialized", None)
    if is_initialized is None or is_initialized():
        ray.shutdown()


def log(msg: str) -> None:
    """Progress message to stderr (stdout is reserved for the JSON result)."""
    print(f"[workloads] {msg}", file=sys.stderr, flush=True)


def _current_backend_name(ray: ModuleType) -> str:
    """Backend name (``ray``/``nbcluster``) of the imported module."""
    return ray.__name__.split(".")[0]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of ``values``."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered)) - 1))
    return ordered[rank]


# Remote function bodies.  Defined at module level (this file runs as
# ``__main__``, so Ray's cloudpickle ships them by value).
def _noop() -> None:
    """Do nothing."""
    return None


def _one() -> int:
    """Return 1."""
    return 1


def _inc(x: int) -> int:
    """Return ``x + 1``."""
    return x + 1


# --------------------------------------------------------------------------
# Process / memory accounting
# --------------------------------------------------------------------------


def _marker_regex(backend: str) -> re.Pattern[str]:
    """Regex matching command lines that belong to ``backend``.

    Matches the backend name not preceded by a letter, so ``ray`` hits
    ``raylet``, ``ray::IDLE`` and ``.../site-packages/ray/...`` but not
    ``array``.
    """
    return re.compile(rf"(?<![A-Za-z]){re.escape(backend)}")


def backend_processes(backend: str, before: set[int], t_start: float) -> list[Any]:
    """Processes started by the driver for ``backend``, excluding the driver.

    Union of (a) the driver's descendants and (b) any process that did not
    exist in ``before``, was created after ``t_start`` and whose command line
    mentions the backend (catches daemonised/re-parented processes such as
    Ray's gcs_server or raylet), plus the descendants of (b).
    """
    import psutil

    me = psutil.Process()
    found: dict[int, psutil.Process] = {}
    for child in me.children(recursive=True):
        found[child.pid] = child

    marker = _marker_regex(backend)
    for proc in psutil.process_iter(["pid", "cmdline", "create_time"]):
        info = proc.info
        if info["pid"] == me.pid or info["pid"] in before or info["pid"] in found:
            continue
        if (info["create_time"] or 0) < t_start - 1.0:
            continue
        if marker.search(" ".join(info["cmdline"] or [])):
            found[proc.pid] = proc
            try:
                for child in proc.children(recursive=True):
                    found.setdefault(child.pid, child)
            except psutil.Error:
                pass
    found.pop(me.pid, None)
    return list(found.values())


def measure_memory(procs: list[Any]) -> Figures:
    """Sum RSS/USS/PSS (MB) over ``procs`` with a per-process breakdown."""
    import psutil

    mb = 1024 * 1024
    rss = uss = pss = 0
    full_ok = True
    breakdown: list[dict[str, Any]] = []
    for proc in procs:
        try:
            with proc.oneshot():
                name = proc.name()
                cmd = " ".join(proc.cmdline()).strip()[:120]
                try:
                    mem = proc.memory_full_info()
                    p_uss = getattr(mem, "uss", None)
                    p_pss = getattr(mem, "pss", None)
                except psutil.AccessDenied:
                    mem = proc.memory_info()
                    p_uss = p_pss = None
        except psutil.NoSuchProcess:
            continue
        rss += mem.rss
        if p_uss is None or p_pss is None:
            full_ok = False
        else:
            uss += p_uss
            pss += p_pss
        breakdown.append(
            {
                "pid": proc.pid,
                "name": name,
                "rss_mb": round(mem.rss / mb, 1),
                "uss_mb": None if p_uss is None else round(p_uss / mb, 1),
                "pss_mb": None if p_pss is None else round(p_pss / mb, 1),
                "cmdline": cmd,
            }
        )
    breakdown.sort(key=lambda d: d["rss_mb"], reverse=True)
    return {
        "rss_mb": rss / mb,
        "uss_mb": uss / mb if full_ok else None,
        "pss_mb": pss / mb if full_ok else None,
        "processes": len(breakdown),
        "breakdown": breakdown,
    }


# --------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------


@workload(
    "startup",
    "Wall time from just before ray.init(num_cpus=2) to the first result of a trivial task.",
    [
        Metric("startup_s", "s", "lower", "init + first get(f.remote())"),
        Metric("init_s", "s", "lower", "ray.init alone"),
        Metric("first_task_s", "s", "lower", "first get(f.remote()) after init"),
    ],
    tags=("tasks",),
)
def startup(ray: ModuleType) -> Figures:
    """Time ``init`` plus the first round trip of a trivial task."""
    f = ray.remote(_one)
    t0 = time.perf_counter()
    init_backend(ray)
    t1 = time.perf_counter()
    value = ray.get(f.remote())
    t2 = time.perf_counter()
    if value != 1:
        raise AssertionError(f"trivial task returned {value!r}, expected 1")
    ray.shutdown()
    return {"startup_s": t2 - t0, "init_s": t1 - t0, "first_task_s": t2 - t1}


@workload(
    "idle_memory",
    "Memory of every process the driver started (driver excluded), after "
    "init and one task, once things settle (>= 2 s).",
    [
        Metric("rss_mb", "MB", "lower", "sum of RSS (double-counts shared pages)"),
        Metric("pss_mb", "MB", "lower", "sum of PSS (shared pages split)"),
        Metric("uss_mb", "MB", "lower", "sum of USS (private pages only)"),
        Metric("processes", "count", "lower", "processes started by the driver"),
    ],
    tags=("memory",),
)
def idle_memory(ray: ModuleType) -> Figures:
    """Sum the memory of the backend's processes once the cluster is idle."""
    import psutil

    backend = _current_backend_name(ray)
    before = set(psutil.pids())
    t_start = time.time()
    f = ray.remote(_one)
    init_backend(ray)
    ray.get(f.remote())
    t_task = time.monotonic()

    # Settle: at least 2 s, then until process count is unchanged and total
    # RSS moves by < 2 % between two consecutive 0.5 s samples (cap 10 s).
    time.sleep(2.0)
    deadline = time.monotonic() + 10.0
    prev = measure_memory(backend_processes(backend, before, t_start))
    stable = 0
    while time.monotonic() < deadline and stable < 2:
        time.sleep(0.5)
        cur = measure_memory(backend_processes(backend, before, t_start))
        same_count = cur["processes"] == prev["processes"]
        rss_delta = abs(cur["rss_mb"] - prev["rss_mb"]) / max(prev["rss_mb"], 1.0)
        stable = stable + 1 if same_count and rss_delta < 0.02 else 0
        prev = cur
    settle_s = time.monotonic() - t_task
    ray.shutdown()
    breakdown = prev.pop("breakdown")
    return {**prev, "settle_s": settle_s, "details": {"processes": breakdown}}


@workload(
    "task_rtt",
    "Sequential get(f.remote()) of a no-op task, 1,000 times after 50 warm-up calls.",
    [
        Metric("mean_us", "us", "lower", "mean round trip"),
        Metric("p50_us", "us", "lower", "median round trip"),
        Metric("p99_us", "us", "lower", "99th percentile round trip"),
    ],
    tags=("tasks", "latency"),
)
def task_rtt(ray: ModuleType, n: int = 1000, warmup: int = 50) -> Figures:
    """Measure the latency of one synchronous no-op task round trip."""
    f = ray.remote(_noop)
    init_backend(ray)
    figures = _time_round_trips(lambda: ray.get(f.remote()), n, warmup)
    ray.shutdown()
    return figures


def _time_round_trips(call: Callable[[], Any], n: int, warmup: int) -> Figures:
    """Mean, median and p99 latency (µs) of ``n`` sequential calls after ``warmup`` ones."""
    for _ in range(warmup):
        call()
    samples: list[float] = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        call()
        samples.append((clock() - t0) / 1000.0)
    return {
        "mean_us": statistics.fmean(samples),
        "p50_us": statistics.median(samples),
        "p99_us": percentile(samples, 99),
    }


@workload(
    "tasks_10k",
    "10,000 no-op tasks submitted with a list comprehension, then one get() "
    "of the whole list (after a 100-task warm-up).",
    [
        Metric("total_s", "s", "lower", "submit + get of 10k tasks"),
        Metric("tasks_per_s", "tasks/s", "higher", "throughput"),
        Metric("submit_s", "s", "lower", "submission loop alone"),
    ],
    tags=("tasks", "throughput"),
)
def tasks_10k(ray: ModuleType, n: int = 10_000, warmup: int = 100) -> Figures:
    """Measure throughput of many independent no-op tasks."""
    f = ray.remote(_noop)
    init_backend(ray)
    ray.get([f.remote() for _ in range(warmup)])
    t0 = time.perf_counter()
    refs = [f.remote() for _ in range(n)]
    t1 = time.perf_counter()
    results = ray.get(refs)
    t2 = time.perf_counter()
    if len(results) != n:
        raise AssertionError(f"got {len(results)} results, expected {n}")
    ray.shutdown()
    return {"total_s": t2 - t0, "tasks_per_s": n / (t2 - t0), "submit_s": t1 - t0}


@workload(
    "chain_1k",
    "A chain of 1,000 dependent tasks (x = f.remote(x), f = x + 1) started "
    "from 0, then get() of the last one; checks the value is 1000.",
    [Metric("total_s", "s", "lower", "submit + get of the 1k-task chain")],
    tags=("tasks", "dependencies"),
)
def chain_1k(ray: ModuleType, n: int = 1000) -> Figures:
    """Measure a chain of dependent tasks passing object refs."""
    f = ray.remote(_inc)
    init_backend(ray)
    ray.get(f.remote(0))  # warm one worker and the function export
    t0 = time.perf_counter()
    x = f.remote(0)
    for _ in range(n - 1):
        x = f.remote(x)
    value = ray.get(x)
    t1 = time.perf_counter()
    if value != n:
        raise AssertionError(f"chain returned {value!r}, expected {n}")
    ray.shutdown()
    return {"total_s": t1 - t0}


@workload(
    "placement_groups_100",
    "100 placement groups of one {CPU: 0.01} bundle: create them all, get() every ready(), "
    "then remove them all (after 5 warm-up groups).",
    [
        Metric("create_s", "s", "lower", "100 placement_group() calls"),
        Metric("ready_s", "s", "lower", "get() of the 100 ready() refs"),
        Metric("remove_s", "s", "lower", "100 remove_placement_group() calls"),
        Metric("total_s", "s", "lower", "create + ready + remove"),
    ],
    tags=("placement_groups",),
)
def placement_groups_100(ray: ModuleType, n: int = 100, warmup: int = 5) -> Figures:
    """Measure placement group creation, readiness and removal."""
    init_backend(ray)
    util = ray.util
    warm = [util.placement_group([{"CPU": 0.01}]) for _ in range(warmup)]
    ray.get([pg.ready() for pg in warm], timeout=120)
    for pg in warm:
        util.remove_placement_group(pg)
    t0 = time.perf_counter()
    pgs = [util.placement_group([{"CPU": 0.01}]) for _ in range(n)]
    t1 = time.perf_counter()
    ray.get([pg.ready() for pg in pgs], timeout=300)
    t2 = time.perf_counter()
    for pg in pgs:
        util.remove_placement_group(pg)
    t3 = time.perf_counter()
    ray.shutdown()
    return {"create_s": t1 - t0, "ready_s": t2 - t1, "remove_s": t3 - t2, "total_s": t3 - t0}


class _Counter:
    """A minimal stateful actor for the actor workloads."""

    def __init__(self) -> None:
        self.n = 0

    def inc(self) -> int:
        self.n += 1
        return self.n


@workload(
    "actor_rtt",
    "Sequential get(actor.inc.remote()) on one actor, 1,000 calls after 50 warm-up calls.",
    [
        Metric("mean_us", "us", "lower", "mean round trip"),
        Metric("p50_us", "us", "lower", "median round trip"),
        Metric("p99_us", "us", "lower", "99th percentile round trip"),
    ],
    tags=("actors", "latency"),
)
def actor_rtt(ray: ModuleType, n: int = 1000, warmup: int = 50) -> Figures:
    """Measure the latency of one synchronous actor method call."""
    counter_cls = ray.remote(_Counter)
    init_backend(ray)
    c = counter_cls.remote()
    figures = _time_round_trips(lambda: ray.get(c.inc.remote()), n, warmup)
    ray.shutdown()
    return figures


@workload(
    "actor_10k",
    "10,000 calls to one actor submitted back to back (pipelined), then one get() "
    "of the whole list; checks they ran in order.",
    [
        Metric("total_s", "s", "lower", "submit + get of 10k calls"),
        Metric("calls_per_s", "calls/s", "higher", "throughput"),
    ],
    tags=("actors", "throughput"),
)
def actor_10k(ray: ModuleType, n: int = 10_000, warmup: int = 100) -> Figures:
    """Measure pipelined throughput of one actor."""
    counter_cls = ray.remote(_Counter)
    init_backend(ray)
    c = counter_cls.remote()
    ray.get([c.inc.remote() for _ in range(warmup)])
    t0 = time.perf_counter()
    values = ray.get([c.inc.remote() for _ in range(n)])
    t1 = time.perf_counter()
    if values != list(range(warmup + 1, warmup + n + 1)):
        raise AssertionError("actor calls did not run in submission order")
    ray.shutdown()
    return {"total_s": t1 - t0, "calls_per_s": n / (t1 - t0)}


class _Echo:
    """An actor for the actor-pool workload: ``f`` returns its argument."""

    def f(self, v: int) -> int:
        return v


@workload(
    "actor_pool_map_10k",
    "ray.util.ActorPool over 2 actors: list(pool.map(lambda a, v: a.f.remote(v), range(10_000))) "
    "after a 100-item warm-up map; checks the results came back in order.",
    [
        Metric("total_s", "s", "lower", "the 10k-item map, submit to last result"),
        Metric("items_per_s", "items/s", "higher", "throughput"),
    ],
    tags=("actors", "throughput"),
)
def actor_pool_map_10k(ray: ModuleType, n: int = 10_000, actors: int = 2) -> Figures:
    """Measure ActorPool.map throughput (one call in flight per actor, as Ray's pool does)."""
    echo_cls = ray.remote(_Echo)
    init_backend(ray)
    pool = ray.util.ActorPool([echo_cls.remote() for _ in range(actors)])
    list(pool.map(lambda a, v: a.f.remote(v), range(100)))  # actors up, functions exported
    t0 = time.perf_counter()
    values = list(pool.map(lambda a, v: a.f.remote(v), range(n)))
    t1 = time.perf_counter()
    if values != list(range(n)):
        raise AssertionError("ActorPool.map results are not in submission order")
    ray.shutdown()
    return {"total_s": t1 - t0, "items_per_s": n / (t1 - t0)}


def _stream(n: int) -> Any:
    """Yield ``0 .. n-1`` (a streaming generator task)."""
    # Not ``yield from range(n)``: Ray's worker then fails ("'range_iterator' object has no
    # attribute 'send'").
    for i in range(n):  # noqa: UP028
        yield i


@workload(
    "stream_10k",
    "A streaming generator task yielding 10,000 small ints, consumed as the refs arrive "
    "(for ref in gen: get(ref)) after one warm-up stream; checks the sum.",
    [
        Metric("total_s", "s", "lower", "submit, then take and get all 10k items"),
        Metric("items_per_s", "items/s", "higher", "throughput"),
        Metric("first_item_ms", "ms", "lower", "submission to the first item's value"),
    ],
    tags=("tasks", "generators", "throughput"),
)
def stream_10k(ray: ModuleType, n: int = 10_000) -> Figures:
    """Measure the item throughput of one streaming generator task."""
    f = ray.remote(_stream)
    init_backend(ray)
    sum(ray.get(ref) for ref in f.remote(100))  # warm a worker and the function export
    t0 = time.perf_counter()
    gen = f.remote(n)
    first = ray.get(next(gen))
    t_first = time.perf_counter()
    total = first + sum(ray.get(ref) for ref in gen)
    t1 = time.perf_counter()
    if total != n * (n - 1) // 2:
        raise AssertionError(f"stream summed to {total}, expected {n * (n - 1) // 2}")
    ray.shutdown()
    return {
        "total_s": t1 - t0,
        "items_per_s": n / (t1 - t0),
        "first_item_ms": (t_first - t0) * 1000,
    }


def _array(nbytes: int) -> Any:
    import numpy as np

    return np.ones(nbytes // 8, dtype=np.float64)


def _put_get(ray: ModuleType, nbytes: int, repeat: int) -> Figures:
    init_backend(ray)
    arr = _array(nbytes)
    ray.get(ray.put(_array(1 << 20)))  # warm up the store path
    puts, gets = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        ref = ray.put(arr)
        t1 = time.perf_counter()
        out = ray.get(ref)
        t2 = time.perf_counter()
        if out.shape != arr.shape:
            raise AssertionError("get returned the wrong array")
        puts.append(t1 - t0)
        gets.append(t2 - t1)
        del out, ref
    ray.shutdown()
    put_s, get_s = statistics.median(puts), statistics.median(gets)
    return {"put_s": put_s, "get_s": get_s, "put_gb_per_s": nbytes / put_s / 1e9}


_PUT_GET_METRICS = [
    Metric("put_s", "s", "lower", "put of the array (median)"),
    Metric("get_s", "s", "lower", "get of it on the same node (median)"),
    Metric("put_gb_per_s", "GB/s", "higher", "put throughput"),
]


@workload(
    "put_get_100mb",
    "put() then get() of a 100 MB float64 numpy array on the same node, 5 times.",
    _PUT_GET_METRICS,
    tags=("objects",),
)
def put_get_100mb(ray: ModuleType) -> Figures:
    """Store and read back 100 MB."""
    return _put_get(ray, 100 * 1000 * 1000, 5)


@workload(
    "put_get_1gb",
    "put() then get() of a 1 GB float64 numpy array on the same node, 3 times.",
    _PUT_GET_METRICS,
    tags=("objects",),
)
def put_get_1gb(ray: ModuleType) -> Figures:
    """Store and read back 1 GB."""
    return _put_get(ray, 1000 * 1000 * 1000, 3)


def _array_sum(a: Any) -> float:
    return float(a.sum())


def _make_array(nbytes: int) -> Any:
    return _array(nbytes)


@workload(
    "task_sum_100mb",
    "A task receiving a 100 MB array by ref and returning its sum (median of 5, after a warm-up).",
    [Metric("total_s", "s", "lower", "get(sum.remote(ref)) round trip")],
    tags=("objects", "tasks"),
)
def task_sum_100mb(ray: ModuleType, repeat: int = 5) -> Figures:
    """Pass a large object to a task on the same node."""
    f = ray.remote(_array_sum)
    init_backend(ray)
    ref = ray.put(_array(100 * 1000 * 1000))
    ray.get(f.remote(ref))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        ray.get(f.remote(ref))
        times.append(time.perf_counter() - t0)
    ray.shutdown()
    return {"total_s": statistics.median(times)}


@workload(
    "task_produce_100mb",
    "A task producing a 100 MB array, fetched by the driver (median of 5, after a warm-up).",
    [Metric("total_s", "s", "lower", "get(produce.remote()) round trip")],
    tags=("objects", "tasks"),
)
def task_produce_100mb(ray: ModuleType, repeat: int = 5) -> Figures:
    """Return a large object from a task to the driver."""
    f = ray.remote(_make_array)
    init_backend(ray)
    ray.get(f.remote(1 << 20))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = ray.get(f.remote(100 * 1000 * 1000))
        times.append(time.perf_counter() - t0)
        del out
    ray.shutdown()
    return {"total_s": statistics.median(times)}


class PeakSampler:
    """Samples the RSS of the driver and of every backend process in a background thread.

    Keeps each process's peak RSS and the peak of their sum (sampled together, so the sum is
    what was resident at one moment). The backend's process list is looked up again every few
    seconds (workers start while the workload runs).
    """

    def __init__(self, every: float = 0.5) -> None:
        import threading

        self.every = every
        self.peak_total = 0
        self.peaks: dict[int, tuple[int, str]] = {}  # pid -> (peak rss, label)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-sampler", daemon=True)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        procs: list[Any] = []
        next_scan = 0.0
        while not self._stop.is_set():
            if time.monotonic() >= next_scan:
                procs = [me, *me.children(recursive=True)]
                next_scan = time.monotonic() + 5.0
            self.sample(procs)
            self._stop.wait(self.every)

    def sample(self, procs: list[Any]) -> None:
        """One sample of ``procs`` (also callable from the workload, e.g. at the very end)."""
        import psutil

        total = 0
        for proc in procs:
            try:
                rss = proc.memory_info().rss
                label = self.peaks.get(proc.pid, (0, ""))[1] or _label(proc)
            except psutil.Error:
                continue
            total += rss
            if rss > self.peaks.get(proc.pid, (0, ""))[0]:
                self.peaks[proc.pid] = (rss, label)
        self.peak_total = max(self.peak_total, total)

    def figures(self) -> Figures:
        """Peak of the sum, the driver's peak, the largest other process's peak, a breakdown."""
        import os as _os

        mb = 1024 * 1024
        me = _os.getpid()
        others = [(rss, label, pid) for pid, (rss, label) in self.peaks.items() if pid != me]
        others.sort(reverse=True)
        return {
            "peak_rss_mb": self.peak_total / mb,
            "driver_peak_mb": self.peaks.get(me, (0, ""))[0] / mb,
            "max_other_peak_mb": (others[0][0] / mb) if others else 0.0,
            "details": {
                "peak_rss_per_process": [
                    {"pid": pid, "label": label, "peak_rss_mb": round(rss / mb, 1)}
                    for rss, label, pid in others[:12]
                ]
            },
        }


def _label(proc: Any) -> str:
    """A short name for a process: its command line's telling part."""
    cmd = " ".join(proc.cmdline())
    for key in ("gcs_server", "raylet", "dashboard", "head", "agent", "worker", "ray::"):
        if key in cmd:
            return f"{proc.name()} ({key})"
    return proc.name()


def _queued(ray: ModuleType, n: int) -> Figures:
    """Submit ``n`` no-op tasks at once, then get them all; time and peak memory."""
    import gc

    import psutil

    f = ray.remote(_noop)
    init_backend(ray)
    ray.get([f.remote() for _ in range(100)])  # warm the workers and the function export
    gc.collect()
    driver = psutil.Process()
    base_mb = driver.memory_info().rss / 2**20
    with PeakSampler() as sampler:
        t0 = time.perf_counter()
        refs = [f.remote() for _ in range(n)]
        t1 = time.perf_counter()
        submitted_mb = driver.memory_info().rss / 2**20
        results = ray.get(refs, timeout=3600)
        t2 = time.perf_counter()
        held_mb = driver.memory_info().rss / 2**20
        sampler.sample([driver, *driver.children(recursive=True)])
    if len(results) != n or any(r is not None for r in results[:: max(1, n // 1000)]):
        raise AssertionError(f"got {len(results)} results, expected {n} Nones")
    del results, refs
    ray.shutdown()
    return {
        "total_s": t2 - t0,
        "submit_s": t1 - t0,
        "tasks_per_s": n / (t2 - t0),
        "driver_base_mb": base_mb,
        "driver_after_submit_mb": submitted_mb,
        "driver_held_mb": held_mb,
        "driver_kb_per_held": (held_mb - base_mb) * 1024 / n,
        **sampler.figures(),
    }


_QUEUED_METRICS = [
    Metric("total_s", "s", "lower", "submit + get of every task"),
    Metric("submit_s", "s", "lower", "submission loop alone"),
    Metric("tasks_per_s", "tasks/s", "higher", "throughput"),
    Metric(
        "peak_rss_mb",
        "MB",
        "lower",
        "peak of the summed RSS of the driver and every backend process",
    ),
    Metric("driver_peak_mb", "MB", "lower", "the driver's peak RSS"),
    Metric("max_other_peak_mb", "MB", "lower", "the largest peak RSS of any other backend process"),
    Metric(
        "driver_kb_per_held", "KB", "lower", "driver RSS growth per finished task whose ref is held"
    ),
]


@workload(
    "queued_100k",
    "100,000 no-op tasks submitted at once (list comprehension), then one get() of the list; "
    "peak RSS of the driver and every backend process sampled every 0.5 s.",
    _QUEUED_METRICS,
    tags=("tasks", "throughput", "memory"),
)
def queued_100k(ray: ModuleType) -> Figures:
    """100k queued tasks."""
    return _queued(ray, 100_000)


@workload(
    "queued_1m",
    "1,000,000 no-op tasks submitted at once, then one get() of the list (Ray's release test "
    "'1M queued tasks on one node'); peak RSS of every process.",
    _QUEUED_METRICS,
    tags=("tasks", "throughput", "memory"),
)
def queued_1m(ray: ModuleType) -> Figures:
    """1M queued tasks."""
    return _queued(ray, 1_000_000)


@workload(
    "driver_memory",
    "Driver RSS per task: 100,000 tasks that cannot run (each needs more CPUs than the cluster "
    "has) queued at once; then, with those still queued, 100,000 no-op tasks run with every "
    "ref held.",
    [
        Metric("kb_per_queued", "KB", "lower", "driver RSS per queued task"),
        Metric("kb_per_held", "KB", "lower", "driver RSS per finished task whose ref is held"),
    ],
    tags=("tasks", "memory"),
)
def driver_memory(ray: ModuleType, n: int = 100_000) -> Figures:
    """Bytes a driver keeps per queued task and per held result."""
    import gc

    import psutil

    driver = psutil.Process()
    f = ray.remote(_noop)
    init_backend(ray)
    ray.get([f.remote() for _ in range(100)])
    gc.collect()
    base = driver.memory_info().rss
    big = f.options(num_cpus=64)  # never placed on a 2-CPU cluster: stays queued
    queued = [big.remote() for _ in range(n)]
    time.sleep(2.0)  # (the I/O thread takes them in)
    gc.collect()
    queued_rss = driver.memory_info().rss
    refs = [f.remote() for _ in range(n)]
    ray.get(refs, timeout=3600)
    time.sleep(1.0)
    gc.collect()
    held_rss = driver.memory_info().rss
    del queued, refs
    ray.shutdown()
    return {
        "kb_per_queued": (queued_rss - base) / n / 1024,
        "kb_per_held": (held_rss - queued_rss) / n / 1024,
    }


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


def import_backend(backend: str) -> ModuleType:
    """Import the backend module (applying Ray's loopback env defaults)."""
    if backend == "ray":
        for key, value in RAY_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
    module = importlib.import_module(BACKENDS[backend])
    missing = [name for name in REQUIRED_API if not hasattr(module, name)]
    if missing:
        where = getattr(module, "__file__", None) or "namespace package"
        raise ImportError(
            f"{BACKENDS[backend]} ({where}) lacks {', '.join(missing)}: "
            "not installed in this venv, or incomplete"
        )
    return module


def check_backend(backend: str) -> dict[str, Any]:
    """Import-only check of ``backend``; the record run.py expects."""
    try:
        module = import_backend(backend)
    except Exception as exc:
        return {"backend": backend, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {
        "backend": backend,
        "ok": True,
        "version": getattr(module, "__version__", None),
        "file": getattr(module, "__file__", None),
    }


def run_one(backend: str, name: str) -> dict[str, Any]:
    """Run workload ``name`` on ``backend``; return the JSON-able record."""
    record: dict[str, Any] = {
        "backend": backend,
        "workload": name,
        "ok": False,
        "python": platform.python_version(),
    }
    ray: ModuleType | None = None
    try:
        ray = import_backend(backend)
        record["version"] = getattr(ray, "__version__", None)
        t0 = time.perf_counter()
        figures = REGISTRY[name].fn(ray)
        record["wall_s"] = time.perf_counter() - t0
        record["details"] = figures.pop("details", None)
        record["figures"] = figures
        record["ok"] = True
    except BaseException as exc:  # report every failure (even SystemExit) as JSON
        traceback.print_exc(file=sys.stderr)
        record["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if ray is not None:
            try:
                shutdown_backend(ray)
            except Exception as exc:
                log(f"shutdown failed: {exc!r}")
    return record


def main(argv: list[str] | None = None) -> int:
    """CLI: run one workload on one backend, print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=sorted(BACKENDS))
    parser.add_argument("--workload", choices=sorted(REGISTRY))
    parser.add_argument("--list", action="store_true", help="print the registry as JSON and exit")
    parser.add_argument("--check", action="store_true", help="only check that --backend imports")
    args = parser.parse_args(argv)

    if args.list:
        print(json.dumps(describe_registry(), indent=2))
        return 0
    if args.check:
        if not args.backend:
            parser.error("--check needs --backend")
        record = check_backend(args.backend)
        print(json.dumps(record))
        return 0 if record["ok"] else 1
    if not args.backend or not args.workload:
        parser.error("--backend and --workload are required (or --list / --check)")

    # Keep stdout for the JSON result only: route fd 1 (inherited by any
    # child process, e.g. Ray workers) and sys.stdout to stderr.
    sys.stdout.flush()
    result_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    record = run_one(args.backend, args.workload)
    os.write(result_fd, (json.dumps(record) + "\n").encode())
    os.close(result_fd)
    return 0 if record["ok"] else 1


def describe_registry() -> list[dict[str, Any]]:
    """The registry as plain data (names, descriptions, metrics)."""
    return [
        {
            "name": w.name,
            "description": w.description,
            "tags": list(w.tags),
            "metrics": [m.__dict__ for m in w.metrics],
        }
        for w in REGISTRY.values()
    ]


if __name__ == "__main__":
    sys.exit(main())
