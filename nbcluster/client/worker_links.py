"""The driver's sockets to its leased workers, read on the I/O thread's loop.

Each worker is reached on two plain (not asyncio) ZeroMQ sockets: its task socket (tasks out,
results in) and its control socket (cancels and steals, heard while it runs user code). The loop
watches each task socket's descriptor and, when it fires, takes in every waiting message at once
(at most :data:`WORKER_READ_BATCH` before serving others). The descriptor is edge-triggered and a
send may take in what arrived meanwhile without it firing again, so every send schedules one
look at ``EVENTS`` once the loop's turn is over.

A worker on this host (same kernel and network namespace, same user) is reached on a Unix
socket instead of its ZeroMQ task socket (:mod:`nbcluster.transport.local`): no ZeroMQ I/O
threads between us, a round trip ~100 µs shorter. Its control socket stays ZeroMQ. A user
thread that submits a task writes it to a local link itself (:meth:`WorkerLinks.send_now`,
holding the client's lock, as the loop's callbacks here do).

What goes to a worker's task socket during one turn of the loop leaves at the end of the turn,
in order, as one message: a ``BATCH`` when there are several (a turn that took in a dozen
results sends the dozen tasks that follow them at once). Each ZeroMQ message costs both ends'
I/O threads a wake-up and ~20 µs of CPU, more than a task's own bookkeeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

import zmq

from nbcluster.client.workers import WorkerConn
from nbcluster.protocol.codec import encode
from nbcluster.transport import Transport
from nbcluster.transport import local as local_links
from nbcluster.transport.local import LocalLinkError, ReadBuffer, Unpacker, pack
from nbcluster.transport.serve import batched

log = logging.getLogger("nbcluster")

#: Messages taken from one worker before the loop serves others.
WORKER_READ_BATCH = 256
#: Reads (of up to :data:`~nbcluster.transport.local.READ_CHUNK` bytes) from a local link per turn.
LOCAL_READ_CHUNKS = 8


class _Link:
    """The sockets of one :class:`WorkerConn`: a ZeroMQ task socket, or a local link."""

    __slots__ = ("closed", "conn", "ctrl", "fd", "local", "lout", "out", "sock", "unpacker")

    def __init__(self, sock: Any, ctrl: Any, conn: WorkerConn, local: Any = None) -> None:
        self.sock = sock
        self.ctrl = ctrl
        self.conn = conn
        self.local: socket.socket | None = local
        self.fd: int = local.fileno() if local is not None else sock.getsockopt(zmq.FD)
        # Local link only: results (as on the ZeroMQ socket, no size limit), unsent bytes.
        self.unpacker = Unpacker(0) if local is not None else None
        self.lout = bytearray()
        self.closed = False
        self.out: list[list[Any]] = []  # messages for the task socket, sent at the turn's end


class WorkerLinks:
    """Every worker connection of one client.

    Used on the I/O thread, and by a user thread sending a task itself (:meth:`send_now`);
    either holds ``lock`` meanwhile (the loop's callbacks here take it).

    Parameters
    ----------
    loop
        The I/O thread's loop.
    transport
        The client's authenticated transport.
    dispatch
        Called with ``(conn, frames)`` for each message a worker sends.
    lock
        The client's lock (:attr:`nbcluster.client.shell.IoShell.lock`).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        transport: Transport,
        dispatch: Callable[[WorkerConn, list[Any]], Any],
        lock: Any,
    ) -> None:
        self._loop = loop
        self._lock = lock
        self._transport = transport
        self._dispatch = dispatch
        self._links: dict[WorkerConn, _Link] = {}
        self._queued: set[_Link] = set()  # links with messages waiting in ``out``
        self._flush_due = False
        self._local_key = transport.keys.server_secret if local_links.enabled() else None
        self._rbuf = ReadBuffer()  # every local link is read into it, one at a time

    def open(self, conn: WorkerConn, hello: list[Any]) -> None:
        """Connect to ``conn`` and send it ``hello`` (its BIND) first."""
        local = None
        if self._local_key is not None:  # a worker on this host: a Unix socket is shorter
            local = local_links.connect(local_links.local_name(self._local_key, conn.addr))
        sock = None if local else self._transport.client(zmq.DEALER, conn.addr, aio=False)
        ctrl = self._transport.client(zmq.DEALER, conn.control_addr, aio=False)
        link = self._links[conn] = _Link(sock, ctrl, conn, local)
        self._loop.add_reader(link.fd, self._readable, link)
        self._queue(link, hello)

    def close(self, conn: WorkerConn) -> None:
        """Drop the connection to ``conn`` (perhaps from inside its own read: a RESULT saying
        the worker retires; the read stops at ``closed``)."""
        link = self._links.pop(conn, None)
        if link is None:
            return
        link.closed = True
        self._queued.discard(link)
        self._loop.remove_reader(link.fd)
        if link.local is not None:
            self._loop.remove_writer(link.fd)
            link.local.close()
        else:
            link.sock.close(linger=0)
        link.ctrl.close(linger=0)

    def close_all(self) -> None:
        """Close every connection (the client is closing)."""
        for conn in list(self._links):
            self.close(conn)

    def send(self, conn: WorkerConn, frames: list[Any], control: bool = False) -> None:
        """Send ``frames`` on ``conn``'s task socket (or its control socket)."""
        link = self._links.get(conn)
        if link is None:
            return
        if control:  # (a control socket carries one message now and then: sent at once)
            self._send(link, link.ctrl, frames)
        else:
            self._queue(link, frames)

    def send_both(self, conn: WorkerConn, frames: list[Any]) -> None:
        """Send ``frames`` on both of ``conn``'s sockets (a cancel: whichever is heard first)."""
        link = self._links.get(conn)
        if link is not None:
            self._queue(link, list(frames))
            self._send(link, link.ctrl, list(frames))

    def _queue(self, link: _Link, frames: list[Any]) -> None:
        if not link.out:
            self._queued.add(link)
        link.out.append(frames)
        if not self._flush_due:
            self._flush_due = True
            self._loop.call_soon(self._flush_later)

    def _flush_later(self) -> None:
        with self._lock:
            self._flush_due = False
            self.flush()

    def send_now(self, conn: WorkerConn, header: Any, payload: list[Any]) -> bool:
        """Send a message on ``conn``'s local link at once (a user thread, holding the lock);
        ``False`` if ``conn`` is on ZeroMQ (only the loop's thread may use it: leave it there).

        The order is kept: behind what the loop queued or could not write yet, it waits there.
        Saves waking the I/O thread for a task that goes to a waiting worker.
        """
        link = self._links.get(conn)
        if link is None or link.closed:
            return True  # (dropped, as send() would: the lease is gone; its tasks are requeued)
        if link.local is None:
            return False
        frames = encode(header, payload)
        if link.out:  # (then a flush is due: nothing is queued without one)
            link.out.append(frames)
        elif self._send_local(link, frames):  # (only the loop's thread may watch a descriptor)
            self._loop.call_soon_threadsafe(self._watch_writable, link)
        return True

    def _watch_writable(self, link: _Link) -> None:
        with self._lock:
            if link.lout and not link.closed:
                self._loop.add_writer(link.fd, self._writable, link)

    def flush(self) -> None:
        """Send what was queued (one message per worker), then look for answers.

        Called where a burst of work ends (commands from user threads taken in, a worker's
        messages read), and at the end of any turn of the loop that queued something.
        """
        if not self._queued:
            return
        links = list(self._queued)
        self._queued.clear()
        for link in links:
            out, link.out = link.out, []
            if link.closed:
                continue
            if link.local is not None:
                for frames in batched(out):
                    if self._send_local(link, frames):
                        self._loop.add_writer(link.fd, self._writable, link)
                continue
            for frames in batched(out):
                self._send(link, link.sock, frames)
            # A send may take in what arrived meanwhile without the descriptor firing again.
            # (What reading it queues leaves at the end of this turn.)
            if not link.closed and link.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                self._read(link)

    def _send(self, link: _Link, sock: Any, frames: list[Any]) -> None:
        # High-water marks are off: a send never blocks.
        try:
            sock.send_multipart(frames, zmq.NOBLOCK)  # (small frames: copying is cheaper)
        except zmq.ZMQError as exc:
            log.debug("send to worker %s failed: %s", link.conn.addr, exc)

    def _send_local(self, link: _Link, frames: list[Any]) -> bool:
        """Write ``frames`` on a local link; whether bytes now wait for it to be writable (and
        did not before: then the caller has it watched)."""
        assert link.local is not None
        waited = bool(link.lout)
        try:
            waits = local_links.write(link.local, link.lout, pack(frames))
        except OSError as exc:  # the worker is gone (the head will say so)
            log.debug("send to worker %s failed: %s", link.conn.addr, exc)
            return False
        return waits and not waited

    def _writable(self, link: _Link) -> None:
        assert link.local is not None
        with self._lock:
            try:
                waits = local_links.flush(link.local, link.lout)
            except OSError as exc:
                log.debug("send to worker %s failed: %s", link.conn.addr, exc)
                link.lout.clear()
                waits = False
            if not waits:
                self._loop.remove_writer(link.fd)

    def _read_local(self, link: _Link) -> None:
        """Take in what a worker on a local link sent (a few chunks at most per turn)."""
        sock, dispatch, conn = link.local, self._dispatch, link.conn
        assert sock is not None
        rbuf = self._rbuf
        for _ in range(LOCAL_READ_CHUNKS):
            try:
                data = rbuf.recv(sock)
            except BlockingIOError:
                return
            except OSError as exc:
                log.debug("reading from worker %s failed: %s", conn.addr, exc)
                data = memoryview(b"")
            if not data:  # the worker is gone: the head says so (its lease is lost)
                self._loop.remove_reader(link.fd)
                return
            assert link.unpacker is not None
            try:
                messages = link.unpacker.feed(data)
            except LocalLinkError as exc:
                log.warning("worker %s sent %s: link dropped", conn.addr, exc)
                self._loop.remove_reader(link.fd)
                return
            for frames in messages:
                if link.closed:
                    return
                dispatch(conn, frames)
            if len(data) < rbuf.size:
                return
        self._loop.call_soon(self._readable, link)  # more: after the others' turn

    def _read(self, link: _Link) -> None:
        """Take in every message waiting from a worker (a few hundred at most per turn)."""
        if link.local is not None:
            self._read_local(link)
            return
        sock, dispatch, conn = link.sock, self._dispatch, link.conn
        for _ in range(WORKER_READ_BATCH):
            if link.closed:
                break
            try:
                # Copied (bytes): results are small (large ones are in a node's store), and a
                # kept zmq.Frame would pin libzmq's 8 KiB receive buffer.
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            except zmq.ZMQError as exc:
                log.debug("reading from worker %s failed: %s", conn.addr, exc)
                break
            dispatch(conn, frames)
        else:
            self._loop.call_soon(self._readable, link)  # more: after the others' turn

    def _readable(self, link: _Link) -> None:
        with self._lock, self.burst():
            self._read(link)
        # (What those messages caused, the tasks that follow results, left at the burst's end.)

    @contextlib.contextmanager
    def burst(self) -> Iterator[None]:
        """Queue what is sent meanwhile, and flush it at the end (lock held).

        Without it each first queued message schedules a flush for the end of the loop's
        turn: one more turn of the loop per task, for a flush that finds nothing left.
        """
        due = self._flush_due
        self._flush_due = True
        try:
            yield
        finally:
            self._flush_due = due  # (a flush scheduled before still comes: harmless)
            self.flush()
