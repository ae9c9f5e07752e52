"""``NbclusterApp``: hosts the head on the Jupyter server's event loop, plus a local node agent."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from jupyter_server.extension.application import ExtensionApp
from traitlets import Bool, Dict, Float, Int, List, Unicode

from nbcluster.api import ADDRESS_ENV
from nbcluster.deploy.registry import Pools
from nbcluster.exceptions import NbclusterError
from nbcluster.head.service import HeadService
from nbcluster.launch import START_TIMEOUT_S, AgentOptions, AgentProcess, free_port, start_agent
from nbcluster.protocol import schema as m
from nbcluster.protocol.security import (
    TOKEN_FILE_ENV,
    new_token,
    read_token_file,
    write_token_file,
)

AGENT_STOP_TIMEOUT_S = 10.0
_WILDCARDS = ("0.0.0.0", "", "*", "::")


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        # As ZeroMQ binds: a port whose old connections linger in TIME_WAIT (the previous
        # server's head) is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host if host not in _WILDCARDS else "", port))
        except OSError:
            return False
    return True


class NbclusterApp(ExtensionApp):
    """The nbcluster server extension (settings: ``c.NbclusterApp.<name>``)."""

    name = "nbcluster"
    load_other_extensions = True

    port = Int(
        7711,
        config=True,
        help="Port of the head (0: any free port). Remote node agents connect to it. If it is "
        "taken, a free port is used instead and a warning logged.",
    )
    ip = Unicode(
        "127.0.0.1",
        config=True,
        help="Address the head binds to; loopback by default. Use 0.0.0.0 to let node agents "
        "on other hosts join (connections are always authenticated and encrypted).",
    )
    local_node = Bool(
        True, config=True, help="Start a node agent for this machine along with the server."
    )
    node_name = Unicode("", config=True, help="Name of the local node (default: the host name).")
    node_bind_host = Unicode(
        "",
        config=True,
        help="Address the local node's workers and object store listen on. Default: ``ip``, "
        "or 127.0.0.1 when ``ip`` is a wildcard; with nodes on other hosts, set this host's "
        "address that they can reach.",
    )
    num_cpus = Float(
        None, allow_none=True, config=True, help="CPUs of the local node (default: detected)."
    )
    num_gpus = Float(
        None, allow_none=True, config=True, help="GPUs of the local node (default: detected)."
    )
    resources = Dict({}, config=True, help='Custom resources of the local node, e.g. {"TPU": 4}.')
    object_store_memory = Int(
        None,
        allow_none=True,
        config=True,
        help="Bytes of shared memory for the local node's object store (default: 30% of RAM).",
    )
    keep_nodes = Bool(
        True,
        config=True,
        help="When the server stops, leave the other node agents (nbcluster-worker) running: "
        "they rejoin the head of the next server start on the same port, with their workers and "
        "actors. False: tell them to stop too. The local node always stops with the server.",
    )
    state_file = Unicode(
        "",
        config=True,
        help="Where the head keeps its restart snapshot (mode 0600). Default: "
        "nbcluster-head-state-PORT in the Jupyter runtime directory.",
    )
    token_file = Unicode(
        "",
        config=True,
        help="File holding the cluster secret (mode 0600); created if missing. Default: "
        "nbcluster-token in the Jupyter runtime directory.",
    )

    pools = List(
        Dict(),
        config=True,
        help="Pools that grow this cluster, made when the server starts, e.g. "
        '[{"kind": "slurm", "name": "gpu", "gpus": 1, "partition": "gpu", "walltime": '
        '"2:00:00", "adapt": {"minimum": 0, "maximum": 16, "idle_timeout": "5min"}}] '
        '(or "scale": N for a fixed size). Their jobs end when the server stops. With jobs on '
        "other machines, set ip to an address they can reach.",
    )

    head: HeadService | None = None
    pool_registry: Pools | None = None
    address = ""  # what kernels and local agents connect to
    _agent: AgentProcess | None = None
    _agent_ready: asyncio.Event | None = None
    _agent_reader: asyncio.Task[Any] | None = None
    _stopping = False
    _conn_file: Path | None = None
    _token = ""

    # ------------------------------------------------------------------------- set-up
    @property
    def _server(self) -> Any:
        assert self.serverapp is not None
        return self.serverapp

    def initialize_settings(self) -> None:
        """Choose the port and secret, and export them before any kernel starts."""
        runtime = Path(self._server.runtime_dir)
        runtime.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = (
            Path(self.token_file).expanduser() if self.token_file else runtime / "nbcluster-token"
        )
        if path.exists():
            self._token = read_token_file(path)  # kept across restarts: remote agents rejoin
        else:
            self._token = new_token()
            write_token_file(path, self._token)
        self.token_file = str(path)
        port = self.port
        if port == 0 or not _port_free(self.ip, port):
            if port:
                self.log.warning("nbcluster: port %s is taken; the head uses a free port", port)
            port = free_port(self.ip)
        self.port = port
        if not self.state_file:  # per port: servers side by side must not share a snapshot
            self.state_file = str(runtime / f"nbcluster-head-state-{port}")
        host = "127.0.0.1" if self.ip in _WILDCARDS else self.ip
        self.address = f"{host}:{port}"
        # Kernels inherit the server's environment: nbcluster.init() finds the head there.
        os.environ[ADDRESS_ENV] = self.address
        os.environ[TOKEN_FILE_ENV] = self.token_file
        os.environ.pop("NBCLUSTER_TOKEN", None)
        self._conn_file = runtime / f"nbcluster-server-{os.getpid()}.json"
        info = {
            "address": self.address,
            "token_file": self.token_file,
            "pid": os.getpid(),
            "base_url": self._server.base_url,
        }
        fd = os.open(self._conn_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(fd, 0o600)
            json.dump(info, f)
        self.settings["nbcluster"] = self

    def initialize_handlers(self) -> None:
        from nbcluster.jupyter.handlers import ROUTES

        self.handlers.extend(ROUTES)

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        """Start the head on the server's loop, then the local node agent."""
        head = HeadService(self._token, self.ip, self.port, state_file=self.state_file)
        head.observe.notebook_root = str(Path(self._server.root_dir).expanduser())
        try:
            await head.start()
        except Exception as exc:  # the server still runs; kernels fall back to local clusters
            self.log.error("nbcluster: the head could not start on %s: %s", self.address, exc)
            self._unexport()
            return
        self.head = head
        self.log.info("nbcluster: head listening on %s", self.head.address)
        if self.local_node:
            await self._start_agent()
        self.pool_registry = Pools(ServerHeadLink(self, asyncio.get_running_loop()))
        for spec in self.pools:
            try:
                pool = await asyncio.to_thread(self.pool_registry.from_config, spec)
            except Exception as exc:  # the server runs on; the panel shows no such pool
                self.log.error("nbcluster: pool %s could not start: %s", spec, exc)
            else:
                self.log.info("nbcluster: pool %s (%s) started", pool.name, pool.kind)

    async def _start_agent(self) -> None:
        options = AgentOptions(
            head_address=self.address,
            token_file=self.token_file,
            node_name=self.node_name,
            bind_host=self.node_bind_host or ("127.0.0.1" if self.ip in _WILDCARDS else self.ip),
            cwd=str(Path(self._server.root_dir).expanduser()),
            num_cpus=self.num_cpus,
            num_gpus=self.num_gpus,
            resources=self.resources,
            object_store_memory=self.object_store_memory,
        )
        # Its log goes to the server's stderr.
        self._agent = start_agent(options)
        self._agent_ready = asyncio.Event()
        self._agent_reader = asyncio.create_task(self._read_agent(self._agent))

    async def _read_agent(self, agent: AgentProcess) -> None:
        assert self._agent_ready is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            await asyncio.to_thread(agent.wait_ready, deadline)  # off the server's loop
        except NbclusterError as exc:
            if not self._stopping:  # else stopped by stop_extension() while starting
                self.log.error("nbcluster: the local node agent failed to start: %s", exc)
            return
        self._agent_ready.set()
        self.log.info("nbcluster: local node %s is up", agent.node_id)

    async def wait_agent_ready(self, timeout: float) -> bool:
        """Whether the local agent registered within ``timeout`` seconds."""
        if self._agent_ready is None:
            return False
        try:
            await asyncio.wait_for(self._agent_ready.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # ------------------------------------------------------------------------- tear-down
    async def stop_extension(self) -> None:
        """Stop the local agent with its workers, then the head.

        The local agent leaves first (SIGTERM: it says goodbye, so the head's restart snapshot
        does not wait for it). Other agents stay up to rejoin the next head (``keep_nodes``).
        """
        self._stopping = True
        if self.pool_registry is not None:  # while the head is up: their nodes drain
            await asyncio.to_thread(self.pool_registry.close_all, True)
        if self._agent is not None:
            await asyncio.to_thread(self._agent.stop, AGENT_STOP_TIMEOUT_S)
        if self.head is not None:
            await self.head.stop(stop_nodes=not self.keep_nodes)
        if self._agent_reader is not None:
            self._agent_reader.cancel()
            with contextlib.suppress(BaseException):
                await self._agent_reader
        self._unexport()

    def _unexport(self) -> None:
        """Withdraw the address from the environment and the runtime dir."""
        if self._conn_file is not None:
            self._conn_file.unlink(missing_ok=True)
        for key, value in ((ADDRESS_ENV, self.address), (TOKEN_FILE_ENV, self.token_file)):
            if os.environ.get(key) == value:
                del os.environ[key]


class ServerHeadLink:
    """The :class:`~nbcluster.deploy.pool.HeadLink` of the head this server hosts.

    Pools call it from their own threads: queries run on the server's loop, which owns the
    head's state.
    """

    def __init__(self, app: NbclusterApp, loop: asyncio.AbstractEventLoop) -> None:
        self._app = app
        self._loop = loop

    @property
    def address(self) -> str:
        return self._app.address

    def secret(self) -> str:
        return self._app._token

    def owner_job(self) -> str | None:
        return None  # the server owns its pools: they end with it (close, or head timeout)

    def query(self, what: str) -> Any:
        head = self._app.head
        if head is None:
            raise NbclusterError("the head is not running")

        async def ask() -> Any:
            return head.observe.query(m.Query(rid=0, what=what))

        return asyncio.run_coroutine_threadsafe(ask(), self._loop).result(10.0)
