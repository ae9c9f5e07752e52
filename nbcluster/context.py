"""What the current process is doing: which task runs here, for which job, with what resources."""

from __future__ import annotations

import contextvars
import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TaskContext:
    """The task a worker is running now."""

    task_id: str
    job_id: str
    name: str
    node_id: str
    worker_id: str
    assigned: dict[str, object] = field(default_factory=dict)
    actor_id: str | None = None
    #: The placement group it runs in, and whether what it creates runs there too (Ray's
    #: ``placement_group_capture_child_tasks``).
    placement_group: str | None = None
    capture: bool = False


current_task: contextvars.ContextVar[TaskContext | None] = contextvars.ContextVar(
    "nbcluster_current_task", default=None
)


@dataclass
class WorkerIdentity:
    """Set in worker processes: who this worker is (``None`` in drivers)."""

    worker_id: str
    node_id: str
    node_name: str
    head_address: str
    job_id: str | None = None
    sys_path: list[str] = field(default_factory=list)
    namespace: str = ""


worker_identity: WorkerIdentity | None = None

#: In an actor's worker: the actor's class (its methods make ``current_actor``'s handle).
actor_class: type | None = None


class ActorExit(BaseException):
    """Raised by :func:`nbcluster.exit_actor` to end the actor after the current call."""


def in_worker() -> bool:
    """Whether this process is an nbcluster worker."""
    return worker_identity is not None or "NBCLUSTER_WORKER_ID" in os.environ
