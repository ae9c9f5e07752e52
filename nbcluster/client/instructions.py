"""What :class:`~nbcluster.client.state.ClientState` asks its I/O shell to do.

The state never touches a socket, a timer or a clock: each event it handles returns a list of
these, which the shell (:mod:`nbcluster.client.shell`, on the I/O thread) carries out in order.
Headers are the wire dicts (``{"k": Kind..., ...}``), so what goes out is byte for byte what the
head, agents and workers read.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nbcluster.client.inputs import Event
    from nbcluster.client.workers import WorkerConn


@dataclass(slots=True)
class ToHead:
    """Send a message to the head."""

    header: dict[str, Any]
    payload: list[Any] = field(default_factory=list)


@dataclass(slots=True)
class OpenWorker:
    """Connect to a worker (task and control sockets), bind it to our job, read its answers."""

    conn: WorkerConn


@dataclass(slots=True)
class CloseWorker:
    """Stop reading from a worker and close its sockets."""

    conn: WorkerConn


@dataclass(slots=True)
class ToWorker:
    """Send a message on a worker's task socket (opened by an earlier :class:`OpenWorker`)."""

    conn: WorkerConn
    header: dict[str, Any]
    payload: list[Any] = field(default_factory=list)


@dataclass(slots=True)
class CancelOnWorker:
    """Send a ``CANCEL`` on both of a worker's sockets (the control one reaches a busy worker)."""

    conn: WorkerConn
    header: dict[str, Any]


@dataclass(slots=True)
class ToControl:
    """Send a message on a worker's control socket only (``STEAL``: its control thread answers
    even while the main thread runs a long task)."""

    conn: WorkerConn
    header: dict[str, Any]


@dataclass(slots=True)
class ToOwner:
    """Send a message to an object's owner, on our one (ordered) connection to it."""

    owner: str
    header: dict[str, Any]


@dataclass(slots=True)
class ReplyObject:
    """Answer a ``GET_OBJECT`` on our owner socket (``ident``: who asked)."""

    ident: bytes
    header: dict[str, Any]
    payload: list[Any] = field(default_factory=list)


@dataclass(slots=True)
class StartTimer:
    """Hand ``event`` back to the state after ``delay`` seconds (timers are never cancelled:
    the state ignores the ones it no longer needs)."""

    delay: float
    event: Event


@dataclass(slots=True)
class FreeStored:
    """Free these objects (we own them) from the node's store, if this process has one."""

    oids: list[str]


@dataclass(slots=True)
class ShowOutput:
    """Show a task's output lines (through the notebook hook, else on our stdout/stderr)."""

    stream: str
    text: str
    tag: Any


@dataclass(slots=True)
class AwaitReply:
    """The head answers request ``rid`` later (``ACTOR_CREATED``): settle ``reply`` with it."""

    rid: int
    reply: concurrent.futures.Future[dict[str, Any]]


Instruction = (
    ToHead
    | OpenWorker
    | CloseWorker
    | ToWorker
    | CancelOnWorker
    | ToControl
    | ToOwner
    | ReplyObject
    | StartTimer
    | FreeStored
    | ShowOutput
    | AwaitReply
)
