"""The IPython extension: ``%load_ext nbcluster``, ``%nbcluster``, ``%%remote``, ``%%on``.

The cells run remotely with :func:`nbcluster.cells.run_cell`; remote output is routed to the
submitting cell by :mod:`nbcluster.kernel`. IPython is imported only when the extension is
loaded.
"""

from __future__ import annotations

import ast
import importlib
import json
import linecache
import shlex
import sys
from typing import Any

from nbcluster.actor import ActorHandle, get_actor
from nbcluster.api import actors, get, init, is_initialized, nodes, shutdown
from nbcluster.cells import EXEC_METHOD, ModuleByName, run_cell, sendable
from nbcluster.client import current
from nbcluster.client.core import CoreClient
from nbcluster.deploy.registry import Pools, option_parser, parse_words, split_line
from nbcluster.kernel import attach_kernel
from nbcluster.remote import remote
from nbcluster.runtime_env.upload import job_env, set_job_env, upload_stats
from nbcluster.status import cluster_nodes, nodes_text, table

# Names IPython keeps in the user namespace that a cell never means to send.
_IPYTHON_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "open"}

HELP = """\
%nbcluster status     nodes with CPUs, GPUs, memory and resources in use
%nbcluster nodes      node ids, addresses and state
%nbcluster tasks      tasks this kernel submitted that are not finished
%nbcluster actors     actors of the cluster
%nbcluster shutdown   disconnect (and stop a local cluster this kernel started)
%nbcluster runtime_env [--working-dir DIR] [--py-module PATH]... [--exclude PATTERN]...
                       [--env NAME=VALUE]... | --clear
    The runtime_env of this kernel's tasks and actors (`--working-dir .`: the notebook's folder,
    so modules beside the notebook import on every node). No option: show it.

%nbcluster scale KIND N [--cpus N --gpus N --memory 32GB --partition P --walltime 2:00:00 ...]
    Have N nodes of a pool (KIND: slurm, ssh, kubernetes) join this cluster; 0 ends them.
%nbcluster adapt KIND [--min N] [--max N] [--idle-timeout 5min] [pool options]
    Grow the pool for tasks waiting for resources, release nodes idle that long.
%nbcluster pools      the pools this kernel made, with their jobs

%%remote [--num-cpus N] [--num-gpus N] [--resources JSON]
    Run the cell as a task. It reads the notebook names it uses; the names it binds come back
    (modules are imported here too; values that do not pickle are skipped with a note).
%%on ACTOR
    Run the cell inside that actor's process, with the actor instance as `self`.
"""


# ============================================================================ running a cell
def _used_names(code: str) -> set[str]:
    """Every name a cell's code mentions (read or written, at any depth)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return set()
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}


def _inputs(code: str, user_ns: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The notebook globals a cell uses that can be sent, and why the others cannot."""
    used = (
        (name, user_ns[name])
        for name in sorted(_used_names(code))
        if name in user_ns and name not in _IPYTHON_NAMES and not name.startswith("__")
    )
    # Modules are pickled by reference: imported again where the cell runs.
    return sendable(used, lambda m: m)


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
        if isinstance(value, ModuleByName):  # imported remotely: import it here too
            try:
                value = importlib.import_module(value.name)
            except ImportError as exc:
                skipped[name] = f"module {value.name} does not import here: {exc}"
                continue
        user_ns[name] = value
    _note(skipped, "not copied back")
    return outcome["result"]


# ============================================================================ the magics
def _connect() -> None:
    """Connect as ``init()`` does: the server's head when the kernel was told one, else local."""
    if not is_initialized():
        init()
    client = current.get()
    if client is not None:
        attach_kernel(client)


def _tasks_snapshot(client: CoreClient) -> list[list[str]]:
    return client.task_rows(10.0)


def _magics_class() -> type:
    """Build the Magics class (IPython is imported only here)."""
    from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

    @magics_class
    class NbclusterMagics(Magics):
        """``%nbcluster``, ``%%remote`` and ``%%on``."""

        def __init__(self, shell: Any = None, **kwargs: Any) -> None:
            super().__init__(shell, **kwargs)
            self._pools = Pools()  # the pools this kernel made (their jobs end with it)

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
                shutdown()
                print("nbcluster: disconnected")
                return
            _connect()
            if cmd in ("scale", "adapt", "pools"):
                print(pool_command(self._pools, line))
                return
            if cmd == "status":
                print(nodes_text(cluster_nodes()))
            elif cmd == "nodes":
                rows = [
                    [n["node_id"], n["name"], n["address"], "alive" if n["alive"] else "dead"]
                    for n in nodes()
                ]
                print(table(rows, ["node_id", "name", "address", "state"]))
            elif cmd == "runtime_env":
                _runtime_env_magic(shlex.split(line)[1:])
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
                    for a in actors()
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
            task = remote(**options)(run_cell).options(name="%%remote")
            return _finish_cell(get(task.remote(cell, inputs, filename)), user_ns)

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
            client = current.require()
            (ref,) = client.submit_actor_call(
                handle._aid, handle._cls_name, EXEC_METHOD, (cell, inputs, filename), {}, 1
            )
            return _finish_cell(get(ref), user_ns)

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


def _parse_runtime_env_options(words: list[str]) -> dict[str, Any]:
    """``%nbcluster runtime_env``'s options as a ``runtime_env`` dict."""
    env: dict[str, Any] = {}
    lists = {"--py-module": "py_modules", "--exclude": "excludes"}
    i = 0
    while i < len(words):
        key, eq, value = words[i].partition("=")
        if key not in ("--working-dir", "--env", *lists):
            raise ValueError(f"%nbcluster runtime_env: unknown option {words[i]!r}")
        if not eq:
            if i + 1 >= len(words):
                raise ValueError(f"%nbcluster runtime_env: {key} needs a value")
            i += 1
            value = words[i]
        if key == "--working-dir":
            env["working_dir"] = value
        elif key == "--env":
            name, sep, val = value.partition("=")
            if not sep or not name:
                raise ValueError(f"%nbcluster runtime_env: --env expects NAME=VALUE, got {value!r}")
            env.setdefault("env_vars", {})[name] = val
        else:
            env.setdefault(lists[key], []).append(value)
        i += 1
    return env


def _runtime_env_magic(words: list[str]) -> None:
    client = current.require()
    if words == ["--clear"]:
        set_job_env(client, None)
        print("nbcluster: no runtime_env for this kernel's tasks and actors")
        return
    if words:
        set_job_env(client, _parse_runtime_env_options(words))  # packed and uploaded now
    spec = job_env(client)
    if spec is None:
        print("nbcluster: no runtime_env (set one: %nbcluster runtime_env --working-dir .)")
        return
    stats = upload_stats(client)
    print(
        f"nbcluster: runtime_env {spec.as_dict()} "
        f"({stats['uploads']} package(s), {stats['bytes']} bytes uploaded by this kernel)"
    )


def pool_command(pools: Pools, line: str) -> str:
    """``%nbcluster scale|adapt|pools ...``: act on ``pools``; returns what to print.

    Raises
    ------
    ValueError
        A malformed line (the message says what is wrong).
    """
    words = split_line(line)
    cmd, args = words[0], words[1:]
    if cmd == "pools":
        return pools.summary()
    parser = option_parser(f"%nbcluster {cmd}")
    parser.add_argument("kind")
    if cmd == "scale":
        parser.add_argument("n", type=int)
    else:
        parser.add_argument("--min", type=int, default=0)
        parser.add_argument("--max", type=int, default=8)
        parser.add_argument("--idle-timeout", default="5min")
    ns, options = parse_words(args, parser)
    if cmd == "scale":
        if ns.n < 0:
            raise ValueError("%nbcluster scale: the number of nodes must be >= 0")
        pool = pools.scale(ns.kind, ns.n, options)
        if ns.n == 0:
            return f"{pool.name}: closed (its jobs end)"
        return f"{pool.name}: scaling to {ns.n} node(s)\n{pool.summary()}"
    pool = pools.adapt(ns.kind, ns.min, ns.max, ns.idle_timeout, options)
    return f"{pool.name}: adaptive, {ns.min}..{ns.max} node(s), idle timeout {ns.idle_timeout}"


def _resolve_actor(what: str, user_ns: dict[str, Any]) -> ActorHandle:
    """``%%on``'s argument: a notebook variable holding a handle, or a named actor's name."""
    if not what:
        raise ValueError("%%on needs an actor: a variable holding its handle, or its name")
    value = user_ns.get(what)
    if isinstance(value, ActorHandle):
        return value
    if value is not None:
        raise TypeError(f"%%on: {what} is a {type(value).__name__}, not an actor handle")
    try:
        return get_actor(what)
    except ValueError:
        raise ValueError(f"%%on: no variable or named actor called {what!r}") from None


# ============================================================================ entry points
def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext nbcluster``: connect (or start a local cluster) and register the magics."""
    ipython.register_magics(_magics_class())
    _connect()


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext nbcluster``: the connection stays (``%nbcluster shutdown`` ends it)."""
