"""A real ``jupyter server`` with the nbcluster extension, and kernels driven like JupyterLab does.

Usage from a test module::

    from tests.jupyter_helpers import JupyterServer, jupyter_server  # noqa: F401 (fixture)

    def test_x(jupyter_server: JupyterServer) -> None:
        k = jupyter_server.start_kernel("work/x.ipynb")
        r = k.execute("import nbcluster as nb; nb.init(); print('hi')")
        r.raise_for_error()
        assert "hi" in r.stdout

The server runs as a subprocess on a free loopback port with a random token, an isolated
runtime/config/data directory and a temporary root directory; its log is ``server.log`` there.
Kernels are started through the REST API (``POST /api/sessions``, so ``JPY_SESSION_NAME`` is the
notebook path) and code runs through the kernel websocket (``/api/kernels/ID/channels``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from nbcluster.launch import free_port

START_TIMEOUT_S = 120.0


@dataclass
class ExecResult:
    """What one ``execute_request`` produced on the kernel's iopub channel."""

    stdout: str = ""
    stderr: str = ""
    outputs: list[dict[str, Any]] = field(default_factory=list)  # every iopub output message
    error: dict[str, Any] | None = None  # ename, evalue, traceback
    result: dict[str, Any] | None = None  # execute_result data, e.g. {"text/plain": "1"}

    def raise_for_error(self) -> ExecResult:
        if self.error is not None:
            tb = "\n".join(self.error.get("traceback", []))
            raise AssertionError(
                f"kernel raised {self.error.get('ename')}: {self.error.get('evalue')}\n{tb}\n"
                f"stdout: {self.stdout}\nstderr: {self.stderr}"
            )
        return self


class Kernel:
    """A kernel started by the server, reached through its websocket."""

    def __init__(self, server: JupyterServer, kernel_id: str, session_id: str, path: str) -> None:
        self.server = server
        self.kernel_id = kernel_id
        self.session_id = session_id
        self.path = path

    def execute(
        self, code: str, timeout: float = 90.0, metadata: dict[str, Any] | None = None
    ) -> ExecResult:
        """Run ``code`` in the kernel and collect its output until it is idle again
        (``metadata``: the request's, as JupyterLab sends ``cellId``)."""
        return asyncio.run(asyncio.wait_for(self._execute(code, metadata or {}), timeout))

    async def _execute(self, code: str, metadata: dict[str, Any]) -> ExecResult:
        url = self.server.ws_url(f"api/kernels/{self.kernel_id}/channels")
        req = HTTPRequest(url, headers={"Authorization": f"token {self.server.token}"})
        conn = await websocket_connect(req)
        try:
            msg_id = uuid.uuid4().hex
            session = uuid.uuid4().hex
            msg = {
                "header": {
                    "msg_id": msg_id,
                    "msg_type": "execute_request",
                    "username": "test",
                    "session": session,
                    "date": "",
                    "version": "5.3",
                },
                "parent_header": {},
                "metadata": metadata,
                "content": {
                    "code": code,
                    "silent": False,
                    "store_history": True,
                    "user_expressions": {},
                    "allow_stdin": False,
                    "stop_on_error": True,
                },
                "channel": "shell",
                "buffers": [],
            }
            await conn.write_message(json.dumps(msg))
            res = ExecResult()
            replied = idle = False
            while not (replied and idle):
                raw = await conn.read_message()
                if raw is None:
                    raise AssertionError("the kernel websocket closed during execution")
                if isinstance(raw, bytes):
                    continue  # binary frames: widget buffers, not needed here
                m = json.loads(raw)
                if m.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                mtype = m["header"]["msg_type"]
                content = m.get("content", {})
                if m.get("channel") == "shell" and mtype == "execute_reply":
                    replied = True
                elif mtype == "status":
                    idle = content.get("execution_state") == "idle"
                elif mtype == "stream":
                    res.outputs.append(m)
                    if content.get("name") == "stderr":
                        res.stderr += content.get("text", "")
                    else:
                        res.stdout += content.get("text", "")
                elif mtype == "error":
                    res.outputs.append(m)
                    res.error = content
                elif mtype == "execute_result":
                    res.outputs.append(m)
                    res.result = content.get("data")
                elif mtype in ("display_data", "update_display_data"):
                    res.outputs.append(m)
            return res
        finally:
            conn.close()

    def interrupt(self) -> None:
        self.server.request("POST", f"api/kernels/{self.kernel_id}/interrupt")

    def restart(self) -> None:
        status, body = self.server.request("POST", f"api/kernels/{self.kernel_id}/restart")
        assert status == 200, body

    def shutdown(self) -> None:
        self.server.request("DELETE", f"api/sessions/{self.session_id}")

    def pid(self) -> int | None:
        """The kernel's process id (a child of the server)."""
        for p in psutil.Process(self.server.proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if any(self.kernel_id in a for a in p.cmdline()):
                    return p.pid
        return None


@dataclass
class JupyterServer:
    """A running ``jupyter server`` subprocess."""

    url: str  # http://127.0.0.1:PORT/BASE_URL/ (ends with "/")
    token: str
    root_dir: Path
    runtime_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes]
    kernels: list[Kernel] = field(default_factory=list)

    def ws_url(self, path: str) -> str:
        return "ws" + self.url[len("http") :] + path.lstrip("/")

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        auth: bool = True,
        timeout: float = 30.0,
    ) -> tuple[int, Any]:
        """One HTTP request under the server's base_url; returns (status, parsed JSON or text)."""
        data = None if body is None else json.dumps(body).encode()
        if data is None and method in ("POST", "PUT", "PATCH"):
            data = b""
        hdrs = dict(headers or {})
        if auth:
            hdrs.setdefault("Authorization", f"token {self.token}")
        req = urllib.request.Request(self.url + path.lstrip("/"), data, hdrs, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def get(self, path: str) -> Any:
        status, body = self.request("GET", path)
        assert status == 200, (status, body)
        return body

    def post(self, path: str, body: Any = None) -> Any:
        status, body = self.request("POST", path, body)
        assert status in (200, 201), (status, body)
        return body

    def start_kernel(self, path: str = "test.ipynb", timeout: float = 60.0) -> Kernel:
        """Start a kernel for notebook ``path`` (relative to the root dir) and wait until ready."""
        (self.root_dir / path).parent.mkdir(parents=True, exist_ok=True)
        status, body = self.request(
            "POST",
            "api/sessions",
            {
                "path": path,
                "name": Path(path).name,
                "type": "notebook",
                "kernel": {"name": "python3"},
            },
            timeout=timeout,
        )
        assert status == 201, (status, body)
        k = Kernel(self, body["kernel"]["id"], body["id"], path)
        self.kernels.append(k)
        deadline = time.monotonic() + timeout
        while True:  # ready when it answers an execute over the websocket
            try:
                k.execute("pass", timeout=max(1.0, deadline - time.monotonic()))
                return k
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 60.0) -> list[int]:
        """SIGTERM the server (it stops its extension, kernels, head and agent); returns the pids
        of its descendants at stop time, so a test can check that none is left."""
        pids = [p.pid for p in self.descendants()]
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _kill([*pids, self.proc.pid])
                self.proc.wait(10)
        return pids


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()


def start_jupyter_server(
    tmp: Path,
    *,
    nbcluster: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    base_url: str = "/",
    timeout: float = START_TIMEOUT_S,
    wait_node: bool = True,
) -> JupyterServer:
    """Start ``jupyter server`` in ``tmp`` with the nbcluster extension.

    Parameters
    ----------
    nbcluster
        ``NbclusterApp`` settings (default: port 0 so parallel tests never collide).
    server
        Extra ``ServerApp`` settings (e.g. ``{"allow_unauthenticated_access": False}``).
    wait_node
        Return only once the local node agent has registered (visible in GET /cluster).
    """
    tmp.mkdir(parents=True, exist_ok=True)
    root = tmp / "root"
    runtime = tmp / "runtime"
    for d in (root, runtime, tmp / "config", tmp / "data"):
        d.mkdir(exist_ok=True)
    runtime.chmod(0o700)
    token = secrets.token_hex(16)
    port = free_port()
    cfg = {
        "ServerApp": {
            "port": port,
            "ip": "127.0.0.1",
            "open_browser": False,
            "root_dir": str(root),
            "base_url": base_url,
            "port_retries": 0,
            "jpserver_extensions": {"nbcluster.jupyter": True},
            **(server or {}),
        },
        "IdentityProvider": {"token": token},
        "NbclusterApp": {"port": 0, **(nbcluster or {})},
    }
    (tmp / "config" / "jupyter_server_config.json").write_text(json.dumps(cfg))
    full_env = dict(os.environ)
    for k in ("NBCLUSTER_ADDRESS", "NBCLUSTER_TOKEN_FILE", "NBCLUSTER_TOKEN", "JPY_SESSION_NAME"):
        full_env.pop(k, None)
    full_env.update(
        {
            "JUPYTER_CONFIG_DIR": str(tmp / "config"),
            "JUPYTER_RUNTIME_DIR": str(runtime),
            "JUPYTER_DATA_DIR": str(tmp / "data"),
            "JUPYTER_PLATFORM_DIRS": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    full_env.update(env or {})
    log_path = tmp / "server.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter_server", "--allow-root"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=full_env,
            cwd=root,
            start_new_session=True,
        )
    base = "/" + base_url.strip("/") + "/" if base_url.strip("/") else "/"
    srv = JupyterServer(f"http://127.0.0.1:{port}{base}", token, root, runtime, log_path, proc)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"jupyter server exited ({proc.returncode}):\n{srv.log()}")
            with contextlib.suppress(OSError):
                status, body = srv.request("GET", "nbcluster/api/cluster", timeout=5)
                if status == 200 and (not wait_node or any(n["alive"] for n in body["nodes"])):
                    return srv
            if time.monotonic() > deadline:
                raise AssertionError(f"jupyter server not ready in {timeout} s:\n{srv.log()}")
            time.sleep(0.3)
    except BaseException:
        srv.stop()
        raise


@pytest.fixture(scope="module")
def jupyter_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyterServer]:
    """A jupyter server hosting a cluster whose local node has 2 CPUs (module-scoped)."""
    srv = start_jupyter_server(
        tmp_path_factory.mktemp("jupyter"), nbcluster={"num_cpus": 2, "num_gpus": 0}
    )
    yield srv
    srv.stop()
