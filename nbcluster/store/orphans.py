"""Finding the segments of node stores whose agent died without cleaning up (SIGKILL, OOM).

Each live store holds an exclusive ``flock`` on ``<shm>/nbc-<store id>.owner`` for as long as its
agent runs; the kernel drops the lock when the process dies, however it dies. A starting agent
sweeps: an owner file it can lock belongs to a dead store, whose segments and spill files it
removes.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import time

from nbcluster.store.segment import validate_store_id

OWNER_SUFFIX = ".owner"
#: An owner file younger than this may belong to a store still taking its lock.
_GRACE_S = 2.0


def owner_path(store_id: str, shm_dir: str) -> str:
    """The lock file that says ``store_id`` is alive."""
    return os.path.join(shm_dir, f"nbc-{validate_store_id(store_id)}{OWNER_SUFFIX}")


def claim(store_id: str, shm_dir: str) -> int:
    """Take the owner lock of ``store_id``; returns the descriptor to keep open while alive."""
    fd = os.open(owner_path(store_id, shm_dir), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, str(os.getpid()).encode())
    return fd


def release(fd: int, store_id: str, shm_dir: str) -> None:
    """Give the owner lock up (the store's files are gone)."""
    with contextlib.suppress(OSError):
        os.unlink(owner_path(store_id, shm_dir))
    with contextlib.suppress(OSError):
        os.close(fd)


def dead_stores(shm_dir: str) -> list[str]:
    """Ids of stores whose owner file is not locked by anyone: their agent is gone."""
    found = []
    now = time.time()
    for path in glob.glob(os.path.join(glob.escape(shm_dir), f"nbc-*{OWNER_SUFFIX}")):
        store_id = os.path.basename(path)[len("nbc-") : -len(OWNER_SUFFIX)]
        try:
            validate_store_id(store_id)
            if now - os.stat(path).st_mtime < _GRACE_S:
                continue
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (OSError, ValueError):
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # alive
        finally:
            os.close(fd)
        found.append(store_id)
    return found
