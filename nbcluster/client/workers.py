"""The workers this client talks to: one connection record per worker process.

Pure records: the sockets behind a :class:`WorkerConn` belong to the I/O shell, which opens and
closes them when told (:class:`~nbcluster.client.instructions.OpenWorker`, ``CloseWorker``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from nbcluster.client.instructions import CloseWorker, Instruction, OpenWorker

if TYPE_CHECKING:
    from nbcluster.client.tasks import Lease


class WorkerConn:
    """A connection to one worker process (kept across leases of the same worker).

    Compared by identity: a result counts only when it came on the connection its task was
    last sent on.
    """

    __slots__ = (
        "addr",
        "closed",
        "control_addr",
        "fns_sent",
        "lease",
        "node_id",
        "node_name",
        "worker_id",
    )

    def __init__(self, addr: str, control_addr: str, worker_id: str = "") -> None:
        self.addr = addr
        self.worker_id = worker_id  # the process behind addr: a later one may reuse its port
        self.control_addr = control_addr
        self.fns_sent: set[str] = set()  # functions this worker has (sent once each)
        self.lease: Lease | None = None
        self.node_id = ""  # where the worker runs (named in its output when that helps)
        self.node_name = ""
        self.closed = False  # its sockets are closed: nothing more goes to this worker

    def __repr__(self) -> str:
        return f"WorkerConn({self.addr}, {self.worker_id or '?'})"


class WorkerConns:
    """Connections by worker address; a new process at an old address gets a new one."""

    def __init__(self, emit: Callable[[Instruction], None]) -> None:
        self._emit = emit
        self.by_addr: dict[str, WorkerConn] = {}

    def conn(self, addr: str, control_addr: str, worker_id: str = "") -> WorkerConn:
        """The connection to a worker (opened once; the shell binds it to our job first)."""
        conn = self.by_addr.get(addr)
        if conn is not None and worker_id and conn.worker_id and conn.worker_id != worker_id:
            # Another worker process listens at this address now (the old one died and its
            # port was reused): it was never bound to our job nor sent our functions.
            self.close(conn)
            conn = None
        if conn is None:
            conn = self.by_addr[addr] = WorkerConn(addr, control_addr, worker_id)
            self._emit(OpenWorker(conn))
        return conn

    def close(self, conn: WorkerConn) -> None:
        """Forget ``conn`` (if still current for its address) and close its sockets."""
        if self.by_addr.get(conn.addr) is conn:
            del self.by_addr[conn.addr]
        if not conn.closed:
            conn.closed = True
            self._emit(CloseWorker(conn))
