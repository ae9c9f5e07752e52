"""A process's link to its node's object store: large values in, zero-copy views out."""

from __future__ import annotations

import itertools
import os
import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import zmq

from nbcluster.exceptions import ObjectLostError
from nbcluster.protocol.codec import encode
from nbcluster.protocol.messages import Kind
from nbcluster.protocol.validation import receive
from nbcluster.store.errors import ObjectExistsError, ObjectStoreError, ObjectStoreFullError
from nbcluster.store.pool import MIN_POOLED
from nbcluster.store.segment import (
    SHM_DIR,
    dumps_oob,
    loads_frames,
    open_segment,
    segment_frames,
    segment_name,
    segment_size,
)
from nbcluster.store.writer import SegmentWriter

#: Serialized values at most this big travel inline with messages; larger ones use the store.
INLINE_THRESHOLD_BYTES = 100 * 1024

#: First bytes of a frame that stands for a stored object (a pickle stream starts with 0x80).
MARKER = b"\x00nbc-store\x00"

REQUEST_TIMEOUT_MS = 60_000
#: A pull moves the whole object; the agent fails it itself on a stalled or dead holder, so
#: this only bounds a pull that keeps making progress (1 TB at 350 MB/s).
PULL_TIMEOUT_MS = 3_000_000


def is_stored(frames: Sequence[Any]) -> bool:
    """Whether ``frames`` is a reference to a stored object rather than an inline value."""
    if len(frames) != 1:
        return False
    first = frames[0]
    raw = first.bytes if hasattr(first, "bytes") else first
    return bytes(raw[: len(MARKER)]) == MARKER


class StoreClient:
    """Talks to the node agent's store service; safe to use from several threads.

    Parameters
    ----------
    transport
        The process's authenticated ZeroMQ transport.
    address
        The agent's store endpoint (``tcp://host:port``).
    store_id
        The store's id (names its segment files).
    """

    def __init__(
        self,
        transport: Any,
        address: str,
        store_id: str,
        shm_dir: str = SHM_DIR,
        keep_mapped: int = 0,
        writer: str = "",
    ) -> None:
        self.address = address
        self.writer = writer  # a worker's id: the agent frees what it never sealed if it dies
        self.store_id = store_id
        self.shm_dir = shm_dir
        # Workers keep their last few mappings: a ref passed to many tasks is then mapped once,
        # and its pages are not faulted in again for every task.
        self._keep = keep_mapped
        self._recent: OrderedDict[str, Any] = OrderedDict()
        self._sock = transport.client(zmq.DEALER, address, aio=False)
        # Re-entrant: a mapping's finalizer may unpin (send) from inside a request on this thread.
        self._lock = threading.RLock()
        self._rid = itertools.count(1)
        self._unpinned: deque[str] = deque()  # appended by mapping finalizers (no lock)
        # Keeps mappings of the segments we wrote: the next reused one is a plain memcpy.
        self._writer = SegmentWriter()
        #: Called before reserving a segment large enough to be pooled: the owner sends the
        #: frees of refs dropped meanwhile first, so their segments are free to reuse.
        self.before_large_write: Callable[[], None] | None = None

    def close(self) -> None:
        with self._lock:
            self._sock.close(linger=0)
        self._writer.close()

    # ------------------------------------------------------------------ requests
    def flush(self) -> None:
        """Send the unpins queued by finalizers."""
        if self._unpinned:
            with self._lock:
                self._flush_unpinned()

    def _flush_unpinned(self) -> None:
        while self._unpinned:
            oid = self._unpinned.popleft()
            try:
                self._sock.send_multipart(
                    encode({"k": Kind.STORE_UNPIN, "oid": oid}), flags=zmq.NOBLOCK
                )
            except zmq.ZMQError:
                return

    def _request(
        self, header: dict[str, Any], timeout_ms: int = REQUEST_TIMEOUT_MS
    ) -> dict[str, Any]:
        rid = next(self._rid)
        with self._lock:
            self._flush_unpinned()
            self._sock.send_multipart(encode({**header, "rid": rid}))
            while True:
                if not self._sock.poll(timeout_ms):
                    raise ObjectStoreError(
                        f"the node's object store at {self.address} did not answer within "
                        f"{timeout_ms // 1000} s"
                    )
                reply, _ = receive(self._sock.recv_multipart())
                if reply.get("rid") == rid:
                    break
        if reply.get("ok"):
            return reply
        if reply.get("err") == "full":
            raise ObjectStoreFullError(*reply["args"])
        if reply.get("err") == "missing":
            raise ObjectLostError(str(reply.get("msg")))
        if reply.get("err") == "exists" and reply.get("args"):
            size, sealed = reply["args"]
            raise ObjectExistsError(str(header.get("oid")), int(size), bool(sealed))
        raise ObjectStoreError(str(reply.get("msg", "object store request failed")))

    def _notify(self, header: dict[str, Any]) -> None:
        with self._lock:
            self._flush_unpinned()
            try:
                self._sock.send_multipart(encode(header), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # the agent is gone: nothing left to unpin or free

    # ------------------------------------------------------------------ objects
    def put(self, oid: str, value: Any, job_id: str) -> list[Any]:
        """Serialize ``value``: inline frames when small, else into the store (a marker frame).

        Large buffers are copied once, straight into shared memory.
        """
        return self.put_frames(oid, dumps_oob(value), job_id)

    def put_frames(self, oid: str, frames: list[Any], job_id: str) -> list[Any]:
        """Like :meth:`put`, for frames serialized without copying their buffers."""
        size = segment_size(frames)
        if size <= INLINE_THRESHOLD_BYTES:
            return [frames[0], *(memoryview(f).tobytes() for f in frames[1:])]
        if size >= MIN_POOLED and self.before_large_write is not None:
            self.before_large_write()
        try:
            reply = self._request(
                {"k": Kind.STORE_RESERVE, "oid": oid, "size": size, "job": job_id, "w": self.writer}
            )
        except ObjectExistsError as exc:
            if not exc.sealed:
                raise
            # An earlier attempt of the same task stored this value here (a retry after its
            # node was taken for dead, a rebuild): object ids are immutable, so keep that one.
            size = exc.size
        else:
            try:
                self._writer.write(reply["path"], frames, bool(reply.get("reused")))
            except BaseException:
                self.free([oid])
                raise
            self._request({"k": Kind.STORE_SEAL, "oid": oid, "w": self.writer})
        meta = {
            "oid": oid,
            "store": self.store_id,
            "size": size,
            "addr": self.address,
            "job": job_id,
        }
        return [MARKER + msgpack.packb(meta)]

    def get(self, frames: Sequence[Any]) -> Any:
        """Deserialize a stored object: buffers are read-only views of its shared memory."""
        first = frames[0]
        raw = first.bytes if hasattr(first, "bytes") else bytes(first)
        meta = msgpack.unpackb(raw[len(MARKER) :])
        oid = meta["oid"]
        mm = self._recent.get(oid)
        if mm is not None:
            self._recent.move_to_end(oid)
            return loads_frames(segment_frames(mm))
        if meta.get("store") != self.store_id:
            if not meta.get("addr"):
                raise ObjectLostError(f"object {oid} lives in another node's store")
            # Our agent copies it from the node that holds it (once per node), then we map it.
            path = self._request(
                {"k": Kind.STORE_PULL, "oid": oid, "from": meta["addr"], "job": meta.get("job")},
                PULL_TIMEOUT_MS,
            )["path"]
            mm = self._open_pinned(oid, path)
        else:
            mm = self._open_local(oid)
        # The object stays pinned (not spilled) while anything still uses the mapping.
        # The garbage collector runs finalizers anywhere, even between two frames of a message we
        # are sending: only queue the unpin here; it leaves with the next message or flush().
        weakref.finalize(mm, self._unpinned.append, oid)
        if self._keep:
            self._remember(oid, mm)
        return loads_frames(segment_frames(mm))

    def _open_pinned(self, oid: str, path: str) -> Any:
        try:
            return open_segment(path)
        except FileNotFoundError:
            self._notify({"k": Kind.STORE_UNPIN, "oid": oid})
            # Freed between the agent's answer and now (its node dropped everything, its job
            # ended): lost, which its owner can rebuild, not an error that fails the reader.
            raise ObjectLostError(f"object {oid} was freed on this node") from None
        except BaseException:
            self._notify({"k": Kind.STORE_UNPIN, "oid": oid})
            raise

    def _open_local(self, oid: str) -> Any:
        try:
            # Fast path: the segment is in shared memory; map it and tell the agent (no wait).
            # Were it spilled right after, our mapping would stay valid all the same.
            mm = open_segment(os.path.join(self.shm_dir, segment_name(self.store_id, oid)))
            self._notify({"k": Kind.STORE_PIN, "oid": oid})
        except FileNotFoundError:  # spilled: the agent restores it (and pins it) first
            path = self._request({"k": Kind.STORE_LOCATE, "oid": oid})["path"]
            mm = self._open_pinned(oid, path)
        return mm

    def _remember(self, oid: str, mm: Any) -> None:
        self._recent[oid] = mm
        while len(self._recent) > self._keep:
            self._recent.popitem(last=False)

    def forget_freed(self) -> None:
        """Drop kept mappings of objects that were freed or spilled meanwhile."""
        for oid in list(self._recent):
            if not os.path.exists(os.path.join(self.shm_dir, segment_name(self.store_id, oid))):
                del self._recent[oid]

    def free(self, oids: list[str]) -> None:
        """The owner is done with these objects."""
        if oids:
            self._notify({"k": Kind.STORE_FREE, "oids": oids})
