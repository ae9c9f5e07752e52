"""The shared-memory object store in the data path: zero-copy reads, freeing, spilling, cleanup."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import nbcluster as nb
from nbcluster.exceptions import TaskError
from nbcluster.store import ObjectStoreFullError
from tests.conftest import ROOT, all_gone, wait_until

np = pytest.importorskip("numpy")

MB = 1 << 20


def _segments(info: nb.ClusterInfo) -> list[str]:
    """The store's object files (not freed segments kept for reuse, ``.pool-<n>``)."""
    store_id = nb.nodes()[0]["store_id"]
    return glob.glob(f"/dev/shm/nbc-{store_id}-[!.]*")


def _store() -> dict[str, int]:
    return dict(nb.nodes()[0]["object_store"])


@pytest.fixture(scope="module")
def small_store() -> Iterator[nb.ClusterInfo]:
    """A cluster whose store holds 300 MB in memory and may spill 400 MB."""
    nb.shutdown()
    info = nb.init(num_cpus=2, object_store_memory=300 * MB, object_spill_limit=400 * MB)
    yield info
    nb.shutdown()


def test_small_values_stay_inline(small_store: nb.ClusterInfo) -> None:
    before = _segments(small_store)
    ref = nb.put(np.zeros(1000))
    assert nb.get(ref, timeout=30).sum() == 0
    assert _segments(small_store) == before


def test_get_is_a_zero_copy_read_only_view(small_store: nb.ClusterInfo) -> None:
    arr = np.random.default_rng(0).random(25 * MB // 8)  # 25 MB
    ref = nb.put(arr)
    assert len(_segments(small_store)) == 1
    t0 = time.perf_counter()
    got = nb.get(ref, timeout=30)
    t_get = time.perf_counter() - t0
    t0 = time.perf_counter()
    arr.copy()
    t_copy = time.perf_counter() - t0
    assert np.array_equal(got, arr)
    assert not got.flags.writeable
    # The array's memory is the shared segment (mapping, not copying: far faster than a copy).
    base = got
    while getattr(base, "base", None) is not None:
        base = base.base
    assert "mmap" in type(base).__name__ or isinstance(base, memoryview)
    assert t_get < max(t_copy, 0.005) * 2


def test_task_result_is_stored_once_and_shared(small_store: nb.ClusterInfo) -> None:
    @nb.remote
    def produce(n: int) -> object:
        return np.arange(n, dtype=np.float64)

    @nb.remote
    def total(a: object) -> float:
        return float(a.sum())  # type: ignore[attr-defined]

    ref = produce.remote(5 * MB)  # 40 MB
    assert nb.get(total.remote(ref), timeout=60) == float(np.arange(5 * MB).sum())
    names = [os.path.basename(p) for p in _segments(small_store)]
    assert names == [f"nbc-{nb.nodes()[0]['store_id']}-{ref.oid}"]  # written once, by the task
    assert nb.get(total.remote(ref), timeout=60) > 0
    assert len(_segments(small_store)) == 1  # passing the ref again copies nothing
    got = nb.get(ref, timeout=60)
    assert got[-1] == 5 * MB - 1 and not got.flags.writeable


def test_dropping_refs_frees_objects(small_store: nb.ClusterInfo) -> None:
    for _ in range(15):  # 15 x 100 MB through a 300 MB store
        ref = nb.put(np.ones(100 * MB // 8))
        assert nb.get(ref, timeout=30)[0] == 1
        del ref
    wait_until(lambda: _store()["objects"] == 0, timeout=10)
    assert _store()["used"] == 0 and _store()["spilled"] == 0
    assert _segments(small_store) == []


def test_freed_results_are_reused_but_never_under_a_reader(small_store: nb.ClusterInfo) -> None:
    @nb.remote
    def produce(n: int, v: float) -> object:
        return np.full(n, v)

    store_id = nb.nodes()[0]["store_id"]
    held = nb.get(produce.remote(5 * MB, 1.0), timeout=60)  # 40 MB; its ref is gone at once
    inodes = []
    for v in range(2, 6):
        ref = produce.remote(5 * MB, float(v))
        out = nb.get(ref, timeout=60)
        assert out[0] == out[-1] == v
        path = f"/dev/shm/nbc-{store_id}-{ref.oid}"
        inodes.append(os.stat(path).st_ino)
        del out, ref
        wait_until(lambda p=path: not os.path.exists(p), timeout=10)  # freed (and pooled)
    # Each result was written into the segment the one before it left (pages already there) ...
    assert len(set(inodes)) < len(inodes)
    # ... but never into the one the driver still maps.
    assert float(held.min()) == float(held.max()) == 1.0
    assert glob.glob(f"/dev/shm/nbc-{store_id}-.pool-*")


def test_a_put_right_after_dropping_a_large_ref_reuses_its_segment(
    small_store: nb.ClusterInfo,
) -> None:
    """A loop that puts an array and drops the last one: each put writes into the segment the
    one before left (its pages exist), though the drop is counted lazily (up to 0.1 s later)."""
    store_id = nb.nodes()[0]["store_id"]
    arr = np.ones(8 * MB // 8)
    ref = nb.put(arr)
    first = os.stat(f"/dev/shm/nbc-{store_id}-{ref.oid}").st_ino
    for _ in range(6):
        del ref
        ref = nb.put(arr)  # at once: the drop must reach the store before this reservation
        assert os.stat(f"/dev/shm/nbc-{store_id}-{ref.oid}").st_ino == first
    assert nb.get(ref, timeout=30).sum() == arr.size
    del ref
    wait_until(lambda: _store()["objects"] == 0, timeout=10)


def test_spilling_and_transparent_restore(small_store: nb.ClusterInfo) -> None:
    refs = [nb.put(np.full(100 * MB // 8, i, dtype=np.float64)) for i in range(5)]  # 500 MB
    # The agent reports its store once a second: wait for a report with all five.
    wait_until(lambda: _store()["objects"] == 5 and _store()["spilled"] > 0, timeout=10)
    assert _store()["used"] <= 300 * MB
    for i, ref in enumerate(refs):  # every one readable, restored as needed
        assert nb.get(ref, timeout=60)[123] == i
    del refs, ref
    wait_until(lambda: _store()["objects"] == 0, timeout=10)
    spill_dir = Path(small_store.session_dir or "") / "spill"
    assert not spill_dir.exists() or list(spill_dir.iterdir()) == []


def test_full_store_fails_put_clearly_and_survives(small_store: nb.ClusterInfo) -> None:
    keep = []
    with pytest.raises(ObjectStoreFullError) as info:  # 300 MB memory + 400 MB disk
        for _ in range(10):
            keep.append(nb.put(np.ones(100 * MB // 8)))
    assert len(keep) >= 3  # at least 300 MB fitted before the store said no
    msg = str(info.value)
    assert "capacity" in msg and "disk limit" in msg
    # The node lives on: small values, and big ones once there is room again.
    assert nb.get(nb.put(b"small"), timeout=30) == b"small"
    del keep
    spill = Path(small_store.session_dir or "") / "spill"
    wait_until(  # freed: no segment in memory, nothing spilled
        lambda: _segments(small_store) == [] and not any(spill.glob("*")), timeout=10
    )
    assert nb.get(nb.put(np.ones(100 * MB // 8)), timeout=30)[0] == 1


def test_task_result_too_big_is_a_task_error(small_store: nb.ClusterInfo) -> None:
    @nb.remote
    def huge() -> object:
        return np.ones(800 * MB // 8)

    with pytest.raises(TaskError, match="ObjectStoreFullError"):
        nb.get(huge.remote(), timeout=120)


def test_nodes_report_the_store(small_store: nb.ClusterInfo) -> None:
    stats = _store()
    assert set(stats) >= {"capacity", "used", "spilled", "objects"}
    assert stats["capacity"] == 300 * MB
    ref = nb.put(np.ones(10 * MB // 8))
    wait_until(lambda: _store()["used"] >= 10 * MB, timeout=10)
    del ref


def test_refs_nested_in_arguments_are_freed_unless_kept(small_store: nb.ClusterInfo) -> None:
    @nb.remote
    def first_sum(refs: list[nb.ObjectRef]) -> float:
        return float(nb.get(refs[0], timeout=30).sum())  # a nested ref arrives as a ref

    for i in range(8):  # 8 x 100 MB through a 300 MB store: each freed after its task
        ref = nb.put(np.full(100 * MB // 8, i, dtype=np.float64))
        assert nb.get(first_sum.remote([ref]), timeout=60) == i * (100 * MB // 8)
        del ref
    wait_until(lambda: _store()["objects"] == 0, timeout=10)


def test_refs_kept_by_the_callee_stay_alive(small_store: nb.ClusterInfo) -> None:
    @nb.remote
    class Holder:
        def __init__(self) -> None:
            self.refs: list[nb.ObjectRef] = []

        def keep(self, refs: list[nb.ObjectRef]) -> None:
            self.refs.extend(refs)

        def total(self) -> float:
            return float(sum(nb.get(r, timeout=30).sum() for r in self.refs))

    @nb.remote
    def echo(refs: list[nb.ObjectRef]) -> list[nb.ObjectRef]:
        return refs

    holder = Holder.remote()
    kept = nb.put(np.ones(1000 * 1000))
    nb.get(holder.keep.remote([kept]), timeout=30)
    returned = nb.put(np.full(1000, 2.0))
    back = nb.get(echo.remote([returned]), timeout=30)
    inner = nb.put(np.full(10, 3.0))
    outer = nb.put([inner])
    del kept, returned, inner
    assert nb.get(holder.total.remote(), timeout=30) == 1000 * 1000
    assert nb.get(back[0], timeout=30).sum() == 2000
    assert nb.get(nb.get(outer, timeout=30)[0], timeout=30).sum() == 30


def test_object_kept_by_an_actor_is_freed_when_it_lets_go(small_store: nb.ClusterInfo) -> None:
    @nb.remote
    class Cache:
        def __init__(self) -> None:
            self.refs: list[nb.ObjectRef] = []

        def keep(self, refs: list[nb.ObjectRef]) -> int:
            self.refs.extend(refs)
            return len(self.refs)

        def total(self) -> float:
            return float(sum(nb.get(r, timeout=30).sum() for r in self.refs))

        def clear(self) -> None:
            self.refs.clear()

    cache = Cache.remote()
    before = set(_segments(small_store))
    ref = nb.put(np.ones(50 * MB // 8))
    (segment,) = set(_segments(small_store)) - before
    assert nb.get(cache.keep.remote([ref]), timeout=30) == 1
    del ref  # the actor still holds it: the object stays
    assert nb.get(cache.total.remote(), timeout=30) == 50 * MB // 8
    assert os.path.exists(segment)  # still stored
    nb.get(cache.clear.remote(), timeout=30)  # the actor lets go: the owner frees it
    wait_until(lambda: not os.path.exists(segment), timeout=10)


def test_refs_inside_a_put_value_live_as_long_as_it(small_store: nb.ClusterInfo) -> None:
    before = set(_segments(small_store))
    inner = nb.put(np.ones(20 * MB // 8))
    (segment,) = set(_segments(small_store)) - before
    outer = nb.put({"weights": inner})
    del inner
    assert os.path.exists(segment)  # held by the outer value
    got = nb.get(nb.get(outer, timeout=30)["weights"], timeout=30)
    assert got.sum() == 20 * MB // 8
    del got, outer
    wait_until(lambda: not os.path.exists(segment), timeout=10)


def test_large_arguments_go_through_the_store(small_store: nb.ClusterInfo) -> None:
    @nb.remote
    def shape_and_sum(a: object, scale: float) -> tuple[int, float, bool]:
        return len(a), float(a.sum()) * scale, bool(a.flags.writeable)  # type: ignore[attr-defined]

    before = set(_segments(small_store))
    arr = np.ones(20 * MB // 8)
    ref = shape_and_sum.remote(arr, 2.0)
    arr[:] = 0  # captured at call time
    assert nb.get(ref, timeout=60) == (20 * MB // 8, 2.0 * 20 * MB // 8, False)
    wait_until(lambda: set(_segments(small_store)) <= before, timeout=10)  # freed after the task


def test_nothing_left_after_shutdown_or_a_killed_driver(tmp_path: Path) -> None:
    nb.shutdown()
    info = nb.init(num_cpus=1)
    store_id = nb.nodes()[0]["store_id"]
    ref = nb.put(np.ones(10 * MB // 8))
    assert glob.glob(f"/dev/shm/nbc-{store_id}-*")
    del ref
    nb.shutdown()
    assert glob.glob(f"/dev/shm/nbc-{store_id}-*") == []
    assert not Path(info.session_dir or "").exists()

    code = (
        "import nbcluster as nb, numpy as np, psutil, time\n"
        "nb.init(num_cpus=1)\n"
        "r = nb.put(np.ones(2_000_000))\n"
        "print(nb.nodes()[0]['store_id'], *[p.pid for p in psutil.Process().children(True)],"
        " flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert proc.stdout is not None
        store_id, *pids = proc.stdout.readline().split()
        assert glob.glob(f"/dev/shm/nbc-{store_id}-*")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        wait_until(lambda: all_gone([int(p) for p in pids]), timeout=15)
        assert glob.glob(f"/dev/shm/nbc-{store_id}-*") == []
    finally:
        if proc.poll() is None:
            proc.kill()
        if proc.stdout is not None:
            proc.stdout.close()
