"""Starting and stopping a local cluster: a head and one node agent as child processes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import psutil

from nbcluster._private_fs import UnsafePathError, user_dir, user_dir_path
from nbcluster.exceptions import NbclusterError
from nbcluster.protocol.security import new_token, write_token_file
from nbcluster.store.manager import cleanup_store

START_TIMEOUT_S = 60.0

log = logging.getLogger(__name__)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _read_ready(
    proc: subprocess.Popen[bytes], marker: str, what: str, log: Path, deadline: float
) -> str:
    """Read ``proc``'s stdout until the line starting with ``marker``; return the rest of it."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = b""
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NbclusterError(
                    f"the {what} did not start within {START_TIMEOUT_S:.0f} s; see {log}"
                )
            if not sel.select(min(left, 0.5)):
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
            for line in buf.decode(errors="replace").splitlines():
                if line.startswith(marker):
                    return line[len(marker) :].strip()
    finally:
        sel.close()
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise NbclusterError(f"the {what} exited during start-up (code {proc.wait()}):\n{tail}")


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
        self._procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[Any]] = []
        self._opts = (num_cpus, num_gpus, resources)
        self._store_opts = (object_store_memory, object_spill_limit)
        self.spill_dir = self.session_dir / "spill"
        self.store_address = ""
        self.store_id = ""

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        log = open(self.session_dir / log_name, "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        env = dict(os.environ)
        env.pop("NBCLUSTER_WORKER_ID", None)
        # Workers import the driver's modules: give them the driver's search path.
        env["PYTHONPATH"] = os.pathsep.join(
            [os.path.abspath(p) if p in ("", ".") else p for p in sys.path if p]
        )
        proc = subprocess.Popen(
            [sys.executable, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
            start_new_session=True,  # a Ctrl-C in the notebook must not hit the cluster
        )
        self._procs.append(proc)
        return proc

    def start(self) -> None:
        """Start the head and the agent concurrently; returns once both are ready."""
        port = _free_port(self.host)
        num_cpus, num_gpus, resources = self._opts
        pid = str(os.getpid())
        head = self._spawn(
            [
                "-m",
                "nbcluster.head",
                "--host",
                self.host,
                "--port",
                str(port),
                "--token-file",
                str(self.token_file),
                "--parent-pid",
                pid,
            ],
            "head.log",
        )
        agent_args = [
            "-m",
            "nbcluster.agent",
            "--address",
            f"{self.host}:{port}",
            "--token-file",
            str(self.token_file),
            "--parent-pid",
            pid,
            "--bind-host",
            self.host,
            "--node-name",
            socket.gethostname(),
            "--cwd",
            os.getcwd(),
        ]
        if num_cpus is not None:
            agent_args += ["--num-cpus", str(num_cpus)]
        if num_gpus is not None:
            agent_args += ["--num-gpus", str(num_gpus)]
        if resources:
            agent_args += ["--resources", json.dumps(resources)]
        memory, spill_limit = self._store_opts
        agent_args += ["--spill-dir", str(self.spill_dir)]
        if memory is not None:
            agent_args += ["--object-store-memory", str(int(memory))]
        if spill_limit is not None:
            agent_args += ["--spill-limit", str(int(spill_limit))]
        agent = self._spawn(agent_args, "agent.log")
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            self.address = _read_ready(
                head, "NBCLUSTER_HEAD_READY", "head", self.session_dir / "head.log", deadline
            )
            ready = _read_ready(
                agent,
                "NBCLUSTER_AGENT_READY",
                "node agent",
                self.session_dir / "agent.log",
                deadline,
            )
            self.node_id, self.store_address, self.store_id = ready.split()
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the head and the agent (and with it every worker); remove the session folder."""
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self._procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill_tree(proc.pid)
                proc.wait(5)
        for proc in self._procs:
            if proc.stdout is not None:
                proc.stdout.close()
        if self.store_id:  # the agent cleans up; this catches an agent that was killed
            cleanup_store(self.store_id, str(self.spill_dir))
        for f in self._logs:
            f.close()
        self._procs.clear()
        self._logs.clear()
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


def _kill_tree(pid: int) -> None:
    try:
        parent = psutil.Process(pid)
        procs = [*parent.children(recursive=True), parent]
    except psutil.Error:
        return
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
