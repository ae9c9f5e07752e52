"""Freed shared-memory segments kept for reuse, so a new large object skips fresh pages.

Writing 100 MB into a *new* tmpfs file costs about four times what writing into one whose pages
already exist does: the kernel allocates, zeroes and charges every page first (and unlinking
the old file frees them again). The store therefore keeps a few freed segments of at least
:data:`MIN_POOLED` bytes: a later reservation of a similar size takes one over (renamed to the
new object's name, truncated to its size) and the writer overwrites it in place.

A segment is only reused when nobody has it mapped: every reader holds a shared ``flock`` on the
file for as long as its mapping lives (:func:`nbcluster.store.segment.open_segment`; the kernel
drops it when the mapping's descriptor is closed or the reader dies). Offering a freed segment
renames it out of its object's name first, then tries an exclusive lock: if a reader still holds
the file, it is unlinked as before (the reader keeps valid pages); if not, the pool holds the
lock until the file is handed out, so a reader that opened the old name just before the rename
cannot lock it, and one that locks it later finds its name gone (it checks) and reports the
object freed, as it would have before.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
from dataclasses import dataclass

#: Smaller segments are cheap to create and are unlinked as before.
MIN_POOLED = 1 << 20
#: At most this many freed segments are kept.
MAX_POOLED = 8


@dataclass
class _Pooled:
    path: str
    size: int
    fd: int  # open read-write, holding the exclusive lock


class SegmentPool:
    """Freed segments of one store, oldest first (not thread-safe: the manager's lock guards it).

    Parameters
    ----------
    shm_dir
        The store's shared-memory directory.
    prefix
        The store's file name prefix (``nbc-<store_id>-``): pooled files are named
        ``<prefix>.pool-<n>``, which no object id can take (ids never start with ``.``) and
        which the store's cleanup glob still matches.
    max_bytes
        Most bytes kept in the pool.
    """

    def __init__(self, shm_dir: str, prefix: str, max_bytes: int) -> None:
        self._dir = shm_dir
        self._prefix = prefix
        self.max_bytes = max_bytes
        self._files: list[_Pooled] = []
        self._seq = itertools.count()
        self.bytes = 0
        self.reused = 0  # reservations served from the pool

    def __len__(self) -> int:
        return len(self._files)

    def offer(self, path: str, size: int) -> list[str]:
        """Keep the freed segment at ``path`` for reuse if nobody maps it.

        Returns
        -------
        list of str
            Files the caller must unlink (the segment itself if it was not kept, older pooled
            segments pushed out); unlinking frees pages, which can take milliseconds.
        """
        if size < MIN_POOLED or size > self.max_bytes:
            return [path]
        pooled = os.path.join(self._dir, f"{self._prefix}.pool-{next(self._seq)}")
        try:
            os.rename(path, pooled)  # out of the object's name first: no new reader finds it
        except FileNotFoundError:
            return []
        try:
            fd = os.open(pooled, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return [pooled]
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a reader still has it mapped: its pages are not ours to reuse
            os.close(fd)
            return [pooled]
        self._files.append(_Pooled(pooled, size, fd))
        self.bytes += size
        return self.trim(self.max_bytes)

    def take(self, size: int, path: str) -> bool:
        """Give a pooled segment of about ``size`` bytes the name ``path``; False if none fits.

        The best fit is the smallest file of at least ``size`` bytes and at most twice that
        (the most recently freed of those);
        else the largest smaller one of at least half (its tail is then allocated fresh). The
        file is truncated to ``size`` and unlocked.
        """
        fits = [p for p in self._files if size <= p.size <= 2 * size]
        if fits:
            # The most recently freed of the best fits: a writer that frees and writes again
            # gets back the file it still has mapped (nbcluster.store.writer).
            best = min(reversed(fits), key=lambda p: p.size)
        else:
            smaller = [p for p in self._files if size // 2 <= p.size < size]
            if not smaller:
                return False
            best = max(smaller, key=lambda p: p.size)
        self._files.remove(best)
        self.bytes -= best.size
        try:
            os.ftruncate(best.fd, size)
            os.rename(best.path, path)
        except OSError:
            self._close(best)
            with contextlib.suppress(OSError):
                os.unlink(best.path)
            return False
        self._close(best)
        self.reused += 1
        return True

    def trim(self, keep_bytes: int) -> list[str]:
        """Drop the oldest segments until at most ``keep_bytes`` (and :data:`MAX_POOLED`
        files) are left; returns the files to unlink."""
        out = []
        while self._files and (self.bytes > keep_bytes or len(self._files) > MAX_POOLED):
            p = self._files.pop(0)
            self.bytes -= p.size
            self._close(p)
            out.append(p.path)
        return out

    def close(self) -> list[str]:
        """Give up every pooled segment; returns the files to unlink."""
        return self.trim(-1)

    @staticmethod
    def _close(p: _Pooled) -> None:
        with contextlib.suppress(OSError):
            os.close(p.fd)  # drops the exclusive lock
