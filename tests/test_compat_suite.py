"""The compatibility suite: Ray programs (``tests/compat/programs``) run unchanged against
nbcluster through a ``ray`` import alias (``tests/compat/run_as.py``).

Each program checks its own results and prints ``COMPAT OK``. The same programs pass against
Ray: ``.venv-bench/bin/python benchmarks/compat_ray.py`` runs them on both.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPAT = ROOT / "tests" / "compat"
PROGRAMS = sorted((COMPAT / "programs").glob("*.py"))
OK_MARKER = "COMPAT OK"

#: Seconds one program may take (they take 4-20 s on a loaded 2-core machine).
PROGRAM_TIMEOUT_S = 150


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("NBCLUSTER_ADDRESS", None)  # each program starts its own cluster
    return env


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``run_as.py ARGS`` in its own session; kill all of it when it overruns."""
    proc = subprocess.Popen(
        [sys.executable, str(COMPAT / "run_as.py"), *args],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"{args} ran past {timeout} s:\n{out[-6000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def test_the_suite_has_its_programs() -> None:
    assert len(PROGRAMS) >= 12


@pytest.mark.timeout(PROGRAM_TIMEOUT_S + 30)
@pytest.mark.parametrize("program", PROGRAMS, ids=[p.stem for p in PROGRAMS])
def test_ray_program_runs_unchanged_on_nbcluster(program: Path) -> None:
    result = _run("nbcluster", str(program), timeout=PROGRAM_TIMEOUT_S)
    assert result.returncode == 0 and OK_MARKER in result.stdout.splitlines(), result.stdout[-6000:]


def test_the_alias_maps_ray_modules_to_nbcluster_modules(tmp_path: Path) -> None:
    # What run_as.py promises: one module object under both names, submodules included, and
    # ray.util.placement_group still the function after its module is imported by name.
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import ray, ray.util.placement_group, ray.util.queue, nbcluster\n"
        "from ray.util.placement_group import placement_group as pg\n"
        "import nbcluster.util.queue as q\n"
        "assert ray is nbcluster and ray.util.queue is q\n"
        "assert callable(ray.util.placement_group) and ray.util.placement_group is pg\n"
        "assert nbcluster.__spec__.name == 'nbcluster'\n"
        "try:\n"
        "    import ray.no_such_module\n"
        "except ModuleNotFoundError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('a module nbcluster lacks imported')\n"
        "print('COMPAT OK')\n"
    )
    result = _run("nbcluster", str(probe), timeout=60)
    assert result.returncode == 0 and OK_MARKER in result.stdout, result.stdout


def test_run_as_refuses_an_unknown_backend() -> None:
    result = _run("dask", str(PROGRAMS[0]), timeout=60)
    assert result.returncode == 2 and "usage" in result.stdout
