"""``python -m nbcluster.worker`` (started by the node agent only): bind the worker's sockets,
say where they are on stdout, and run its task loop."""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

import zmq

from nbcluster import context
from nbcluster.client import current
from nbcluster.protocol.security import derive_keys, token_from_environment
from nbcluster.transport import Transport
from nbcluster.transport import local as local_links
from nbcluster.worker.main import Worker, log

if TYPE_CHECKING:
    from nbcluster.client.core import CoreClient


def main() -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # A crash (segfault in a C extension) dumps the Python stacks to fd 2: the node's log of this
    # worker, whose last lines the driver's WorkerCrashedError then carries.
    faulthandler.enable(all_threads=False)  # the crashing thread: short enough to report
    handler = logging.StreamHandler(sys.__stderr__)
    handler.setFormatter(logging.Formatter("nbcluster worker %(process)d: %(message)s"))
    log.addHandler(handler)
    log.propagate = False
    token = token_from_environment()
    if not token:
        print("nbcluster worker: no cluster secret in the environment", file=sys.stderr)
        sys.exit(2)
    transport = Transport(derive_keys(token))
    host = os.environ.get("NBCLUSTER_BIND_HOST", "127.0.0.1")
    sock, addr = transport.server(zmq.ROUTER, f"tcp://{host}:0", aio=False)
    ctrl, ctrl_addr = transport.server(zmq.ROUTER, f"tcp://{host}:0", aio=False)
    local = None
    if local_links.enabled():
        try:
            local = local_links.listen(local_links.local_name(transport.keys.server_secret, addr))
        except OSError as exc:  # (drivers here use the TCP socket then)
            log.warning("no local link: %s", exc)
    ident = context.WorkerIdentity(
        worker_id=os.environ.get("NBCLUSTER_WORKER_ID", "worker"),
        node_id=os.environ.get("NBCLUSTER_NODE_ID", ""),
        node_name=os.environ.get("NBCLUSTER_NODE_NAME", ""),
        head_address=os.environ.get("NBCLUSTER_HEAD", ""),
    )
    context.worker_identity = ident
    current.set_worker_connector(_connect_client)
    sys.stdout.write(f"NBCLUSTER_WORKER_READY {addr} {ctrl_addr} {os.getpid()}\n")
    sys.stdout.flush()
    Worker(transport, sock, ctrl, ident, local).run()


def _connect_client() -> CoreClient:
    """The client this worker's tasks use to submit tasks or get borrowed refs (on first use)."""
    from nbcluster.client.in_worker import connect_from_worker  # most tasks never need it

    return connect_from_worker()


if __name__ == "__main__":
    main()
