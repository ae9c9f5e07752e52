"""Running a notebook cell's code in a task or an actor (``%%remote``, ``%%on``).

Workers import this module to run such cells, so it imports nothing of IPython and nothing of
ours: it sits below the worker and the magics alike.
"""

from __future__ import annotations

import ast
import builtins
import types
from collections.abc import Callable, Iterable
from typing import Any

import cloudpickle

#: The hidden actor method ``%%on ACTOR`` calls: ``(code, inputs, filename)`` -> the outcome.
EXEC_METHOD = "__nbcluster_exec__"

#: ``run_cell``'s ``bound_self`` when the cell runs in a task (no ``self``).
NO_SELF = object()


class ModuleByName:
    """A module a remote cell imported: the notebook imports it by name (if it can)."""

    def __init__(self, name: str) -> None:
        self.name = name


def pickle_problem(value: Any) -> str | None:
    """Why ``value`` cannot travel between processes (``None`` when it can)."""
    try:
        # Out-of-band buffers are not copied: checking a large array costs next to nothing.
        cloudpickle.dumps(value, protocol=5, buffer_callback=lambda _b: None)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def sendable(
    items: Iterable[tuple[str, Any]], module: Callable[[types.ModuleType], Any]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Split named values into those that can be sent (modules as ``module`` makes them) and,
    for the others, why they do not pickle."""
    values: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name, value in items:
        if isinstance(value, types.ModuleType):
            values[name] = module(value)
            continue
        why = pickle_problem(value)
        if why is None:
            values[name] = value
        else:
            skipped[name] = why
    return values, skipped


def run_cell(
    code: str, inputs: dict[str, Any], filename: str, *, bound_self: Any = NO_SELF
) -> dict[str, Any]:
    """Run a notebook cell's ``code`` here (in a task or an actor) with ``inputs`` as globals.

    Returns the names the cell bound (new or rebound, and picklable), the reasons others were
    skipped, and the value of a trailing expression, as a notebook cell would display it.
    """
    ns: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    ns.update(inputs)
    if bound_self is not NO_SELF:
        ns["self"] = bound_self
    before = dict(ns)
    tree = ast.parse(code, filename)
    last: ast.expr | None = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = tree.body.pop().value  # type: ignore[attr-defined]
    exec(compile(tree, filename, "exec"), ns)
    result = None
    if last is not None:
        result = eval(compile(ast.Expression(last), filename, "eval"), ns)
    bound = (
        (name, value)
        for name, value in ns.items()
        if not (name.startswith("__") or name == "self")
        and not (name in before and before[name] is value)  # not rebound by the cell
    )
    values, skipped = sendable(bound, lambda m: ModuleByName(m.__name__))
    if result is not None and pickle_problem(result) is not None:
        skipped["(cell result)"] = "does not pickle; shown as its repr"
        result = ReprOnly(repr(result))
    return {"values": values, "skipped": skipped, "result": result}


class ReprOnly:
    """Stands in for an unpicklable cell result: displays as the remote value's repr."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text
