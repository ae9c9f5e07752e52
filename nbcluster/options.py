"""One frozen record of the options a task is submitted with, and the resource checks actor
options share (an actor's options stay a checked dict: ``nbcluster/actor.py``)."""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from nbcluster.runtime_env.spec import RuntimeEnvSpec, parse
from nbcluster.scheduling import (
    PlacementGroupSchedulingStrategy,
    StrategySpec,
    strategy_spec,
    submitted_strategy,
)

_EPS = 1e-9

#: Options accepted by ``@remote`` and ``.options()`` on functions.
TASK_OPTION_NAMES = frozenset(
    {
        "num_cpus",
        "num_gpus",
        "resources",
        "memory",
        "max_retries",
        "retry_exceptions",
        "num_returns",
        "name",
        "scheduling_strategy",
        "runtime_env",
        "_generator_backpressure_num_objects",
        "max_calls",
    }
)

#: ``num_returns`` values of generator tasks (Ray's).
GENERATOR_RETURNS = ("streaming", "dynamic")

# Options Ray documents that mean nothing here (yet): accepted, checked where cheap, then ignored
# (docs/user-guide.md lists why for each).
_COMMON_IGNORED = frozenset(
    {
        "accelerator_type",
        "object_store_memory",
        "_metadata",
        "enable_task_events",
        "label_selector",
        "fallback_strategy",
        "_labels",
        "placement_group",
        "placement_group_bundle_index",
        "placement_group_capture_child_tasks",
    }
)

#: Ray's function options accepted and ignored.
TASK_OPTIONS_IGNORED = _COMMON_IGNORED

#: Ray's actor options accepted and ignored.
ACTOR_OPTIONS_IGNORED = _COMMON_IGNORED | {
    "max_pending_calls",
    "enable_tensor_transport",
    "allow_out_of_order_execution",
}

#: Ray's actor method options (``.options()`` and ``@method``); only ``num_returns`` acts.
METHOD_OPTION_NAMES = frozenset(
    {
        "num_returns",
        "concurrency_group",
        "max_task_retries",
        "retry_exceptions",
        "name",
        "enable_task_events",
        "_generator_backpressure_num_objects",
        "tensor_transport",
    }
)


def check_backpressure(value: Any) -> int:
    """``_generator_backpressure_num_objects``: ``None``/-1/0 for none, else a positive count."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < -1:
        raise ValueError(
            f"_generator_backpressure_num_objects must be a positive integer, got {value!r}"
        )
    return max(value, 0)


def check_option_names(given: Iterable[str], valid: Iterable[str], what: str) -> None:
    """Raise Ray's ``ValueError`` for an unknown option, naming the nearest valid one.

    Raises
    ------
    ValueError
        ``Invalid option keyword num_cpu for remote functions (did you mean 'num_cpus'?)...``
    """
    valid = sorted(valid)
    for key in sorted(given):
        if key in valid:
            continue
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"Invalid option keyword {key} for {what}{hint}. Valid ones are {', '.join(valid)}."
        )


def legacy_placement(opts: dict[str, Any]) -> None:
    """Turn Ray's legacy ``placement_group=``/``placement_group_bundle_index=`` options into a
    ``scheduling_strategy`` (in place), for tasks and actors alike.

    Raises
    ------
    ValueError
        For a legacy placement group beside a ``scheduling_strategy``.
    """
    pg = opts.get("placement_group", "default")
    if pg not in (None, "default"):
        if opts.get("scheduling_strategy") not in (None, "DEFAULT"):
            raise ValueError(
                "placement_group= and scheduling_strategy= cannot both be given: use "
                "scheduling_strategy=PlacementGroupSchedulingStrategy(...)"
            )
        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            pg,
            opts.get("placement_group_bundle_index", -1),
            opts.get("placement_group_capture_child_tasks"),
        )


def check_ignored(opts: dict[str, Any]) -> None:
    """Check the values of ``max_calls`` and of ignored options whose misuse would change a
    result.

    Raises
    ------
    ValueError
        For a bad ``max_calls`` or ``max_pending_calls``.
    """
    for key, low in (("max_calls", 0), ("max_pending_calls", -1)):
        v = opts.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            raise ValueError(f"{key} must be an integer >= {low}, got {v!r}")


@dataclass(frozen=True)
class TaskOptions:
    """Validated options of a remote function.

    Attributes mirror Ray's: ``num_cpus`` (default 1), ``num_gpus`` (0), custom ``resources``,
    ``max_retries`` (3, for worker crashes), ``retry_exceptions`` (``False``, ``True`` or a list of
    exception types), ``num_returns`` (1), a display ``name`` and a ``scheduling_strategy``
    (``"DEFAULT"``, ``"SPREAD"`` or a
    :class:`~nbcluster.scheduling.NodeAffinitySchedulingStrategy`) and a validated
    ``runtime_env`` (merged over the job's when the task is submitted).
    """

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    memory: float = 0.0
    max_retries: int = 3
    retry_exceptions: bool | tuple[type[BaseException], ...] = False
    num_returns: int | str = 1
    name: str | None = None
    scheduling_strategy: Any = None
    runtime_env: RuntimeEnvSpec | None = None
    #: Ray's ``_generator_backpressure_num_objects`` (0: no backpressure).
    generator_backpressure: int = 0
    #: Ray's ``max_calls``: a worker that ran the function this many times exits (0: never).
    max_calls: int = 0

    def replace(self, **kwargs: Any) -> TaskOptions:
        """Return a copy with ``kwargs`` applied (validated as in :func:`make_task_options`)."""
        return make_task_options(self, **kwargs)

    def shape(self) -> dict[str, float]:
        """The resource request as a dict, omitting zero amounts."""
        shape: dict[str, float] = {}
        if self.num_cpus > _EPS:
            shape["CPU"] = float(self.num_cpus)
        if self.num_gpus > _EPS:
            shape["GPU"] = float(self.num_gpus)
        if self.memory > _EPS:
            shape["memory"] = float(self.memory)
        for k, v in self.resources.items():
            if v > _EPS:
                shape[k] = float(v)
        return shape

    def strategy(self) -> StrategySpec | None:
        """The scheduling strategy in its wire form (``None`` for DEFAULT), a captured
        placement group's when none was given (:func:`~nbcluster.scheduling.submitted_strategy`)."""
        return submitted_strategy(self.scheduling_strategy)


def _check_amount(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be non-negative, got {value!r}")
    if value != 0 and round(value * 10_000) == 0:
        raise ValueError(f"{name} must be 0 or at least 0.0001, got {value!r}")
    return float(value)


def check_gpus(value: float) -> None:
    """Fractions share one GPU; more than one GPU must be a whole number of them."""
    if value > 1 and value != int(value):
        raise ValueError(f"num_gpus above 1 must be a whole number, got {value!r}")


def make_task_options(base: TaskOptions | None = None, **kwargs: Any) -> TaskOptions:
    """Build validated :class:`TaskOptions` from keyword arguments.

    Ray's options that mean nothing here (``TASK_OPTIONS_IGNORED``) are accepted and dropped.

    Raises
    ------
    ValueError
        For unknown option names (naming the nearest valid one) or invalid values, naming them.
    """
    check_option_names(kwargs, TASK_OPTION_NAMES | TASK_OPTIONS_IGNORED, "remote functions")
    check_ignored(kwargs)
    legacy_placement(kwargs)
    base = base or TaskOptions()
    changes: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in TASK_OPTIONS_IGNORED:
            continue
        if key == "runtime_env":
            changes[key] = parse(value)  # raises RuntimeEnvError (a ValueError), naming the key
            continue
        if value is None and key in ("num_cpus", "num_gpus", "memory", "resources"):
            continue
        if key in ("num_cpus", "num_gpus", "memory"):
            amount = _check_amount(key, value)
            if key == "num_gpus":
                check_gpus(amount)
            changes[key] = amount
        elif key == "resources":
            if not isinstance(value, dict):
                raise ValueError(f"resources must be a dict, got {type(value).__name__}")
            for rk in value:
                if rk in ("CPU", "GPU", "memory"):
                    raise ValueError(f"use num_cpus/num_gpus/memory instead of resources[{rk!r}]")
            changes[key] = {str(k): _check_amount(f"resources[{k!r}]", v) for k, v in value.items()}
        elif key == "num_returns" and value in GENERATOR_RETURNS:
            changes[key] = value
        elif key == "_generator_backpressure_num_objects":
            changes["generator_backpressure"] = check_backpressure(value)
        elif key == "max_calls":
            if value is not None:  # (checked by check_ignored)
                changes[key] = value
        elif key in ("max_retries", "num_returns"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{key} must be an integer, got {value!r}")
            if key == "num_returns" and value < 0:
                raise ValueError("num_returns must be >= 0")
            if key == "max_retries" and value < -1:
                raise ValueError("max_retries must be >= -1 (-1 retries forever)")
            changes[key] = value
        elif key == "retry_exceptions":
            if isinstance(value, bool):
                changes[key] = value
            elif isinstance(value, list | tuple) and all(
                isinstance(t, type) and issubclass(t, BaseException) for t in value
            ):
                changes[key] = tuple(value)
            else:
                raise ValueError("retry_exceptions must be a bool or a list of exception types")
        elif key == "name":
            changes[key] = None if value is None else str(value)
        elif key == "scheduling_strategy":
            strategy_spec(value)  # raises on anything unsupported
            changes[key] = value
        else:
            changes[key] = value
    return dataclasses.replace(base, **changes)
