"""One object in one file: writing serialized frames into a segment and mapping it back.

A *segment* is a file under ``/dev/shm`` (tmpfs, so its pages are shared memory) or, once
spilled, under the spill directory; both use the same layout::

    offset 0   magic  b"NBCSEG01"                  8 bytes
    offset 8   frame count                          uint32, little-endian
    offset 12  reserved (0)                         uint32
    offset 16  (offset, length) per frame           2 x uint64 each
    ...        zero padding to a multiple of 64
    frames     each starting at a multiple of 64    (so SIMD loads and dtype alignment hold)

Frames are ``[pickle_stream, *out_of_band_buffers]`` (pickle protocol 5). Writing copies each
buffer exactly once, from the caller's memory into the file; reading maps the file read-only and
hands out memoryviews of the mapping, so ``pickle.loads(frames[0], buffers=frames[1:])`` yields
numpy arrays that are read-only views of shared memory. A memoryview keeps its mmap alive, so the
mapping lasts exactly as long as some array (or other view) still uses it.

We use plain files and :mod:`mmap` rather than :mod:`multiprocessing.shared_memory`: the latter's
resource tracker unlinks segments when the creating process exits and warns about "leaks" in
others, which is wrong for a store whose segments outlive their writers and are freed by the
node agent.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import pickle
import re
import stat
import struct
from collections.abc import Sequence
from typing import Any

import cloudpickle

from nbcluster.store.errors import ObjectStoreError

SHM_DIR = "/dev/shm"
MAGIC = b"NBCSEG01"
ALIGN = 64
_FIXED = struct.Struct("<8sII")  # magic, frame count, reserved
_ENTRY = struct.Struct("<QQ")  # offset, length
#: Most bytes one write()/sendfile() call is given: Linux transfers at most 0x7ffff000.
IO_CHUNK = 1 << 30

_STORE_ID_RE = re.compile(r"[A-Za-z0-9_]{1,64}")
_OID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")

Frame = bytes | bytearray | memoryview | pickle.PickleBuffer
"""What a frame may be: the pickle stream or an out-of-band buffer (copied or not yet)."""


def validate_store_id(store_id: str) -> str:
    """Check that ``store_id`` is safe in a file name and cannot match another store's glob.

    Parameters
    ----------
    store_id
        Letters, digits and ``_`` only (no ``-``: ``nbc-a-*`` must not match store ``a-b``).

    Returns
    -------
    str
        ``store_id`` unchanged.

    Raises
    ------
    ValueError
        If it is empty, too long or contains another character.
    """
    if not _STORE_ID_RE.fullmatch(store_id):
        raise ValueError(f"invalid store id {store_id!r}: use 1-64 letters, digits or '_'")
    return store_id


def validate_oid(oid: str) -> str:
    """Check that an object id is safe in a file name (no ``/``, no leading ``.``).

    Raises
    ------
    ValueError
        If it is not 1-200 characters of letters, digits, ``_``, ``.`` or ``-``.
    """
    if not _OID_RE.fullmatch(oid):
        raise ValueError(f"invalid object id {oid!r}")
    return oid


def segment_name(store_id: str, oid: str) -> str:
    """The file name of an object's segment: ``nbc-<store_id>-<oid>``."""
    return f"nbc-{validate_store_id(store_id)}-{validate_oid(oid)}"


#: Values of these exact types hold no code, no classes and no buffers: the C pickler alone
#: serializes them, as cloudpickle would (whose pickler costs more to build than a no-op task's
#: whole run on its worker).
PLAIN_TYPES = frozenset({type(None), bool, int, float, complex, str, bytes})


def dumps_oob(value: Any) -> list[Frame]:
    """Serialize ``value`` into ``[pickle_bytes, *buffers]`` without copying the buffers.

    Unlike :func:`nbcluster.serialization.dumps`, out-of-band buffers are returned as the
    :class:`pickle.PickleBuffer` s the pickler produced, still pointing at the value's memory, so
    :func:`write_segment` copies a large array once, straight into shared memory. Write them
    before the value can change.

    Parameters
    ----------
    value
        Anything cloudpickle can serialize.

    Returns
    -------
    list
        The pickle stream followed by one :class:`pickle.PickleBuffer` per out-of-band buffer.
    """
    if type(value) in PLAIN_TYPES:
        return [pickle.dumps(value, protocol=5)]
    buffers: list[pickle.PickleBuffer] = []
    data = cloudpickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    return [data, *buffers]


def _flat(frame: Frame) -> memoryview:
    """A 1-D unsigned-byte view of ``frame``, copying only if it is not contiguous."""
    if isinstance(frame, pickle.PickleBuffer):
        try:
            return frame.raw()
        except BufferError:  # a non-contiguous exporter: one copy is unavoidable
            return memoryview(memoryview(frame).tobytes())
    m = memoryview(frame)
    if not m.contiguous:
        return memoryview(m.tobytes())
    if m.ndim != 1 or m.format != "B":
        m = m.cast("B") if m.c_contiguous else memoryview(m.tobytes())
    return m


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def segment_layout(lengths: Sequence[int]) -> tuple[list[int], int]:
    """Where each frame of the given lengths goes, and the segment's total size.

    Parameters
    ----------
    lengths
        The byte length of each frame.

    Returns
    -------
    tuple
        ``(offsets, size)``: one 64-byte aligned offset per frame, and the file size.
    """
    pos = _align(_FIXED.size + _ENTRY.size * len(lengths))
    offsets = []
    for n in lengths:
        offsets.append(pos)
        pos = _align(pos + n)
    return offsets, pos


def frame_lengths(frames: Sequence[Frame]) -> list[int]:
    """The byte length of each frame (without copying)."""
    return [_flat(f).nbytes for f in frames]


def segment_size(frames: Sequence[Frame]) -> int:
    """The size in bytes of the segment that :func:`write_segment` would write for ``frames``."""
    return segment_layout(frame_lengths(frames))[1]


def _header(lengths: Sequence[int], offsets: Sequence[int]) -> bytes:
    parts = [_FIXED.pack(MAGIC, len(lengths), 0)]
    parts += [_ENTRY.pack(o, n) for o, n in zip(offsets, lengths, strict=True)]
    return b"".join(parts)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < data.nbytes:
        n = os.pwrite(fd, data[done : done + IO_CHUNK], offset + done)
        if n <= 0:  # pragma: no cover - a regular file never does this
            raise OSError(f"short write at offset {offset + done}")
        done += n


def write_segment(path: str, frames: Sequence[Frame], reuse: bool = False) -> int:
    """Write ``frames`` as a new segment file at ``path``.

    The file is created exclusively with mode 0600 and written with ``pwrite``, which copies each
    buffer once (it beat writing through a shared mapping by ~2x on tmpfs: no page fault per
    4 KiB page) and fails with ``ENOSPC`` when ``/dev/shm`` is full, so readers, who only map
    sealed segments, never meet a hole (``SIGBUS``). Pages are not allocated up front: that
    zero-filled them first and cost ~20% of the write. On any failure the partial file is removed.

    Parameters
    ----------
    path
        The file to create (normally ``<shm_dir>/nbc-<store_id>-<oid>``).
    frames
        ``[pickle_stream, *buffers]``: bytes-like objects or :class:`pickle.PickleBuffer` s.
    reuse
        The store handed out a freed segment under this name (:mod:`nbcluster.store.pool`):
        overwrite it in place, its pages already allocated. It must be a regular file of ours
        with mode 0600, as every segment is.

    Returns
    -------
    int
        The segment size in bytes (equal to :func:`segment_size` of ``frames``).

    Raises
    ------
    OSError
        ``FileExistsError`` if ``path`` exists (and ``reuse`` is false), ``ENOSPC`` if the file
        system is full, ...
    ObjectStoreError
        If ``reuse`` is true and the file is not a private segment of ours.
    """
    views = [_flat(f) for f in frames]
    lengths = [v.nbytes for v in views]
    offsets, size = segment_layout(lengths)
    if reuse:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    else:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        if reuse:
            _check_private(path, os.fstat(fd))
        os.ftruncate(fd, size)
        _pwrite_all(fd, memoryview(_header(lengths, offsets)), 0)
        for off, view in zip(offsets, views, strict=True):
            _pwrite_all(fd, view, off)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        raise
    os.close(fd)
    return size


def _check_private(path: str, st: os.stat_result) -> None:
    # Only segments this user wrote are used: another local user could otherwise plant a file
    # under an object's name.
    if st.st_uid != os.getuid() or st.st_mode & 0o077 or not stat.S_ISREG(st.st_mode):
        raise ObjectStoreError(
            f"segment {path} is not a file owned by this user with mode 0600; refusing to use it"
        )


def lock_reader(fd: int, path: str, st: os.stat_result) -> None:
    """Take a shared lock on an opened segment that lasts as long as its mapping.

    The store reuses a freed segment only when it can lock it exclusively (nobody maps it), so
    a mapping's pages never change under it. Map ``fd`` after this (the mapping keeps a
    duplicate of the descriptor, and with it the lock, until it is gone).

    Raises
    ------
    FileNotFoundError
        If the segment was freed meanwhile: it is held by the store's pool, or ``path`` no
        longer names it.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise FileNotFoundError(f"segment {path} was freed") from None
    try:
        now = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"segment {path} was freed") from None
    if (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev):
        raise FileNotFoundError(f"segment {path} was freed")


def open_segment(path: str) -> mmap.mmap:
    """Map the segment file at ``path`` read-only.

    The file descriptor is closed right away; the mapping stays valid even if the file is then
    unlinked (freed or spilled), until the returned object and every view of it are gone. It
    holds a shared lock on the file for as long (:func:`lock_reader`), so the store does not
    reuse the segment's pages while anything maps them.

    Raises
    ------
    FileNotFoundError
        If there is no such segment (or it was freed while being opened).
    ObjectStoreError
        If the file is empty, not ours or not private.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        _check_private(path, st)
        size = st.st_size
        if size < _FIXED.size:
            raise ObjectStoreError(f"segment {path} is truncated ({size} bytes)")
        lock_reader(fd, path, st)
        # The mapping keeps a duplicate of the descriptor, and so the lock, while it lives
        # (not trackfd=False on 3.13, which would drop the lock with our descriptor).
        return mmap.mmap(fd, size, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)


def segment_frames(buf: Any) -> list[memoryview]:
    """Parse a segment held in ``buf`` (a mapping, or bytes received from elsewhere).

    Parameters
    ----------
    buf
        Any object exporting the buffer protocol that holds a whole segment.

    Returns
    -------
    list of memoryview
        ``[pickle_stream, *buffers]`` as views into ``buf`` (no copy); they keep ``buf`` alive
        and are read-only when ``buf`` is.

    Raises
    ------
    ObjectStoreError
        If ``buf`` does not hold a well-formed segment.
    """
    whole = memoryview(buf).cast("B")
    try:
        if whole.nbytes < _FIXED.size:
            raise ObjectStoreError(f"segment truncated: {whole.nbytes} bytes")
        magic, count, _ = _FIXED.unpack_from(whole, 0)
        if magic != MAGIC:
            raise ObjectStoreError(f"not an object store segment (magic {bytes(magic)!r})")
        table_end = _FIXED.size + _ENTRY.size * count
        if table_end > whole.nbytes:
            raise ObjectStoreError(f"segment truncated: header names {count} frames")
        frames = []
        for i in range(count):
            off, n = _ENTRY.unpack_from(whole, _FIXED.size + _ENTRY.size * i)
            if off < table_end or off + n > whole.nbytes:
                raise ObjectStoreError(f"segment frame {i} ({off}+{n}) is out of bounds")
            frames.append(whole[off : off + n])  # slices share the buffer, not the parent view
        if not frames:
            raise ObjectStoreError("segment holds no frames")
        return frames
    finally:
        whole.release()


def map_segment(path: str) -> list[memoryview]:
    """Map the segment at ``path`` read-only and return its frames as views of the mapping.

    Pass the result to :func:`loads_frames` (or ``pickle.loads(frames[0],
    buffers=frames[1:])``); arrays come back read-only and backed by the mapping.
    """
    return segment_frames(open_segment(path))


def loads_frames(frames: Sequence[memoryview]) -> Any:
    """Deserialize ``[pickle_stream, *buffers]``, using the buffers in place."""
    return pickle.loads(frames[0], buffers=frames[1:])
