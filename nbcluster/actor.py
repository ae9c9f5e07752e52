"""Actors: ``@remote`` classes, their handles and methods, named actors, ``kill``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import cloudpickle

from nbcluster import context
from nbcluster.client import current
from nbcluster.client.streams import DYNAMIC, STREAMING
from nbcluster.exceptions import SerializationError
from nbcluster.options import (
    ACTOR_OPTIONS_IGNORED,
    METHOD_OPTION_NAMES,
    check_backpressure,
    check_gpus,
    check_ignored,
    check_option_names,
    legacy_placement,
)
from nbcluster.runtime_env.spec import parse as parse_runtime_env
from nbcluster.runtime_env.upload import wire_env
from nbcluster.scheduling import strategy_spec, submitted_strategy

F = TypeVar("F", bound=Callable[..., Any])

#: Options accepted by ``@remote`` and ``.options()`` on classes.
ACTOR_OPTION_NAMES = frozenset(
    {
        "num_cpus",
        "num_gpus",
        "resources",
        "memory",
        "name",
        "namespace",
        "get_if_exists",
        "lifetime",
        "max_restarts",
        "max_task_retries",
        "max_concurrency",
        "concurrency_groups",
        "scheduling_strategy",
        "runtime_env",
    }
)


#: Method-table values of generator methods (a table holds ``num_returns`` >= 0 otherwise).
_GEN_CODES = {"streaming": -STREAMING, "dynamic": -DYNAMIC}


def method(
    *, num_returns: int | str = 1, concurrency_group: str | None = None, **options: Any
) -> Callable[[F], F]:
    """Declare options of an actor method, as Ray's ``@ray.method(num_returns=2)``.

    Parameters
    ----------
    num_returns
        How many object refs a call returns.
    concurrency_group
        The concurrency group (declared in the class's ``@remote(concurrency_groups=...)``)
        whose limit the method's calls share; ``None``: the default group (``max_concurrency``).
    **options
        Ray's other method options (``max_task_retries``, ...): accepted and ignored; an unknown
        one raises ``ValueError`` naming the nearest valid one.
    """
    check_option_names(options, METHOD_OPTION_NAMES, "actor methods")
    code = _returns_code(num_returns)
    _check_group_name(concurrency_group)

    def deco(fn: F) -> F:
        fn.__nbcluster_num_returns__ = code  # type: ignore[attr-defined]
        if concurrency_group is not None:
            fn.__nbcluster_concurrency_group__ = concurrency_group  # type: ignore[attr-defined]
        return fn

    return deco


def _check_group_name(group: Any) -> None:
    """A method's or a call's ``concurrency_group``: ``None`` or a non-empty string."""
    if group is not None and (not isinstance(group, str) or not group):
        raise ValueError(f"concurrency_group must be a non-empty string, got {group!r}")


def _returns_code(num_returns: Any) -> int:
    """A method table's value: ``num_returns``, or a negative code for a generator."""
    if num_returns in _GEN_CODES:
        return _GEN_CODES[num_returns]
    if isinstance(num_returns, bool) or not isinstance(num_returns, int) or num_returns < 0:
        raise ValueError(
            "num_returns must be a non-negative integer, 'streaming' or 'dynamic', "
            f"got {num_returns!r}"
        )
    return num_returns


def _check_actor_options(opts: dict[str, Any]) -> dict[str, Any]:
    check_option_names(opts, ACTOR_OPTION_NAMES | ACTOR_OPTIONS_IGNORED, "actors")
    check_ignored(opts)
    legacy_placement(opts)
    for key in ("num_cpus", "num_gpus", "memory"):
        v = opts.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or v < 0):
            raise ValueError(f"{key} must be a non-negative number, got {v!r}")
    lifetime = opts.get("lifetime")
    if lifetime not in (None, "detached", "non_detached"):
        raise ValueError("lifetime must be None, 'detached' or 'non_detached'")
    for key in ("max_restarts", "max_task_retries"):
        v = opts.get(key)
        if v is not None and (not isinstance(v, int) or v < -1):
            raise ValueError(f"{key} must be an integer >= -1, got {v!r}")
    mc = opts.get("max_concurrency")
    if mc is not None and (not isinstance(mc, int) or mc < 1):
        raise ValueError(f"max_concurrency must be a positive integer, got {mc!r}")
    groups = opts.get("concurrency_groups")
    if groups is not None:
        if not isinstance(groups, dict):
            raise ValueError("concurrency_groups must be a dict of group name -> limit")
        for g, limit in groups.items():
            if not isinstance(g, str) or not g:
                raise ValueError(f"a concurrency group name must be a non-empty string: {g!r}")
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise ValueError(
                    f"concurrency_groups[{g!r}] must be a positive integer, got {limit!r}"
                )
    if "runtime_env" in opts:
        # Validated once here (RuntimeEnvError names a bad key); packed when the actor is made.
        opts["runtime_env"] = parse_runtime_env(opts["runtime_env"])
    if opts.get("num_gpus") is not None:
        check_gpus(opts["num_gpus"])
    strategy_spec(opts.get("scheduling_strategy"))  # raises on anything unsupported
    res = opts.get("resources")
    if res is not None:
        if not isinstance(res, dict):
            raise ValueError("resources must be a dict")
        for k, v in res.items():
            if k in ("CPU", "GPU", "memory"):
                raise ValueError(f"use num_cpus/num_gpus/memory instead of resources[{k!r}]")
            if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
                raise ValueError(f"resources[{k!r}] must be a non-negative number")
    return opts


def method_table(cls: type) -> tuple[dict[str, int], bool]:
    """The callable methods of an actor class with their ``num_returns``; whether any is async."""
    methods: dict[str, int] = {}
    is_async = False
    for name, member in inspect.getmembers(cls, callable):
        if name.startswith("__") and name != "__call__":
            continue
        default = -STREAMING if inspect.isgeneratorfunction(member) else 1
        if inspect.isasyncgenfunction(member):
            default = -STREAMING
        methods[name] = int(getattr(member, "__nbcluster_num_returns__", default))
        if inspect.iscoroutinefunction(member) or inspect.isasyncgenfunction(member):
            is_async = True
    return methods, is_async


class ActorClass:
    """A class decorated with ``@remote``: ``Cls.remote(...)`` creates an actor."""

    def __init__(self, cls: type, options: dict[str, Any]) -> None:
        self._cls = cls
        self._options = _check_actor_options(dict(options))
        self._name = cls.__name__
        self._blob: bytes | None = None
        self.__doc__ = cls.__doc__
        self._methods, self._is_async = method_table(cls)
        self._groups: dict[str, str] = {  # method -> its @method(concurrency_group=...)
            name: group
            for name, member in inspect.getmembers(cls, callable)
            if name in self._methods
            and (group := getattr(member, "__nbcluster_concurrency_group__", None)) is not None
        }
        self._check_groups(self._options)

    def _check_groups(self, opts: dict[str, Any]) -> None:
        """Every group a method names must be declared, as in Ray."""
        declared = opts.get("concurrency_groups") or {}
        for name, group in self._groups.items():
            if group not in declared:
                raise ValueError(
                    f"{self._name}.{name} uses concurrency group {group!r}, which "
                    f"concurrency_groups does not declare (declared: {sorted(declared)})"
                )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"actor class {self._name} cannot be instantiated directly; "
            f"use {self._name}.remote(...) to create an actor"
        )

    def _pickled(self) -> bytes:
        if self._blob is None:
            init = getattr(self._cls, "__init__", None)
            code = getattr(init, "__code__", None)
            filename = code.co_filename if code is not None else ""
            try:
                self._blob = cloudpickle.dumps((self._cls, filename), protocol=5)
            except Exception as exc:
                raise SerializationError(
                    f"could not serialize actor class {self._name}: {type(exc).__name__}: {exc}"
                ) from exc
        return self._blob

    def options(self, **kwargs: Any) -> _BoundActorClass:
        """Override options for one creation: ``Cls.options(name="x", num_gpus=1).remote()``."""
        opts = _check_actor_options({**self._options, **kwargs})
        self._check_groups(opts)
        return _BoundActorClass(self, opts)

    def remote(self, *args: Any, **kwargs: Any) -> ActorHandle:
        """Create the actor; returns its handle."""
        return self._create(self._options, args, kwargs)

    def _create(
        self, opts: dict[str, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> ActorHandle:
        client = current.require()
        num_cpus = opts.get("num_cpus")
        shape: dict[str, float] = {}
        if num_cpus:
            shape["CPU"] = float(num_cpus)
        if opts.get("num_gpus"):
            shape["GPU"] = float(opts["num_gpus"])
        if opts.get("memory"):
            shape["memory"] = float(opts["memory"])
        for k, v in (opts.get("resources") or {}).items():
            if v:
                shape[k] = float(v)
        # As in Ray: an actor without num_cpus needs 1 CPU to be placed and holds 0 while alive.
        place = dict(shape) if num_cpus is not None else {**shape, "CPU": 1.0}
        name = opts.get("name")
        namespace = opts.get("namespace")
        if namespace is None:
            namespace = client.namespace or f"job-{client.job_id}"
        max_restarts = opts.get("max_restarts") or 0
        spec = {
            "name": name,
            "ns": namespace,
            "get_if_exists": bool(opts.get("get_if_exists")),
            "detached": opts.get("lifetime") == "detached",
            "shape": shape,
            "place_shape": place,
            "max_restarts": max_restarts,
            "max_task_retries": opts.get("max_task_retries") or 0,
            "max_concurrency": opts.get("max_concurrency") or 1,
            "concurrency_groups": dict(opts.get("concurrency_groups") or {}),
            "is_async": self._is_async,
            "methods": self._methods,
            "sys_path": _sys_path(),
            "strategy": submitted_strategy(opts.get("scheduling_strategy")),
        }
        renv = wire_env(client, opts.get("runtime_env"))
        if renv is not None:
            spec["renv"] = renv  # the head asks for a worker of this environment
        if spec["detached"] and not name:
            raise ValueError("a detached actor must have a name (options(name=...))")
        reply = client.create_actor(self._name, self._pickled(), args, kwargs, spec)
        return ActorHandle(
            reply["aid"],
            reply.get("cls_name", self._name),
            dict(reply.get("methods") or {}),
            client,
            owned=not reply.get("existing", False) and not name,
        )

    def __repr__(self) -> str:
        return f"<nbcluster actor class {self._name}>"


class _BoundActorClass:
    def __init__(self, cls: ActorClass, options: dict[str, Any]) -> None:
        self._cls = cls
        self._options = options

    def remote(self, *args: Any, **kwargs: Any) -> ActorHandle:
        return self._cls._create(self._options, args, kwargs)

    def options(self, **kwargs: Any) -> _BoundActorClass:
        opts = _check_actor_options({**self._options, **kwargs})
        self._cls._check_groups(opts)
        return _BoundActorClass(self._cls, opts)


class ActorHandle:
    """A reference to a live actor: ``handle.method.remote(...)`` calls it.

    Handles can be passed to tasks and other actors. When every handle held by the process that
    created an (unnamed, non-detached) actor is gone, and none was sent elsewhere, the actor is
    terminated once its pending calls are done.
    """

    def __init__(
        self, aid: str, cls_name: str, methods: dict[str, int], client: Any, *, owned: bool = False
    ) -> None:
        self._aid = aid
        self._cls_name = cls_name
        self._methods = methods
        self._client = client
        client.actor_handle_added(aid, cls_name, owned)

    def __getattr__(self, name: str) -> ActorMethod:
        if name.startswith("_") and name != "__call__":
            raise AttributeError(name)
        methods = self.__dict__.get("_methods") or {}
        if name not in methods:
            raise AttributeError(f"actor {self._cls_name} has no method {name!r}")
        return ActorMethod(self, name, methods[name])

    def __repr__(self) -> str:
        return f"Actor({self._cls_name}, {self._aid})"

    def __hash__(self) -> int:
        return hash(self._aid)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ActorHandle) and other._aid == self._aid

    @property
    def actor_id(self) -> str:
        return self._aid

    def __reduce__(self) -> tuple[Any, ...]:
        self._client.actor_escaped(self._aid)
        return (_rebuild_handle, (self._aid, self._cls_name, self._methods))

    def __del__(self) -> None:
        try:
            self._client.actor_handle_removed(self._aid)
        except Exception:  # interpreter shutdown
            pass


def _rebuild_handle(aid: str, cls_name: str, methods: dict[str, int]) -> ActorHandle:
    return ActorHandle(aid, cls_name, methods, current.require())


class ActorMethod:
    """``handle.method``: call ``.remote(...)`` on it."""

    def __init__(
        self,
        handle: ActorHandle,
        name: str,
        num_returns: int,
        concurrency_group: str = "",
        backpressure: int = 0,
    ) -> None:
        self._handle = handle
        self._name = name
        self._num_returns = num_returns  # < 0: a generator (-STREAMING or -DYNAMIC)
        self._group = concurrency_group
        self._backpressure = backpressure

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        h = self._handle
        gen = -self._num_returns if self._num_returns < 0 else 0
        nret = 1 if gen else self._num_returns
        refs = h._client.submit_actor_call(
            h._aid,
            h._cls_name,
            self._name,
            args,
            kwargs,
            nret,
            gen,
            self._backpressure,
            concurrency_group=self._group,
        )
        if nret == 1:
            return refs[0]
        if nret == 0:
            return None
        return refs

    def options(
        self,
        *,
        num_returns: int | str | None = None,
        concurrency_group: str | None = None,
        **kwargs: Any,
    ) -> ActorMethod:
        """Options of one call: ``num_returns`` (an int, ``"streaming"`` or ``"dynamic"``),
        ``concurrency_group`` (run in that group) and ``_generator_backpressure_num_objects``;
        Ray's other method options are accepted and ignored."""
        check_option_names(kwargs, METHOD_OPTION_NAMES, "actor methods")
        _check_group_name(concurrency_group)
        bp = self._backpressure
        if "_generator_backpressure_num_objects" in kwargs:
            bp = check_backpressure(kwargs["_generator_backpressure_num_objects"])
        code = self._num_returns if num_returns is None else _returns_code(num_returns)
        group = self._group if concurrency_group is None else concurrency_group
        return ActorMethod(self._handle, self._name, code, group, bp)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"actor method {self._handle._cls_name}.{self._name} cannot be called directly; "
            f"use .{self._name}.remote(...)"
        )


def _sys_path() -> list[str]:
    import os
    import sys

    return [os.path.abspath(p) if p in ("", ".") else p for p in sys.path]


def get_actor(name: str, namespace: str | None = None) -> ActorHandle:
    """The handle of the named actor; ``ValueError`` if there is none.

    ``namespace`` defaults to this job's namespace (``init(namespace=...)``).
    """
    client = current.require()
    ns = namespace if namespace is not None else (client.namespace or f"job-{client.job_id}")
    info = client.query_args("actor", name=name, ns=ns)
    if info is None or info.get("state") == "dead":  # an ActorView's state
        raise ValueError(f"no actor named {name!r} in namespace {ns!r}")
    return ActorHandle(info["actor_id"], info["class_name"], dict(info["methods"]), client)


def kill(actor: ActorHandle, *, no_restart: bool = True) -> None:
    """Terminate an actor now (its process is killed; calls in flight fail with ActorDiedError).

    With ``no_restart=False`` it is restarted if its ``max_restarts`` allows.
    """
    if not isinstance(actor, ActorHandle):
        raise TypeError(f"kill() expects an actor handle, got {type(actor).__name__}")
    actor._client.kill_actor(actor._aid, no_restart)


def exit_actor() -> None:
    """End the current actor from inside one of its methods (the call itself returns ``None``)."""
    task = context.current_task.get()
    if task is None or task.actor_id is None:
        raise TypeError("exit_actor() can only be called inside an actor method")
    raise context.ActorExit()
