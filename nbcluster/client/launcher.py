"""Starting and stopping a local cluster: a head and one node agent as child processes."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from nbcluster._private_fs import UnsafePathError, user_dir, user_dir_path
from nbcluster.exceptions import NbclusterError
from nbcluster.launch import (
    EXIT_ADDRESS_IN_USE,
    HEAD_READY,
    START_TIMEOUT_S,
    AgentOptions,
    ChildProcess,
    child_env,
    free_port,
    start_agent,
)
from nbcluster.protocol.security import new_token, write_token_file

log = logging.getLogger(__name__)
#: How many ports a local cluster tries when another process binds the one picked first.
PORT_ATTEMPTS = 5


class LocalCluster:
    """A head and a node agent started by this process, torn down by :meth:`stop`.

    Both children watch this process and exit on their own if it dies without stopping them.
    """

    def __init__(
        self,
        *,
        num_cpus: float | None = None,
        num_gpus: float | None = None,
        resources: dict[str, float] | None = None,
        host: str = "127.0.0.1",
        object_store_memory: int | None = None,
        object_spill_limit: int | None = None,
    ) -> None:
        root, self._own_root = _session_root()
        self.session_dir = Path(tempfile.mkdtemp(prefix=f"session-{os.getpid()}-", dir=root))
        self.token = new_token()
        self.token_file = self.session_dir / "token"
        write_token_file(self.token_file, self.token)
        self.host = host
        self.address = ""
        self.node_id = ""
        self._children: list[ChildProcess] = []
        self._opts = (num_cpus, num_gpus, resources)
        self._store_opts = (object_store_memory, object_spill_limit)
        self.spill_dir = self.session_dir / "spill"
        self.store_address = ""
        self.store_id = ""

    def start(self) -> None:
        """Start the head and the agent concurrently; returns once both are ready."""
        for attempt in range(1, PORT_ATTEMPTS + 1):
            port = free_port(self.host)
            if self._start_on(port):
                return
            # Another process bound the port between our pick and the head's bind.
            log.info("port %d was taken before the head bound it (try %d)", port, attempt)
        raise NbclusterError(f"the head found its port taken {PORT_ATTEMPTS} times in a row")

    def _start_on(self, port: int) -> bool:
        """Start both with the head on ``port``; False (nothing left running) if it was taken."""
        num_cpus, num_gpus, resources = self._opts
        memory, spill_limit = self._store_opts
        # Workers import the driver's modules: give them the driver's search path.
        env = child_env(
            {
                "PYTHONPATH": os.pathsep.join(
                    [os.path.abspath(p) if p in ("", ".") else p for p in sys.path if p]
                )
            }
        )
        try:
            head = ChildProcess(
                "head",
                "nbcluster.head",
                [
                    "--host",
                    self.host,
                    "--port",
                    str(port),
                    "--token-file",
                    str(self.token_file),
                    "--parent-pid",
                    str(os.getpid()),
                ],
                marker=HEAD_READY,
                log=self.session_dir / "head.log",
                env=env,
            )
            self._children.append(head)
            options = AgentOptions(
                head_address=f"{self.host}:{port}",
                token_file=self.token_file,
                node_name=socket.gethostname(),
                bind_host=self.host,
                cwd=os.getcwd(),
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                resources=resources,
                object_store_memory=memory,
                spill_dir=self.spill_dir,
                spill_limit=spill_limit,
            )
            agent = start_agent(options, log=self.session_dir / "agent.log", env=env)
            self._children.append(agent)
            deadline = time.monotonic() + START_TIMEOUT_S
            try:
                self.address = head.wait_ready(deadline)
            except NbclusterError:
                if head.proc.poll() != EXIT_ADDRESS_IN_USE:
                    raise
                self._stop_children()
                return False
            agent.wait_ready(deadline)
        except BaseException:
            self.stop()
            raise
        self.node_id, self.store_address, self.store_id = (
            agent.node_id,
            agent.store_address,
            agent.store_id,
        )
        return True

    def _stop_children(self, timeout: float = 5.0) -> None:
        for child in self._children:
            child.terminate()  # both at once: each waits for the other's exit otherwise
        deadline = time.monotonic() + timeout
        for child in self._children:
            child.stop(deadline - time.monotonic())
        self._children.clear()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the head and the agent (and with it every worker); remove the session folder."""
        self._stop_children(timeout)
        if os.environ.get("NBCLUSTER_KEEP_LOGS"):
            self.token_file.unlink(missing_ok=True)
        else:
            shutil.rmtree(self.session_dir, ignore_errors=True)
            if self._own_root:  # a fallback root made for this session alone
                with contextlib.suppress(OSError):
                    os.rmdir(self.session_dir.parent)


def _session_root() -> tuple[Path, bool]:
    """The folder to make the session folder in, and whether it was made for this session only.

    Normally the per-user folder ``$TMPDIR/nbcluster-<uid>`` (checked: ours, mode 0700, not a
    link). If another user took that name first, a fresh private folder is used instead, so
    that they can neither read the session nor stop us from starting one.
    """
    try:
        return Path(user_dir()), False
    except UnsafePathError as exc:
        log.warning("not using %s (%s); using a fresh private folder", user_dir_path(), exc)
        return Path(tempfile.mkdtemp(prefix=f"nbcluster-{os.getuid()}-")), True
