"""Every notebook in ``notebooks/`` runs end to end against a cluster hosted by a jupyter server.

nbclient executes each notebook in a fresh kernel that gets the environment the server gives its
own kernels (the head's address and token file), so the notebooks connect to the server's
cluster exactly as they do in JupyterLab. Any error in any cell fails the test.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import nbformat
import psutil
import pytest
from nbclient import NotebookClient

from tests.conftest import ROOT, wait_until
from tests.jupyter_helpers import JupyterServer, jupyter_server  # noqa: F401 (fixture)

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def kernel_env(jupyter_server: JupyterServer) -> dict[str, str]:  # noqa: F811
    k = jupyter_server.start_kernel("env.ipynb")
    r = k.execute(
        "import os; print(os.environ['NBCLUSTER_ADDRESS'], os.environ['NBCLUSTER_TOKEN_FILE'])"
    ).raise_for_error()
    k.shutdown()
    address, token_file = r.stdout.split()
    return {"NBCLUSTER_ADDRESS": address, "NBCLUSTER_TOKEN_FILE": token_file}


def test_the_examples_are_all_there() -> None:
    names = [p.stem for p in NOTEBOOKS]
    for topic in ("quickstart", "actors", "gpus", "scaling", "dashboard"):
        assert any(topic in n for n in names), names


@pytest.mark.timeout(600)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_without_errors(
    path: Path,
    kernel_env: dict[str, str],
    jupyter_server: JupyterServer,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    for key, value in kernel_env.items():
        monkeypatch.setenv(key, value)
    with_slurm = False
    if "scaling" in path.stem:
        # Its Slurm part runs against the tests' local Slurm (SLURM_CONF in the environment
        # the kernel inherits); where that cannot run, the notebook skips that part itself.
        try:
            request.getfixturevalue("local_slurm")
            with_slurm = True
        except pytest.skip.Exception as exc:
            print(f"{path.name}: without Slurm ({exc})")
    nodes_before = _alive_nodes(jupyter_server)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    t0 = time.monotonic()
    client.execute()  # raises CellExecutionError on the first failing cell
    elapsed = time.monotonic() - t0
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors, errors
    if with_slurm:  # the pool's cells ran: the job script, then both jobs running
        text = "".join(
            str(o.get("text", "")) + str(o.get("data", {}).get("text/html", ""))
            for c in nb.cells
            if c.cell_type == "code"
            for o in c.get("outputs", [])
        )
        assert "#SBATCH --cpus-per-task=1" in text and text.count("<td>running</td>") == 2
    print(f"{path.name}: {elapsed:.1f} s")
    # Agents a notebook started are gone, and so is everything its kernel held.
    wait_until(lambda: _alive_nodes(jupyter_server) == nodes_before, timeout=30)
    wait_until(lambda: _cpus_free(jupyter_server) == 2.0, timeout=30)
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if _started_by(p, tmp_path)]
    assert not leftovers


def _alive_nodes(srv: JupyterServer) -> int:
    return sum(1 for n in srv.get("nbcluster/api/cluster")["nodes"] if n["alive"])


def _cpus_free(srv: JupyterServer) -> float:
    nodes = srv.get("nbcluster/api/cluster")["nodes"]
    return float(sum(n["resources_available"].get("CPU", 0) for n in nodes if n["alive"]))


def _started_by(p: Any, tmp_path: Path) -> bool:
    cmd = " ".join(p.info.get("cmdline") or [])
    return "nbcluster" in cmd and "worker" in cmd and "--node-name" in cmd and "sim" in cmd


def test_nbcluster_lab_opens_the_notebooks_with_the_cluster_running(tmp_path: Path) -> None:
    """The README's main command: JupyterLab serving the notebooks, the cluster in its server."""
    import json
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import urllib.request

    from tests.jupyter_helpers import free_port

    notebooks = tmp_path / "notebooks"
    shutil.copytree(ROOT / "notebooks", notebooks)
    port, token = free_port(), "labtest"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBCLUSTER_")}
    for d in ("runtime", "config", "data"):
        (tmp_path / d).mkdir()
        env[f"JUPYTER_{d.upper()}_DIR"] = str(tmp_path / d)
    (tmp_path / "runtime").chmod(0o700)
    args = ["--no-browser", f"--port={port}", f"--IdentityProvider.token={token}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "nbcluster", "lab", *args, "--NbclusterApp.port=0"],
        cwd=tmp_path,  # finds ./notebooks by itself
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def get(path: str) -> Any:
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/{path}", headers={"Authorization": f"token {token}"}
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    def ready() -> bool:
        try:
            return any(n["alive"] for n in get("nbcluster/api/cluster")["nodes"])
        except OSError:
            return False

    try:
        wait_until(ready, timeout=120, interval=0.5)
        names = {c["name"] for c in get("api/contents/")["content"]}
        assert {p.name for p in NOTEBOOKS} <= names
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any("nbcluster.agent" in " ".join(c.cmdline()) for c in children)
    finally:
        proc.send_signal(signal.SIGTERM)  # reaches JupyterLab itself (the wrapper exec'd it)
        proc.wait(60)
    wait_until(lambda: all(not c.is_running() for c in children), timeout=30)
