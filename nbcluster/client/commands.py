"""Commands user threads post to the client's I/O thread.

User threads never touch the I/O thread's state: they post one of these (``CoreClient._post``,
through ``IoShell.post``) and the I/O thread carries it out in order (``ClientState.handle``, a
``match`` on the type). A command holds only values the posting thread made and will not touch
again, or thread-safe objects (futures, events) through which the I/O thread answers.
"""

from __future__ import annotations

import concurrent.futures
import threading
from dataclasses import dataclass
from typing import Any

from nbcluster.client.tasks import TaskRecord
from nbcluster.refs import ObjectRef


@dataclass(slots=True)
class SubmitTask:
    """Queue a task (its arguments already serialized)."""

    rec: TaskRecord


@dataclass(slots=True)
class CancelTask:
    """Cancel the task producing object ``oid`` (``force``: kill its worker)."""

    oid: str
    force: bool


@dataclass(slots=True)
class FetchObject:
    """Ask ``owner`` for the value of the borrowed object ``oid`` (once)."""

    oid: str
    owner: str


@dataclass(slots=True)
class TellOwner:
    """Send ``header`` (``ESCAPE``, ``BORROW_DEL``) to the owner at ``owner``."""

    owner: str
    header: dict[str, Any]


@dataclass(slots=True)
class SetBlocked:
    """This worker's task waits (``blocked``) or runs again: tell the head (it lends CPUs)."""

    blocked: bool


@dataclass(slots=True)
class Rebuild:
    """Run again the task that made ``oid``; set ``done`` once it is no longer pending."""

    oid: str
    done: threading.Event


@dataclass(slots=True)
class CreateActor:
    """Send an ``ACTOR_CREATE`` once its argument refs are ready; ``reply`` gets the answer."""

    header: dict[str, Any]
    payload: list[Any]
    deps: list[ObjectRef]
    reply: concurrent.futures.Future[dict[str, Any]]


@dataclass(slots=True)
class CallActor:
    """Queue an actor method call (sent in submission order)."""

    rec: TaskRecord
    cls_name: str


@dataclass(slots=True)
class CountActorHandle:
    """An ``ActorHandle`` appeared (``delta`` 1) or went away (-1) in this process."""

    aid: str
    cls_name: str
    owned: bool
    delta: int


@dataclass(slots=True)
class ActorEscaped:
    """A handle of ``aid`` was sent to another process: never release the actor from here."""

    aid: str


@dataclass(slots=True)
class KillActor:
    """Ask the head to kill ``aid``; ``done`` is set once it is dead on this side."""

    aid: str
    no_restart: bool
    done: concurrent.futures.Future[None] | None


#: Everything a user thread may post.
Command = (
    SubmitTask
    | CancelTask
    | FetchObject
    | TellOwner
    | SetBlocked
    | Rebuild
    | CreateActor
    | CallActor
    | CountActorHandle
    | ActorEscaped
    | KillActor
)
