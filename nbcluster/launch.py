"""Starting nbcluster's own processes as children of this one: a head, or a node agent.

This is the one launcher of the node agent: local mode (:class:`~nbcluster.client.launcher.
LocalCluster`) and the Jupyter server extension both use :func:`start_agent`, and pools that
start agents on other machines are meant to build on it too. A child prints one ready line on
stdout (``NBCLUSTER_HEAD_READY ADDRESS``, ``NBCLUSTER_AGENT_READY NODE_ID STORE_ADDRESS
STORE_ID``); lines printed before it (warnings) are skipped, what comes after goes to its log.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psutil

from nbcluster.exceptions import NbclusterError
from nbcluster.store.manager import cleanup_store

#: How long a head or an agent may take to print its ready line.
START_TIMEOUT_S = 60.0
HEAD_READY = "NBCLUSTER_HEAD_READY"
AGENT_READY = "NBCLUSTER_AGENT_READY"
#: A head's exit status when its port was taken (errno EADDRINUSE): its launcher picks another.
EXIT_ADDRESS_IN_USE = 98
#: Where :func:`free_port` looks when the kernel's ephemeral range cannot be read.
_EPHEMERAL_DEFAULT = (32768, 60999)
_PORTS_BELOW = 20000  # free_port picks from [_PORTS_BELOW, start of the ephemeral range)


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(w) for w in f.read().split())
    except (OSError, ValueError):
        return _EPHEMERAL_DEFAULT
    return low, high


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now, for a server whose port must be known before it starts.

    It is picked outside the kernel's ephemeral range, where neither outgoing connections nor
    servers bound to port 0 land: a port from that range (what binding port 0 returns) can be
    taken by any connection made before our server binds it (seen in CI: the head of a local
    cluster exited with "Address already in use"). The launcher still retries on a clash.
    """
    bind_host = "" if host in ("0.0.0.0", "*", "::") else host
    low, _ = _ephemeral_range()
    if low - _PORTS_BELOW >= 1000:
        rng = random.SystemRandom()
        for _ in range(64):
            port = rng.randrange(_PORTS_BELOW, low)
            with socket.socket() as s:
                try:
                    s.bind((bind_host, port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:  # no room below the ephemeral range: the kernel's choice
        s.bind((bind_host, 0))
        return int(s.getsockname()[1])


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a head or an agent, plus ``extra``.

    A worker's identity is never passed on: a task that starts a cluster starts a driver's one.
    """
    env = dict(os.environ)
    env.pop("NBCLUSTER_WORKER_ID", None)
    env.update(extra or {})
    return env


class ChildProcess:
    """A started ``python -m <module>`` child that reports readiness with one line on stdout.

    Parameters
    ----------
    what
        What it is, for errors (``"head"``, ``"node agent"``).
    module, args
        What to run: ``sys.executable -m module *args``.
    marker
        The first word of its ready line.
    log
        File its stderr (and any stdout after the ready line) is appended to; ``None``: this
        process's stderr.
    env
        Its environment (default: :func:`child_env`).
    """

    def __init__(
        self,
        what: str,
        module: str,
        args: Sequence[str],
        *,
        marker: str,
        log: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.what = what
        self.marker = marker
        self.log = log
        self._log_file: IO[bytes] | None = open(log, "ab") if log is not None else None  # noqa: SIM115 - closed in stop()
        self._drain: threading.Thread | None = None
        self._started = time.monotonic()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=self._log_file,
                env=dict(env) if env is not None else child_env(),
                start_new_session=True,  # a Ctrl-C in the notebook or terminal is not for it
            )
        except BaseException:
            if self._log_file is not None:
                self._log_file.close()
            raise

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.proc.pid

    def wait_ready(self, deadline: float) -> str:
        """Block until the ready line (by ``time.monotonic()`` ``deadline``); return its rest.

        Raises
        ------
        NbclusterError
            It exited first (with the end of its log), or the deadline passed.
        """
        stdout = self.proc.stdout
        assert stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(stdout, selectors.EVENT_READ)
        buf = b""
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    where = f"; see {self.log}" if self.log is not None else ""
                    waited = time.monotonic() - self._started
                    raise NbclusterError(
                        f"the {self.what} did not start within {waited:.0f} s{where}"
                    )
                if not sel.select(min(left, 0.5)):
                    if self.proc.poll() is not None:
                        break
                    continue
                try:
                    chunk = os.read(stdout.fileno(), 4096)
                except (OSError, ValueError):  # closed by stop() meanwhile
                    break
                if not chunk:
                    buf += b"\n"  # a last line without its newline is complete too
                buf += chunk
                *lines, buf = buf.split(b"\n")  # only whole lines: a read may end mid-line
                for i, line in enumerate(lines):
                    text = line.decode(errors="replace")
                    if text.startswith(self.marker):
                        self._start_drain(b"\n".join([*lines[i + 1 :], buf]))
                        return text[len(self.marker) :].strip()
                if not chunk:
                    break
        finally:
            sel.close()
        tail = ""
        if self.log is not None and self.log.exists():
            tail = ":\n" + self.log.read_text(errors="replace")[-2000:]
        try:
            how = f"exited during start-up (code {self.proc.wait(5)})"
        except subprocess.TimeoutExpired:  # it closed its stdout but runs on
            how = "closed its output without a ready line"
        raise NbclusterError(f"the {self.what} {how}{tail}")

    def _start_drain(self, pending: bytes) -> None:
        """Keep reading stdout after the ready line, so that a chatty child never blocks on it."""

        def drain() -> None:
            out = self._log_file
            data = pending
            with contextlib.suppress(OSError, ValueError):
                while True:
                    if data and out is not None:
                        out.write(data)
                        out.flush()
                    assert self.proc.stdout is not None
                    data = os.read(self.proc.stdout.fileno(), 65536)
                    if not data:
                        return

        self._drain = threading.Thread(target=drain, name=f"nbcluster-{self.what}-out", daemon=True)
        self._drain.start()

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM); :meth:`stop` waits for it."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop it: SIGTERM, then after ``timeout`` s SIGKILL for it and its descendants."""
        self.terminate()
        try:
            self.proc.wait(max(0.1, timeout))
        except subprocess.TimeoutExpired:
            _kill_tree(self.proc.pid)
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # what left its tree, in its session
            self.proc.wait(5)
        if self._drain is not None:
            self._drain.join(1.0)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._log_file is not None:
            self._log_file.close()


@dataclass(frozen=True)
class AgentOptions:
    """What a node agent is started with: the flags of ``nbcluster-worker``."""

    head_address: str
    """``HOST:PORT`` of the head it joins."""
    token_file: str | os.PathLike[str]
    """File holding the cluster secret (never passed in argv)."""
    node_name: str = ""
    """The node's name (default: this host's name)."""
    bind_host: str = "127.0.0.1"
    """Address its workers and object store listen on."""
    cwd: str | None = None
    """Working directory of its workers."""
    num_cpus: float | None = None
    num_gpus: float | None = None
    resources: Mapping[str, float] | None = None
    object_store_memory: int | None = None
    spill_dir: str | os.PathLike[str] | None = None
    """Where its store spills (default: the agent's own checked per-user folder)."""
    spill_limit: int | None = None
    watch_parent: bool = True
    """Exit when this process is gone (so no agent outlives the process that started it)."""

    def args(self) -> list[str]:
        """The command-line arguments of ``python -m nbcluster.agent``."""
        args = ["--address", self.head_address, "--token-file", str(self.token_file)]
        if self.watch_parent:
            args += ["--parent-pid", str(os.getpid())]
        args += [
            "--bind-host",
            self.bind_host,
            "--node-name",
            self.node_name or socket.gethostname(),
        ]
        if self.cwd is not None:
            args += ["--cwd", self.cwd]
        if self.num_cpus is not None:
            args += ["--num-cpus", str(self.num_cpus)]
        if self.num_gpus is not None:
            args += ["--num-gpus", str(self.num_gpus)]
        if self.resources:
            args += ["--resources", json.dumps(dict(self.resources))]
        if self.spill_dir is not None:
            args += ["--spill-dir", str(self.spill_dir)]
        if self.object_store_memory is not None:
            args += ["--object-store-memory", str(int(self.object_store_memory))]
        if self.spill_limit is not None:
            args += ["--spill-limit", str(int(self.spill_limit))]
        return args


class AgentProcess(ChildProcess):
    """A node agent started by :func:`start_agent`; its ids are known once :meth:`wait_ready`."""

    def __init__(
        self, options: AgentOptions, *, log: Path | None, env: Mapping[str, str] | None
    ) -> None:
        super().__init__(
            "node agent", "nbcluster.agent", options.args(), marker=AGENT_READY, log=log, env=env
        )
        self.options = options
        self.node_id = ""
        self.store_address = ""
        self.store_id = ""

    @property
    def head_address(self) -> str:
        """The head it joined."""
        return self.options.head_address

    def wait_ready(self, deadline: float) -> str:
        """Block until it registered with the head; sets ``node_id`` and the store's address/id."""
        rest = super().wait_ready(deadline)
        words = rest.split()
        if len(words) != 3:
            self.stop()
            raise NbclusterError(f"the node agent printed a malformed ready line: {rest!r}")
        self.node_id, self.store_address, self.store_id = words
        return rest

    def stop(self, timeout: float = 5.0) -> None:
        """Stop it with its workers; remove what a killed agent's store left behind."""
        super().stop(timeout)
        if self.store_id:  # the agent cleans up; this catches an agent that was killed
            spill = self.options.spill_dir
            cleanup_store(self.store_id, str(spill) if spill is not None else None)


def start_agent(
    options: AgentOptions, *, log: Path | None = None, env: Mapping[str, str] | None = None
) -> AgentProcess:
    """Start a node agent on this machine; call ``wait_ready`` on the result before using it.

    Parameters
    ----------
    options
        Its flags.
    log
        File its output is appended to (``None``: this process's stderr).
    env
        Its environment (default: :func:`child_env`).
    """
    return AgentProcess(options, log=log, env=env)


def _kill_tree(pid: int) -> None:
    try:
        parent = psutil.Process(pid)
        procs = [*parent.children(recursive=True), parent]
    except psutil.Error:
        return
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
