"""``runtime_env`` on a real local cluster: working_dir, py_modules, excludes, env_vars; merging,
the size limit, uploading once, the node's cache; and the packaging rules on their own.

The other-host case (a node in its own network namespace that cannot see the notebook's folder)
is in ``tests/test_runtime_env_netns.py``.
"""

from __future__ import annotations

import io
import os
import re
import stat
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import nbcluster as nb
from nbcluster.client import current
from nbcluster.runtime_env import upload
from nbcluster.runtime_env.packaging import pack, unpack
from nbcluster.runtime_env.spec import RuntimeEnvError, parse
from tests.conftest import wait_until

MOD = f"renv_helper_{os.getpid()}"  # a module name no other test (or process) uses


@pytest.fixture(scope="module")
def renv_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A local cluster whose node caches packages in a folder of this test."""
    nb.shutdown()
    cache = tmp_path_factory.mktemp("renv-cache")
    os.chmod(cache, 0o700)
    old = os.environ.get("NBCLUSTER_RUNTIME_ENV_DIR")
    os.environ["NBCLUSTER_RUNTIME_ENV_DIR"] = str(cache)  # the agent and its workers inherit it
    try:
        info = nb.init(num_cpus=2)
        yield {"info": info, "cache": cache}
    finally:
        nb.shutdown()
        if old is None:
            os.environ.pop("NBCLUSTER_RUNTIME_ENV_DIR", None)
        else:
            os.environ["NBCLUSTER_RUNTIME_ENV_DIR"] = old


@pytest.fixture
def code_dir(tmp_path: Path) -> Path:
    """A folder with a module (not on anyone's path), a data file and a cache folder."""
    d = tmp_path / "proj"
    d.mkdir()
    (d / f"{MOD}.py").write_text("VALUE = 'v1'\n\ndef value():\n    return VALUE\n")
    (d / "data").mkdir()
    (d / "data" / "big.bin").write_bytes(b"x" * 5000)
    (d / "notes.txt").write_text("notes")
    (d / "__pycache__").mkdir()
    (d / "__pycache__" / "stale.pyc").write_bytes(b"old")
    return d


def _client() -> Any:
    return current.require()


def _agent_log(info: nb.ClusterInfo) -> str:
    logs = sorted(Path(info.session_dir).glob("*agent*.log"))
    return "".join(p.read_text(errors="replace") for p in logs)


@nb.remote
def import_and_describe(mod: str) -> dict[str, Any]:
    import importlib

    m = importlib.import_module(mod)
    return {"value": m.value(), "cwd": os.getcwd(), "files": sorted(os.listdir("."))}


@nb.remote
def read_env(*names: str) -> dict[str, Any]:
    return {"vars": {n: os.environ.get(n) for n in names}, "pid": os.getpid()}


# ----------------------------------------------------------------------------- bad input
def test_unknown_and_unsupported_keys_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown runtime_env key 'wokring_dir'"):
        read_env.options(runtime_env={"wokring_dir": "."})
    for key in ("pip", "conda", "uv", "container"):
        with pytest.raises(ValueError, match=rf"runtime_env key '{key}' is not supported yet"):
            nb.remote(runtime_env={key: ["numpy"]})(lambda: 1)

    @nb.remote
    class Plain:
        pass

    with pytest.raises(ValueError, match="'pip' is not supported yet"):
        Plain.options(runtime_env={"pip": ["requests"]})
    with pytest.raises(ValueError, match="env_vars must be a dict of str to str"):
        read_env.options(runtime_env={"env_vars": {"A": 1}})
    with pytest.raises(ValueError, match="is not a directory"):
        read_env.options(runtime_env={"working_dir": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match="remote URIs"):
        read_env.options(runtime_env={"working_dir": "s3://bucket/code.zip"})
    # init checks before it starts or connects to anything
    nb.shutdown()
    with pytest.raises(ValueError, match="'conda' is not supported yet"):
        nb.init(runtime_env={"conda": "env.yml"})
    assert not nb.is_initialized()


# ----------------------------------------------------------------------------- code
def test_working_dir_module_imports_in_its_folder(
    renv_cluster: dict[str, Any], code_dir: Path
) -> None:
    # Not on the workers' path without a runtime_env:
    with pytest.raises(nb.exceptions.RayTaskError, match=f"No module named '{MOD}'"):
        nb.get(import_and_describe.remote(MOD), timeout=60)
    env = {"working_dir": str(code_dir)}
    out = nb.get(import_and_describe.options(runtime_env=env).remote(MOD), timeout=60)
    assert out["value"] == "v1"
    cache = renv_cluster["cache"]
    assert Path(out["cwd"]).parent == cache  # the node's unpacked copy, not the folder itself
    assert f"{MOD}.py" in out["files"] and "data" in out["files"]
    assert "__pycache__" not in out["files"]  # never shipped


def test_excludes_leave_files_out_and_out_of_the_hash(
    renv_cluster: dict[str, Any], code_dir: Path
) -> None:
    env = {"working_dir": str(code_dir), "excludes": ["data/", "*.txt"]}
    out = nb.get(import_and_describe.options(runtime_env=env).remote(MOD), timeout=60)
    assert out["value"] == "v1"
    assert "data" not in out["files"] and "notes.txt" not in out["files"]
    assert f"{MOD}.py" in out["files"]
    before = pack(str(code_dir), ("data/", "*.txt"), keep_name=False, limit=10**9).hash
    (code_dir / "data" / "big.bin").write_bytes(b"y" * 7000)  # excluded: same package
    after = pack(str(code_dir), ("data/", "*.txt"), keep_name=False, limit=10**9).hash
    assert before == after
    (code_dir / f"{MOD}.py").write_text("def value():\n    return 'v2'\n")
    assert pack(str(code_dir), ("data/", "*.txt"), keep_name=False, limit=10**9).hash != after


def test_py_modules_directories_and_module_objects(
    renv_cluster: dict[str, Any], tmp_path: Path
) -> None:
    pkg = f"renv_pkg_{os.getpid()}"
    (tmp_path / "libs" / pkg).mkdir(parents=True)
    (tmp_path / "libs" / pkg / "__init__.py").write_text("def value():\n    return 'pkg'\n")
    single = tmp_path / "single"
    single.mkdir()
    (single / f"{pkg}_one.py").write_text("def value():\n    return 'one'\n")
    sys.path.insert(0, str(single))
    try:
        import importlib

        module = importlib.import_module(f"{pkg}_one")
    finally:
        sys.path.remove(str(single))
    env = {"py_modules": [str(tmp_path / "libs" / pkg), module]}
    assert nb.get(import_and_describe.options(runtime_env=env).remote(pkg), timeout=60)[
        "value"
    ] == ("pkg")
    out = nb.get(import_and_describe.options(runtime_env=env).remote(f"{pkg}_one"), timeout=60)
    assert out["value"] == "one"
    sys.modules.pop(f"{pkg}_one", None)


# ----------------------------------------------------------------------------- env_vars
def test_env_vars_per_task_do_not_leak_into_other_tasks(renv_cluster: dict[str, Any]) -> None:
    name = f"NBC_RENV_{os.getpid()}"
    one = nb.get(read_env.options(runtime_env={"env_vars": {name: "1"}}).remote(name), timeout=60)
    plain = nb.get(read_env.remote(name), timeout=60)
    two = nb.get(read_env.options(runtime_env={"env_vars": {name: "2"}}).remote(name), timeout=60)
    again = nb.get(read_env.options(runtime_env={"env_vars": {name: "1"}}).remote(name), timeout=60)
    assert one["vars"][name] == "1" and two["vars"][name] == "2"
    assert plain["vars"][name] is None  # the env-1 worker is not reused for a plain task
    assert len({one["pid"], plain["pid"], two["pid"]}) == 3  # one worker per environment
    # Its own worker, or a new one (an idle worker of another environment may be stopped for
    # room), never one that ran another environment:
    assert again["vars"][name] == "1" and again["pid"] not in (plain["pid"], two["pid"])
    expanded = nb.get(
        read_env.options(runtime_env={"env_vars": {name: "${HOME}:x"}}).remote(name), timeout=60
    )
    assert expanded["vars"][name] == f"{os.environ['HOME']}:x"


def test_job_env_is_merged_under_the_tasks_as_ray_does(
    renv_cluster: dict[str, Any], code_dir: Path, tmp_path: Path
) -> None:
    a, b = f"NBC_A_{os.getpid()}", f"NBC_B_{os.getpid()}"
    nb.init(runtime_env={"working_dir": str(code_dir), "env_vars": {a: "job", b: "job"}})
    try:
        got = nb.get(read_env.remote(a, b), timeout=60)
        assert got["vars"] == {a: "job", b: "job"}
        got = nb.get(
            read_env.options(runtime_env={"env_vars": {b: "task"}}).remote(a, b), timeout=60
        )
        assert got["vars"] == {a: "job", b: "task"}  # env_vars merge, the task's win
        other = tmp_path / "other"
        other.mkdir()
        (other / f"{MOD}.py").write_text("def value():\n    return 'other'\n")
        out = nb.get(
            import_and_describe.options(runtime_env={"working_dir": str(other)}).remote(MOD),
            timeout=60,
        )
        assert out["value"] == "other"  # a task's working_dir replaces the job's
        assert nb.get(import_and_describe.remote(MOD), timeout=60)["value"] == "v1"
    finally:
        upload.set_job_env(_client(), None)


@nb.remote
def parent_reads(name: str) -> Any:
    return nb.get(read_env.remote(name), timeout=60)["vars"][name]


def test_nested_tasks_inherit_their_parents_env(renv_cluster: dict[str, Any]) -> None:
    name = f"NBC_NEST_{os.getpid()}"
    env = {"env_vars": {name: "inherited"}}
    assert nb.get(parent_reads.options(runtime_env=env).remote(name), timeout=60) == "inherited"


# ----------------------------------------------------------------------------- actors
@nb.remote
class EnvActor:
    def describe(self, name: str) -> dict[str, Any]:
        import importlib

        return {
            "var": os.environ.get(name),
            "value": importlib.import_module(MOD).value(),
            "pid": os.getpid(),
        }


def test_per_actor_runtime_env(renv_cluster: dict[str, Any], code_dir: Path) -> None:
    name = f"NBC_ACTOR_{os.getpid()}"
    env = {"working_dir": str(code_dir), "env_vars": {name: "actor"}}
    actor = EnvActor.options(runtime_env=env).remote()
    out = nb.get(actor.describe.remote(name), timeout=60)
    assert out["var"] == "actor" and out["value"] == "v1"
    plain = nb.get(read_env.remote(name), timeout=60)
    assert plain["vars"][name] is None and plain["pid"] != out["pid"]
    nb.kill(actor)


# ----------------------------------------------------------------------------- upload, cache, limit
def test_second_use_uploads_nothing_and_the_node_unpacks_once(
    renv_cluster: dict[str, Any], tmp_path: Path
) -> None:
    d = tmp_path / "once"
    d.mkdir()
    (d / f"{MOD}.py").write_text(f"def value():\n    return {os.urandom(8).hex()!r}\n")
    client = _client()
    before = upload.upload_stats(client)
    env = {"working_dir": str(d)}
    first = nb.get(import_and_describe.options(runtime_env=env).remote(MOD), timeout=60)
    second = nb.get(import_and_describe.options(runtime_env=dict(env)).remote(MOD), timeout=60)
    actor = EnvActor.options(runtime_env={"working_dir": str(d), "env_vars": {"X": "1"}}).remote()
    assert nb.get(actor.describe.remote("X"), timeout=60)["value"] == first["value"]
    nb.kill(actor)
    after = upload.upload_stats(client)
    assert after["uploads"] == before["uploads"] + 1  # one package, put once
    assert first["cwd"] == second["cwd"]
    digest = Path(first["cwd"]).name
    unpacked = re.findall(
        rf"runtime_env: unpacked package {digest}\b", _agent_log(renv_cluster["info"])
    )
    assert len(unpacked) == 1  # fetched and unpacked once on the node, whatever used it
    assert stat.S_IMODE(os.stat(renv_cluster["cache"]).st_mode) == 0o700


def test_edited_code_is_shipped_with_the_next_task(
    renv_cluster: dict[str, Any], code_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upload, "RECHECK_S", 0.0)  # look at the folder on every submission
    env = {"working_dir": str(code_dir)}
    assert (
        nb.get(import_and_describe.options(runtime_env=env).remote(MOD), timeout=60)["value"]
        == "v1"
    )
    (code_dir / f"{MOD}.py").write_text("def value():\n    return 'edited'\n")
    assert nb.get(import_and_describe.options(runtime_env=env).remote(MOD), timeout=60)[
        "value"
    ] == ("edited")


def test_too_large_a_directory_is_refused_before_upload(
    renv_cluster: dict[str, Any], code_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = _client()
    before = upload.upload_stats(client)
    monkeypatch.setenv("NBCLUSTER_RUNTIME_ENV_MAX_BYTES", "4000")  # data/big.bin is 5000 bytes
    with pytest.raises(RuntimeEnvError, match=r"more than the .* limit; leave large files out"):
        read_env.options(runtime_env={"working_dir": str(code_dir)}).remote("X")

    @nb.remote
    class Big:
        pass

    with pytest.raises(RuntimeEnvError, match="limit"):
        Big.options(runtime_env={"working_dir": str(code_dir)}).remote()
    assert upload.upload_stats(client)["uploads"] == before["uploads"]
    # Excluding the large file makes it fit.
    env = {"working_dir": str(code_dir), "excludes": ["data/"]}
    assert (
        nb.get(import_and_describe.options(runtime_env=env).remote(MOD), timeout=60)["value"]
        == "v1"
    )


# ----------------------------------------------------------------------------- packaging
def _zip(entries: list[tuple[str, bytes, int]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            zf.writestr(info, data)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("name", "mode", "why"),
    [
        ("../evil.py", stat.S_IFREG | 0o600, "leaves its folder"),
        ("a/../../evil.py", stat.S_IFREG | 0o600, "leaves its folder"),
        ("/etc/evil.py", stat.S_IFREG | 0o600, "not a relative path"),
        ("link", stat.S_IFLNK | 0o777, "not a regular file"),
    ],
)
def test_unpack_refuses_paths_out_of_its_folder_and_links(
    tmp_path: Path, name: str, mode: int, why: str
) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(RuntimeEnvError, match=why):
        unpack(_zip([(name, b"/etc/passwd", mode)]), str(dest), "0" * 32)
    assert not (tmp_path / "evil.py").exists()


def test_unpack_checks_the_content_hash_and_hash_ignores_times(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "m.py").write_text("x = 1\n")
    first = pack(str(src), (), keep_name=False, limit=10**6)
    os.utime(src / "sub" / "m.py", (1, 1))
    assert pack(str(src), (), keep_name=False, limit=10**6).hash == first.hash
    dest = tmp_path / "dest"
    dest.mkdir()
    assert unpack(first.data, str(dest), first.hash) == 1
    assert (dest / "sub" / "m.py").read_text() == "x = 1\n"
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(RuntimeEnvError, match="arrived with content hash"):
        unpack(first.data, str(other), "f" * 32)


def test_parse_keeps_which_keys_were_set() -> None:
    spec = parse({"env_vars": {"A": "1"}})
    assert spec is not None and spec.keys == frozenset({"env_vars"})
    assert parse({}) is None and parse(None) is None


def test_workers_of_old_environments_do_not_pile_up(renv_cluster: dict[str, Any]) -> None:
    name = f"NBC_MANY_{os.getpid()}"
    pids = set()
    for i in range(8):  # as if code were edited and shipped again 8 times
        env = {"env_vars": {name: str(i)}}
        got = nb.get(read_env.options(runtime_env=env).remote(name), timeout=60)
        assert got["vars"][name] == str(i)
        pids.add(got["pid"])
    assert len(pids) == 8  # each environment had a worker of its own

    def workers() -> int:
        return int(nb.nodes()[0]["workers"])

    # Idle workers of environments nobody waits for are stopped beyond the node's 2 CPUs
    # (plus the fresh workers kept ready for the next job).
    wait_until(lambda: workers() <= 5, timeout=30)


def test_a_folder_removed_after_first_use_is_a_clear_error(
    renv_cluster: dict[str, Any], code_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upload, "RECHECK_S", 0.0)
    bound = import_and_describe.options(runtime_env={"working_dir": str(code_dir)})
    assert nb.get(bound.remote(MOD), timeout=60)["value"] == "v1"
    import shutil

    shutil.rmtree(code_dir)
    with pytest.raises(RuntimeEnvError, match="does not exist"):
        bound.remote(MOD)
    with pytest.raises(RuntimeEnvError, match="is not a directory"):
        import_and_describe.options(runtime_env={"working_dir": str(code_dir)})


def test_magic_options_become_a_runtime_env() -> None:
    from nbcluster.magics import _parse_runtime_env_options

    words = ["--working-dir", ".", "--env", "A=1=2", "--exclude=*.csv", "--py-module", "lib"]
    assert _parse_runtime_env_options(words) == {
        "working_dir": ".",
        "env_vars": {"A": "1=2"},
        "excludes": ["*.csv"],
        "py_modules": ["lib"],
    }
    with pytest.raises(ValueError, match="unknown option '--pip'"):
        _parse_runtime_env_options(["--pip", "numpy"])
    with pytest.raises(ValueError, match="--env expects NAME=VALUE"):
        _parse_runtime_env_options(["--env", "A"])
    with pytest.raises(ValueError, match="--working-dir needs a value"):
        _parse_runtime_env_options(["--working-dir"])
