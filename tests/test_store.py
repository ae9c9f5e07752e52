"""The node-local shared-memory object store (library level: no cluster processes)."""

from __future__ import annotations

import gc
import glob
import mmap
import os
import pickle
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nbcluster.exceptions import NbclusterError
from nbcluster.store import (
    SHM_DIR,
    ObjectNotFoundError,
    ObjectStoreError,
    ObjectStoreFullError,
    StoreManager,
    cleanup_store,
    default_capacity,
    dumps_oob,
    get_local,
    map_segment,
    put_local,
    segment_frames,
    segment_name,
    segment_size,
    write_segment,
)

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not os.path.isdir(SHM_DIR), reason="needs /dev/shm (Linux)"),
]

MB = 1 << 20


def shm_free() -> int:
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


def unpooled(stats: dict[str, int]) -> dict[str, int]:
    """``stats`` without ``pooled`` (freed segments kept for reuse), checked to be in bounds."""
    out = dict(stats)
    assert 0 <= out.pop("pooled") <= out["capacity"] // 4
    return out


def leftovers(store_id: str, spill_dir: Path) -> list[str]:
    pattern = f"nbc-{store_id}-*"
    return glob.glob(os.path.join(SHM_DIR, pattern)) + glob.glob(str(spill_dir / pattern))


@pytest.fixture
def store_id() -> str:
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def spill_dir(tmp_path: Path) -> Path:
    return tmp_path / "spill"


@pytest.fixture
def make_store(store_id: str, spill_dir: Path) -> Iterator[Any]:
    """Build stores for a test; afterwards clean up and assert nothing of them remains."""
    made: list[StoreManager] = []

    def make(capacity: int, disk_limit: int | None = None) -> StoreManager:
        m = StoreManager(store_id, capacity, spill_dir, disk_limit_bytes=disk_limit)
        made.append(m)
        return m

    yield make
    gc.collect()  # drop mappings held by test locals' garbage
    for m in made:
        m.cleanup()
    assert leftovers(store_id, spill_dir) == []


def mapping_of(arr: np.ndarray[Any, Any]) -> object:
    """Follow ``arr``'s base chain down to the object that owns the memory."""
    obj: object = arr
    while isinstance(obj, np.ndarray | memoryview):
        obj = obj.base if isinstance(obj, np.ndarray) else obj.obj
    return obj


def test_roundtrip_assorted_values(make_store: Any) -> None:
    store = make_store(256 * MB)
    arr = np.arange(1_000_000, dtype=np.float64).reshape(1000, 1000)
    values: dict[str, Any] = {
        "int": 42,
        "str": "héllo" * 10_000,
        "bytes": os.urandom(300_000),
        "none": None,
        "nested": {"a": [1, 2.5, (3, "x")], "b": {4, 5}},
        "fn": lambda x: x + 1,
        "arr": arr,
        "fortran": np.asfortranarray(arr[:100, :50]),
        "noncontig": arr[::2, ::3],
        "empty": np.empty((0, 3), dtype=np.int32),
        "structured": np.zeros(10, dtype=[("a", "i4"), ("b", "f8")]),
        "mixed": [arr[:10], {"k": np.ones(5, dtype=np.uint8)}, "tail"],
    }
    for name, value in values.items():
        put_local(store, name, value)
    assert store.stats()["objects"] == len(values)

    for name in ("int", "str", "bytes", "none", "nested"):
        assert get_local(store, name) == values[name]
    assert get_local(store, "fn")(1) == 2
    for name in ("arr", "fortran", "noncontig", "empty", "structured"):
        got = get_local(store, name)
        np.testing.assert_array_equal(got, values[name])
        assert got.dtype == values[name].dtype and got.shape == values[name].shape
    mixed = get_local(store, "mixed")
    np.testing.assert_array_equal(mixed[0], arr[:10])
    np.testing.assert_array_equal(mixed[1]["k"], np.ones(5, dtype=np.uint8))
    assert mixed[2] == "tail"

    # Contiguous arrays come back read-only, backed by the mapping, and 64-byte aligned.
    a1, a2 = get_local(store, "arr"), get_local(store, "arr")
    assert a1.flags.writeable is False
    with pytest.raises(ValueError):
        a1[0, 0] = 1.0
    assert isinstance(mapping_of(a1), mmap.mmap)
    assert a1.ctypes.data % 64 == 0
    assert np.shares_memory(a1, a1[10:]) and not np.shares_memory(a1, arr)
    assert get_local(store, "fortran").flags.f_contiguous
    del a1, a2

    for name in values:
        assert store.free(name)
    assert not store.free("int")
    assert unpooled(store.stats()) == {"capacity": 256 * MB, "used": 0, "spilled": 0, "objects": 0}


def test_segment_layout_and_errors(tmp_path: Path) -> None:
    frames = dumps_oob({"a": np.arange(10, dtype=np.int16), "b": np.arange(3.0)})
    assert len(frames) == 3 and isinstance(frames[1], pickle.PickleBuffer)  # not copied yet
    path = str(tmp_path / "seg")
    size = write_segment(path, frames)
    assert size == segment_size(frames) == os.path.getsize(path) and size % 64 == 0
    got = map_segment(path)
    assert [f.nbytes for f in got] == [memoryview(frames[0]).nbytes, 20, 24]
    assert all(f.readonly for f in got)
    # The same bytes parse from any buffer (for instance received from another node).
    data = Path(path).read_bytes()
    assert [bytes(f) for f in segment_frames(data)] == [bytes(f) for f in got]
    with pytest.raises(FileExistsError):
        write_segment(path, frames)
    with pytest.raises(ObjectStoreError, match="not an object store segment"):
        segment_frames(b"x" * 64)
    with pytest.raises(ObjectStoreError, match="out of bounds"):
        segment_frames(data[:100])
    with pytest.raises(ValueError):
        segment_name("a-b", "x")
    with pytest.raises(ValueError):
        segment_name("a", "../x")


def test_zero_copy_get_is_much_faster_than_copy(make_store: Any) -> None:
    size = 200 * MB
    if shm_free() < 3 * size:
        pytest.skip("/dev/shm is too small")
    store = make_store(2 * size)
    arr = np.random.default_rng(0).random(size // 8)
    put_local(store, "big", arr)

    arr.copy()  # warm the allocator so the copy is timed at its best
    t0 = time.perf_counter()
    copy = arr.copy()
    copy_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = get_local(store, "big")
    get_s = time.perf_counter() - t0

    assert get_s < 0.5 * copy_s, (get_s, copy_s)
    assert isinstance(mapping_of(got), mmap.mmap) and got.flags.writeable is False
    assert np.array_equal(got[:1000], copy[:1000]) and got[-1] == arr[-1]
    del got, copy


def test_pinning_follows_the_mapping(make_store: Any) -> None:
    store = make_store(64 * MB)
    put_local(store, "x", np.ones(MB))
    got = get_local(store, "x")
    assert store._entries["x"].pins == 1
    del got
    gc.collect()
    assert store._entries["x"].pins == 0
    # Values without out-of-band buffers release the mapping right after loading.
    put_local(store, "s", "s" * 200_000)
    assert get_local(store, "s") == "s" * 200_000
    gc.collect()
    assert store._entries["s"].pins == 0


def test_capacity_and_lru_spilling(make_store: Any, spill_dir: Path) -> None:
    store = make_store(50 * MB)
    arrays = [np.full(20 * MB // 8, i, dtype=np.float64) for i in range(5)]
    sizes = [put_local(store, f"o{i}", a) for i, a in enumerate(arrays)]
    s = store.stats()
    assert s["objects"] == 5 and s["capacity"] == 50 * MB
    assert s["used"] <= 50 * MB and s["used"] == 2 * sizes[0]  # the two newest stay
    assert s["spilled"] == 3 * sizes[0]
    assert len(list(spill_dir.glob("nbc-*"))) == 3
    # Least recently used first: o0..o2 went to disk, in that order.
    assert not os.path.exists(store.shm_path("o0")) and os.path.exists(store.spill_path("o0"))
    assert os.path.exists(store.shm_path("o4"))

    # Every value reads back: restored transparently, spilling others to make room.
    for i, a in enumerate(arrays):
        got = get_local(store, f"o{i}")
        assert got[0] == i and got[-1] == i and np.array_equal(got, a)
        assert store.locate(f"o{i}") == store.shm_path(f"o{i}")
        del got
        gc.collect()
        assert store.stats()["used"] <= 50 * MB
    s = store.stats()
    assert s["used"] + s["spilled"] == 5 * sizes[0]

    for i in range(5):
        store.free(f"o{i}")
    assert list(spill_dir.glob("nbc-*")) == []
    assert unpooled(store.stats()) == {"capacity": 50 * MB, "used": 0, "spilled": 0, "objects": 0}


def test_pinned_objects_stay_and_overflow_goes_to_disk(make_store: Any, spill_dir: Path) -> None:
    store = make_store(30 * MB)
    put_local(store, "a", np.zeros(10 * MB // 8))
    put_local(store, "b", np.ones(10 * MB // 8))
    held = [get_local(store, "a"), get_local(store, "b")]  # both pinned
    # No unpinned victim can make room: the new object goes straight to disk.
    put_local(store, "c", np.full(15 * MB // 8, 2.0))
    assert store.locate("c").startswith(str(spill_dir))
    assert os.path.exists(store.shm_path("a")) and os.path.exists(store.shm_path("b"))
    got = get_local(store, "c")  # served from the spill file, still zero-copy
    assert got[0] == 2.0 and isinstance(mapping_of(got), mmap.mmap)
    del got, held
    gc.collect()
    # Once unpinned, a read restores it, spilling the least recently used.
    assert store.locate("c") == store.shm_path("c")
    assert not os.path.exists(store.shm_path("a"))
    assert np.array_equal(get_local(store, "a"), np.zeros(10 * MB // 8))


def test_full_store_raises_clear_error_and_leaks_nothing(
    make_store: Any, store_id: str, spill_dir: Path
) -> None:
    store = make_store(10 * MB, disk_limit=10 * MB)
    n = 0
    with pytest.raises(ObjectStoreFullError) as info:
        while n < 100:
            put_local(store, f"o{n}", np.zeros(3 * MB // 8))
            n += 1
    assert 5 <= n <= 6  # three in memory, three on disk (minus header slack)
    err = info.value
    assert isinstance(err, NbclusterError)
    msg = str(err)
    for number in (10 * MB, err.requested, err.used, err.spilled):
        assert str(number) in msg
    assert "capacity" in msg and "disk limit" in msg and f"o{n}" in msg
    assert err.capacity == 10 * MB and err.disk_limit == 10 * MB
    # The failed put left no file and no reservation; the others are intact.
    assert not store.contains(f"o{n}")
    assert len(leftovers(store_id, spill_dir)) == n == store.stats()["objects"]
    assert pickle.loads(pickle.dumps(err)).requested == err.requested
    # An object bigger than memory and disk together fails outright.
    with pytest.raises(ObjectStoreFullError):
        store.reserve("huge", 25 * MB)
    for i in range(n):
        assert float(get_local(store, f"o{i}")[0]) == 0.0
        gc.collect()


def test_put_free_loop_keeps_memory_bounded(make_store: Any) -> None:
    if shm_free() < 400 * MB:
        pytest.skip("/dev/shm is too small")
    store = make_store(300 * MB)
    arr = np.ones(100 * MB // 8)
    for i in range(20):
        put_local(store, f"o{i}", arr)
        got = get_local(store, f"o{i}")
        assert got[-1] == 1.0
        del got
        assert store.free(f"o{i}")
        assert store.stats()["used"] == 0
    assert unpooled(store.stats()) == {"capacity": 300 * MB, "used": 0, "spilled": 0, "objects": 0}


def test_manager_rejects_misuse(make_store: Any) -> None:
    store = make_store(MB)
    with pytest.raises(ObjectNotFoundError, match="not in the object store"):
        store.locate("nope")
    path = store.reserve("x", 1000)
    with pytest.raises(ObjectStoreError, match="not sealed"):
        store.locate("x")
    with pytest.raises(ObjectStoreError, match="never written"):
        store.seal("x")
    with pytest.raises(ValueError, match="already in the store"):
        store.reserve("x", 10)
    write_segment(path, [b"abc"])
    store.seal("x")
    assert store.stats()["used"] == os.path.getsize(path) < 1000  # shrunk to the real size
    with pytest.raises(ObjectStoreError, match="already sealed"):
        store.seal("x")
    store.unpin("x")  # unbalanced unpin is harmless
    assert store.free("x") and not os.path.exists(path)


def test_cleanup_removes_everything(store_id: str, spill_dir: Path) -> None:
    store = StoreManager(store_id, 20 * MB, spill_dir)
    for i in range(4):
        put_local(store, f"o{i}", np.zeros(8 * MB // 8))
    store.reserve("unsealed", MB)  # reserved but never written
    Path(store.shm_path("stray")).write_bytes(b"x")  # a file the books do not know
    assert len(leftovers(store_id, spill_dir)) == 5
    assert store.cleanup() == 5
    assert leftovers(store_id, spill_dir) == []
    assert store.stats()["objects"] == 0

    # cleanup_store needs only the id, e.g. in a parent after the store's process died.
    with StoreManager(store_id, 20 * MB, spill_dir) as again:
        for i in range(4):
            put_local(again, f"o{i}", np.zeros(8 * MB // 8))
        assert cleanup_store(store_id, str(spill_dir)) == 4
        assert leftovers(store_id, spill_dir) == []


def test_default_spill_dir_is_removed(store_id: str) -> None:
    store = StoreManager(store_id, 2 * MB)
    put_local(store, "a", np.zeros(MB // 8 + 1000))
    put_local(store, "b", np.zeros(MB // 8 + 1000))  # spills a
    assert os.path.isdir(store.spill_dir) and store.stats()["spilled"] > 0
    assert cleanup_store(store_id) == 2
    assert not os.path.exists(store.spill_dir)
    assert glob.glob(os.path.join(SHM_DIR, f"nbc-{store_id}-*")) == []


def test_cleanup_after_sigkilled_writer(store_id: str, spill_dir: Path) -> None:
    """A child writes a segment (and starts another) then is SIGKILLed; the parent cleans up."""
    code = f"""
import os, sys, numpy as np
from nbcluster.store import StoreManager, put_local
m = StoreManager({store_id!r}, 64 << 20, {str(spill_dir)!r})
put_local(m, "done", np.ones(1 << 20))
m.reserve("partial", 1 << 20)
open(m.shm_path("partial"), "wb").write(b"half")
print("ready", flush=True)
sys.stdin.read()
"""
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        assert len(leftovers(store_id, spill_dir)) == 2
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert len(leftovers(store_id, spill_dir)) == 2  # the files outlive the writer...
    assert cleanup_store(store_id, str(spill_dir)) == 2  # ...until the owner cleans up
    assert leftovers(store_id, spill_dir) == []


def test_default_capacity() -> None:
    cap = default_capacity()
    phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < cap <= 0.3 * phys and cap <= shm_free() + MB
