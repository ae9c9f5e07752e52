"""The worker's end of local links (:mod:`nbcluster.transport.local`): drivers on its host.

Each connection gets an identity as a ROUTER peer would (``\\x01`` and a number: ZeroMQ's own
start with ``\\x00``), so the rest of the worker answers it as any other driver. The main thread
accepts and reads (under the worker's socket lock); any thread sends under that lock. A write
the kernel cannot take at once waits in the connection's buffer, sent when the socket is
writable (the main thread polls for it; the control thread retries too, for a main thread busy
in a long call).
"""

from __future__ import annotations

import itertools
import logging
import socket
from typing import Any

import zmq

from nbcluster.transport.local import (
    LocalLinkError,
    ReadBuffer,
    Unpacker,
    accept,
    flush,
    pack,
    write,
)

log = logging.getLogger(__name__)

#: The first byte of a local connection's identity.
LOCAL_MARK = b"\x01"
POLLOUT = int(zmq.POLLOUT)
#: A busy worker (that does not poll) looks for new connections every this many reads.
ACCEPT_EVERY = 64


class _Peer:
    __slots__ = ("closed", "fd", "ident", "out", "sock", "unpacker")

    def __init__(self, sock: socket.socket, ident: bytes, max_bytes: int) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.ident = ident
        self.unpacker = Unpacker(max_bytes)
        self.out = bytearray()  # what the kernel did not take yet
        self.closed = False


class LocalPeers:
    """Every local connection to one worker.

    Parameters
    ----------
    listener
        The worker's listening socket (:func:`nbcluster.transport.local.listen`).
    poller
        The main thread's poller: the listener and each connection are registered with it.
    max_bytes
        The largest message accepted.
    """

    def __init__(self, listener: socket.socket, poller: zmq.Poller, max_bytes: int) -> None:
        self.listener = listener
        self._poller = poller
        self._max = max_bytes
        self._peers: dict[bytes, _Peer] = {}
        self._seq = itertools.count(1)
        self._accept_due = False
        self._reads = 0
        self.pending = False  # some connection has bytes waiting to be written
        self._rbuf = ReadBuffer()  # (reads happen under the worker's socket lock: one at a time)
        poller.register(listener.fileno(), zmq.POLLIN)

    @staticmethod
    def is_local(ident: bytes) -> bool:
        """Whether ``ident`` is one of our connections' identities."""
        return ident[:1] == LOCAL_MARK

    def polled(self, ready: list[tuple[Any, int]]) -> None:
        """What the main thread's poll found: a connection waiting, sockets writable."""
        listener_fd = self.listener.fileno()
        for fd, events in ready:
            if fd == listener_fd:
                self._accept_due = True
            elif int(events) & POLLOUT:  # (int: pyzmq's flags are slow enums)
                self.flush()

    def receive(self) -> list[tuple[bytes, list[bytes]]]:
        """Accept new connections and take in every whole message waiting (main thread, under
        the socket lock): ``(identity, frames)`` pairs."""
        self._reads += 1
        if self._accept_due or self._reads % ACCEPT_EVERY == 0:
            # (A worker that never runs out of work polls no more: look now and then anyway.)
            self._accept_due = False
            while (sock := accept(self.listener)) is not None:
                ident = LOCAL_MARK + next(self._seq).to_bytes(4, "big")
                peer = self._peers[ident] = _Peer(sock, ident, self._max)
                self._poller.register(peer.fd, zmq.POLLIN)
        out: list[tuple[bytes, list[bytes]]] = []
        for peer in list(self._peers.values()):
            self._read(peer, out)
        return out

    def send(self, ident: bytes, frames: list[Any]) -> None:
        """Send one message (under the socket lock); dropped if that driver is gone."""
        peer = self._peers.get(ident)
        if peer is None or peer.closed:
            return
        waited = bool(peer.out)
        try:
            waits = write(peer.sock, peer.out, pack(frames))
        except OSError as exc:  # the driver went away
            log.debug("local link %s: %s", ident.hex(), exc)
            self._close(peer)
            return
        if waits and not waited:
            self._want_write(peer, True)

    def flush(self) -> None:
        """Write what waits (under the socket lock)."""
        still = False
        for peer in list(self._peers.values()):
            if not peer.out or peer.closed:
                continue
            try:
                waits = flush(peer.sock, peer.out)
            except OSError as exc:
                log.debug("local link %s: %s", peer.ident.hex(), exc)
                self._close(peer)
                continue
            if waits:
                still = True
            else:
                self._want_write(peer, False)
        self.pending = still

    def close(self) -> None:
        """Close every connection and the listener."""
        for peer in list(self._peers.values()):
            self._close(peer)
        self.listener.close()

    def _read(self, peer: _Peer, out: list[tuple[bytes, list[bytes]]]) -> None:
        while not peer.closed:
            try:
                data = self._rbuf.recv(peer.sock)
            except BlockingIOError:
                return
            except OSError as exc:
                log.debug("local link %s: %s", peer.ident.hex(), exc)
                data = memoryview(b"")
            if not data:  # the driver went away
                self._close(peer)
                return
            try:
                out.extend((peer.ident, frames) for frames in peer.unpacker.feed(data))
            except LocalLinkError as exc:
                log.warning("closing a local link that sent %s", exc)
                self._close(peer)
                return
            if len(data) < self._rbuf.size:
                return  # (all there was: no need for a call that says so)

    def _want_write(self, peer: _Peer, on: bool) -> None:
        self.pending = self.pending or on
        try:
            self._poller.modify(peer.fd, zmq.POLLIN | (zmq.POLLOUT if on else 0))
        except (KeyError, ValueError):
            pass  # (closed meanwhile)

    def _close(self, peer: _Peer) -> None:
        if peer.closed:
            return
        peer.closed = True
        self._peers.pop(peer.ident, None)
        try:
            self._poller.unregister(peer.fd)
        except KeyError:
            pass
        peer.sock.close()
