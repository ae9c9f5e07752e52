"""What each message from the head or a worker becomes for the client's state: an event.

The I/O shell (:mod:`nbcluster.client.shell`) feeds the event returned here to
:class:`~nbcluster.client.state.ClientState`; messages that only answer a request of the shell
(query replies, errors, welcomes) are handled there and are not listed here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nbcluster.client.commands import CancelTask
from nbcluster.client.inputs import (
    ActorStateChanged,
    Event,
    LeaseFailed,
    LeaseGranted,
    LeaseInfeasible,
    LeaseLost,
    NodeDied,
    StreamItemArrived,
    TaskResult,
    TasksStolen,
)
from nbcluster.client.workers import WorkerConn
from nbcluster.protocol import schema as m

#: ``(context, message, payload) -> event``: the context is ``None`` for the head, the
#: :class:`WorkerConn` a worker's message came on.
Translate = Callable[[Any, Any, list[Any]], Event]


def _lease_granted(_: None, msg: m.LeaseGranted, payload: list[Any]) -> Event:
    return LeaseGranted(
        msg.rid,
        msg.lease_id,
        msg.worker_id,
        msg.worker_addr,
        msg.control_addr,
        msg.pid,
        msg.node_id,
        msg.node_name,
        msg.gpus,
        msg.shape,
    )


def _actor_state(_: None, msg: m.ActorState, payload: list[Any]) -> Event:
    infeasible = msg.infeasible
    return ActorStateChanged(
        msg.aid,
        msg.state if infeasible is None else "",
        msg.cls_name or "",
        msg.addr or "",
        msg.control_addr or "",
        msg.worker_id or "",
        msg.reason or "",
        msg.init_error,
        infeasible,
        payload,
    )


def _lease_lost(_: None, msg: m.LeaseLost, payload: list[Any]) -> Event:
    return LeaseLost(msg.lease_id, msg.reason or "worker died", msg.drain)


def _lease_failed(_: None, msg: m.LeaseFailed, payload: list[Any]) -> Event:
    return LeaseFailed(msg.rid, msg.msg or "no node can run it")


def _lease_infeasible(_: None, msg: m.LeaseInfeasible, payload: list[Any]) -> Event:
    return LeaseInfeasible(msg.rid, msg.shape, msg.missing)


def _node_died(_: None, msg: m.NodeDied, payload: list[Any]) -> Event:
    return NodeDied(msg.node_id, msg.store_id)


def _task_cancel(_: None, msg: m.TaskCancel, payload: list[Any]) -> Event:
    return CancelTask(f"{msg.tid}.0", msg.force)  # from the Jupyter panel


def _result(conn: WorkerConn, msg: m.Result, payload: list[Any]) -> Event:
    return TaskResult(
        conn,
        msg.tid,
        msg.ok,
        msg.n,
        msg.err,
        msg.lost,
        msg.kept,
        msg.returned,
        payload,
        msg.ph,
        msg.retire,
    )


def _stolen(conn: WorkerConn, msg: m.Stolen, payload: list[Any]) -> Event:
    return TasksStolen(conn, msg.tids)


def _stream_item(conn: WorkerConn, msg: m.StreamItem, payload: list[Any]) -> Event:
    return StreamItemArrived(conn, msg.tid, msg.i, msg.returned, payload)


#: The head's messages that become events.
FROM_HEAD: dict[type[m.Message], Translate] = {
    m.LeaseGranted: _lease_granted,
    m.ActorState: _actor_state,
    m.LeaseLost: _lease_lost,
    m.LeaseFailed: _lease_failed,
    m.LeaseInfeasible: _lease_infeasible,
    m.NodeDied: _node_died,
    m.TaskCancel: _task_cancel,
}
#: A worker's messages that become events (its LOG depends on the shell's settings).
FROM_WORKER: dict[type[m.Message], Translate] = {
    m.Result: _result,
    m.Stolen: _stolen,
    m.StreamItem: _stream_item,
}
