"""Launching two nodes through Slurm: nbcluster's ``SlurmCluster`` vs dask-jobqueue vs Ray.

Starts the tests' single-node Slurm (``tests/slurm_local.py``: needs root; installs
``slurm-wlm``/``munge`` with apt when missing), then measures, for each system, in a fresh
process and one run each:

- **ready**: seconds from asking for 2 nodes (``pool.scale(2)``, ``cluster.scale(2)``, ``sbatch``)
  until the driver sees both joined;
- **first task**: seconds from the same start until a first task's result is back.

The systems:

- ``nbcluster``: ``SlurmCluster(cpus=1, memory="1GB").scale(2)``, ``wait_for_nodes(2)``, a task
  pinned to a pool node.
- ``dask-jobqueue``: ``SLURMCluster(cores=1, memory="1GB", processes=1).scale(2)``,
  ``client.wait_for_workers(2)``, ``client.submit(f).result()``.
- ``ray``: Ray's documented sbatch recipe (``ray start --head`` in an ``srun`` step, then
  ``ray start --address`` in another, then the driver script in the batch shell), in one job of
  two tasks since this Slurm has one node; the recipe's fixed ``sleep``s are replaced by waiting
  for the head to answer (``ray status``), which only helps Ray.

Run: ``bash benchmarks/setup.sh && sudo .venv-bench/bin/python benchmarks/slurm_launch.py``.
Prints a table and the ratios (other / nbcluster; above 1 means nbcluster is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from nbcluster.launch import free_port  # noqa: E402  (needs the sys.path entry above)

NBCLUSTER = """
import json, time
import nbcluster as nb
from nbcluster.deploy import SlurmCluster

nb.init(num_cpus=1)

@nb.remote
def f():
    return 1

pool = SlurmCluster(cpus=1, memory="1GB", workdir=WORKDIR)
t0 = time.perf_counter()
pool.scale(2)
jobs = pool.wait_for_nodes(2, timeout=120)
ready = time.perf_counter() - t0
pin = nb.NodeAffinitySchedulingStrategy(jobs[0].node_id, soft=False)
assert nb.get(f.options(scheduling_strategy=pin).remote(), timeout=120) == 1
done = time.perf_counter() - t0
pool.close()
nb.shutdown()
print("RESULT", json.dumps({"ready": ready, "first_task": done}))
"""

DASK = """
import json, sys, time
from dask.distributed import Client
from dask_jobqueue import SLURMCluster

cluster = SLURMCluster(cores=1, processes=1, memory="1GB", walltime="00:10:00",
                       python=sys.executable, log_directory=WORKDIR,
                       scheduler_options={"host": "127.0.0.1"})
client = Client(cluster)
t0 = time.perf_counter()
cluster.scale(2)
client.wait_for_workers(2, timeout=120)
ready = time.perf_counter() - t0
assert client.submit(lambda: 1).result(timeout=120) == 1
done = time.perf_counter() - t0
client.close()
cluster.close()
print("RESULT", json.dumps({"ready": ready, "first_task": done}))
"""

RAY_DRIVER = """
import json, os, time
import ray

ray.init(address=os.environ["RAY_ADDRESS"])
while sum(1 for n in ray.nodes() if n["Alive"]) < 2:
    time.sleep(0.05)
ready = time.time() - float(os.environ["T0"])

@ray.remote
def f():
    return 1

assert ray.get(f.remote()) == 1
done = time.time() - float(os.environ["T0"])
print("RESULT", json.dumps({"ready": ready, "first_task": done}), flush=True)
"""

# Ray's sbatch recipe (docs: "Deploying on Slurm", slurm-basic.sh), on one Slurm node: the head
# and one worker as two srun steps of one job, then the driver in the batch shell.
RAY_SCRIPT = """#!/bin/bash
#SBATCH --job-name=ray-bench
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --mem-per-cpu=1G
#SBATCH --output={out}
set -x
port={port}
# Ray >= 2.5x authenticates with a token: like nbcluster's secret, made once per user.
export RAY_AUTH_MODE=token
[ -s ~/.ray/auth_token ] || {ray} get-auth-token --generate >/dev/null
srun --nodes=1 --ntasks=1 --exact {ray} start --head --port=$port \\
    --num-cpus=1 --include-dashboard=false --disable-usage-stats --block &
# The recipe sleeps 10 s here; we wait for the head instead (ray picks its own IP).
until grep -qs ":$port" /tmp/ray/ray_current_cluster; do sleep 0.1; done
export RAY_ADDRESS=$(cat /tmp/ray/ray_current_cluster)
until {ray} status --address=$RAY_ADDRESS >/dev/null 2>&1; do sleep 0.2; done
srun --nodes=1 --ntasks=1 --exact {ray} start --address=$RAY_ADDRESS --num-cpus=1 \\
    --disable-usage-stats --block &
{python} -u {driver}
{ray} stop --force >/dev/null 2>&1
"""


def _run_script(python: str, code: str, workdir: Path, timeout: float) -> dict[str, float]:
    src = f"WORKDIR = {str(workdir)!r}\n" + textwrap.dedent(code)
    # This checkout's nbcluster, in the driver and (sbatch exports the environment) the jobs.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    r = subprocess.run(
        [python, "-c", src], capture_output=True, text=True, timeout=timeout, cwd=workdir, env=env
    )
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT ") :]))
    raise RuntimeError(f"exit {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")


def bench_ray(python: str, workdir: Path, timeout: float) -> dict[str, float]:
    ray = str(Path(python).with_name("ray"))
    if not os.access(ray, os.X_OK):
        raise RuntimeError(f"no ray command beside {python}")
    driver = workdir / "ray_driver.py"
    driver.write_text(RAY_DRIVER)
    out = workdir / "ray-%j.out"
    script = RAY_SCRIPT.format(out=out, port=free_port(), ray=ray, python=python, driver=driver)
    t0 = time.time()
    env = {**os.environ, "T0": repr(t0)}
    r = subprocess.run(
        ["sbatch", "--parsable"], input=script, capture_output=True, text=True, env=env
    )
    if r.returncode:
        raise RuntimeError(r.stderr)
    job = r.stdout.strip().split(";")[0]
    log = workdir / f"ray-{job}.out"
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace") if log.exists() else ""
            for line in text.splitlines():
                if line.startswith("RESULT "):
                    return dict(json.loads(line[len("RESULT ") :]))
            time.sleep(0.2)
        raise RuntimeError(f"no result in {timeout:.0f} s:\n{text[:3000]}\n...\n{text[-1500:]}")
    finally:
        subprocess.run(["scancel", job], capture_output=True)


def _wait_queue_empty(timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True)
        if not r.stdout.split():
            return
        time.sleep(0.3)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_py = ROOT / ".venv-bench" / "bin" / "python"
    p.add_argument("--python", default=str(default_py if default_py.exists() else sys.executable))
    p.add_argument("--systems", default="nbcluster,dask-jobqueue,ray")
    p.add_argument("--timeout", type=float, default=240.0)
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "slurm_launch.json"))
    args = p.parse_args()

    from tests.slurm_local import LocalSlurm, why_unavailable

    why = why_unavailable()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    slurm = LocalSlurm()
    results: dict[str, dict[str, float] | str] = {}
    tmp = Path(tempfile.mkdtemp(prefix="nbcluster-slurm-bench-"))
    try:
        slurm.start()
        for system in args.systems.split(","):
            work = tmp / system
            work.mkdir()
            try:
                if system == "nbcluster":
                    results[system] = _run_script(args.python, NBCLUSTER, work, args.timeout)
                elif system == "dask-jobqueue":
                    results[system] = _run_script(args.python, DASK, work, args.timeout)
                elif system == "ray":
                    results[system] = bench_ray(args.python, work, args.timeout)
                else:
                    results[system] = f"unknown system {system!r}"
            except Exception as exc:
                results[system] = f"failed: {str(exc)[:4000]}"
            _wait_queue_empty()
    finally:
        slurm.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"{'system':<15} {'ready (s)':>10} {'first task (s)':>15}")
    for system, r in results.items():
        if isinstance(r, dict):
            print(f"{system:<15} {r['ready']:>10.2f} {r['first_task']:>15.2f}")
        else:
            print(f"{system:<15} {r}")
    ours = results.get("nbcluster")
    if isinstance(ours, dict):
        for system, r in results.items():
            if system != "nbcluster" and isinstance(r, dict):
                print(
                    f"{system} / nbcluster: ready {r['ready'] / ours['ready']:.2f}x, "
                    f"first task {r['first_task'] / ours['first_task']:.2f}x"
                )
    Path(args.output).write_text(json.dumps({"results": results, "cpus": os.cpu_count()}, indent=2))
    return 0 if all(isinstance(r, dict) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
