"""Moving stored objects between nodes: an agent pulls a segment from the agent that holds it.

Objects travel from node agent to node agent, never through the head. The puller asks the
holder's store socket for a stream (``STORE_READ``); the holder sends the segment in chunks
(``STORE_CHUNK``) straight from its mapping of the file, at most ``window`` chunks ahead of the
puller's credits (``STORE_CREDIT``, one per chunk received). The puller writes each chunk at its
offset into a file of the final size in its own store, then seals it: no copy of the whole object
is ever held in Python memory, and the link stays busy while chunks are written.

Concurrent readers of one object on a node wait for the same pull, so it crosses the network
once. A holder that dies mid-transfer (its connection drops, or nothing arrives for a while) fails
the pull with :class:`~nbcluster.exceptions.ObjectLostError`, and the partial segment is removed.

Each pull runs on a thread of its own with a dedicated connection: receiving, decrypting and
writing never wait for the agent's event loop, and the loop never waits for them.

With :data:`~nbcluster.store.bulk.STREAMS` > 0 (the default) the puller asks for the bulk
channel instead (``STORE_READ {…, streams}``): the holder answers ``STORE_BULK`` with a fresh key
on this CurveZMQ connection, and the bytes come over plain TCP streams sealed with AES-256-GCM
(:mod:`nbcluster.store.bulk`). A holder without a bulk listener streams ``STORE_CHUNK``s as above.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from nbcluster.exceptions import ObjectLostError, ProtocolError
from nbcluster.protocol.codec import encode
from nbcluster.protocol.messages import Kind
from nbcluster.protocol.validation import receive
from nbcluster.store import bulk
from nbcluster.store.bulk import CONNECT_TIMEOUT_S, STALL_TIMEOUT_S, TICK_MS
from nbcluster.store.errors import ObjectStoreError
from nbcluster.store.manager import StoreManager
from nbcluster.store.segment import lock_reader

log = logging.getLogger(__name__)

#: Bytes per chunk (what one ``STORE_CHUNK`` carries); ``NBCLUSTER_TRANSFER_CHUNK_BYTES``.
#: Measured on loopback with CurveZMQ (benchmarks/cross_node.py): 1-4 MiB keep the
#: (de)cryption in cache; 16 MiB and more are slower.
CHUNK_BYTES = int(os.environ.get("NBCLUSTER_TRANSFER_CHUNK_BYTES", 4 << 20))
#: Chunks a holder may send ahead of the puller's credits (``NBCLUSTER_TRANSFER_WINDOW``);
#: ``CHUNK_BYTES * WINDOW`` in flight must cover the link's bandwidth-delay product.
WINDOW = int(os.environ.get("NBCLUSTER_TRANSFER_WINDOW", 8))
#: Bounds a holder applies to what a puller asks for.
MIN_CHUNK, MAX_CHUNK, MAX_WINDOW = 64 << 10, 64 << 20, 64

#: ZeroMQ io threads (where CURVE decrypts) for pulls; concurrent pulls spread over them.
_IO_THREADS = 2

#: What a pulling thread watches on its connection. A refused connection (``CONNECT_RETRIED``
#: before any handshake) means nothing listens there any more: the holder is gone, and its
#: objects with it; waiting :data:`CONNECT_TIMEOUT_S` for it would only delay the rebuild.
_MONITORED = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


class ObjectPuller:
    """Fetches segments from other agents' store sockets into this node's store.

    Parameters
    ----------
    transport
        The agent's :class:`~nbcluster.transport.sockets.Transport` (its context and CURVE keys).
    manager
        This node's store books.
    chunk_bytes, window
        Stream shape asked of holders (see :data:`CHUNK_BYTES`, :data:`WINDOW`).
    streams
        Bulk streams asked of holders (:data:`~nbcluster.store.bulk.STREAMS`; 0: CurveZMQ only).
    max_parallel
        Pulls of different objects that run at once; more wait for a thread.
    """

    def __init__(
        self,
        transport: Any,
        manager: StoreManager,
        *,
        chunk_bytes: int = CHUNK_BYTES,
        window: int = WINDOW,
        max_parallel: int = 4,
        streams: int = bulk.STREAMS,
    ) -> None:
        self._transport = transport
        # Pulls decrypt on io threads of their own: not on the agent's, which also encrypts what
        # this node serves to others and carries its control traffic.
        self._ctx: zmq.Context[Any] = zmq.Context(io_threads=_IO_THREADS)
        self._manager = manager
        self.chunk_bytes = chunk_bytes
        self.window = window
        self.streams = streams
        self._inflight: dict[str, asyncio.Future[None]] = {}
        self._pool = ThreadPoolExecutor(max_parallel, thread_name_prefix="nbc-pull")
        self._stop = threading.Event()
        self.pulls = 0  # transfers started (what single-flight keeps at one per object)
        self.bytes_in = 0
        self._count = threading.Lock()  # pulling threads add to bytes_in

    async def pull(self, oid: str, addr: str) -> None:
        """Make ``oid`` (held by the agent at ``addr``) a sealed object of this node's store.

        Raises
        ------
        ObjectLostError
            If the holder does not have it, cannot be reached, or goes away mid-transfer.
        ObjectStoreError
            If this node's store cannot take it.
        """
        fut = self._inflight.get(oid)  # first: a pull in progress has its object reserved
        if fut is None:
            if self._manager.contains(oid):
                return
            fut = self._start(oid, addr)
            if not fut.done():
                self._inflight[oid] = fut
        # shield: a reader that gives up leaves the pull to the others (and to its thread, which
        # finishes or removes its partial file on its own).
        await asyncio.shield(fut)

    def _start(self, oid: str, addr: str) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        fut.add_done_callback(_retrieve)
        self.pulls += 1
        try:
            work = loop.run_in_executor(self._pool, self._transfer, oid, addr)
        except RuntimeError:  # the pool is shut down: the agent is closing
            fut.set_exception(ObjectLostError(f"object {oid}: this node is shutting down"))
            return fut

        def finished(work: asyncio.Future[None]) -> None:
            # On the loop, whoever still waits: the books learn the outcome exactly once.
            self._inflight.pop(oid, None)
            exc: BaseException | None
            if work.cancelled():
                exc = ObjectLostError(f"object {oid}: this node is shutting down")
            else:
                exc = work.exception()
            if exc is None:
                try:
                    self._manager.seal(oid)
                except Exception as e:  # e.g. freed meanwhile by the agent closing
                    self._manager.free(oid)
                    exc = e
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)

        work.add_done_callback(finished)
        return fut

    # ------------------------------------------------------------------ the pulling thread
    def _connect(self, addr: str) -> tuple[Any, Any]:
        """A CURVE client socket to ``addr`` with its monitor, watched from before it connects."""
        t = self._transport
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        # A holder whose host is cut off (no FIN ever comes) is noticed by missing heartbeats.
        sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10_000)
        sock.curve_secretkey = t.keys.client_secret
        sock.curve_publickey = t.keys.client_public
        sock.curve_serverkey = t.keys.server_public
        mon = sock.get_monitor_socket(_MONITORED)
        sock.connect(addr)
        return sock, mon

    def _transfer(self, oid: str, addr: str) -> None:
        """Stream ``oid`` from ``addr`` into a reserved file of this store (not sealed yet)."""
        sock, mon = self._connect(addr)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(mon, zmq.POLLIN)
        rid = 1
        w = _Writer(self._manager, oid)
        done = False
        try:
            sock.send_multipart(
                encode(
                    {
                        "k": Kind.STORE_READ,
                        "rid": rid,
                        "oid": oid,
                        "chunk": self.chunk_bytes,
                        "window": self.window,
                        "streams": self.streams,
                    }
                )
            )
            connected = False
            start = last = time.monotonic()
            t0 = time.perf_counter()
            while not done:
                if self._stop.is_set():
                    raise ObjectLostError(f"object {oid}: this node is shutting down")
                events = dict(poller.poll(TICK_MS))
                now = time.monotonic()
                if mon in events:
                    event = parse_monitor_message(mon.recv_multipart())["event"]
                    if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                        connected = True
                    elif connected:
                        raise _lost(oid, addr, w, "its node went away mid-transfer")
                    else:
                        raise _lost(oid, addr, w, "its node refused or dropped the connection")
                if sock in events:
                    try:
                        h, payload = receive(sock.recv_multipart(copy=False))
                    except ProtocolError as exc:
                        why = f"its node sent a malformed message: {exc}"
                        raise _lost(oid, addr, w, why) from None
                    if h.get("rid") != rid:
                        continue
                    if h["k"] == Kind.STORE_BULK:
                        self._bulk(oid, addr, h, w)
                        done = True
                        break
                    if h["k"] != Kind.STORE_CHUNK:
                        raise _refused(oid, addr, h)
                    # Credit first: the holder sends the next chunk while we write this one.
                    sock.send_multipart(encode({"k": Kind.STORE_CREDIT, "rid": rid, "n": 1}))
                    done = w.write(int(h["size"]), int(h["off"]), payload[0] if payload else b"")
                    with self._count:
                        self.bytes_in += len(payload[0]) if payload else 0
                    last = time.monotonic()  # after the write: making room may have taken long
                elif not connected and now - start > CONNECT_TIMEOUT_S:
                    raise _lost(oid, addr, w, f"no answer within {CONNECT_TIMEOUT_S:.0f} s")
                elif now - last > STALL_TIMEOUT_S:
                    raise _lost(oid, addr, w, f"nothing arrived for {STALL_TIMEOUT_S:.0f} s")
            dt = time.perf_counter() - t0
            log.info(
                "pulled %s from %s: %d bytes in %.3f s (%.0f MB/s)",
                *(oid, addr, w.size, dt, w.size / max(dt, 1e-9) / 1e6),
            )
        except BaseException:
            w.discard()
            with contextlib.suppress(zmq.ZMQError):  # tell the holder to stop and unpin
                msg = {"k": Kind.STORE_CREDIT, "rid": rid, "n": 0}
                sock.send_multipart(encode(msg), flags=zmq.NOBLOCK)
            raise
        finally:
            w.close()
            sock.disable_monitor()
            mon.close(linger=0)
            # A little linger: the cancel above should leave; a dead holder costs nothing.
            sock.close(linger=0 if done else 200)

    def _bulk(self, oid: str, addr: str, offer: dict[str, Any], w: _Writer) -> None:
        """Receive ``oid`` on the bulk channel the holder offered, into its reserved file."""
        w.begin(int(offer["size"]))

        def counted(n: int) -> None:
            with self._count:
                self.bytes_in += n

        bulk.receive(addr, offer, oid, w.put, self._stop.is_set, counted)
        if w.received != w.size:
            raise _lost(oid, addr, w, "the transfer ended early")

    def close(self) -> None:
        """Stop every pull (each removes its partial file) and wait for their threads."""
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        if not self._ctx.closed:
            self._ctx.destroy(linger=0)


class _Writer:
    """The destination file of one pull: reserved on the first chunk, written at offsets."""

    def __init__(self, manager: StoreManager, oid: str) -> None:
        self._m = manager
        self.oid = oid
        self.size = -1
        self.received = 0
        self._fd = -1
        self._path = ""
        self._lock = threading.Lock()

    def begin(self, size: int) -> None:
        """Reserve the object and make its file, of its final size."""
        if size < 0:
            raise ObjectStoreError(f"object {self.oid}: the holder sent a negative size")
        self._path = self._m.reserve(self.oid, size)
        self.size = size
        self._fd = os.open(self._path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        # The final size at once: chunks go straight to their place, nothing is appended.
        os.ftruncate(self._fd, size)

    def write(self, size: int, off: int, data: Any) -> bool:
        """Write the next chunk of a ``STORE_CHUNK`` stream; True once the whole object is in."""
        view = memoryview(data).cast("B")
        if self.size < 0:
            self.begin(size)
        if size != self.size or off != self.received or off + view.nbytes > size:
            raise ObjectStoreError(
                f"object {self.oid}: the holder sent bytes {off}..{off + view.nbytes} of "
                f"{size}, expected {self.received} of {self.size}"
            )
        self.put(off, view)
        return self.received == self.size

    def put(self, off: int, view: memoryview) -> None:
        """Write authenticated bytes at ``off`` (bulk streams call this from their threads)."""
        done = 0
        try:
            while done < view.nbytes:
                done += os.pwrite(self._fd, view[done:], off + done)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise ObjectStoreError(
                    f"object {self.oid}: no space left for it in {os.path.dirname(self._path)}"
                ) from None
            raise
        with self._lock:
            self.received += view.nbytes

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def discard(self) -> None:
        """Drop the partial object: its reservation and its file."""
        self.close()
        if self.size >= 0:
            self._m.free(self.oid)
            with contextlib.suppress(FileNotFoundError):  # if the books had forgotten it
                os.unlink(self._path)


def _retrieve(fut: asyncio.Future[None]) -> None:
    """Mark a pull's error as seen: every reader of it may have given up already."""
    if not fut.cancelled():
        fut.exception()


def _lost(oid: str, addr: str, w: _Writer, why: str) -> ObjectLostError:
    got = f" after {w.received} of {w.size} bytes" if w.size >= 0 else ""
    return ObjectLostError(f"object {oid} could not be fetched from {addr}{got}: {why}")


def _refused(oid: str, addr: str, h: dict[str, Any]) -> Exception:
    msg = f"object {oid} could not be fetched from the node that holds it ({addr}): "
    msg += str(h.get("msg", "it is gone"))
    if h.get("err") == "missing":
        return ObjectLostError(msg)
    return ObjectStoreError(msg)


def map_segment(path: str) -> tuple[Any, int]:
    """Map a segment file read-only for sending; returns ``(mapping or b"", size)``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        size = st.st_size
        if size == 0:
            return b"", 0
        # Chunks in flight keep the mapping, and its lock, so the segment is not reused early.
        lock_reader(fd, path, st)
        return mmap.mmap(fd, size, prot=mmap.PROT_READ), size
    finally:
        os.close(fd)
