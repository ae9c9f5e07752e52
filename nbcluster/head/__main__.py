"""``python -m nbcluster.head``: run a head in this process until stopped."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import sys
from pathlib import Path

import psutil

from nbcluster._proc import setup_logging, watch_parent
from nbcluster.exceptions import AddressInUseError
from nbcluster.head.metrics_http import MetricsServer
from nbcluster.head.service import HeadService
from nbcluster.launch import EXIT_ADDRESS_IN_USE
from nbcluster.protocol.security import read_token_file, token_from_environment


async def run_head(args: argparse.Namespace) -> int:
    token = read_token_file(Path(args.token_file)) if args.token_file else token_from_environment()
    if not token:
        print("nbcluster head: no cluster secret (use --token-file)", file=sys.stderr)
        return 2
    head = HeadService(token, args.host, args.port, state_file=getattr(args, "state_file", None))
    # Handlers before the ready line: a SIGTERM right after it must still stop the nodes.
    gone = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, gone.set)
    try:
        address = await head.start()
    except AddressInUseError as exc:
        print(f"nbcluster head: {exc}", file=sys.stderr)
        return EXIT_ADDRESS_IN_USE  # our launchers pick another port and start again
    metrics: MetricsServer | None = None
    if getattr(args, "metrics_port", None) is not None:
        metrics = MetricsServer(head.observe, args.metrics_host, args.metrics_port)
        try:
            url = await metrics.start()
        except OSError as exc:
            print(f"nbcluster head: no metrics endpoint: {exc}", file=sys.stderr)
            await head.stop()
            return 2
        print(f"NBCLUSTER_METRICS_READY {url}", flush=True)
    print(f"NBCLUSTER_HEAD_READY {address}", flush=True)
    watchers = []
    if args.parent_pid:
        watchers.append(asyncio.create_task(watch_parent(args.parent_pid, gone)))
    stopped = asyncio.create_task(head.wait_stopped())
    gone_t = asyncio.create_task(gone.wait())
    await asyncio.wait([stopped, gone_t], return_when=asyncio.FIRST_COMPLETED)
    if metrics is not None:
        await metrics.stop()
    parent_died = bool(args.parent_pid) and gone.is_set() and not _alive(args.parent_pid)
    # A signal ends the whole cluster unless asked to keep the nodes for a restarted head.
    await head.stop(stop_nodes=not getattr(args, "keep_nodes", False))
    if parent_died and args.token_file:
        # Our launcher was killed before it could clean up: remove its session folder (the
        # secret in it must not outlive the cluster).
        session = Path(args.token_file).parent
        if session.name.startswith("session-"):
            shutil.rmtree(session, ignore_errors=True)
    for t in [*watchers, gone_t, stopped]:
        t.cancel()
        with contextlib.suppress(BaseException):
            await t
    return 0


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nbcluster.head")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--token-file")
    p.add_argument("--parent-pid", type=int, default=0)
    p.add_argument("--state-file")
    p.add_argument("--keep-nodes", action="store_true")
    # The standalone head's Prometheus endpoint (``nbcluster head`` documents them).
    p.add_argument("--metrics-port", type=int)
    p.add_argument("--metrics-host", default="127.0.0.1")
    args = p.parse_args(argv)
    setup_logging("head")
    return asyncio.run(run_head(args))


if __name__ == "__main__":
    sys.exit(main())
