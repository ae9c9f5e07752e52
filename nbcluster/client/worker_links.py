"""The driver's sockets to its leased workers, read on the I/O thread's loop.

Each worker is reached on two plain (not asyncio) ZeroMQ sockets: its task socket (tasks out,
results in) and its control socket (cancels and steals, heard while it runs user code). The loop
watches each task socket's descriptor and, when it fires, takes in every waiting message at once
(at most :data:`WORKER_READ_BATCH` before serving others). The descriptor is edge-triggered and a
send may take in what arrived meanwhile without it firing again, so every send schedules one
look at ``EVENTS`` once the loop's turn is over.

What goes to a worker's task socket during one turn of the loop leaves at the end of the turn,
in order, as one message: a ``BATCH`` when there are several (a turn that took in a dozen
results sends the dozen tasks that follow them at once). Each ZeroMQ message costs both ends'
I/O threads a wake-up and ~20 µs of CPU, more than a task's own bookkeeping.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import zmq

from nbcluster.client.workers import WorkerConn
from nbcluster.transport import Transport
from nbcluster.transport.serve import batched

log = logging.getLogger("nbcluster")

#: Messages taken from one worker before the loop serves others.
WORKER_READ_BATCH = 256


class _Link:
    """The sockets of one :class:`WorkerConn`."""

    __slots__ = ("closed", "conn", "ctrl", "fd", "out", "sock")

    def __init__(self, sock: Any, ctrl: Any, conn: WorkerConn) -> None:
        self.sock = sock
        self.ctrl = ctrl
        self.conn = conn
        self.fd: int = sock.getsockopt(zmq.FD)
        self.closed = False
        self.out: list[list[Any]] = []  # messages for the task socket, sent at the turn's end


class WorkerLinks:
    """Every worker connection of one client (I/O thread only).

    Parameters
    ----------
    loop
        The I/O thread's loop.
    transport
        The client's authenticated transport.
    dispatch
        Called with ``(conn, frames)`` for each message a worker sends.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        transport: Transport,
        dispatch: Callable[[WorkerConn, list[Any]], Any],
    ) -> None:
        self._loop = loop
        self._transport = transport
        self._dispatch = dispatch
        self._links: dict[WorkerConn, _Link] = {}
        self._queued: set[_Link] = set()  # links with messages waiting in ``out``
        self._flush_due = False

    def open(self, conn: WorkerConn, hello: list[Any]) -> None:
        """Connect to ``conn`` and send it ``hello`` (its BIND) first."""
        sock = self._transport.client(zmq.DEALER, conn.addr, aio=False)
        ctrl = self._transport.client(zmq.DEALER, conn.control_addr, aio=False)
        link = self._links[conn] = _Link(sock, ctrl, conn)
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
        link.sock.close(linger=0)
        link.ctrl.close(linger=0)

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
        self._flush_due = False
        self.flush()

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

    def _read(self, link: _Link) -> None:
        """Take in every message waiting from a worker (a few hundred at most per turn)."""
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
        self._read(link)
        self.flush()  # what those messages caused (the tasks that follow results) leaves now
