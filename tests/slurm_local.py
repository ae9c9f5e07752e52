"""A real, single-node Slurm for the tests: munged, slurmctld and slurmd run directly.

``LocalSlurm.start()`` installs Debian's ``slurm-wlm`` and ``munge`` when they are missing (as
root, with apt), writes a ``slurm.conf`` for this host (its name, CPUs and memory) into a private
directory, starts a munged of its own (own key and socket), slurmctld and slurmd in the
foreground as child processes (no systemd), and waits until ``sinfo`` shows the node idle.
``SLURM_CONF`` in this process's environment points the commands (and the pools) at it.
``stop()`` cancels what is left and stops the daemons. Nothing outside its directory is changed
except the apt install.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from nbcluster.launch import free_port

PACKAGES = ("slurm-wlm", "munge")
#: CPUs the node declares: more than the CI machine's 2, so that a few 1-CPU jobs run at once
#: (slurmd takes the configured figures with ``SlurmdParameters=config_overrides``).
NODE_CPUS = 8
#: GPUs the node declares (device files of its own: see ``start``).
NODE_GPUS = 2
#: A node of the ``remote`` partition that never comes up: jobs there would run elsewhere.
REMOTE_NODE = "nbtest-remote"


def why_unavailable() -> str | None:
    """Why a local Slurm cannot run here (``None``: it can, possibly after an apt install)."""
    if shutil.which("slurmctld") and shutil.which("munged"):
        return None if os.geteuid() == 0 else "the local Slurm runs its daemons as root"
    if os.geteuid() != 0:
        return "slurm-wlm/munge are not installed and installing them needs root"
    if not shutil.which("apt-get"):
        return "slurm-wlm/munge are not installed and there is no apt-get"
    return None


def install() -> None:
    """apt-get install slurm-wlm and munge (once; raises with apt's output on failure)."""
    if shutil.which("slurmctld") and shutil.which("munged") and shutil.which("sbatch"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
    ):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if r.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")


#: Processes of test infrastructure that outlive single tests (the session's Slurm daemons):
#: they and their children are not processes a test started (``conftest.descendants``).
INFRASTRUCTURE_PIDS: set[int] = set()


class LocalSlurm:
    """One single-node Slurm cluster (see the module docstring)."""

    def __init__(self, partition: str = "debug") -> None:
        self.partition = partition
        self.dir = Path(tempfile.mkdtemp(prefix=f"nbcluster-slurm-{os.getpid()}-"))
        os.chmod(self.dir, 0o755)  # slurmd/jobs read the conf; the key is 0400 inside
        self.host = socket.gethostname()
        self.conf = self.dir / "slurm.conf"
        self.procs: list[subprocess.Popen[bytes]] = []
        self._old_conf = os.environ.get("SLURM_CONF")

    def start(self, timeout: float = 60.0) -> None:
        install()
        d = self.dir
        for sub in ("state", "spool", "munge"):
            (d / sub).mkdir(mode=0o700)
        key = d / "munge" / "munge.key"
        subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True, timeout=30)
        os.chmod(key, 0o400)
        sock = d / "munge" / "munge.sock"
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={sock}",
                f"--key-file={key}",
                f"--pid-file={d / 'munge' / 'munged.pid'}",
                f"--log-file={d / 'munged.log'}",
                f"--seed-file={d / 'munge' / 'seed'}",
            ],
        )
        self._wait(lambda: sock.exists(), 10.0, "munged did not create its socket")
        mem_mb = int(psutil.virtual_memory().total // 2**20)
        gres = f"Gres=gpu:{NODE_GPUS}"
        self.conf.write_text(
            f"""ClusterName=nbtest
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
StateSaveLocation={d / "state"}
SlurmdSpoolDir={d / "spool"}
SlurmctldPidFile={d / "slurmctld.pid"}
SlurmdPidFile={d / "slurmd.pid"}
SlurmctldLogFile={d / "slurmctld.log"}
SlurmdLogFile={d / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SlurmdParameters=config_overrides
ReturnToService=2
SlurmctldTimeout=300
SlurmdTimeout=300
MessageTimeout=30
InactiveLimit=0
KillWait=5
DefMemPerCPU=256
MinJobAge=2
OverTimeLimit=0
GresTypes=gpu
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={NODE_CPUS} RealMemory={mem_mb} {gres} State=UNKNOWN
NodeName={REMOTE_NODE} NodeAddr=192.0.2.1 CPUs=1 RealMemory=100 State=DOWN
PartitionName={self.partition} Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
PartitionName=remote Nodes={REMOTE_NODE} MaxTime=INFINITE State=UP
"""
        )
        # Stand-in GPU device files: Slurm hands them out and sets CUDA_VISIBLE_DEVICES and
        # SLURM_JOB_GPUS (no cgroup constrains devices here); the fake NVML shows the GPUs.
        (d / "dev").mkdir()
        for i in range(NODE_GPUS):  # character devices, as Slurm insists: /dev/null's, /dev/zero's
            dev = os.makedev(1, (3, 5, 7, 8)[i])
            os.mknod(d / "dev" / f"nvidia{i}", stat.S_IFCHR | 0o600, dev)
        (self.dir / "gres.conf").write_text(
            f"NodeName={self.host} Name=gpu File={d / 'dev'}/nvidia[0-{NODE_GPUS - 1}]\n"
        )
        os.environ["SLURM_CONF"] = str(self.conf)
        env = {**os.environ}
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)], env)
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)], env)
        self._wait(self._idle, timeout, "the Slurm node did not become idle")

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        out = open(self.dir / f"{name}.out", "ab")  # noqa: SIM115 - the child holds it
        self.procs.append(
            subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=env,
                start_new_session=True,
            )
        )
        out.close()

    def _idle(self) -> bool:
        r = subprocess.run(
            ["sinfo", "-h", "-N", "-n", self.host, "-o", "%T"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return r.returncode == 0 and r.stdout.strip() in ("idle", "idle*") and "*" not in r.stdout

    def _wait(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(
                        f"{what}: {p.args[0]} exited ({p.returncode}):\n{self.logs()}"
                    )
            if cond():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{what} within {timeout:.0f} s:\n{self.logs()}")

    def logs(self) -> str:
        """The end of each daemon's log."""
        out = []
        for f in sorted(self.dir.glob("*.log")) + sorted(self.dir.glob("*.out")):
            out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-1500:]}")
        return "\n".join(out)

    def jobs(self) -> list[str]:
        """Ids of the jobs squeue lists (any state)."""
        r = subprocess.run(
            ["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=10, check=True
        )
        return r.stdout.split()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            subprocess.run(["scancel", "--full", "--user", "root"], timeout=10)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        if self._old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = self._old_conf
        shutil.rmtree(self.dir, ignore_errors=True)
