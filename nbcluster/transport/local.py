"""Local links: a driver and a worker on the same host talk over a Unix socket, not ZeroMQ.

A ZeroMQ message crosses two more threads than the sender and the receiver (each end's ZeroMQ
I/O thread), and each hand-off is a wake-up: a no-op task's round trip took ~480 µs here, of
which a bare CurveZMQ round trip is ~110 µs, against ~20 µs for a Unix socket. So a driver that
finds its worker on its own host (the same kernel and network namespace) sends it tasks on a
Unix stream socket, read and written by the threads that use them.

Who may connect:

- The worker listens on an *abstract* Unix socket (no file: it goes with the process, and it is
  only visible in the worker's network namespace, so hosts simulated in namespaces still talk
  TCP). Its name is a keyed hash of the worker's TCP address under a key derived from the
  cluster secret (:func:`local_name`): only members of the cluster can find it.
- Both ends check the other's user id (``SO_PEERCRED``, set by the kernel): a process of another
  user is refused before anything it sent is read, and a driver never talks to a listener of
  another user (one that took the name first). Same-user processes could already read each
  other's memory; such a link is therefore not encrypted. ``NBCLUSTER_LOCAL_LINKS=0`` turns
  local links off (every link is CurveZMQ then).

Messages are a list of frames, framed as ``<count> <length>... <bytes>...`` (little-endian
``uint32``); a frame count or a message size over the limits closes the link.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
from collections.abc import Sequence
from typing import Any

#: Set to ``0`` to keep every driver-worker link on CurveZMQ.
LOCAL_LINKS_ENV = "NBCLUSTER_LOCAL_LINKS"
#: Most frames in one message (a task has a header and a few argument frames).
MAX_FRAMES = 4096
#: Bytes read per ``recv`` call.
READ_CHUNK = 256 * 1024

_U32 = struct.Struct("<I")


class LocalLinkError(ConnectionError):
    """The other end sent something that is not a message (the link is closed)."""


def enabled() -> bool:
    """Whether local links are used (``$NBCLUSTER_LOCAL_LINKS``, on unless ``0``)."""
    return os.environ.get(LOCAL_LINKS_ENV, "1").strip() != "0"


def local_name(key: bytes, tcp_address: str) -> bytes:
    """The abstract Unix socket name of the worker at ``tcp_address`` (a leading NUL byte)."""
    digest = hashlib.blake2b(tcp_address.encode(), key=key[:64], digest_size=16).hexdigest()
    return b"\0nbcluster-" + digest.encode()


def listen(name: bytes) -> socket.socket:
    """A non-blocking listening socket at the abstract ``name``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(name)
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def accept(listener: socket.socket) -> socket.socket | None:
    """The next connection of our own user, non-blocking; ``None`` if none is waiting.

    Connections of other users are closed unread.
    """
    while True:
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return None
        if same_user(conn):
            conn.setblocking(False)
            return conn
        conn.close()


def connect(name: bytes) -> socket.socket | None:
    """Connect to the listener at ``name``; ``None`` if there is none here (another host or
    namespace, a worker that died) or it belongs to another user."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)  # (a Unix connect completes at once, or fails: a full backlog)
    try:
        sock.connect(name)
    except OSError:  # (BlockingIOError included: the caller's loop must not wait)
        sock.close()
        return None
    if not same_user(sock):
        sock.close()
        return None
    return sock


def same_user(sock: socket.socket) -> bool:
    """Whether the process at the other end of ``sock`` runs as our user (kernel-checked)."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return False
    _pid, uid, _gid = struct.unpack("3i", creds)
    return bool(uid == os.getuid())


def pack(frames: Sequence[Any]) -> bytes:
    """One message's frames as bytes to write."""
    views = [memoryview(f) for f in frames]
    lengths = [v.nbytes for v in views]
    return struct.pack(f"<{len(lengths) + 1}I", len(lengths), *lengths) + b"".join(views)


def write(sock: socket.socket, out: bytearray, data: bytes) -> bool:
    """Send ``data`` on a non-blocking ``sock`` after what waits in ``out``; what the kernel does
    not take now is kept in ``out``. Returns whether bytes wait (watch for writable).

    Raises
    ------
    OSError
        If the other end is gone (``BrokenPipeError``, ``ConnectionResetError``).
    """
    if out:  # (behind what waits already: in order)
        out += data
        return True
    try:
        n = sock.send(data)
    except BlockingIOError:
        n = 0
    if n < len(data):
        out += data[n:]
    return bool(out)


def flush(sock: socket.socket, out: bytearray) -> bool:
    """Send what waits in ``out``; returns whether some still does. Raises as :func:`write`."""
    if out:
        try:
            del out[: sock.send(out)]
        except BlockingIOError:
            pass
    return bool(out)


class ReadBuffer:
    """One reusable buffer that a thread reads its local links into.

    ``sock.recv(READ_CHUNK)`` allocates a fresh 256 KiB object per call: above glibc's mmap
    threshold, so each read mapped and unmapped memory (a TLB shootdown across the process's
    threads every time; seen in ``perf`` as ~10 % of the driver's I/O thread at one task per
    round trip). Reading into one buffer costs nothing of the kind.
    """

    def __init__(self, size: int = READ_CHUNK) -> None:
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        self.size = size

    def recv(self, sock: socket.socket) -> memoryview:
        """Read what ``sock`` has (up to ``size`` bytes); empty at end of stream.

        The view is valid until the next call (feed it to an :class:`Unpacker`, which copies).

        Raises
        ------
        BlockingIOError
            Nothing to read now.
        OSError
            The link broke.
        """
        return self._view[: sock.recv_into(self._buf)]


class Unpacker:
    """Cuts a byte stream into messages.

    Parameters
    ----------
    max_bytes
        The largest message accepted (``<= 0``: no limit).
    """

    def __init__(self, max_bytes: int) -> None:
        self._buf = bytearray()  # the start of a message not complete yet
        self._max = max_bytes

    def feed(self, data: bytes | bytearray | memoryview) -> list[list[bytes]]:
        """Add ``data``; returns the messages it completed.

        Raises
        ------
        LocalLinkError
            If a message claims no frames, too many, or more bytes than allowed.
        """
        buf = self._buf
        if not buf:  # the usual case: whole messages, cut straight from ``data``
            with memoryview(data) as src:
                out, pos = self._cut(src)
                if pos < len(src):
                    buf += src[pos:]
            return out
        buf += data
        with memoryview(buf) as src:  # (released before the bytearray is resized)
            out, pos = self._cut(src)
        del buf[:pos]
        return out

    def _cut(self, src: memoryview) -> tuple[list[list[bytes]], int]:
        out = []
        pos, end = 0, len(src)
        while end - pos >= 4:
            (n,) = _U32.unpack_from(src, pos)
            if n == 0 or n > MAX_FRAMES:
                raise LocalLinkError(f"a message of {n} frames")
            head = 4 + 4 * n
            if end - pos < head:
                break
            lengths = struct.unpack_from(f"<{n}I", src, pos + 4)
            total = head + sum(lengths)
            if 0 < self._max < total:
                raise LocalLinkError(f"a message of {total} bytes (at most {self._max})")
            if end - pos < total:
                break
            off = pos + head
            frames = []
            for length in lengths:
                frames.append(bytes(src[off : off + length]))
                off += length
            out.append(frames)
            pos += total
        return out, pos
