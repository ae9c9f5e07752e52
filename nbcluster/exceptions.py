"""Every error nbcluster raises, under one root class, with Ray's names as aliases.

Ray code that catches ``ray.exceptions.RayTaskError`` or ``GetTimeoutError`` works unchanged with
``import nbcluster as ray``.
"""

from __future__ import annotations

import linecache
from typing import Any


class NbclusterError(Exception):
    """Root of every error raised by nbcluster."""


class ConfigurationError(NbclusterError):
    """Invalid settings: a bad token file, an unusable address, conflicting options."""


class ProtocolError(NbclusterError):
    """A peer sent a message we cannot understand (malformed frame, wrong protocol version)."""


class AuthenticationError(NbclusterError):
    """A peer did not prove it knows the cluster secret, or refused ours."""


class ConnectionFailedError(NbclusterError, ConnectionError):
    """A cluster service could not be reached."""


class AddressInUseError(ConnectionFailedError):
    """A server could not bind its address: another socket holds it."""


class SystemError_(NbclusterError):
    """An internal failure of the cluster runtime (a bug or a dead service)."""


class GetTimeoutError(NbclusterError, TimeoutError):
    """``get`` or ``wait`` ran past its ``timeout``."""


class TaskCancelledError(NbclusterError):
    """The task was cancelled with :func:`nbcluster.cancel` before it produced a result."""

    def __init__(self, task_id: str | None = None, message: str | None = None) -> None:
        self.task_id = task_id
        self.message = message or f"task {task_id} was cancelled"
        super().__init__(self.message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.task_id, self.message))


class TaskUnschedulableError(NbclusterError):
    """The task can never be placed: its hard node affinity names a dead or unknown node, or
    one with less than it needs."""


class WorkerCrashedError(NbclusterError):
    """The worker process running the task died (and the task's retries were used up)."""


class OutOfMemoryError(WorkerCrashedError):
    """The node ran low on memory and its memory monitor killed the worker running the task
    (the message names the task, the node's usage and the worker's memory), as Ray's."""


class ObjectLostError(NbclusterError):
    """An object's value is gone and cannot be rebuilt."""


class OwnerDiedError(ObjectLostError):
    """The process that owned an object (the driver or task that made it) is gone."""


class SerializationError(NbclusterError, TypeError):
    """A value could not be pickled or unpickled (the message names which one)."""


class TaskError(NbclusterError):
    """An exception raised inside a remote task, carrying the remote traceback.

    ``get`` raises an instance of a class deriving from both ``TaskError`` and the original
    exception's type, so ``except ValueError`` catches a remote ``ValueError``.
    """

    def __init__(
        self,
        function_name: str,
        traceback_str: str,
        cause: BaseException | None,
        where: str = "",
        frames: list[tuple[str, int, str, str]] | None = None,
    ) -> None:
        self.function_name = function_name
        self.traceback_str = traceback_str
        self.cause = cause
        self.where = where
        # (filename, lineno, function, source line) of the remote stack, innermost last.
        self.frames = frames
        #: The remote exception's type (``module.Qualname``), kept even when the exception itself
        #: cannot be rebuilt here.
        self.cause_type = _type_name(type(cause)) if cause is not None else ""
        #: Why the remote exception could not be rebuilt here ("" when it was, or was none).
        self.cause_unavailable = ""
        super().__init__(self._message())

    def _render(self) -> str:
        if not self.frames:
            return self.traceback_str.rstrip()
        lines = ["Traceback (most recent call last):"]
        for filename, lineno, name, line in self.frames:
            lines.append(f'  File "{filename}", line {lineno}, in {name}')
            # A notebook cell's source exists only in the driver: look it up here.
            src = line or linecache.getline(filename, lineno).strip()
            if src:
                lines.append(f"    {src}")
        return "\n".join(lines) + "\n" + self.traceback_str.rstrip()

    def _message(self) -> str:
        loc = f" ({self.where})" if self.where else ""
        text = f"task {self.function_name}{loc} raised:\n\n{self._render()}"
        why = getattr(self, "cause_unavailable", "")
        if why:
            kind = getattr(self, "cause_type", "") or "exception"
            text += f"\n\n(the remote {kind} could not be rebuilt here: {why})"
        return text

    def __str__(self) -> str:
        return self._message()

    def _render_traceback_(self) -> list[str]:
        """What IPython shows for this error: the remote stack, as a local error would look."""
        cause = type(self.cause).__name__ if self.cause is not None else "TaskError"
        if self.cause is None and self.cause_type:
            cause = self.cause_type.rpartition(".")[2]
        loc = f" ({self.where})" if self.where else ""
        return [
            f"\x1b[0;31m{cause}\x1b[0m raised in task \x1b[1m{self.function_name}\x1b[0m{loc}",
            *self._render().splitlines(),
        ]

    def __reduce__(self) -> tuple[Any, ...]:
        # The cause travels as a pickle of its own: if it cannot be rebuilt where this error is
        # unpickled (a class only the worker can import, an __init__ that wants other arguments),
        # the error still arrives, with the cause's type, message and the remote traceback.
        blob, why = _pickle_cause(self.cause)
        return (
            _rebuild_task_error,
            (
                self.function_name,
                self.traceback_str,
                blob,
                self.where,
                self.frames,
                getattr(self, "cause_type", ""),
                getattr(self, "cause_unavailable", "") or why,
            ),
        )

    def as_instanceof_cause(self) -> TaskError:
        """Return an equivalent error that is also an instance of the cause's type."""
        cause_cls = type(self.cause) if self.cause is not None else None
        if cause_cls is None or issubclass(cause_cls, TaskError):
            return self
        try:
            cls = _dual_class(cause_cls)
            err: TaskError = cls.__new__(cls)  # type: ignore[call-overload]
            # Not through __init__: the cause's own __init__ (next in the MRO) would run with
            # our message as its arguments.
            err.__dict__.update(getattr(self.cause, "__dict__", {}))  # errno, code, ...
            err.function_name = self.function_name
            err.traceback_str = self.traceback_str
            err.cause = self.cause
            err.where = self.where
            err.frames = self.frames
            err.cause_type = getattr(self, "cause_type", "")
            err.cause_unavailable = ""
            err.args = (self._message(),)
            return err
        except TypeError:  # e.g. a final class or incompatible layout (OSError subclasses)
            return self


_dual_cache: dict[type, type] = {}


def _dual_class(cause_cls: type) -> type:
    cls = _dual_cache.get(cause_cls)
    if cls is None:
        name = f"TaskError({cause_cls.__name__})"
        cls = type(name, (TaskError, cause_cls), {"__module__": "nbcluster.exceptions"})
        cls.__init__ = TaskError.__init__  # type: ignore[misc]
        cls.__str__ = TaskError.__str__  # type: ignore[assignment]
        _dual_cache[cause_cls] = cls
    return cls


def _type_name(cls: type) -> str:
    module = getattr(cls, "__module__", "") or ""
    name = getattr(cls, "__qualname__", cls.__name__)
    return name if module in ("builtins", "__main__", "") else f"{module}.{name}"


def _pickle_cause(cause: BaseException | None) -> tuple[bytes | None, str]:
    """``(pickle of cause, "")``, or ``(None, why)`` when it cannot be pickled."""
    if cause is None:
        return None, ""
    import cloudpickle  # here: this module is imported by everything, pickling is rare

    try:
        return cloudpickle.dumps(cause, protocol=5), ""
    except Exception as exc:
        return None, f"it could not be pickled: {type(exc).__name__}: {exc}"


def _rebuild_task_error(
    function_name: str,
    traceback_str: str,
    cause: BaseException | bytes | None,
    where: str,
    frames: list[tuple[str, int, str, str]] | None = None,
    cause_type: str = "",
    unavailable: str = "",
) -> TaskError:
    why = unavailable
    if isinstance(cause, bytes | bytearray | memoryview):
        import pickle

        try:
            cause = pickle.loads(cause)
        except Exception as exc:  # ModuleNotFoundError, a TypeError from the class's __init__...
            cause, why = None, f"{type(exc).__name__}: {exc}"
        if not isinstance(cause, BaseException):
            cause = None
    err = TaskError(function_name, traceback_str, cause, where, frames)
    if cause is None:
        err.cause_type = cause_type
        err.cause_unavailable = why
        err.args = (err._message(),)
    return err


class ActorError(NbclusterError):
    """Base for actor failures."""


class ActorDiedError(ActorError):
    """The actor is dead (killed, crashed past ``max_restarts``, or its ``__init__`` failed)."""


# Ray's names, so that Ray code catching them works unchanged.
RayError = NbclusterError
RayTaskError = TaskError
RaySystemError = SystemError_
RayActorError = ActorError
ObjectFetchTimedOutError = GetTimeoutError

__all__ = [
    "ActorDiedError",
    "ActorError",
    "AddressInUseError",
    "AuthenticationError",
    "ConfigurationError",
    "ConnectionFailedError",
    "GetTimeoutError",
    "NbclusterError",
    "ObjectFetchTimedOutError",
    "ObjectLostError",
    "OutOfMemoryError",
    "OwnerDiedError",
    "ProtocolError",
    "RayActorError",
    "RayError",
    "RaySystemError",
    "RayTaskError",
    "SerializationError",
    "SystemError_",
    "TaskCancelledError",
    "TaskError",
    "TaskUnschedulableError",
    "WorkerCrashedError",
]
