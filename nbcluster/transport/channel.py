"""The transport seam: what the head and agents need from a message transport, and two of them.

A :class:`Listener` is a bound endpoint many peers connect to; each received message comes with
the identity of the peer that sent it, and answers go back by that identity. A :class:`Channel`
is one connection to a listener. A :class:`Network` makes both. Messages are lists of frames
(:mod:`nbcluster.protocol.codec`).

- :class:`ZmqNetwork`: the real one, ZeroMQ ROUTER/DEALER sockets with CurveZMQ authentication,
  made by a :class:`~nbcluster.transport.sockets.Transport` (its security is unchanged).
- :class:`MemoryNetwork`: asyncio queues in one process, so that head and agent logic can be
  run and tested together without sockets.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

import zmq

from nbcluster.exceptions import ConnectionFailedError
from nbcluster.transport.sockets import Transport

log = logging.getLogger(__name__)


#: Received frames smaller than this are copied to ``bytes`` even on a ``copy=False`` channel.
#: libzmq decodes the small messages of one read in place, in a shared 8 KiB buffer: one small
#: frame kept (a task's result, held as long as its ref) would keep that whole buffer alive.
SMALL_FRAME = 64 * 1024
#: Messages a listener takes in per turn of its loop before the loop serves others.
READ_BATCH = 256


class PeerUnreachable(ConnectionError):
    """A listener has no connection to that peer (it left, or never connected)."""


class Channel(Protocol):
    """One connection to a listener: messages in order, both ways."""

    async def send(self, frames: Sequence[Any]) -> None:
        """Queue one message (a list of frames) for the listener."""
        ...

    async def recv(self) -> list[Any]:
        """The next message from the listener."""
        ...

    def close(self) -> None:
        """Close the connection (what is still queued may be lost)."""
        ...


class Listener(Protocol):
    """A bound endpoint: messages from every peer connected to it, each with its identity."""

    #: Where peers connect (``tcp://host:port``).
    endpoint: str

    async def send(self, peer: bytes, frames: Sequence[Any]) -> None:
        """Queue one message for ``peer``.

        Raises
        ------
        PeerUnreachable
            If no peer of that identity is connected.
        """
        ...

    def send_nowait(self, peer: bytes, frames: Sequence[Any]) -> None:
        """Queue one message for ``peer`` without waiting; one that cannot be sent (the peer
        left) is logged and dropped."""
        ...

    async def recv(self) -> tuple[bytes, list[Any]]:
        """The next message from any peer, with that peer's identity."""
        ...

    def close(self) -> None:
        """Stop listening."""
        ...


class Network(Protocol):
    """Makes listeners and channels (one per process, closed with it)."""

    def listen(self, endpoint: str) -> Listener:
        """Bind ``endpoint`` (``tcp://host:0`` picks a free port: see ``Listener.endpoint``)."""
        ...

    async def connect(self, endpoint: str, verify_timeout: float | None = None) -> Channel:
        """Connect to a listener; with ``verify_timeout``, wait until it answered (and, on
        ZeroMQ, accepted our credentials) for at most that long."""
        ...

    def close(self) -> None:
        """Close every listener and channel made here."""
        ...


# ------------------------------------------------------------------------------ ZeroMQ
class ZmqChannel:
    """A :class:`Channel` over an asyncio ZeroMQ DEALER socket (``copy=False``: received
    frames are ``zmq.Frame`` views, for messages whose payloads may be large)."""

    def __init__(self, sock: Any, copy: bool = True) -> None:
        self.sock = sock
        self.copy = copy

    async def send(self, frames: Sequence[Any]) -> None:
        await self.sock.send_multipart(frames)

    async def recv(self) -> list[Any]:
        frames: list[Any] = await self.sock.recv_multipart(copy=self.copy)
        if not self.copy:
            return [f if len(f) >= SMALL_FRAME else f.bytes for f in frames]
        return frames

    def close(self) -> None:
        self.sock.close(linger=0)


class ZmqListener:
    """A :class:`Listener` over a plain (not asyncio) ZeroMQ ROUTER socket (``ROUTER_MANDATORY``).

    The loop watches the socket's descriptor itself and, when it fires, takes in every waiting
    message at once (at most :data:`READ_BATCH` per turn): pyzmq's asyncio wrapper makes a future,
    a callback and an ``EVENTS`` look per message, which was most of what a head serving 1,000
    pinging agents did besides its own work. Sends never block (high-water marks are off).

    The descriptor is edge-triggered and a send may take in what arrived meanwhile without it
    firing again, so a send made while :meth:`recv` waits schedules one look at ``EVENTS``.
    The socket is used on its loop's thread only (ZeroMQ sockets are not thread-safe).
    """

    def __init__(self, sock: Any, endpoint: str) -> None:
        self.sock, self.endpoint = sock, endpoint
        self._fd: int = sock.getsockopt(zmq.FD)
        self._inbox: deque[list[Any]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._look_due = False
        self._closed = False

    async def send(self, peer: bytes, frames: Sequence[Any]) -> None:
        try:
            self.sock.send_multipart([peer, *frames], zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: that peer is not connected
            raise PeerUnreachable(str(exc)) from None
        finally:
            self._sent()

    def send_nowait(self, peer: bytes, frames: Sequence[Any]) -> None:
        try:
            # copy=False: pyzmq still copies frames under its copy threshold (64 KiB); a large
            # one (an object's chunk) goes without a copy.
            self.sock.send_multipart([peer, *frames], zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            log.debug("send to %r failed: %s", peer, exc)
        self._sent()

    async def recv(self) -> tuple[bytes, list[Any]]:
        inbox = self._inbox
        while not inbox:
            loop = self._watch()
            self._read()  # also what a send took in without the descriptor firing
            if inbox:
                break
            if self._closed:
                raise ConnectionError(f"the listener at {self.endpoint} was closed")
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        frames = inbox.popleft()
        return frames[0], frames[1:]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        self.sock.close(linger=0)
        self._wake()

    # ------------------------------------------------------------------ the descriptor
    def _watch(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
            loop.add_reader(self._fd, self._readable)
        return loop

    def _readable(self) -> None:
        self._look_due = False
        if self._read() == READ_BATCH and self._loop is not None:
            self._loop.call_soon(self._readable)  # more: after the loop's other work
        if self._inbox:
            self._wake()

    def _read(self) -> int:
        """Take in the messages waiting (at most :data:`READ_BATCH`); returns how many."""
        if self._closed:
            return 0
        sock, inbox = self.sock, self._inbox
        n = 0
        while n < READ_BATCH:
            try:
                inbox.append(sock.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
            except zmq.ZMQError as exc:
                log.debug("reading on %s failed: %s", self.endpoint, exc)
                break
            n += 1
        return n

    def _sent(self) -> None:
        if self._waiter is not None and not self._look_due and self._loop is not None:
            self._look_due = True
            self._loop.call_soon(self._readable)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class ZmqNetwork:
    """The ZeroMQ :class:`Network`: CURVE-authenticated sockets of one :class:`Transport`."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    def listen(self, endpoint: str) -> ZmqListener:
        sock, bound = self.transport.server(zmq.ROUTER, endpoint, aio=False)
        return ZmqListener(sock, bound)

    async def connect(self, endpoint: str, verify_timeout: float | None = None) -> ZmqChannel:
        if verify_timeout is None:
            return ZmqChannel(self.transport.client(zmq.DEALER, endpoint))
        sock = await self.transport.connect_verified(zmq.DEALER, endpoint, verify_timeout)
        return ZmqChannel(sock)

    def close(self) -> None:
        self.transport.close()


# ------------------------------------------------------------------------------ in memory
class MemoryChannel:
    """One end of an in-memory connection (a :class:`Channel`)."""

    def __init__(self, listener: MemoryListener, ident: bytes) -> None:
        self.listener, self.ident = listener, ident
        self.inbox: asyncio.Queue[list[Any]] = asyncio.Queue()
        self.closed = False

    async def send(self, frames: Sequence[Any]) -> None:
        if not self.closed and not self.listener.closed:  # like ZeroMQ: dropped, no error
            self.listener.inbox.put_nowait((self.ident, [bytes(f) for f in frames]))

    async def recv(self) -> list[Any]:
        return await self.inbox.get()

    def close(self) -> None:
        self.closed = True
        self.listener.peers.pop(self.ident, None)


class MemoryListener:
    """An in-memory :class:`Listener`; peers get identities as ZeroMQ would give them."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.inbox: asyncio.Queue[tuple[bytes, list[Any]]] = asyncio.Queue()
        self.peers: dict[bytes, MemoryChannel] = {}
        self.closed = False
        self._ids = itertools.count(1)

    def connect(self) -> MemoryChannel:
        """A new connection from a new peer."""
        ch = MemoryChannel(self, b"\0peer-%d" % next(self._ids))
        self.peers[ch.ident] = ch
        return ch

    async def send(self, peer: bytes, frames: Sequence[Any]) -> None:
        ch = self.peers.get(peer)
        if ch is None or ch.closed:
            raise PeerUnreachable(f"no peer {peer!r}")
        ch.inbox.put_nowait([bytes(f) for f in frames])

    def send_nowait(self, peer: bytes, frames: Sequence[Any]) -> None:
        ch = self.peers.get(peer)
        if ch is None or ch.closed:
            log.debug("send to %r failed: not connected", peer)
            return
        ch.inbox.put_nowait([bytes(f) for f in frames])

    async def recv(self) -> tuple[bytes, list[Any]]:
        return await self.inbox.get()

    def close(self) -> None:
        self.closed = True


class MemoryNetwork:
    """A :class:`Network` of asyncio queues: every listener and channel lives in this process.

    Frames are copied to ``bytes`` on the way, as they would be by a socket. Endpoints look like
    ZeroMQ's (``tcp://host:port``, with made-up ports) so that code parsing them works unchanged.
    """

    def __init__(self) -> None:
        self.listeners: dict[str, MemoryListener] = {}
        self._ports = itertools.count(40000)

    def listen(self, endpoint: str) -> MemoryListener:
        host_port = endpoint.removeprefix("tcp://")
        host, _, port = host_port.rpartition(":")
        if port in ("0", "*"):
            port = str(next(self._ports))
        bound = f"tcp://{host}:{port}"
        if bound in self.listeners and not self.listeners[bound].closed:
            raise ConnectionFailedError(f"could not bind {bound}: already in use")
        listener = self.listeners[bound] = MemoryListener(bound)
        return listener

    async def connect(self, endpoint: str, verify_timeout: float | None = None) -> MemoryChannel:
        listener = self.listeners.get(endpoint)
        if listener is None or listener.closed:
            raise ConnectionFailedError(f"nothing listens at {endpoint}")
        return listener.connect()

    def close(self) -> None:
        for listener in self.listeners.values():
            listener.close()
