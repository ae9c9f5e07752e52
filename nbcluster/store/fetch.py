"""Reading a stored object straight from the node that holds it, into this process's memory.

A process with no store of its own (a driver on a host where no node agent runs, or one that
connected before its agent registered) cannot map stored values. It asks the holder's store
socket for the same chunked stream another node's agent pulls (``STORE_READ``, see
:mod:`nbcluster.store.transfer`), over its own authenticated connection, and assembles the segment
in a private buffer: one copy, nothing written to any node's store. On the bulk channel
(:mod:`nbcluster.store.bulk`) each chunk is decrypted straight into that buffer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import zmq
from zmq.utils.monitor import parse_monitor_message

from nbcluster.exceptions import ObjectLostError
from nbcluster.protocol.codec import decode, encode
from nbcluster.protocol.messages import Kind
from nbcluster.protocol.validation import validate
from nbcluster.store import bulk
from nbcluster.store.bulk import CONNECT_TIMEOUT_S, STALL_TIMEOUT_S, TICK_MS
from nbcluster.store.client import MARKER
from nbcluster.store.errors import ObjectStoreError
from nbcluster.store.segment import loads_frames, segment_frames
from nbcluster.store.transfer import _MONITORED, CHUNK_BYTES, WINDOW


def stored_meta(frames: Sequence[Any]) -> dict[str, Any]:
    """The description inside a stored object's marker frame (oid, store, size, addr, job)."""
    first = frames[0]
    raw = first.bytes if hasattr(first, "bytes") else bytes(first)
    meta = msgpack.unpackb(raw[len(MARKER) :])
    if not isinstance(meta, dict):
        raise ObjectStoreError("malformed stored-object marker")
    return meta


def fetch_stored(
    transport: Any,
    frames: Sequence[Any],
    gone: Callable[[str], bool] | None = None,
) -> Any:
    """Deserialize a stored object read from its holder.

    Numpy arrays come back as read-only views of a private buffer, as they would from the store.

    Parameters
    ----------
    transport
        This process's :class:`~nbcluster.transport.sockets.Transport`.
    frames
        The object's marker frame (as :func:`~nbcluster.store.client.is_stored` recognizes).
    gone
        Called with the holder's store id while waiting: ``True`` once that node is known dead,
        which ends the read at once.

    Raises
    ------
    ObjectLostError
        If the holder does not have it, is known dead, refuses the connection, or goes away.
    """
    meta = stored_meta(frames)
    oid, addr, store = str(meta.get("oid")), str(meta.get("addr") or ""), str(meta.get("store"))
    if not addr:
        raise ObjectLostError(f"object {oid} lives in another node's store, at no known address")
    buf = read_segment(transport, oid, addr, lambda: gone is not None and gone(store))
    return loads_frames(segment_frames(memoryview(buf).toreadonly()))


def read_segment(
    transport: Any, oid: str, addr: str, gone: Callable[[], bool] = lambda: False
) -> bytearray:
    """Stream segment ``oid`` from the store socket at ``addr`` into a new buffer.

    Flow control is the pullers': each chunk received grants the holder one more. A holder
    that offers the bulk channel sends the bytes there instead (:func:`.bulk.receive`).
    """
    sock = transport.client(zmq.DEALER, addr, aio=False, connect=False)
    sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)  # a holder cut off without a FIN is noticed
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10_000)
    mon = sock.get_monitor_socket(_MONITORED)
    sock.connect(addr)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(mon, zmq.POLLIN)
    buf = bytearray()
    size = -1
    received = 0
    done = False

    def lost(why: str) -> ObjectLostError:
        got = f" after {received} of {size} bytes" if size >= 0 else ""
        return ObjectLostError(f"object {oid} could not be fetched from {addr}{got}: {why}")

    try:
        read = {"k": Kind.STORE_READ, "rid": 1, "oid": oid, "chunk": CHUNK_BYTES}
        sock.send_multipart(encode({**read, "window": WINDOW, "streams": bulk.STREAMS}))
        connected = False
        start = last = time.monotonic()
        while not done:
            if gone():
                raise lost("its node died")
            events = dict(poller.poll(TICK_MS))
            now = time.monotonic()
            if mon in events:
                event = parse_monitor_message(mon.recv_multipart())["event"]
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    connected = True
                elif connected:
                    raise lost("its node went away mid-transfer")
                else:
                    raise lost("its node refused or dropped the connection")
            if sock in events:
                h, payload = decode(sock.recv_multipart(copy=False))
                if h.get("rid") != 1:
                    continue
                if h.get("k") == Kind.STORE_BULK:
                    validate(h, payload)
                    size = int(h["size"])
                    buf = bytearray(size)
                    bulk.receive(addr, h, oid, memoryview(buf), gone)
                    done = True
                    break
                if h.get("k") != Kind.STORE_CHUNK:
                    msg = f"object {oid} could not be fetched from {addr}: "
                    msg += str(h.get("msg", "it is gone"))
                    if h.get("err") == "missing":
                        raise ObjectLostError(msg)
                    raise ObjectStoreError(msg)
                sock.send_multipart(encode({"k": Kind.STORE_CREDIT, "rid": 1, "n": 1}))
                total, off = int(h["size"]), int(h["off"])
                data = memoryview(payload[0] if payload else b"").cast("B")
                if size < 0:
                    if total < 0:
                        raise ObjectStoreError(f"object {oid}: the holder sent a negative size")
                    size = total
                    buf = bytearray(size)
                if total != size or off != received or off + data.nbytes > size:
                    raise ObjectStoreError(
                        f"object {oid}: the holder sent bytes {off}..{off + data.nbytes} of "
                        f"{total}, expected {received} of {size}"
                    )
                buf[off : off + data.nbytes] = data
                received += data.nbytes
                done = received == size
                last = time.monotonic()
            elif not connected and now - start > CONNECT_TIMEOUT_S:
                raise lost(f"no answer within {CONNECT_TIMEOUT_S:.0f} s")
            elif now - last > STALL_TIMEOUT_S:
                raise lost(f"nothing arrived for {STALL_TIMEOUT_S:.0f} s")
        return buf
    except BaseException:
        if not done:  # tell the holder to stop streaming (and unpin)
            try:
                stop = encode({"k": Kind.STORE_CREDIT, "rid": 1, "n": 0})
                sock.send_multipart(stop, flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        raise
    finally:
        sock.disable_monitor()
        mon.close(linger=0)
        sock.close(linger=0 if done else 200)
