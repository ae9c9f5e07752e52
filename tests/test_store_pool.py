"""Freed segments reused for new objects: only when nobody maps them, and within the capacity."""

from __future__ import annotations

import gc
import glob
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nbcluster.store import SHM_DIR, StoreManager, get_local, open_segment, put_local
from nbcluster.store.pool import MAX_POOLED, MIN_POOLED

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not os.path.isdir(SHM_DIR), reason="needs /dev/shm (Linux)"),
]

MB = 1 << 20


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StoreManager]:
    store_id = "p" + uuid.uuid4().hex[:12]
    m = StoreManager(store_id, 256 * MB, tmp_path / "spill")
    yield m
    gc.collect()
    m.cleanup()
    assert glob.glob(os.path.join(SHM_DIR, f"nbc-{store_id}-*")) == []


def test_a_freed_segment_is_reused_in_place(store: StoreManager) -> None:
    put_local(store, "a", np.full(4 * MB // 8, 1.0))
    ino = os.stat(store.shm_path("a")).st_ino
    assert store.free("a")
    assert not os.path.exists(store.shm_path("a"))
    assert store.stats()["pooled"] > 4 * MB and store.stats()["used"] == 0
    # A similar size takes the same file (its pages already allocated) and the right contents.
    put_local(store, "b", np.full(3 * MB // 8, 2.0))
    assert os.stat(store.shm_path("b")).st_ino == ino
    assert store.stats()["pooled"] == 0
    got = get_local(store, "b")
    assert got.shape == (3 * MB // 8,) and float(got.min()) == float(got.max()) == 2.0
    assert os.path.getsize(store.shm_path("b")) == store.stats()["used"]  # truncated to size


def test_a_mapped_segment_is_never_reused(store: StoreManager) -> None:
    put_local(store, "a", np.full(4 * MB // 8, 1.0))
    held = get_local(store, "a")  # a reader still maps it: its pages are not the store's
    assert store.free("a")
    assert store.stats()["pooled"] == 0
    put_local(store, "b", np.full(4 * MB // 8, 2.0))
    assert float(held.min()) == float(held.max()) == 1.0
    del held
    gc.collect()
    # Once the reader is gone, frees pool again.
    assert store.free("b")
    assert store.stats()["pooled"] > 0


def test_a_reader_racing_the_free_finds_it_gone(store: StoreManager) -> None:
    put_local(store, "a", np.ones(2 * MB // 8))
    path = store.shm_path("a")
    fd = os.open(path, os.O_RDONLY)  # a reader that opened it just before the free
    try:
        store.free("a")
        pooled = glob.glob(os.path.join(SHM_DIR, f"nbc-{store.store_id}-.pool-*"))
        assert len(pooled) == 1
        # The pooled file is locked: nobody can map it as a segment.
        with pytest.raises(FileNotFoundError):
            open_segment(pooled[0])
    finally:
        os.close(fd)
    with pytest.raises(FileNotFoundError):
        open_segment(path)


def test_of_equal_fits_the_most_recently_freed_segment_is_taken(store: StoreManager) -> None:
    # A writer keeps mappings of what it wrote last: it should get that file back.
    for name in ("a", "b", "c"):
        put_local(store, name, np.ones(2 * MB // 8))
    inodes = {n: os.stat(store.shm_path(n)).st_ino for n in ("a", "b", "c")}
    for name in ("b", "c", "a"):
        store.free(name)
    put_local(store, "d", np.ones(2 * MB // 8))
    assert os.stat(store.shm_path("d")).st_ino == inodes["a"]
    put_local(store, "e", np.ones(2 * MB // 8))
    assert os.stat(store.shm_path("e")).st_ino == inodes["c"]


def test_small_segments_are_not_pooled_and_the_pool_is_bounded(store: StoreManager) -> None:
    put_local(store, "small", np.ones(MIN_POOLED // 16))
    store.free("small")
    assert store.stats()["pooled"] == 0
    for i in range(MAX_POOLED + 3):
        put_local(store, f"o{i}", np.ones(MB // 8 + 1000 * i))
    for i in range(MAX_POOLED + 3):
        store.free(f"o{i}")
    files = glob.glob(os.path.join(SHM_DIR, f"nbc-{store.store_id}-.pool-*"))
    assert len(files) == MAX_POOLED
    assert store.stats()["pooled"] == sum(os.path.getsize(f) for f in files)
    assert store.stats()["pooled"] <= store.capacity // 4


def test_pooled_segments_give_way_before_anything_spills(tmp_path: Path) -> None:
    m = StoreManager("q" + uuid.uuid4().hex[:12], 40 * MB, tmp_path / "spill")
    try:
        put_local(m, "keep", np.ones(20 * MB // 8))
        put_local(m, "gone", np.ones(8 * MB // 8))
        m.free("gone")
        assert m.stats()["pooled"] > 8 * MB
        # 19 MB more fits only if the pooled 8 MB goes (it is too small to be reused for it).
        put_local(m, "new", np.ones(19 * MB // 8))
        stats: dict[str, Any] = m.stats()
        assert stats["pooled"] == 0 and stats["spilled"] == 0 and stats["objects"] == 2
    finally:
        m.cleanup()


def test_a_writer_copies_into_its_kept_mapping_of_a_reused_segment(store: StoreManager) -> None:
    from nbcluster.store import dumps_oob, loads_frames, map_segment, segment_size
    from nbcluster.store.writer import SegmentWriter

    w = SegmentWriter(keep=1)
    inodes = set()
    try:
        for i, n in enumerate([4 * MB, 4 * MB, 3 * MB, 4 * MB, 4 * MB]):
            frames = dumps_oob(np.full(n // 8, float(i)))
            path, reused = store.reserve_segment(f"o{i}", segment_size(frames))
            assert reused == (i > 0)
            w.write(path, frames, reused)
            store.seal(f"o{i}")
            inodes.add(os.stat(path).st_ino)
            got = loads_frames(map_segment(path))
            assert got.shape == (n // 8,) and float(got.min()) == float(got.max()) == float(i)
            del got
            gc.collect()
            store.free(f"o{i}")
        assert len(inodes) == 1  # one file throughout, shrunk and grown (grown: pwrite)
        assert len(w._maps) == 1
        # A kept mapping of a file that is gone is dropped, not kept holding its pages.
        for path in store._pool.close():
            os.unlink(path)
        small = dumps_oob(b"x" * 100)
        w.write(store.reserve("small", segment_size(small)), small, False)
        assert len(w._maps) == 0
    finally:
        w.close()
