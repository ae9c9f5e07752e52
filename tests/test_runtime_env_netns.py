"""A module beside a notebook imports on another host once ``working_dir`` is set.

The host is a network namespace of ``tests/test_netns.py`` (its ``net`` fixture), and its node
agent also runs in a mount namespace where the notebook's folder is an empty tmpfs: like a
machine that does not share the notebook's disk, it can only get the code through the cluster.
The driver is a real IPython kernel started in the notebook's folder, using the magic.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kernels import Kernel
from tests.multinode import Procs
from tests.test_netns import Net, net  # noqa: F401 (fixture)


@pytest.fixture
def notebook_dir(tmp_path: Path) -> Path:
    d = tmp_path / "notebooks"
    d.mkdir()
    (d / f"beside_{os.getpid()}.py").write_text(
        "def where():\n    import os\n    return 'beside the notebook', os.getcwd()\n"
    )
    cells = [{"cell_type": "code", "source": "%load_ext nbcluster", "metadata": {}}]
    (d / "analysis.ipynb").write_text(json.dumps({"cells": cells, "nbformat": 4}))
    return d


@pytest.fixture
def kernel_and_node(
    net: Net,  # noqa: F811
    notebook_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[Kernel, str, Path]]:
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    monkeypatch.setenv("NBCLUSTER_RUNTIME_ENV_DIR", str(cache))  # the agent inherits it
    (tmp_path / "procs").mkdir()
    procs = Procs(tmp_path / "procs", host=net.head_ip)
    # The notebook's folder, hidden from the node: an empty tmpfs over it in the agent's own
    # mount namespace.
    hide = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        'mount -t tmpfs tmpfs "$0" && exec "$@"',
        str(notebook_dir),
    ]
    kernel: Kernel | None = None
    try:
        procs.start_head()
        node = procs.join(
            "h1",
            "--num-cpus",
            "1",
            "--bind-host",
            net.hosts["h1"],
            prefix=[*net.netns("h1"), *hide],
        )
        env = {
            "NBCLUSTER_ADDRESS": procs.address,
            "NBCLUSTER_TOKEN_FILE": str(procs.token_file),
            "NBCLUSTER_BIND_HOST": net.head_ip,  # the kernel's objects: reachable from h1
        }
        kernel = Kernel(env, cwd=notebook_dir)
        kernel.run("%load_ext nbcluster\nimport nbcluster as nb", timeout=120)
        yield kernel, node, cache
    except BaseException:
        print(procs.logs())
        raise
    finally:
        if kernel is not None:
            kernel.close()
        procs.close()


def _printed(kernel: Kernel, code: str, timeout: float = 120.0) -> str:
    msgs: list[dict[str, Any]] = kernel.run(code, timeout=timeout)
    return "".join(m["content"]["text"] for m in msgs if m["msg_type"] == "stream")


def test_module_beside_the_notebook_imports_on_another_host(
    kernel_and_node: tuple[Kernel, str, Path], notebook_dir: Path
) -> None:
    kernel, node, cache = kernel_and_node
    mod = f"beside_{os.getpid()}"
    define = f"""
import os
@nb.remote
def remote_where():
    import {mod}
    folder = {str(notebook_dir)!r}
    return {{
        "got": {mod}.where(),
        "node": nb.get_runtime_context().get_node_id(),
        "folder_seen": sorted(os.listdir(folder)) if os.path.isdir(folder) else None,
    }}
def attempt():
    try:
        print("RESULT", repr(nb.get(remote_where.remote(), timeout=60)))
    except Exception as exc:
        print("FAILED", type(exc).__name__, str(exc).splitlines()[-1])
import {mod}  # beside the notebook: imports here
"""
    kernel.run(define)
    before = _printed(kernel, "attempt()")
    assert "FAILED" in before and f"No module named '{mod}'" in before, before
    out = _printed(kernel, "%nbcluster runtime_env --working-dir .")
    assert "working_dir" in out and "1 package(s)" in out, out
    after = _printed(kernel, "attempt()")
    assert "RESULT" in after, after
    result = eval(after.split("RESULT", 1)[1].strip())
    assert result["node"] == node
    assert result["got"][0] == "beside the notebook"
    assert Path(result["got"][1]).parent == cache  # runs in the node's unpacked copy
    assert result["folder_seen"] == []  # the node cannot see the notebook's folder
    # A %%remote cell uses the kernel's runtime_env too.
    cell = f"%%remote\nimport {mod}\nanswer = {mod}.where()[0]"
    kernel.run(cell, timeout=120)
    assert "beside the notebook" in _printed(kernel, "print(answer)")
