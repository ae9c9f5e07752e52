"""Command-line entry points: ``nbcluster`` (head, status, memory, up, demo, lab),
``nbcluster-worker``."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from pathlib import Path

from nbcluster.protocol.security import (
    TOKEN_FILE_ENV,
    new_token,
    read_token_file,
    write_token_file,
)

DEFAULT_TOKEN_FILE = Path(os.environ.get("NBCLUSTER_HOME", Path.home() / ".nbcluster")) / "token"


def add_metrics_options(p: argparse.ArgumentParser) -> None:
    """``--metrics-port`` and ``--metrics-host`` (the standalone head's Prometheus endpoint)."""
    p.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics at http://HOST:PORT/metrics (0: any free port; default: "
        "no endpoint). No authentication: see docs/security.md",
    )
    p.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address of the metrics endpoint (default loopback only; 0.0.0.0 exposes the "
        "metrics, unauthenticated, to everyone who can reach this host)",
    )


def _cmd_head(args: argparse.Namespace) -> int:
    from nbcluster._proc import setup_logging
    from nbcluster.head.__main__ import run_head

    token_file = Path(args.token_file or DEFAULT_TOKEN_FILE)
    if not token_file.exists():
        write_token_file(token_file, new_token())
        print(f"wrote a new cluster secret to {token_file} (mode 0600)")
    else:
        read_token_file(token_file)  # refuses group/world-readable files
    setup_logging("head")
    state_file = args.state_file or str(token_file.with_name(f"head-{args.port}.state"))
    ns = argparse.Namespace(
        host=args.host,
        port=args.port,
        token_file=str(token_file),
        parent_pid=0,
        state_file=state_file,
        keep_nodes=args.keep_nodes,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
    )
    print(
        f"nbcluster head starting on {args.host}:{args.port}\n"
        f'  drivers:      nbcluster.init(address="{args.host}:{args.port}")  '
        f"(with NBCLUSTER_TOKEN_FILE={token_file})\n"
        f"  worker hosts: copy {token_file} (mode 0600), then run\n"
        f"                nbcluster-worker --address {args.host}:{args.port} "
        f"--token-file {token_file}",
        flush=True,
    )
    return asyncio.run(run_head(ns))


def _connect(args: argparse.Namespace, cmd: str) -> bool:
    """``nb.init`` as a driver of the head at ``--address`` / ``$NBCLUSTER_ADDRESS`` (with
    ``--token-file``, ``$NBCLUSTER_TOKEN_FILE`` or the default secret); False (and a message)
    when no address was given."""
    import nbcluster as nb

    address = args.address or os.environ.get(nb.api.ADDRESS_ENV)
    if not address:
        print(
            f"nbcluster {cmd}: pass --address HOST:PORT or set NBCLUSTER_ADDRESS", file=sys.stderr
        )
        return False
    token_file = (
        args.token_file
        or os.environ.get(TOKEN_FILE_ENV)
        or (str(DEFAULT_TOKEN_FILE) if DEFAULT_TOKEN_FILE.exists() else None)
    )
    nb.init(address=address, token_file=token_file, log_to_driver=False)
    return True


def _cmd_status(args: argparse.Namespace) -> int:
    import nbcluster as nb
    from nbcluster.status import (
        actor_views,
        cluster_view,
        status_report,
        task_count_views,
        task_views,
    )

    try:
        if not _connect(args, "status"):
            return 2
        report = status_report(cluster_view(), task_views(), actor_views(), task_count_views())
        print(report)
    except nb.exceptions.NbclusterError as exc:
        print(f"nbcluster status: {exc}", file=sys.stderr)
        return 1
    finally:
        nb.shutdown()
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    import nbcluster as nb
    from nbcluster.util.logs import get_log

    try:
        if not _connect(args, "logs"):
            return 2
        lines = get_log(
            args.actor,
            args.task,
            worker_id=args.worker,
            namespace=args.namespace,
            follow=args.follow,
            tail=args.tail,
        )
        for line in lines:
            print(line, flush=args.follow)
    except nb.exceptions.NbclusterError as exc:
        print(f"nbcluster logs: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the end of --follow
        return 0
    finally:
        nb.shutdown()
    return 0


def _cmd_memory(args: argparse.Namespace) -> int:
    import msgspec

    import nbcluster as nb
    from nbcluster.status import memory_text, memory_view

    try:
        if not _connect(args, "memory"):
            return 2
        body = memory_view(args.limit)
        if args.json:
            print(msgspec.json.format(msgspec.json.encode(body)).decode())
        else:
            print(memory_text(body))
    except (nb.exceptions.NbclusterError, ValueError) as exc:
        print(f"nbcluster memory: {exc}", file=sys.stderr)
        return 1
    finally:
        nb.shutdown()
    return 0


def _cmd_up(argv: list[str]) -> int:
    """``nbcluster up KIND --nodes N [pool options]``: grow a running head's cluster."""
    import signal
    import threading

    import nbcluster as nb
    from nbcluster.deploy.registry import option_parser, parse_words, pool_class

    p = option_parser("nbcluster up")
    p.description = "Add nodes to a running head's cluster as jobs of Slurm, SSH hosts, ..."
    p.add_argument("-h", "--help", action="help")
    p.add_argument("kind", help="slurm, ssh or kubernetes")
    p.add_argument("--nodes", type=int, default=1, help="jobs to start (default 1)")
    p.add_argument("--address", help="HOST:PORT of the head (default $NBCLUSTER_ADDRESS)")
    p.add_argument("--token-file", help=f"cluster secret (default {DEFAULT_TOKEN_FILE})")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the nodes")
    p.add_argument(
        "--adapt",
        action="store_true",
        help="grow and shrink with demand (between --min and --nodes) until Ctrl-C",
    )
    p.add_argument("--min", type=int, default=0)
    p.add_argument("--idle-timeout", default="5min")
    p.add_argument(
        "--wait",
        action="store_true",
        help="stay in the foreground; Ctrl-C ends the jobs (default: leave them running: they "
        "end with scancel/close, or when the head has been gone for their head timeout)",
    )
    try:
        ns, options = parse_words(argv, p)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    address = ns.address or os.environ.get(nb.api.ADDRESS_ENV) or "127.0.0.1:7711"
    token_file = ns.token_file or os.environ.get(TOKEN_FILE_ENV) or str(DEFAULT_TOKEN_FILE)
    foreground = ns.wait or ns.adapt
    options.pop("name", None)
    options.setdefault("lifetime", "owned" if foreground else "detached")
    try:
        nb.init(address=address, token_file=token_file, log_to_driver=False)
        pool = pool_class(ns.kind)(name=ns.kind, **options)
        if ns.adapt:
            pool.adapt(minimum=ns.min, maximum=ns.nodes, idle_timeout=ns.idle_timeout)
            print(f"{pool.name}: adaptive, {ns.min}..{ns.nodes} node(s); Ctrl-C ends the jobs")
        else:
            pool.scale(ns.nodes)
            print(f"{pool.name}: submitted {ns.nodes} job(s); waiting for them to join")
            pool.wait_for_nodes(ns.nodes, timeout=ns.timeout)
        print(pool.summary(), flush=True)
    except (nb.exceptions.NbclusterError, ValueError, TypeError) as exc:
        print(f"nbcluster up: {exc}", file=sys.stderr)
        nb.shutdown()
        return 1
    if not foreground:
        nb.shutdown()
        return 0
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    last = ""
    while not stop.wait(2.0):
        now = pool.summary()
        if now != last:
            print(now, flush=True)
            last = now
    print(f"{pool.name}: ending its jobs", flush=True)
    pool.close()
    nb.shutdown()
    return 0


def _cmd_lab(argv: list[str]) -> int:
    """``jupyter lab`` with the nbcluster server extension on (even if not enabled globally).

    The first argument not starting with ``-`` is the notebook directory (default: ./notebooks
    if it exists); the others go to JupyterLab (``--port 8889``, ``--no-browser``...).
    """
    dirs = [a for a in argv if not a.startswith("-")][:1]
    rest = [a for a in argv if a not in dirs]
    directory = dirs[0] if dirs else ("notebooks" if Path("notebooks").is_dir() else ".")
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        f"--ServerApp.root_dir={directory}",
        "--ServerApp.jpserver_extensions=nbcluster.jupyter=True",
        *rest,
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # e.g. in a container
    if os.name == "posix":
        os.execv(sys.executable, cmd)  # become JupyterLab: signals (Ctrl-C, SIGTERM) reach it
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:  # JupyterLab got the Ctrl-C too and shuts down by itself
        return 130


def main(argv: list[str] | None = None) -> int:
    """``nbcluster``: run a head, show cluster status, or run the demo."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return worker_main(argv[1:])
    if argv[:1] == ["up"]:
        return _cmd_up(argv[1:])
    if argv[:1] == ["lab"] and not {"-h", "--help"} & set(argv):
        return _cmd_lab(argv[1:])
    p = argparse.ArgumentParser(prog="nbcluster", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("head", help="run a standalone head")
    h.add_argument("--host", default="127.0.0.1")
    h.add_argument("--port", type=int, default=7711)
    h.add_argument("--token-file", help=f"cluster secret (default {DEFAULT_TOKEN_FILE})")
    h.add_argument(
        "--state-file",
        help="restart snapshot (default: head-PORT.state beside the token file); a head started "
        "again with the same one takes the cluster back: nodes, actors and drivers reconnect",
    )
    h.add_argument(
        "--keep-nodes",
        action="store_true",
        help="on Ctrl-C/SIGTERM leave the node agents running for the next head (default: stop "
        "them too)",
    )
    add_metrics_options(h)
    s = sub.add_parser("status", help="nodes and resources of a running cluster")
    lg = sub.add_parser("logs", help="a worker's log: of an actor, a task or a worker process")
    which = lg.add_mutually_exclusive_group(required=True)
    which.add_argument("--actor", help="an actor's name (or id): its worker's whole log")
    which.add_argument("--task", help="a task's id: the lines it printed")
    which.add_argument("--worker", help="a worker's id (dead ones too)")
    lg.add_argument("--namespace", help="the actor's namespace (default: any, the newest)")
    lg.add_argument("--follow", "-f", action="store_true", help="print new lines as they come")
    lg.add_argument("--tail", type=int, default=1000, help="last lines first (-1: all kept)")
    for cmd in (s, lg):
        cmd.add_argument("--address", help="the head (default $NBCLUSTER_ADDRESS)")
        cmd.add_argument("--token-file")
    mem = sub.add_parser(
        "memory", help="what the nodes' object stores hold, largest first (like ray memory)"
    )
    mem.add_argument("--address", help="HOST:PORT of the head (default $NBCLUSTER_ADDRESS)")
    mem.add_argument("--token-file", help=f"cluster secret (default {DEFAULT_TOKEN_FILE})")
    mem.add_argument("--limit", type=int, help="objects to list (default 100)")
    mem.add_argument("--json", action="store_true", help="the MemoryBody view as JSON")
    sub.add_parser("demo", help="run the examples on a local cluster and print their results")
    lab = sub.add_parser(
        "lab", help="open JupyterLab with the cluster running (in its server) and the notebooks"
    )
    lab.add_argument(
        "directory", nargs="?", help="where the notebooks are (default: ./notebooks if it exists)"
    )
    lab.add_argument("jupyterlab_options", nargs="*", help="passed on to JupyterLab")
    sub.add_parser("worker", help="same as nbcluster-worker")
    sub.add_parser(
        "up", help="add nodes to a running head as jobs of Slurm/SSH/Kubernetes (up KIND -h)"
    )
    args = p.parse_args(argv)
    if args.cmd == "head":
        return _cmd_head(args)
    if args.cmd == "status":
        return _cmd_status(args)
    if args.cmd == "logs":
        return _cmd_logs(args)
    if args.cmd == "memory":
        return _cmd_memory(args)
    from nbcluster.demo import run_demo

    return run_demo()


def worker_main(argv: list[str] | None = None) -> int:
    """``nbcluster-worker``: join this host to a head as a node agent."""
    from nbcluster.agent.__main__ import main as agent_main

    return agent_main(argv)


if __name__ == "__main__":
    sys.exit(main())
