"""``@remote``: turning functions into tasks."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
from collections.abc import Callable
from typing import Any, overload

import cloudpickle

from nbcluster.client import current
from nbcluster.client.streams import DYNAMIC, STREAMING
from nbcluster.exceptions import SerializationError
from nbcluster.options import (
    ACTOR_OPTIONS_IGNORED,
    TASK_OPTION_NAMES,
    TASK_OPTIONS_IGNORED,
    TaskOptions,
    check_option_names,
    make_task_options,
)
from nbcluster.refs import ObjectRef
from nbcluster.runtime_env.upload import wire_env


class RemoteFunction:
    """A function that runs as a task: call ``.remote(...)`` to submit it.

    The function is pickled by value once (cloudpickle), so functions defined in a notebook cell
    or ``__main__`` work, and redefining the function in a later cell runs its new body.
    """

    def __init__(self, fn: Callable[..., Any], options: TaskOptions) -> None:
        self._function = fn
        self._options = options
        self._name: str = options.name or str(getattr(fn, "__name__", "task"))
        self._blob: bytes | None = None
        self._fn_id = ""
        # Looked up once: inspect's checks cost more than the rest of a submit's bookkeeping.
        self._is_generator = inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn)
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"remote function {self._name} cannot be called directly; "
            f"use {self._name}.remote(...) to run it as a task"
        )

    def _pickled(self) -> tuple[str, bytes]:
        if self._blob is None:
            try:
                code = getattr(self._function, "__code__", None)
                filename = code.co_filename if code is not None else ""
                blob = cloudpickle.dumps((self._function, filename), protocol=5)
            except Exception as exc:
                raise SerializationError(
                    f"could not serialize remote function {self._name} (it captures something "
                    f"that cannot be pickled): {type(exc).__name__}: {exc}"
                ) from exc
            self._fn_id = hashlib.blake2b(blob, digest_size=12).hexdigest()
            self._blob = blob
        return self._fn_id, self._blob

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Submit the task; returns an ``ObjectRef`` (a list of them when ``num_returns > 1``)."""
        return self._submit(self._options, args, kwargs)

    def _submit(self, opts: TaskOptions, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        client = current.require()
        fn_id, blob = self._pickled()
        explicit = self._explicit_returns(opts)
        nret, gen = generator_mode(self._is_generator, opts.num_returns, explicit)
        refs = client.submit(
            opts.name or self._name,
            fn_id,
            blob,
            args,
            kwargs,
            opts.shape(),
            nret,
            opts.max_retries,
            opts.retry_exceptions,
            strategy=opts.strategy(),
            runtime_env=wire_env(client, opts.runtime_env),
            gen=gen,
            backpressure=opts.generator_backpressure,
            max_calls=opts.max_calls,
        )
        if nret == 1:
            return refs[0]
        if nret == 0:
            return None
        return refs

    def _explicit_returns(self, opts: TaskOptions) -> bool:
        return opts.num_returns != TaskOptions.num_returns

    def options(self, **kwargs: Any) -> _BoundOptions:
        """Override options for one submission: ``f.options(num_gpus=1).remote(x)``.

        As in Ray, ``max_calls`` cannot be overridden here: the decorator's holds.
        """
        return _BoundOptions(self, _with_options(self._options, kwargs))

    def bind(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - Ray DAG API
        raise NotImplementedError("nbcluster does not implement Ray's DAG API (bind)")

    def __repr__(self) -> str:
        return f"<nbcluster remote function {self._name}>"


class _BoundOptions:
    def __init__(self, fn: RemoteFunction, options: TaskOptions) -> None:
        self._fn = fn
        self._options = options

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn._submit(self._options, args, kwargs)

    def options(self, **kwargs: Any) -> _BoundOptions:
        return _BoundOptions(self._fn, _with_options(self._options, kwargs))


def _with_options(base: TaskOptions, kwargs: dict[str, Any]) -> TaskOptions:
    """``.options()`` over ``base``; a ``max_calls`` there is checked and ignored (Ray's rule)."""
    opts = make_task_options(base, **kwargs)
    if opts.max_calls != base.max_calls:
        opts = dataclasses.replace(opts, max_calls=base.max_calls)
    return opts


def generator_mode(is_generator: bool, num_returns: int | str, explicit: bool) -> tuple[int, int]:
    """``(num_returns, gen)`` of a call: a generator function streams unless told otherwise.

    ``gen`` is 0 (a plain task), ``STREAMING`` or ``DYNAMIC`` (:mod:`nbcluster.client.streams`).
    """
    if num_returns == "streaming":
        return 1, STREAMING
    if num_returns == "dynamic":
        return 1, DYNAMIC
    assert isinstance(num_returns, int)
    if not explicit and is_generator:
        return 1, STREAMING  # Ray's default for generator functions
    return num_returns, 0


@overload
def remote(fn: type, /) -> Any: ...


@overload
def remote(fn: Callable[..., Any], /) -> RemoteFunction: ...


@overload
def remote(**kwargs: Any) -> Callable[[Any], Any]: ...


def remote(*args: Any, **kwargs: Any) -> Any:
    """Make a function a remote task, as Ray's ``@ray.remote``.

    Use bare (``@remote``) or with options (``@remote(num_cpus=2, num_gpus=1)``).
    """
    if len(args) == 1 and not kwargs and callable(args[0]):
        return _make(args[0], TaskOptions())
    if args:
        raise TypeError("@remote takes keyword options only, e.g. @remote(num_gpus=1)")
    from nbcluster.actor import ACTOR_OPTION_NAMES

    valid = TASK_OPTION_NAMES | ACTOR_OPTION_NAMES | TASK_OPTIONS_IGNORED | ACTOR_OPTIONS_IGNORED
    check_option_names(kwargs, valid, "@remote")
    # The rest is checked against what the decorated object is (function or class).
    return lambda target: _make(target, dict(kwargs))


def _make(target: Any, opts: TaskOptions | dict[str, Any]) -> Any:
    if inspect.isclass(target):
        from nbcluster.actor import ActorClass

        return ActorClass(target, opts if isinstance(opts, dict) else {})
    if isinstance(opts, dict):
        given = opts
        opts = make_task_options(None, **given)
        if opts.num_gpus > 0 and given.get("max_calls") is None:
            # Ray's default for GPU functions: a fresh worker per call, so that GPU memory
            # (which frameworks keep cached) is given back when the call ends.
            opts = dataclasses.replace(opts, max_calls=1)
    return RemoteFunction(target, opts)


__all__ = ["ObjectRef", "RemoteFunction", "remote"]
