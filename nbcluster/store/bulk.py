"""The bulk channel of object transfers: AES-256-GCM over plain TCP, keyed per transfer.

One CurveZMQ connection encrypts on one libzmq io thread with a cipher (XSalsa20-Poly1305 in
software) that caps a transfer at a few hundred MB/s. So the bytes of an object take another
path, still encrypted and authenticated end to end:

1. The puller asks the holder's store socket (CurveZMQ, authenticated by the cluster secret) for
   the object with ``STORE_READ {…, streams: S}``.
2. The holder pins the object, draws a fresh random 256-bit key and a 128-bit transfer id, and
   answers ``STORE_BULK {rid, size, port, tid, key, chunk, streams}`` on that same CurveZMQ
   connection: the key never travels anywhere else.
3. The puller opens ``streams`` TCP connections to ``port`` on the holder's host. Each begins
   with a hello, ``tid | stream | streams | HMAC-SHA256(key, …)``; the holder admits a stream
   only with a valid MAC, and each stream number once, so a peer without the key cannot claim
   (or replay its way into) a transfer.
4. Stream ``s`` carries chunks ``s, s + S, s + 2S, …`` (``chunk`` bytes each, the last one
   shorter), each sealed with AES-GCM: the nonce is the chunk's index, and the associated data
   binds the transfer id, the object id, the index, the offset and the sizes. Nothing on a
   stream is a header the receiver parses: it computes every chunk's length, nonce and
   associated data itself, so a chunk altered, dropped, reordered, replayed or moved from another
   transfer or object fails its tag, and the transfer is aborted (:class:`TransferIntegrityError`).

AES-GCM runs at GB/s per core where the CPU has AES and carry-less multiply instructions, and
the ``cryptography`` calls and socket calls release the GIL, so several streams use several
cores at both ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from nbcluster.exceptions import ObjectLostError
from nbcluster.store.errors import ObjectStoreError

log = logging.getLogger(__name__)

#: No chunk for this long (a holder cut off without its connection dropping): give up.
STALL_TIMEOUT_S = 30.0
#: The holder must answer (its store socket's handshake, its bulk port) within this long.
CONNECT_TIMEOUT_S = 10.0
#: How often a pulling thread looks at the agent closing and at its deadlines.
TICK_MS = 250
#: AES-GCM tag bytes appended to each chunk.
TAG = 16
#: Parallel streams a puller asks for (``NBCLUSTER_TRANSFER_STREAMS``; 0: no bulk channel, the
#: bytes travel in ``STORE_CHUNK``s over the CurveZMQ connection as before). One per two cores:
#: each stream costs a core at each end (decrypting and writing, encrypting and sending).
STREAMS = int(
    os.environ.get("NBCLUSTER_TRANSFER_STREAMS", "").strip()
    or max(1, min(4, (os.cpu_count() or 1) // 2))
)
#: The most streams a holder grants one transfer.
MAX_STREAMS = 16
#: Connections a holder's bulk listener keeps at once that have not sent a valid hello yet.
MAX_PENDING = 64
#: A connection must send its hello within this long.
HELLO_TIMEOUT_S = 10.0

_HELLO = struct.Struct(">16sII32s")
_AAD = struct.Struct(">8s16sQQQQ")


def nonce(index: int) -> bytes:
    """The 96-bit GCM nonce of chunk ``index`` (unique per chunk; the key is per transfer)."""
    return index.to_bytes(12, "big")


def associated(tid: bytes, oid: str, index: int, off: int, n: int, size: int) -> bytes:
    """What chunk ``index`` is bound to besides its bytes: transfer, object, place, sizes."""
    return _AAD.pack(b"nbc-bulk", tid, index, off, n, size) + oid.encode()


def hello(key: bytes, tid: bytes, stream: int, streams: int) -> bytes:
    """The first bytes of stream ``stream``: it claims that stream of transfer ``tid``."""
    mac = hmac.new(key, b"nbc-bulk-hello" + tid + struct.pack(">II", stream, streams), "sha256")
    return _HELLO.pack(tid, stream, streams, mac.digest())


def chunk_count(size: int, chunk: int) -> int:
    """How many chunks a ``size``-byte object takes."""
    return -(-size // chunk)


class TransferIntegrityError(ObjectStoreError):
    """A chunk failed AES-GCM authentication: the transfer was altered in transit."""


# --------------------------------------------------------------------------- the holder's side
class Offer:
    """One transfer a holder serves: its key, what to send, and how its streams went.

    Created and awaited on the agent's loop; its streams run on threads, which report back with
    ``call_soon_threadsafe``.
    """

    def __init__(
        self, server: BulkServer, oid: str, data: Any, size: int, chunk: int, streams: int
    ) -> None:
        self._server = server
        self.oid, self.data, self.size, self.chunk = oid, data, size, chunk
        self.nchunks = chunk_count(size, chunk)
        self.streams = min(streams, self.nchunks)
        self.tid = secrets.token_bytes(16)
        self.key = secrets.token_bytes(32)
        self.claimed: set[int] = set()
        self.sent = 0  # bytes of plaintext sent (all streams)
        self.error = ""
        self.cancelled = False
        self._conns: list[socket.socket] = []
        self._running = 0
        self._lock = threading.Lock()
        self._loop = asyncio.get_running_loop()
        self.all_claimed = asyncio.Event()
        self.finished = asyncio.Event()
        if self.streams == 0:
            self.all_claimed.set()
            self.finished.set()

    def grant(self, n: int) -> None:
        """The puller's ``STORE_CREDIT``: ``n <= 0`` stops the transfer (more credit: ignored)."""
        if n <= 0:
            self.cancel("the puller stopped")

    def cancel(self, why: str) -> None:
        """Stop every stream now (their sockets are shut down)."""
        with self._lock:
            self.cancelled = True
            self.error = self.error or why
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._server.withdraw(self.tid)
        self._loop.call_soon_threadsafe(self.finished.set)

    def _claim(self, stream: int, conn: socket.socket) -> bool:
        with self._lock:
            if self.cancelled or stream in self.claimed:
                return False
            self.claimed.add(stream)
            self._conns.append(conn)
            self._running += 1
            everyone = len(self.claimed) == self.streams
        if everyone:
            self._server.withdraw(self.tid)  # no more hellos for it
            self._loop.call_soon_threadsafe(self.all_claimed.set)
        return True

    def _send(self, conn: socket.socket, stream: int) -> None:
        """Encrypt and send this stream's chunks (a thread of the bulk server)."""
        aes = AESGCM(self.key)
        view = memoryview(self.data)
        out = bytearray(self.chunk + TAG)
        corrupt = _test_corrupt_index()
        error = ""
        try:
            for k in range(stream, self.nchunks, self.streams):
                if self.cancelled:
                    return
                off = k * self.chunk
                n = min(self.chunk, self.size - off)
                sealed = memoryview(out)[: n + TAG]
                aes.encrypt_into(
                    nonce(k),
                    view[off : off + n],
                    associated(self.tid, self.oid, k, off, n, self.size),
                    sealed,
                )
                if k == corrupt:  # test hook: a byte altered on the wire
                    sealed[n // 2] ^= 0x01
                conn.sendall(sealed)
                with self._lock:
                    self.sent += n
        except OSError as exc:
            error = f"stream {stream}: {exc}"
        finally:
            view.release()
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_WR)  # the puller reads to the end; then the FIN
            conn.close()
            with self._lock:
                self._running -= 1
                last = self._running == 0 and len(self.claimed) == self.streams
                if error and not self.error:
                    self.error = error
            if error or last:
                self._loop.call_soon_threadsafe(self.finished.set)
            if error:
                self.cancel(error)


class BulkServer:
    """A node's bulk listener: admits streams of the transfers it offered, and sends them.

    Parameters
    ----------
    host
        Address to listen on (the agent's bind host); the port is chosen by the system.
    """

    def __init__(self, host: str) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, 0))
        self._sock.listen(128)
        self.port: int = self._sock.getsockname()[1]
        self._offers: dict[bytes, Offer] = {}
        self._lock = threading.Lock()
        self._pending = threading.BoundedSemaphore(MAX_PENDING)
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="nbc-bulk-accept", daemon=True)
        self._thread.start()

    def offer(self, oid: str, data: Any, size: int, chunk: int, streams: int) -> Offer:
        """Register a transfer of ``data`` (``size`` bytes) in ``streams`` streams (on the loop)."""
        offer = Offer(self, oid, data, size, chunk, max(1, min(streams, MAX_STREAMS)))
        if offer.streams:
            with self._lock:
                self._offers[offer.tid] = offer
        return offer

    def withdraw(self, tid: bytes) -> None:
        """Admit no more streams for transfer ``tid``."""
        with self._lock:
            self._offers.pop(tid, None)

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._closed:
                    return
                time.sleep(0.05)  # e.g. out of descriptors for a moment
                continue
            if not self._pending.acquire(blocking=False):
                conn.close()  # too many strangers at once: refuse, do not queue
                continue
            threading.Thread(target=self._admit, args=(conn,), daemon=True).start()

    def _admit(self, conn: socket.socket) -> None:
        """Read and check one hello, then serve the stream it claims (or close)."""
        offer: Offer | None = None
        stream = -1
        try:
            conn.settimeout(HELLO_TIMEOUT_S)
            raw = _recv_exactly(conn, _HELLO.size)
            if raw is not None:
                tid, stream, streams, _ = _HELLO.unpack(raw)
                with self._lock:
                    offer = self._offers.get(tid)
                if offer is not None and not (
                    stream < offer.streams
                    and streams == offer.streams
                    and hmac.compare_digest(raw, hello(offer.key, tid, stream, streams))
                    and offer._claim(stream, conn)
                ):
                    offer = None
        except OSError:
            offer = None
        finally:
            self._pending.release()
        if offer is None:
            log.info("refused a bulk connection: unknown transfer, bad MAC or stream taken")
            conn.close()
            return
        conn.settimeout(STALL_TIMEOUT_S)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        offer._send(conn, stream)

    def close(self) -> None:
        """Stop listening and stop every transfer in progress."""
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with self._lock:
            offers = list(self._offers.values())
        for offer in offers:
            with contextlib.suppress(RuntimeError):  # its loop may be closed already
                offer.cancel("this node is shutting down")


def _keepalive(conn: socket.socket) -> None:
    """Probe a quiet connection every 2 s: a holder cut off without a FIN is noticed in ~10 s
    (as CurveZMQ heartbeats did), not only after :data:`STALL_TIMEOUT_S`."""
    with contextlib.suppress(OSError, AttributeError):  # not TCP (a test's pipe), not Linux
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 2)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 2)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4)


def _test_corrupt_index() -> int:
    """Test hook (``NBCLUSTER_TEST_BULK_CORRUPT``): the chunk whose bytes are altered on the
    wire, as a stranger on the path would (-1: none)."""
    return int(os.environ.get("NBCLUSTER_TEST_BULK_CORRUPT", "-1"))


def _recv_exactly(conn: socket.socket, n: int) -> bytes | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = conn.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return bytes(buf)


# --------------------------------------------------------------------------- the puller's side
def connect(host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection to a holder's bulk listener (a module function: tests route it)."""
    return socket.create_connection((host, port), timeout=timeout)


def endpoint_host(addr: str) -> str:
    """The host of a ZeroMQ endpoint ``tcp://HOST:PORT`` (brackets of IPv6 removed)."""
    hostport = addr.split("://", 1)[-1]
    return hostport.rpartition(":")[0].strip("[]")


def receive(
    addr: str,
    offer: dict[str, Any],
    oid: str,
    into: memoryview | Callable[[int, memoryview], None],
    stop: Callable[[], bool],
    progress: Callable[[int], None] = lambda n: None,
) -> None:
    """Receive transfer ``offer`` (a ``STORE_BULK``) from the holder whose store socket is ``addr``.

    Parameters
    ----------
    into
        Where the object goes: a writable buffer of its size (chunks are decrypted straight into
        it; on failure it holds garbage and must be dropped), or ``write(off, data)`` (chunks are
        decrypted into a buffer of the stream's, checked, then handed over: a file written so
        only ever holds authenticated bytes).
    stop
        Polled between chunks and while waiting: True ends the transfer.
    progress
        Called with each chunk's size once it is in (from the streams' threads).

    Raises
    ------
    ObjectLostError
        If the holder cannot be reached, goes away, or goes quiet for the stall timeout.
    TransferIntegrityError
        If a chunk fails authentication.
    """
    size, chunk, streams = int(offer["size"]), int(offer["chunk"]), int(offer["streams"])
    if streams <= 0:
        if size:
            raise ObjectStoreError(f"object {oid}: the holder offered {size} bytes in no stream")
        return
    if chunk <= 0 or streams > chunk_count(size, chunk):
        raise ObjectStoreError(f"object {oid}: the holder offered a malformed transfer")
    _Receipt(addr, offer, oid, into, stop, progress).run()


class _Aborted(Exception):
    """Another stream failed first."""


class _Receipt:
    """One bulk transfer being received: a thread per stream (the first on the caller's)."""

    def __init__(
        self,
        addr: str,
        offer: dict[str, Any],
        oid: str,
        into: memoryview | Callable[[int, memoryview], None],
        stop: Callable[[], bool],
        progress: Callable[[int], None],
    ) -> None:
        self.connect_s, self.stall_s, self.tick_s = (
            CONNECT_TIMEOUT_S,
            STALL_TIMEOUT_S,
            TICK_MS / 1e3,
        )
        self.addr, self.host, self.oid = addr, endpoint_host(addr), oid
        self.size, self.chunk = int(offer["size"]), int(offer["chunk"])
        self.streams, self.port = int(offer["streams"]), int(offer["port"])
        self.tid, self.key = bytes(offer["tid"]), bytes(offer["key"])
        self.into, self.stop, self.progress = into, stop, progress
        self.what = f"object {oid} could not be fetched from {addr}"
        self.errors: list[BaseException] = []
        self.failed = threading.Event()
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()

    def run(self) -> None:
        workers = [
            threading.Thread(target=self._stream, args=(s,), name=f"nbc-bulk-{s}", daemon=True)
            for s in range(1, self.streams)
        ]
        for w in workers:
            w.start()
        self._stream(0)
        for w in workers:
            w.join()
        if self.errors:
            # The first cause; the others are streams cut short because of it.
            raise next((e for e in self.errors if not isinstance(e, _Aborted)), self.errors[0])

    def _stream(self, stream: int) -> None:
        try:
            try:
                conn = connect(self.host, self.port, self.connect_s)
            except OSError as exc:
                raise ObjectLostError(
                    f"{self.what}: its node refused or dropped the connection to its bulk port "
                    f"{self.host}:{self.port} ({exc})"
                ) from None
            with self._lock:
                self._socks.append(conn)
            try:
                _keepalive(conn)
                conn.sendall(hello(self.key, self.tid, stream, self.streams))
                conn.settimeout(self.tick_s)
                self._chunks(conn, stream)
            finally:
                conn.close()
        except BaseException as exc:
            with self._lock:
                self.errors.append(exc)
                self.failed.set()
                for s in self._socks:  # the other streams stop at once
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)

    def _chunks(self, conn: socket.socket, stream: int) -> None:
        """Receive, authenticate and place chunks ``stream, stream + S, …``."""
        aes = AESGCM(self.key)
        chunk, size, into = self.chunk, self.size, self.into
        sealed = memoryview(bytearray(chunk + TAG))
        plain = None if isinstance(into, memoryview) else memoryview(bytearray(chunk))
        last = time.monotonic()
        for k in range(stream, chunk_count(size, chunk), self.streams):
            off = k * chunk
            n = min(chunk, size - off)
            need, got = n + TAG, 0
            if self.stop():
                raise ObjectLostError(f"{self.what}: the transfer was stopped (its node died?)")
            while got < need:
                if self.failed.is_set():
                    raise _Aborted()
                try:
                    r = conn.recv_into(sealed[got:need])
                except TimeoutError:
                    if self.stop():
                        raise ObjectLostError(f"{self.what}: the transfer was stopped") from None
                    if time.monotonic() - last > self.stall_s:
                        raise ObjectLostError(
                            f"{self.what}: nothing arrived for {self.stall_s:.0f} s"
                        ) from None
                    continue
                except OSError as exc:
                    if self.failed.is_set():
                        raise _Aborted() from None
                    raise ObjectLostError(
                        f"{self.what}: its node went away mid-transfer ({exc})"
                    ) from None
                if r == 0:
                    if self.failed.is_set():
                        raise _Aborted()
                    raise ObjectLostError(
                        f"{self.what}: its node went away mid-transfer "
                        f"(stream {stream} closed in chunk {k})"
                    )
                got += r
                last = time.monotonic()
            dest = plain[:n] if plain is not None else into[off : off + n]  # type: ignore[index]
            try:
                aad = associated(self.tid, self.oid, k, off, n, size)
                aes.decrypt_into(nonce(k), sealed[:need], aad, dest)
            except InvalidTag:
                raise TransferIntegrityError(
                    f"object {self.oid}: chunk {k} (bytes {off}..{off + n}) from {self.addr} "
                    "failed authentication (AES-GCM tag): it was altered in transit; the "
                    "transfer is aborted"
                ) from None
            if plain is not None:
                into(off, plain[:n])  # type: ignore[operator]
            self.progress(n)
