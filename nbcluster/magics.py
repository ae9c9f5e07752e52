"""The IPython extension: ``%load_ext nbcluster``, ``%nbcluster``, ``%%remote``, ``%%on``.

It also routes remote output in a notebook kernel: every task remembers which cell submitted it
(the kernel's parent header when ``.remote()`` was called), and its prints are published under
that cell, even when they arrive after the cell finished.

IPython is imported only when the extension is loaded: workers import this module to run
``%%on`` cells (:func:`run_cell`) and should not pay for IPython.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import json
import linecache
import shlex
import sys
import threading
import types
from collections import OrderedDict
from typing import Any

import cloudpickle

import nbcluster as nb
from nbcluster.client import current
from nbcluster.client.core import CoreClient
from nbcluster.status import other_resources, table, used
from nbcluster.widgets import cluster_nodes

#: Cells whose parent header is kept for late output (the oldest are forgotten first).
MAX_CELLS = 512

# Names IPython keeps in the user namespace that a cell never means to send.
_IPYTHON_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "open"}

HELP = """\
%nbcluster status     nodes with CPUs, GPUs, memory and resources in use
%nbcluster nodes      node ids, addresses and state
%nbcluster tasks      tasks this kernel submitted that are not finished
%nbcluster actors     actors of the cluster
%nbcluster shutdown   disconnect (and stop a local cluster this kernel started)

%%remote [--num-cpus N] [--num-gpus N] [--resources JSON]
    Run the cell as a task. It reads the notebook names it uses; the names it binds come back
    (modules are imported here too; values that do not pickle are skipped with a note).
%%on ACTOR
    Run the cell inside that actor's process, with the actor instance as `self`.
"""


# ============================================================================ running a cell
_NO_SELF = object()


class _Module:
    """A module a remote cell imported: the notebook imports it by name (if it can)."""

    def __init__(self, name: str) -> None:
        self.name = name


def _pickle_problem(value: Any) -> str | None:
    """Why ``value`` cannot travel between processes (``None`` when it can)."""
    try:
        # Out-of-band buffers are not copied: checking a large array costs next to nothing.
        cloudpickle.dumps(value, protocol=5, buffer_callback=lambda _b: None)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def run_cell(
    code: str, inputs: dict[str, Any], filename: str, *, bound_self: Any = _NO_SELF
) -> dict[str, Any]:
    """Run a notebook cell's ``code`` here (in a task or an actor) with ``inputs`` as globals.

    Returns the names the cell bound (new or rebound, and picklable), the reasons others were
    skipped, and the value of a trailing expression, as a notebook cell would display it.
    """
    ns: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    ns.update(inputs)
    if bound_self is not _NO_SELF:
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
    values: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name, value in ns.items():
        if name.startswith("__") or name == "self":
            continue
        if name in before and before[name] is value:
            continue  # not rebound by the cell
        if isinstance(value, types.ModuleType):
            values[name] = _Module(value.__name__)
            continue
        why = _pickle_problem(value)
        if why is None:
            values[name] = value
        else:
            skipped[name] = why
    if result is not None and _pickle_problem(result) is not None:
        skipped["(cell result)"] = "does not pickle; shown as its repr"
        result = _Repr(repr(result))
    return {"values": values, "skipped": skipped, "result": result}


class _Repr:
    """Stands in for an unpicklable cell result: displays as the remote value's repr."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _used_names(code: str) -> set[str]:
    """Every name a cell's code mentions (read or written, at any depth)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return set()
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}


def _inputs(code: str, user_ns: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The notebook globals a cell uses that can be sent, and why the others cannot."""
    inputs: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name in sorted(_used_names(code)):
        if name not in user_ns or name in _IPYTHON_NAMES or name.startswith("__"):
            continue
        value = user_ns[name]
        if isinstance(value, types.ModuleType):
            inputs[name] = value  # pickled by reference: imported again where the cell runs
            continue
        why = _pickle_problem(value)
        if why is None:
            inputs[name] = value
        else:
            skipped[name] = why
    return inputs, skipped


_cell_numbers = iter(range(1, sys.maxsize))


def _register_source(code: str) -> str:
    """A file name for a remote cell whose lines tracebacks can show (the driver keeps them)."""
    filename = f"<nbcluster-cell-{next(_cell_numbers)}>"
    lines = code.splitlines(keepends=True)
    linecache.cache[filename] = (len(code), None, lines, filename)
    return filename


def _note(skipped: dict[str, str], what: str) -> None:
    if skipped:
        items = "; ".join(f"{k} ({v})" for k, v in skipped.items())
        print(f"nbcluster: {what}: {items}", file=sys.stderr)


def _finish_cell(outcome: dict[str, Any], user_ns: dict[str, Any]) -> Any:
    skipped = dict(outcome["skipped"])
    for name, value in outcome["values"].items():
        if isinstance(value, _Module):  # imported remotely: import it here too
            try:
                value = importlib.import_module(value.name)
            except ImportError as exc:
                skipped[name] = f"module {value.name} does not import here: {exc}"
                continue
        user_ns[name] = value
    _note(skipped, "not copied back")
    return outcome["result"]


# ============================================================================ output routing
class CellOutput:
    """Publishes remote output under the notebook cell that submitted the task.

    ``tag`` runs in the user's thread at ``.remote()`` time and remembers the cell's parent
    header; ``write`` runs on the client's I/O thread and writes the lines to the kernel's stream
    with that parent header (ipykernel then sends a ``stream`` message the frontend shows under
    that cell).
    """

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.streams: dict[str, Any] = {"stdout": sys.stdout, "stderr": sys.stderr}  # OutStreams
        self._headers: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def tag(self) -> str | None:
        """The id of the cell running now (its request's ``msg_id``)."""
        try:
            parent = self.kernel.get_parent("shell")
        except Exception:
            return None
        header = (parent or {}).get("header") or {}
        msg_id = header.get("msg_id")
        if not msg_id:
            return None
        with self._lock:
            self._headers[msg_id] = header
            self._headers.move_to_end(msg_id)
            while len(self._headers) > MAX_CELLS:
                self._headers.popitem(last=False)
        return str(msg_id)

    def write(self, stream: str, text: str, tag: Any) -> None:
        out = self.streams.get(stream) or self.streams["stdout"]
        with self._lock:
            header = self._headers.get(tag) if tag else None
        try:
            if header is not None and hasattr(out, "set_thread_parent"):
                token = out.set_thread_parent(header)
                try:
                    out.write(text)
                finally:
                    out.reset_thread_parent(token)
            else:  # no cell known (or an older ipykernel): the current cell gets it
                out.write(text)
        except Exception:  # the kernel is shutting down: nowhere left to show it
            pass


def _kernel_shell() -> Any:
    """The IPython shell of the Jupyter kernel we run in, else ``None``."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return None
    shell = ipython.get_ipython()
    return shell if getattr(shell, "kernel", None) is not None else None


def attach_kernel(client: CoreClient) -> None:
    """Route ``client``'s remote output to notebook cells when it runs in a Jupyter kernel."""
    shell = _kernel_shell()
    if shell is None or client.on_output is not None:
        return
    router = CellOutput(shell.kernel)
    client.output_tag = router.tag
    client.on_output = router.write


# ============================================================================ the magics
def _connect() -> None:
    """Connect as ``init()`` does: the server's head when the kernel was told one, else local."""
    if not nb.is_initialized():
        nb.init()
    client = current.get()
    if client is not None:
        attach_kernel(client)


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.1f}G"


def status_text() -> str:
    """The ``%nbcluster status`` table: one row per node, then one per GPU with metrics."""
    rows = []
    gpu_rows = []
    for n in cluster_nodes():
        m = n.get("metrics") or {}
        mem = (
            f"{_gib(m.get('memory_used'))}/{_gib(m.get('memory_total'))}"
            if m.get("memory_total")
            else "-"
        )
        cpu = m.get("cpu_percent")
        rows.append(
            [
                n.get("name", ""),
                "alive" if n.get("alive") else "dead",
                used(n, "CPU"),
                "-" if cpu is None else f"{cpu:.0f}%",
                used(n, "GPU"),
                mem,
                other_resources(n),
            ]
        )
        for g in m.get("gpus") or []:
            util = g.get("utilization")
            gpu_rows.append(
                [
                    n.get("name", ""),
                    str(g.get("index", "")),
                    str(g.get("name", "")),
                    "-" if util is None else f"{util:.0f}%",
                    f"{_gib(g.get('memory_used'))}/{_gib(g.get('memory_total'))}",
                ]
            )
    text = table(rows, ["node", "state", "CPU used", "CPU %", "GPU used", "memory", "resources"])
    if gpu_rows:
        text += "\n\n" + table(gpu_rows, ["node", "GPU", "name", "util", "memory"])
    return text


def _tasks_snapshot(client: CoreClient) -> list[list[str]]:
    async def snap() -> list[list[str]]:  # on the I/O thread, which owns the task records
        rows = []
        for rec in list(client._by_tid.values()):
            if rec.actor_id is not None:
                state, where = "actor call", rec.actor_id
            elif rec.lease is not None:
                state, where = "running", rec.lease.node_name or rec.lease.node_id
            else:
                state, where = "waiting", "-"
            rows.append([rec.tid, rec.name, state, where])
        return rows

    return list(client._call(snap(), 10.0))


def _magics_class() -> type:
    """Build the Magics class (IPython is imported only here)."""
    from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

    @magics_class
    class NbclusterMagics(Magics):
        """``%nbcluster``, ``%%remote`` and ``%%on``."""

        def _user_ns(self) -> dict[str, Any]:
            assert self.shell is not None
            ns: dict[str, Any] = self.shell.user_ns
            return ns

        @line_magic
        def nbcluster(self, line: str) -> None:
            """Cluster status and control: ``%nbcluster status|nodes|tasks|actors|shutdown``."""
            cmd = line.strip().split()[0] if line.strip() else "help"
            if cmd in ("help", "-h", "--help"):
                print(HELP)
                return
            if cmd == "shutdown":
                nb.shutdown()
                print("nbcluster: disconnected")
                return
            _connect()
            if cmd == "status":
                print(status_text())
            elif cmd == "nodes":
                rows = [
                    [n["node_id"], n["name"], n["address"], "alive" if n["alive"] else "dead"]
                    for n in nb.nodes()
                ]
                print(table(rows, ["node_id", "name", "address", "state"]))
            elif cmd == "tasks":
                rows = _tasks_snapshot(current.require())
                print(table(rows, ["task", "name", "state", "where"]) if rows else "no tasks")
            elif cmd == "actors":
                rows = [
                    [
                        a["actor_id"],
                        a["class_name"],
                        a.get("name") or "-",
                        a["state"],
                        str(a.get("pid") or "-"),
                    ]
                    for a in nb.actors()
                ]
                print(table(rows, ["actor", "class", "name", "state", "pid"]) if rows else "none")
            else:
                print(f"unknown command {cmd!r}\n\n{HELP}", file=sys.stderr)

        @cell_magic
        def remote(self, line: str, cell: str) -> Any:
            """Run this cell as a task (``%%remote [--num-cpus N] [--num-gpus N]``...)."""
            options = _parse_remote_options(line)
            _connect()
            user_ns = self._user_ns()
            inputs, skipped = _inputs(cell, user_ns)
            _note(skipped, "not sent to the cluster")
            filename = _register_source(cell)
            task = nb.remote(**options)(run_cell).options(name="%%remote")
            return _finish_cell(nb.get(task.remote(cell, inputs, filename)), user_ns)

        @cell_magic
        def on(self, line: str, cell: str) -> Any:
            """Run this cell inside an actor's process with the instance as ``self``."""
            _connect()
            handle = _resolve_actor(line.strip(), self._user_ns())
            user_ns = self._user_ns()
            inputs, skipped = _inputs(cell, user_ns)
            inputs.pop("self", None)
            _note(skipped, "not sent to the actor")
            filename = _register_source(cell)
            from nbcluster.worker.actor_host import EXEC_METHOD

            client = current.require()
            (ref,) = client.submit_actor_call(
                handle._aid, handle._cls_name, EXEC_METHOD, (cell, inputs, filename), {}, 1
            )
            return _finish_cell(nb.get(ref), user_ns)

    return NbclusterMagics


def _parse_remote_options(line: str) -> dict[str, Any]:
    """``%%remote``'s options as ``@remote`` keywords; a clear error for anything else."""
    words = shlex.split(line)
    options: dict[str, Any] = {}
    flags = {"--num-cpus": "num_cpus", "--num-gpus": "num_gpus", "--resources": "resources"}
    i = 0
    while i < len(words):
        word = words[i]
        key, _, value = word.partition("=")
        if key not in flags:
            raise ValueError(f"%%remote: unknown option {word!r} (see %nbcluster help)")
        if not value:
            if i + 1 >= len(words):
                raise ValueError(f"%%remote: {key} needs a value")
            i += 1
            value = words[i]
        if key == "--resources":
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"%%remote: --resources must be a JSON object: {exc}") from None
            if not isinstance(parsed, dict):
                raise ValueError("%%remote: --resources must be a JSON object like '{\"TPU\": 1}'")
            options["resources"] = parsed
        else:
            try:
                options[flags[key]] = float(value)
            except ValueError:
                raise ValueError(f"%%remote: {key} expects a number, got {value!r}") from None
        i += 1
    return options


def _resolve_actor(what: str, user_ns: dict[str, Any]) -> nb.ActorHandle:
    """``%%on``'s argument: a notebook variable holding a handle, or a named actor's name."""
    if not what:
        raise ValueError("%%on needs an actor: a variable holding its handle, or its name")
    value = user_ns.get(what)
    if isinstance(value, nb.ActorHandle):
        return value
    if value is not None:
        raise TypeError(f"%%on: {what} is a {type(value).__name__}, not an actor handle")
    try:
        return nb.get_actor(what)
    except ValueError:
        raise ValueError(f"%%on: no variable or named actor called {what!r}") from None


# ============================================================================ entry points
def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext nbcluster``: connect (or start a local cluster) and register the magics."""
    ipython.register_magics(_magics_class())
    _connect()


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext nbcluster``: the connection stays (``%nbcluster shutdown`` ends it)."""
