"""The bulk channel of object transfers: AES-256-GCM over TCP streams, keyed over CurveZMQ.

Real processes only: a standalone head and node agents on loopback (the helpers of
``tests/test_transfer.py``). Tampering is done on the wire: a holder agent started with the
test hook ``NBCLUSTER_TEST_BULK_CORRUPT`` flips a byte of one sealed chunk just before its socket
sends it, and a man-in-the-middle proxy in this process flips a byte of what a real holder sent.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from nbcluster.protocol.codec import encode
from nbcluster.protocol.messages import Kind
from nbcluster.protocol.validation import receive
from nbcluster.store import bulk
from nbcluster.store.errors import ObjectStoreError
from nbcluster.store.fetch import fetch_stored, read_segment
from nbcluster.store.segment import SHM_DIR
from tests.conftest import wait_until
from tests.test_transfer import Cluster, _files, _start_cluster, _stats, _stop_cluster

np = pytest.importorskip("numpy")

MB = 1 << 20
#: Odd sizes: the last chunk of every stream is short, and streams end at different chunks.
ODD = 37 * MB + 12345


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """``holder``, ``reader`` (3 bulk streams of 1 MiB chunks) and ``tamperer`` (its agent
    alters chunk 2 of everything it sends)."""
    c = _start_cluster(tmp_path_factory.mktemp("bulk"))
    try:
        c.join("holder")
        c.join(
            "reader",
            env={"NBCLUSTER_TRANSFER_STREAMS": "3", "NBCLUSTER_TRANSFER_CHUNK_BYTES": str(MB)},
        )
        c.join("tamperer", env={"NBCLUSTER_TEST_BULK_CORRUPT": "2"})
        yield c
    finally:
        _stop_cluster(c)


def _digest(arr: Any) -> str:
    return hashlib.sha256(memoryview(arr).cast("B")).hexdigest()


def _offer(c: Cluster, addr: str, oid: str, streams: int = 2) -> tuple[Any, dict[str, Any]]:
    """Ask the holder at ``addr`` for ``oid`` on the bulk channel, as a puller does (over
    CurveZMQ): its ``STORE_BULK``, and the control socket (closed by the caller)."""
    sock = c.transport.client(zmq.DEALER, addr, aio=False)
    read = {"k": Kind.STORE_READ, "rid": 7, "oid": oid, "chunk": MB, "window": 1}
    sock.send_multipart(encode({**read, "streams": streams}))
    assert sock.poll(30_000), "no answer to STORE_READ"
    h, _ = receive(sock.recv_multipart())
    assert h["k"] == Kind.STORE_BULK, h
    return sock, h


def _refused(port: int, hello: bytes) -> bool:
    """Send ``hello`` to the bulk port: True if the holder closes without sending a byte."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as conn:
        conn.sendall(hello)
        return conn.recv(1) == b""


def test_big_object_crosses_nodes_intact_on_several_streams(nodes: Cluster) -> None:
    c = nodes
    holder, reader, _ = c.nodes
    arr = np.random.default_rng(11).integers(0, 255, ODD, dtype=np.uint8)
    put, get = c.client(holder), c.client(reader)
    before_out, before_in = _stats(c, holder), _stats(c, reader)
    try:
        frames = put.put("odd.p", arr, "job1")
        got = get.get(frames)
        assert got.shape == arr.shape and _digest(got) == _digest(arr)
        size = os.path.getsize(_files(reader.store_id, "odd.p")[0])
        assert _stats(c, reader)["bytes_in"] - before_in["bytes_in"] == size
        assert _stats(c, holder)["bytes_out"] - before_out["bytes_out"] == size
        # A process without a store reads it from the holder on the same channel.
        assert _digest(fetch_stored(c.transport, frames)) == _digest(arr)
        del got
    finally:
        put.free(["odd.p"])
        get.free(["odd.p"])
        put.close()
        get.close()


def test_a_chunk_altered_on_the_wire_aborts_the_pull_and_nothing_is_sealed(
    nodes: Cluster,
) -> None:
    c = nodes
    _, reader, tamperer = c.nodes
    arr = np.random.default_rng(12).random(20 * MB // 8)  # chunk 2 of 20 (5 when fetched)
    put, get = c.client(tamperer), c.client(reader)
    try:
        frames = put.put("bad.p", arr, "job2")
        before = _stats(c, reader)
        for _ in range(2):  # nothing of the first attempt is left to be found by the second
            with pytest.raises(ObjectStoreError, match=r"bad\.p.*chunk 2 .*failed authentication"):
                get.get(frames)
            assert _files(reader.store_id, "bad.p") == []
        after = _stats(c, reader)
        assert after["objects"] == before["objects"] and after["used"] == before["used"]
        # The reader's store and the holder's original are fine: the altered bytes were on the
        # wire only (a process without a store, reading from the holder, sees the same).
        with pytest.raises(bulk.TransferIntegrityError, match="altered in transit"):
            fetch_stored(c.transport, frames)
    finally:
        put.free(["bad.p"])
        put.close()
        get.close()


class _Proxy:
    """A man in the middle on the bulk channel: forwards both ways, and can flip one byte of
    what the holder sends (counted over all streams it carries, in the order they forward)."""

    def __init__(self, flip_at: int | None) -> None:
        self.flip_at = flip_at
        self.forwarded = 0
        self._lock = threading.Lock()

    def connect(self, host: str, port: int, timeout: float) -> socket.socket:
        ours, theirs = socket.socketpair()
        upstream = socket.create_connection((host, port), timeout=timeout)
        upstream.settimeout(None)
        threading.Thread(target=self._pipe, args=(theirs, upstream, False), daemon=True).start()
        threading.Thread(target=self._pipe, args=(upstream, theirs, True), daemon=True).start()
        ours.settimeout(timeout)
        return ours

    def _pipe(self, src: socket.socket, dst: socket.socket, from_holder: bool) -> None:
        try:
            while data := src.recv(1 << 20):
                if from_holder:
                    buf = bytearray(data)
                    with self._lock:
                        at = self.flip_at
                        if at is not None and self.forwarded <= at < self.forwarded + len(buf):
                            buf[at - self.forwarded] ^= 0x80
                        self.forwarded += len(buf)
                    data = bytes(buf)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.mark.parametrize("flip_at", [None, 3 * MB + 5])
def test_a_stranger_on_the_path_cannot_alter_a_transfer(
    nodes: Cluster, monkeypatch: pytest.MonkeyPatch, flip_at: int | None
) -> None:
    c = nodes
    holder = c.nodes[0]
    arr = np.random.default_rng(13).random(10 * MB // 8)
    proxy = _Proxy(flip_at)
    monkeypatch.setattr(bulk, "connect", proxy.connect)
    put = c.client(holder)
    try:
        frames = put.put("mitm.p", arr, "job3")
        if flip_at is None:  # the proxy forwards faithfully: the object arrives
            assert _digest(fetch_stored(c.transport, frames)) == _digest(arr)
            assert proxy.forwarded > arr.nbytes
        else:
            with pytest.raises(bulk.TransferIntegrityError, match=r"mitm\.p.*failed auth"):
                fetch_stored(c.transport, frames)
    finally:
        put.free(["mitm.p"])
        put.close()


def test_without_the_transfer_key_no_stream_is_served(nodes: Cluster) -> None:
    c = nodes
    holder = c.nodes[0]
    arr = np.random.default_rng(14).random(3 * MB // 8)
    put = c.client(holder)
    ctl = None
    try:
        put.put("keyed.p", arr, "job4")
        segment = Path(SHM_DIR, f"nbc-{holder.store_id}-keyed.p").read_bytes()
        ctl, offer = _offer(c, holder.store_address, "keyed.p", streams=2)
        tid, key, port, n = offer["tid"], offer["key"], offer["port"], offer["streams"]
        assert n == 2 and len(key) == 32 and len(tid) == 16
        wrong = os.urandom(32)
        assert _refused(port, bulk.hello(wrong, tid, 0, n))  # a wrong key
        assert _refused(port, bulk.hello(key, os.urandom(16), 0, n))  # an unknown transfer
        assert _refused(port, bulk.hello(key, tid, 2, n))  # a stream it does not have
        assert _refused(port, b"GET / HTTP/1.0\r\n\r\n".ljust(56))  # not a hello at all
        # None of that used the transfer up: the puller with the key gets every byte.
        buf = bytearray(int(offer["size"]))
        bulk.receive(holder.store_address, offer, "keyed.p", memoryview(buf), lambda: False)
        assert bytes(buf) == segment
        # Its hellos, replayed once the streams are claimed, are refused.
        assert _refused(port, bulk.hello(key, tid, 0, n))
        # The holder unpins it once served: it can be freed.
        put.free(["keyed.p"])
        wait_until(lambda: not _files(holder.store_id, "keyed.p"))
    finally:
        if ctl is not None:
            ctl.close(linger=0)
        put.close()


def test_the_chunk_size_and_streams_asked_for_are_bounded(nodes: Cluster) -> None:
    c = nodes
    holder = c.nodes[0]
    put = c.client(holder)
    ctl = None
    try:
        frames = put.put("tiny.p", np.arange(300_000, dtype=np.uint8), "job5")
        ctl, offer = _offer(c, holder.store_address, "tiny.p", streams=64)
        assert offer["streams"] == 1  # one chunk: one stream, whatever was asked
        buf = bytearray(int(offer["size"]))
        bulk.receive(holder.store_address, offer, "tiny.p", memoryview(buf), lambda: False)
        via_fetch = read_segment(c.transport, "tiny.p", holder.store_address)
        assert buf == via_fetch
        del frames
    finally:
        if ctl is not None:
            ctl.close(linger=0)
        put.free(["tiny.p"])
        put.close()
