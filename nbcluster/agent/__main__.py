"""``python -m nbcluster.agent``: run a node agent in this process until stopped."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from nbcluster._proc import setup_logging, watch_parent
from nbcluster.agent.agent import HEAD_TIMEOUT_S, NodeAgent
from nbcluster.agent.resources import node_resources
from nbcluster.exceptions import NbclusterError
from nbcluster.launch import AGENT_READY
from nbcluster.protocol.security import read_token_file, token_from_environment


def build_parser(prog: str = "nbcluster-worker") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Join this host to an nbcluster head.")
    p.add_argument("--address", required=True, help="HOST:PORT of the head")
    p.add_argument("--token-file", help="file holding the cluster secret (mode 0600)")
    p.add_argument(
        "--token-stdin",
        action="store_true",
        help="read the cluster secret as the first line of stdin, and drain and exit when stdin "
        "closes (how a pool starts agents over SSH: the session's end ends the agent)",
    )
    p.add_argument("--num-cpus", type=float)
    p.add_argument("--num-gpus", type=float)
    p.add_argument("--resources", type=json.loads, help="JSON, e.g. '{\"TPU\": 4}'")
    p.add_argument("--node-name")
    p.add_argument(
        "--bind-host",
        default="127.0.0.1",
        help="address workers listen on; 'auto': this host's address on the route to the head",
    )
    p.add_argument("--prestart", type=int, help="workers to start before any task arrives")
    p.add_argument("--object-store-memory", type=int, help="bytes of shared memory for objects")
    p.add_argument(
        "--spill-dir",
        help="where objects spill when the store is full (private to you: mode 0700; default "
        "$TMPDIR/nbcluster-UID/spill-STORE_ID)",
    )
    p.add_argument("--spill-limit", type=int, help="most bytes to spill (default: free space)")
    p.add_argument(
        "--head-timeout",
        type=float,
        default=HEAD_TIMEOUT_S,
        help="exit when the head has been unreachable this many seconds (default "
        f"{HEAD_TIMEOUT_S:g}; 0: never), which ends a batch job running this agent",
    )
    p.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a label reported with this node (nodes() shows them; pools find their jobs by it)",
    )
    p.add_argument(
        "--exit-with-job",
        metavar="JOB_ID",
        help="drain and exit when this job of the cluster ends (the driver that owns a pool)",
    )
    p.add_argument("--parent-pid", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--cwd", help=argparse.SUPPRESS)
    return p


async def run_agent(args: argparse.Namespace) -> int:
    try:  # a missing or unsafe token file: said in one line
        if args.token_stdin:
            token = _read_stdin_line().strip() or None
        elif args.token_file:
            token = read_token_file(Path(args.token_file))
        else:
            token = token_from_environment()
    except NbclusterError as exc:
        print(f"nbcluster-worker: {exc}", file=sys.stderr)
        return 2
    if not token:
        print(
            f"{sys.argv[0]}: no cluster secret: pass --token-file (or --token-stdin and the "
            "secret on stdin) or set NBCLUSTER_TOKEN_FILE",
            file=sys.stderr,
        )
        return 2
    try:  # bad amounts are a usage error, said in one line
        node_resources(args.num_cpus, args.num_gpus, args.resources, [])
        args.labels = parse_labels(args.label)
        if args.bind_host == "auto":
            args.bind_host = route_address(args.address)
    except ValueError as exc:
        print(f"nbcluster-worker: {exc}", file=sys.stderr)
        return 2
    try:  # e.g. a spill directory another user controls: said in one line
        agent = _make_agent(args, token)
    except NbclusterError as exc:
        print(f"nbcluster-worker: {exc}", file=sys.stderr)
        return 1
    # Handlers before anything starts: a SIGTERM that came between the ready line and the
    # handler would end us by default and leave our workers (own sessions) running.
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signalled.set)
    try:
        await agent.start()
    except NbclusterError as exc:
        print(f"nbcluster-worker: {exc}", file=sys.stderr)
        await agent.close()
        return 1
    await agent.wait_prestarted(timeout=30.0)
    print(
        f"{AGENT_READY} {agent.node_id} {agent.store_address} {agent.store_id}",
        flush=True,
    )
    watcher = None
    if args.parent_pid:
        watcher = asyncio.create_task(watch_parent(args.parent_pid, agent.stopped))
    if args.token_stdin:
        _watch_stdin_eof(loop, signalled)
    sig_t = asyncio.create_task(signalled.wait())
    stop_t = asyncio.create_task(agent.stopped.wait())
    await asyncio.wait([sig_t, stop_t], return_when=asyncio.FIRST_COMPLETED)
    for t in (sig_t, stop_t):
        t.cancel()
    if signalled.is_set():
        # Ctrl-C / SIGTERM / stdin closed: tell the head first, so that it reschedules our
        # tasks and actors now.
        await agent.drain()
    await agent.close()
    if agent.exit_reason:
        print(f"nbcluster-worker: {agent.exit_reason}", file=sys.stderr)
    if watcher is not None:
        watcher.cancel()
        with contextlib.suppress(BaseException):
            await watcher
    return agent.exit_code


def parse_labels(items: list[str]) -> dict[str, str]:
    """``["k=v", ...]`` as a dict (a ``ValueError`` naming a malformed one)."""
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--label takes KEY=VALUE, got {item!r}")
        labels[key.strip()] = value
    return labels


def route_address(head: str) -> str:
    """This host's address on the route to ``head`` (``HOST:PORT``): what others reach us on."""
    host = head.rsplit(":", 1)[0].strip("[]")
    try:
        infos = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise ValueError(f"cannot resolve the head's host {host!r}: {exc}") from exc
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect(addr)  # UDP: no packet is sent, the kernel only picks the route
        except OSError as exc:
            raise ValueError(f"no route to the head's host {host!r}: {exc}") from exc
        return str(s.getsockname()[0])


def _read_stdin_line(limit: int = 4096) -> str:
    """The first line of stdin, read unbuffered: what follows is watched for its end."""
    data = b""
    while len(data) < limit:
        byte = os.read(sys.stdin.fileno(), 1)
        if not byte or byte == b"\n":
            break
        data += byte
    return data.decode(errors="replace")


def _watch_stdin_eof(loop: asyncio.AbstractEventLoop, closed: asyncio.Event) -> None:
    """Set ``closed`` when stdin reaches its end (the SSH session that started us ended)."""

    def watch() -> None:
        with contextlib.suppress(OSError, ValueError):
            while os.read(sys.stdin.fileno(), 65536):
                pass
        with contextlib.suppress(RuntimeError):  # the loop is already closed: we are done anyway
            loop.call_soon_threadsafe(closed.set)

    threading.Thread(target=watch, name="nbcluster-stdin", daemon=True).start()


def _make_agent(args: argparse.Namespace, token: str) -> NodeAgent:
    return NodeAgent(
        args.address,
        token,
        token_file=args.token_file,
        name=args.node_name,
        bind_host=args.bind_host,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        resources=args.resources,
        prestart=args.prestart,
        worker_cwd=args.cwd,
        object_store_memory=args.object_store_memory,
        spill_dir=args.spill_dir,
        spill_limit=args.spill_limit,
        head_timeout=args.head_timeout,
        labels=args.labels,
        exit_with_job=args.exit_with_job,
    )


def main(argv: list[str] | None = None, prog: str = "nbcluster-worker") -> int:
    args = build_parser(prog).parse_args(argv)
    setup_logging("agent")
    return asyncio.run(run_agent(args))


if __name__ == "__main__":
    sys.exit(main(prog="python -m nbcluster.agent"))
