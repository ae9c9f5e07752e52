"""The accounting side of a node's object store: capacity, LRU spilling, restore, cleanup.

A :class:`StoreManager` lives in the node agent. It decides *where* an object's segment goes and
keeps the books; writers and readers (workers, drivers on this node) do the copying and mapping
themselves (:mod:`nbcluster.store.segment`). It has no sockets and no clocks: each method is one
event and returns its result, so the agent can serve requests from its loop and tests can drive
it directly.

Lifecycle of an object::

    reserve(oid, size) -> path     # memory (or disk) set aside; the writer creates the file
    seal(oid)                      # written; immutable from now on; may be spilled when unpinned
    locate(oid, pin=True) -> path  # a reader maps it (restored from disk first if spilled)
    unpin(oid)                     # that reader's mapping is gone
    free(oid)                      # no reference left anywhere: the file is unlinked

Pinning policy: a pinned object (some reader has it mapped) is never spilled or restored. On Linux
spilling a mapped segment would be *safe* (an unlinked tmpfs file stays valid for whoever mapped
it), but its memory would not be released until the last reader unmaps it, so the store would
believe it has room it does not have. Keeping pinned objects in place keeps ``used`` equal to the
shared memory actually held. When memory is all pinned, new objects go straight to the spill
directory and spilled objects are served from there (still mapped, zero-copy, through the page
cache), so a put only fails when memory *and* disk are exhausted.

``free`` of a pinned object unlinks it at once and stops counting it; readers keep their views
(Linux keeps the pages until they unmap), exactly as a value outlives the dropped ref that
produced it.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import heapq
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from nbcluster._private_fs import (
    UnsafePathError,
    open_private_dir,
    open_private_file,
    user_dir,
    user_dir_path,
)
from nbcluster.store import orphans
from nbcluster.store.errors import (
    ObjectExistsError,
    ObjectNotFoundError,
    ObjectStoreError,
    ObjectStoreFullError,
)
from nbcluster.store.pool import SegmentPool
from nbcluster.store.segment import (
    IO_CHUNK,
    SHM_DIR,
    segment_name,
    validate_oid,
    validate_store_id,
)

__all__ = ["StoreManager", "cleanup_store", "default_capacity", "default_spill_dir"]


def default_capacity(fraction: float = 0.3, shm_dir: str = SHM_DIR) -> int:
    """The default store capacity: ``fraction`` of physical memory, capped by free ``shm_dir``.

    Parameters
    ----------
    fraction
        Share of physical memory (0.3, as in Ray).
    shm_dir
        The tmpfs that will hold segments; its free space is a hard limit (writing beyond it
        fails with ``ENOSPC`` whatever the store believes).

    Returns
    -------
    int
        Capacity in bytes.
    """
    phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    st = os.statvfs(shm_dir)
    return int(min(phys * fraction, st.f_bavail * st.f_frsize))


def default_spill_dir(store_id: str) -> str:
    """Where a store spills when not told otherwise: ``<tmpdir>/nbcluster-<uid>/spill-<store_id>``.

    Inside the current user's private folder (:func:`nbcluster._private_fs.user_dir`, checked
    before use), not directly in the shared temporary directory.
    """
    return os.path.join(user_dir_path(), f"spill-{validate_store_id(store_id)}")


def cleanup_store(store_id: str, spill_dir: str | None = None, shm_dir: str = SHM_DIR) -> int:
    """Remove every segment and spill file of ``store_id``; safe to call after a crash.

    Meant for the process that owns a node's store (or its parent, once the owner died): it
    needs no :class:`StoreManager`, only the store id, and also removes files of writers that
    were killed mid-write.

    Parameters
    ----------
    store_id
        The store's id.
    spill_dir
        Its spill directory; ``None`` means :func:`default_spill_dir`, which is then removed
        too if empty.
    shm_dir
        Where its segments live.

    Returns
    -------
    int
        How many files were removed.
    """
    pattern = f"nbc-{validate_store_id(store_id)}-*"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(orphans.owner_path(store_id, shm_dir))
    default_dir = default_spill_dir(store_id)
    dirs = [shm_dir, spill_dir or default_dir]
    removed = 0
    for d in dirs:
        for path in glob.glob(os.path.join(glob.escape(d), pattern)):
            try:
                os.unlink(path)
                removed += 1
            except FileNotFoundError:
                pass
    if spill_dir is None or os.path.abspath(spill_dir) == default_dir:
        try:
            os.rmdir(default_dir)
        except OSError:  # absent, or holds someone else's files
            pass
    return removed


@dataclass
class _Entry:
    size: int
    sealed: bool = False
    on_disk: bool = False
    pins: int = 0


class StoreManager:
    """Books of one node's shared-memory object store.

    Parameters
    ----------
    store_id
        Unique per node and cluster session (letters, digits, ``_``): every file is named
        ``nbc-<store_id>-<oid>``, so :func:`cleanup_store` can find them all.
    capacity_bytes
        Shared memory the store may use (see :func:`default_capacity`).
    spill_dir
        Directory for spilled objects (created on first use, mode 0700); ``None`` means
        :func:`default_spill_dir`. It must be private to this user (not a symbolic link, owned
        by us, no group/other permission bits): it is opened once and checked, and spill files
        are created and read relative to that descriptor.
    disk_limit_bytes
        Most bytes to spill; ``None`` means bounded only by the disk's free space.
    shm_dir
        Where segments live (``/dev/shm``; tests and non-Linux hosts may pass another tmpfs).

    Notes
    -----
    Methods take an internal lock, so a reader's mapping finalizer (which may run on any thread)
    can call :meth:`unpin`; the manager is otherwise meant for one thread (the agent's loop).
    Spilling and restoring copy files synchronously; an agent should run them off its loop.
    """

    def __init__(
        self,
        store_id: str,
        capacity_bytes: int,
        spill_dir: str | os.PathLike[str] | None = None,
        disk_limit_bytes: int | None = None,
        shm_dir: str = SHM_DIR,
    ) -> None:
        if capacity_bytes < 0 or (disk_limit_bytes is not None and disk_limit_bytes < 0):
            raise ValueError("store limits must not be negative")
        if not os.path.isdir(shm_dir):
            raise ObjectStoreError(f"shared-memory directory {shm_dir} does not exist")
        self.store_id = validate_store_id(store_id)
        self.capacity = int(capacity_bytes)
        self.disk_limit = disk_limit_bytes
        self.shm_dir = shm_dir
        self.spill_dir = os.path.abspath(
            os.fspath(spill_dir) if spill_dir is not None else default_spill_dir(store_id)
        )
        self._entries: dict[str, _Entry] = {}
        # Sealed objects in memory, least recently used first (pinned ones stay, and are skipped).
        self._lru: OrderedDict[str, None] = OrderedDict()
        self._used = 0
        self._spilled = 0
        # The checked spill directory: files in it are created and opened relative to this.
        self._spill_fd = _open_spill_dir(self.spill_dir, default=spill_dir is None)
        self._lock = threading.RLock()
        # Freed segments whose pages a new object can reuse (a quarter of the capacity at most).
        self._pool = SegmentPool(shm_dir, f"nbc-{self.store_id}-", self.capacity // 4)
        # Held while we live: an agent started after our death finds and removes our files.
        self._owner_fd = orphans.claim(self.store_id, shm_dir)

    # ------------------------------------------------------------------ paths
    def shm_path(self, oid: str) -> str:
        """Where ``oid``'s segment lives in shared memory."""
        return os.path.join(self.shm_dir, segment_name(self.store_id, oid))

    def spill_path(self, oid: str) -> str:
        """Where ``oid``'s segment lives once spilled."""
        return os.path.join(self.spill_dir, segment_name(self.store_id, oid))

    def _path(self, oid: str, e: _Entry) -> str:
        return self.spill_path(oid) if e.on_disk else self.shm_path(oid)

    # ------------------------------------------------------------------ events
    def reserve(self, oid: str, size: int) -> str:
        """Set aside ``size`` bytes for a new object and say where to create its file.

        Memory first, spilling least-recently-used unpinned sealed objects to make room; if
        memory cannot be freed (the object exceeds the capacity, or what is left is pinned), the
        object is placed on the spill disk directly.

        Parameters
        ----------
        oid
            The new object's id (must not be in the store).
        size
            Its segment size (:func:`~nbcluster.store.segment.segment_size`).

        Returns
        -------
        str
            The path to create the segment at; then call :meth:`seal` (or :meth:`free` if the
            write failed).

        Raises
        ------
        ObjectStoreFullError
            If neither memory nor disk can take ``size`` bytes; nothing was spilled.
        ObjectExistsError
            If ``oid`` is already in the store.
        ValueError
            If ``size`` is negative.
        """
        return self._reserve(oid, size, False)[0]

    def reserve_segment(self, oid: str, size: int) -> tuple[str, bool]:
        """Like :meth:`reserve`, but the file may be a freed segment handed over for reuse.

        Returns
        -------
        tuple
            ``(path, reused)``: if ``reused``, the file exists already (its pages allocated,
            truncated to ``size``) and the writer overwrites it
            (:func:`~nbcluster.store.segment.write_segment` with ``reuse=True``); else it
            creates it.
        """
        return self._reserve(oid, size, True)

    def _reserve(self, oid: str, size: int, reuse: bool) -> tuple[str, bool]:
        validate_oid(oid)
        if size < 0:
            raise ValueError(f"negative object size {size}")
        with self._lock:
            if oid in self._entries:
                e = self._entries[oid]
                raise ObjectExistsError(oid, e.size, e.sealed)
            path = self.shm_path(oid)
            reused = reuse and size <= self.capacity and self._pool.take(size, path)
            if self._make_room(oid, size):
                self._entries[oid] = _Entry(size)
                self._used += size
                return path, reused
            if reused:
                _unlink(path)
            if self._disk_can_take(size):
                self._entries[oid] = _Entry(size, on_disk=True)
                self._spilled += size
                return self.spill_path(oid), False
            raise self._full(oid, size)

    def seal(self, oid: str) -> None:
        """Mark ``oid`` written: it is now immutable, readable and (when unpinned) spillable.

        The reservation shrinks to the file's actual size if the writer used less.

        Raises
        ------
        ObjectNotFoundError
            If ``oid`` was not reserved.
        ObjectStoreError
            If it is already sealed, its file is missing, or larger than reserved.
        """
        with self._lock:
            e = self._get(oid)
            if e.sealed:
                raise ObjectStoreError(f"object {oid} is already sealed")
            try:
                actual = self._stat(oid, e).st_size
            except FileNotFoundError:
                raise ObjectStoreError(f"object {oid} was reserved but never written") from None
            if actual > e.size:
                raise ObjectStoreError(
                    f"object {oid} is {actual} bytes, more than the {e.size} reserved"
                )
            self._account(e, actual - e.size)
            e.size = actual
            e.sealed = True
            if not e.on_disk:
                self._lru[oid] = None

    def pin(self, oid: str) -> None:
        """Count one more reader mapping ``oid``; a pinned object is not spilled or restored.

        Raises
        ------
        ObjectNotFoundError
            If ``oid`` is not in the store.
        ObjectStoreError
            If it is not sealed yet.
        """
        with self._lock:
            e = self._sealed(oid)
            e.pins += 1
            if oid in self._lru:
                self._lru.move_to_end(oid)

    def unpin(self, oid: str) -> None:
        """One reader's mapping of ``oid`` is gone. Ignored for objects freed meanwhile."""
        with self._lock:
            e = self._entries.get(oid)
            if e is not None and e.pins > 0:
                e.pins -= 1

    def free(self, oid: str) -> bool:
        """Drop ``oid`` (sealed or not) and unlink its file (or keep it for reuse).

        Readers that still have it mapped keep valid views (Linux frees the pages when they
        unmap); the store stops counting it at once. A large segment nobody maps goes to the
        pool of segments for reuse instead (:mod:`nbcluster.store.pool`).

        Returns
        -------
        bool
            ``False`` if ``oid`` was not in the store.
        """
        found, finish = self.release(oid)
        finish()
        return found

    def release(self, oid: str) -> tuple[bool, Callable[[], None]]:
        """:meth:`free` in two steps: the books now, the slow unlinking when the caller likes.

        Returns
        -------
        tuple
            ``(found, finish)``: call ``finish()`` (off the agent's loop: unlinking a large
            file frees its pages, which takes milliseconds) to remove what is left.
        """
        with self._lock:
            e = self._entries.pop(oid, None)
            if e is None:
                return False, _nothing
            self._lru.pop(oid, None)
            self._account(e, -e.size)
            if e.on_disk:
                return True, lambda: self._unlink_spilled(oid)
            paths = self._pool.offer(self.shm_path(oid), e.size)
        return True, lambda: _unlink_all(paths)

    def locate(self, oid: str, pin: bool = False) -> str:
        """The path to map ``oid`` from, restoring it from the spill disk into memory first.

        Restoring counts against the capacity and may spill other objects. If memory cannot be
        freed for it (all pinned) or the object is pinned on disk, the spill file's path is
        returned instead: mapping it is still zero-copy, through the page cache.

        Parameters
        ----------
        oid
            A sealed object.
        pin
            Also :meth:`pin` it (atomically with locating it); the caller must :meth:`unpin`
            once its mapping is gone.

        Raises
        ------
        ObjectNotFoundError
            If ``oid`` is not in the store.
        ObjectStoreError
            If it is not sealed yet.
        """
        with self._lock:
            e = self._sealed(oid)
            if e.on_disk and e.pins == 0:
                self._restore(oid, e)
            if not e.on_disk:
                self._lru.move_to_end(oid)
            if pin:
                e.pins += 1
            return self._path(oid, e)

    def contains(self, oid: str) -> bool:
        """Whether ``oid`` is in the store (reserved or sealed)."""
        return oid in self._entries

    def stats(self) -> dict[str, int]:
        """The store's figures.

        Returns
        -------
        dict
            ``capacity`` and ``used`` (bytes of memory), ``spilled`` (bytes on disk),
            ``objects`` (count, reserved ones included) and ``pooled`` (bytes of freed
            segments kept for reuse; they give way to new objects before anything spills).
        """
        with self._lock:
            return {
                "capacity": self.capacity,
                "used": self._used,
                "spilled": self._spilled,
                "objects": len(self._entries),
                "pooled": self._pool.bytes,
            }

    def largest(self, limit: int) -> list[tuple[str, int, str, int]]:
        """The ``limit`` largest objects, largest first: ``(oid, size, state, pins)`` each.

        ``state`` is ``"writing"`` (reserved, not sealed), ``"spilled"`` (on disk) or
        ``"in_memory"``; ``pins`` counts the readers that have it mapped now.
        """
        with self._lock:
            top = heapq.nlargest(limit, self._entries.items(), key=lambda kv: kv[1].size)
            return [
                (
                    oid,
                    e.size,
                    "writing" if not e.sealed else "spilled" if e.on_disk else "in_memory",
                    e.pins,
                )
                for oid, e in top
            ]

    def cleanup(self) -> int:
        """Forget every object and remove every file of this store (see :func:`cleanup_store`).

        Returns
        -------
        int
            How many files were removed.
        """
        with self._lock:
            removed = 0
            for oid, e in self._entries.items():
                removed += self._unlink(oid, e.on_disk)
            self._entries.clear()
            self._lru.clear()
            self._used = self._spilled = 0
            for path in self._pool.close():
                removed += _unlink(path)
            removed += cleanup_store(self.store_id, self.spill_dir, self.shm_dir)
            if self._spill_fd >= 0:
                os.close(self._spill_fd)
                self._spill_fd = -1
            if self._owner_fd >= 0:
                orphans.release(self._owner_fd, self.store_id, self.shm_dir)
                self._owner_fd = -1
            return removed

    def __enter__(self) -> StoreManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # ------------------------------------------------------------------ internals
    def _get(self, oid: str) -> _Entry:
        e = self._entries.get(oid)
        if e is None:
            raise ObjectNotFoundError(oid)
        return e

    def _sealed(self, oid: str) -> _Entry:
        e = self._get(oid)
        if not e.sealed:
            raise ObjectStoreError(f"object {oid} is not sealed yet")
        return e

    def _stat(self, oid: str, e: _Entry) -> os.stat_result:
        if e.on_disk:
            name = segment_name(self.store_id, oid)
            return os.stat(name, dir_fd=self._spill_fd, follow_symlinks=False)
        return os.stat(self.shm_path(oid))

    def _unlink(self, oid: str, on_disk: bool) -> int:
        """Remove ``oid``'s file (a spill file through the checked directory descriptor)."""
        if not on_disk:
            return _unlink(self.shm_path(oid))
        if self._spill_fd < 0:
            return 0
        try:
            os.unlink(segment_name(self.store_id, oid), dir_fd=self._spill_fd)
            return 1
        except FileNotFoundError:
            return 0

    def _unlink_spilled(self, oid: str) -> None:
        self._unlink(oid, True)

    def _account(self, e: _Entry, delta: int) -> None:
        if e.on_disk:
            self._spilled += delta
        else:
            self._used += delta

    def _pinned_bytes(self) -> int:
        return sum(e.size for e in self._entries.values() if e.pins and not e.on_disk)

    def _full(self, oid: str, size: int, reason: str = "") -> ObjectStoreFullError:
        return ObjectStoreFullError(
            oid,
            size,
            self.capacity,
            self._used,
            self._pinned_bytes(),
            self._spilled,
            self.disk_limit,
            reason,
        )

    def _disk_can_take(self, size: int) -> bool:
        if self.disk_limit is not None and self._spilled + size > self.disk_limit:
            return False
        st = os.fstatvfs(self._spill_fd)
        return st.f_bavail * st.f_frsize >= size

    def _make_room(self, oid: str, size: int) -> bool:
        """Spill LRU unpinned objects until ``size`` more bytes fit; False (and no spill) if
        that cannot work."""
        if size > self.capacity:
            return False
        need = self._used + self._pool.bytes + size - self.capacity
        if need > 0 and self._pool.bytes:  # pooled segments give way first
            for path in self._pool.trim(max(0, self._pool.bytes - need)):
                _unlink(path)
            need = self._used + self._pool.bytes + size - self.capacity
        if need <= 0:
            return True
        victims: list[str] = []
        freed = 0
        for victim in self._lru:  # oldest first
            e = self._entries[victim]
            if e.pins or victim == oid:
                continue
            victims.append(victim)
            freed += e.size
            if freed >= need:
                break
        # Plan first, so that a request that cannot succeed spills nothing.
        if freed < need or not self._disk_can_take(freed):
            return False
        for victim in victims:
            self._spill(victim, self._entries[victim])
        return True

    def _spill(self, oid: str, e: _Entry) -> None:
        try:
            _copy_file(
                self.shm_path(oid),
                None,
                segment_name(self.store_id, oid),
                self._spill_fd,
                e.size,
                preallocate=False,
            )
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise self._full(oid, e.size, f"spill disk full ({exc})") from exc
            raise
        _unlink(self.shm_path(oid))
        del self._lru[oid]
        self._used -= e.size
        self._spilled += e.size
        e.on_disk = True

    def _restore(self, oid: str, e: _Entry) -> None:
        """Move a spilled object back into memory, if room can be made; else leave it.

        Raises
        ------
        ObjectStoreError
            If the spill file is not one this store wrote (another user's file, a symbolic
            link, group/other permission bits): it is neither copied nor served.
        """
        try:
            if not self._make_room(oid, e.size):
                self._check_spill_file(oid)  # served from disk: readers check it too
                return
        except ObjectStoreFullError:  # the spill disk filled up while making room
            self._check_spill_file(oid)
            return
        name = segment_name(self.store_id, oid)
        try:
            # Preallocate: tmpfs may be fuller than our books say (other users of /dev/shm).
            _copy_file(name, self._spill_fd, self.shm_path(oid), None, e.size, preallocate=True)
        except UnsafePathError as exc:
            raise ObjectStoreError(f"refusing to restore object {oid}: {exc}") from None
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                return  # serve it from disk instead
            raise
        self._unlink(oid, True)
        self._spilled -= e.size
        self._used += e.size
        e.on_disk = False
        self._lru[oid] = None

    def _check_spill_file(self, oid: str) -> None:
        try:
            os.close(
                open_private_file(
                    segment_name(self.store_id, oid),
                    "spill file",
                    dir_fd=self._spill_fd,
                    display=self.spill_path(oid),
                )
            )
        except UnsafePathError as exc:
            raise ObjectStoreError(f"refusing to serve object {oid}: {exc}") from None


def _open_spill_dir(path: str, default: bool) -> int:
    """Open and check the spill directory (the per-user folder too, for the default one)."""
    try:
        if default:
            user_dir()
        return open_private_dir(path, "spill directory")
    except UnsafePathError as exc:
        raise UnsafePathError(
            f"{exc}; or pass the store another spill directory (--spill-dir)"
        ) from None


def _nothing() -> None:
    pass


def _unlink_all(paths: list[str]) -> None:
    for path in paths:
        _unlink(path)


def _unlink(path: str) -> int:
    try:
        os.unlink(path)
        return 1
    except FileNotFoundError:
        return 0


def _copy_file(
    src: str, src_dir: int | None, dst: str, dst_dir: int | None, size: int, preallocate: bool
) -> None:
    """Copy ``src`` to a new ``dst`` in the kernel (``sendfile``); remove ``dst`` on failure.

    Paths are relative to the directory descriptors ``src_dir``/``dst_dir`` when given. The
    source must be a private file of this user (opened without following links, checked
    through its descriptor): a file someone else planted is refused, never copied into a fresh
    segment of ours. ``dst`` is created exclusively (mode 0600) without following links.

    Raises
    ------
    UnsafePathError
        If the source is a symbolic link, not a regular file, not ours, or not mode 0600.
    """
    fin = open_private_file(src, "object file", dir_fd=src_dir)
    try:
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        fout = os.open(dst, flags, 0o600, dir_fd=dst_dir)
        try:
            if preallocate and size:
                os.posix_fallocate(fout, 0, size)
            _copy_fd(fin, fout)
        except BaseException:
            os.close(fout)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dst, dir_fd=dst_dir)
            raise
        os.close(fout)
    finally:
        os.close(fin)


def _copy_fd(fin: int, fout: int) -> None:
    done = 0
    try:
        while True:
            n = os.sendfile(fout, fin, done, IO_CHUNK)
            if n == 0:
                return
            done += n
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS):  # pragma: no cover - no sendfile
            raise
    while True:  # pragma: no cover - file systems without sendfile
        data = os.pread(fin, 1 << 20, done)
        if not data:
            return
        view = memoryview(data)
        while view:
            n = os.pwrite(fout, view, done)
            done += n
            view = view[n:]
