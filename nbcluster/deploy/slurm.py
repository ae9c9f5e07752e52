"""``SlurmCluster``: nodes of this cluster as Slurm batch jobs (``sbatch``/``squeue``/``scancel``).

Each job runs one node agent with the CPUs, GPUs and memory it asked for. The secret travels in a
0600 file inside the pool's private (0700) folder in the user's home, which the jobs read from the
shared filesystem: it is in no job script, no argument and no environment variable (see
docs/security.md). The job script ``exec``'s the agent, so Slurm's SIGTERM (``scancel``, and
``--signal`` before the walltime ends) reaches it and it drains: its tasks move to other nodes.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Sequence
from typing import Any

from nbcluster.deploy.pool import BackendStatus, JobState, Pool, PoolError, PoolJob
from nbcluster.deploy.util import parse_duration, shell_command
from nbcluster.protocol.security import TOKEN_ENV, TOKEN_FILE_ENV

#: squeue states that mean the job is gone, and whether that is a failure.
_ENDED = {
    "COMPLETED": False,
    "CANCELLED": False,
    "FAILED": True,
    "TIMEOUT": True,
    "NODE_FAIL": True,
    "PREEMPTED": True,
    "OUT_OF_MEMORY": True,
    "BOOT_FAIL": True,
    "DEADLINE": True,
    "SPECIAL_EXIT": True,
    "REVOKED": True,
}
_WAITING = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED"}
_SEP = "\x1f"  # squeue output field separator: in no job name, reason or node list


def slurm_memory(memory: str | int | None) -> str | None:
    """Slurm's ``--mem`` form of ``"32GB"``, ``"500MiB"``, ``"2T"`` or a number of MB."""
    if memory is None:
        return None
    if isinstance(memory, int):
        return f"{memory}M"
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", str(memory).lower())
    if not m:
        raise ValueError(f"memory: cannot read {memory!r} (e.g. '32GB', '500MB', 4096 for MB)")
    return f"{m.group(1)}{(m.group(2) or 'm').upper()}"


def memory_bytes(mem: str) -> int:
    """Bytes of a Slurm ``--mem`` value (``"32G"``)."""
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    return int(mem[:-1]) * scale[mem[-1]]


def slurm_time(walltime: str | float | None) -> str | None:
    """Slurm's ``--time`` (``D-HH:MM:SS`` / ``HH:MM:SS``) of ``"2:00:00"``, ``"90min"``, 3600."""
    if walltime is None:
        return None
    text = str(walltime).strip()
    if re.fullmatch(r"(\d+-)?\d+(:\d+){1,2}|\d+-\d+", text):
        return text  # Slurm's own form, passed as written
    secs = parse_duration(walltime)
    assert secs is not None
    secs = max(60, int(secs))
    return f"{secs // 3600}:{secs % 3600 // 60:02d}:{secs % 60:02d}"


class SlurmCluster(Pool):
    """A pool of Slurm jobs, one node agent each.

    Parameters
    ----------
    cpus
        CPUs per job (``--cpus-per-task``); the node offers that many.
    gpus
        GPUs per job (``--gres=gpu:N``); the agent offers only the GPUs Slurm gave the job.
    memory
        Memory per job (``--mem``): ``"32GB"``, ``"500MB"``, or an int of MB.
    partition, account
        ``--partition``, ``--account``.
    walltime
        ``--time`` (``"02:00:00"``, ``"90min"``). Slurm sends the agent SIGTERM ``signal_grace``
        seconds before it runs out (``--signal``): the node drains, its tasks move elsewhere.
    setup
        Shell lines run before the agent (``["module load cuda", "source venv/bin/activate"]``).
    directives
        More ``#SBATCH`` options, as written (``["--qos=normal", "--constraint=a100"]``).
    python
        The Python of the jobs (default: this process's; it must see the same nbcluster).
    signal_grace
        Seconds before the walltime's end at which the agent is told to drain (default 60).
    job_name
        The jobs' name in ``squeue`` (default ``nbcluster-POOL_ID``).
    sbatch, squeue, scancel, sinfo
        The commands (default: found on ``PATH``).
    **kwargs
        The :class:`~nbcluster.deploy.pool.Pool` options: ``name``, ``lifetime``,
        ``head_timeout``, ``poll_interval``, ``workdir``, ``agent_options``, ``head``.
    """

    kind = "slurm"

    def __init__(
        self,
        cpus: int = 1,
        gpus: int = 0,
        memory: str | int | None = None,
        partition: str | None = None,
        walltime: str | float | None = None,
        account: str | None = None,
        setup: Sequence[str] = (),
        directives: Sequence[str] = (),
        python: str | None = None,
        *,
        signal_grace: float = 60.0,
        job_name: str | None = None,
        sbatch: str = "sbatch",
        squeue: str = "squeue",
        scancel: str = "scancel",
        sinfo: str = "sinfo",
        **kwargs: Any,
    ) -> None:
        if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
            raise ValueError(f"cpus must be a whole number >= 1, got {cpus!r}")
        if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0:
            raise ValueError(f"gpus must be a whole number >= 0, got {gpus!r}")
        if isinstance(setup, str) or isinstance(directives, str):
            raise TypeError("setup and directives take a list of lines")
        super().__init__(python=python, **kwargs)
        self.cpus = cpus
        self.gpus = gpus
        self.memory = slurm_memory(memory)
        self.partition = partition
        self.walltime = slurm_time(walltime)
        self.account = account
        self.setup = [str(s) for s in setup]
        self.directives = [str(d) for d in directives]
        self.signal_grace = int(signal_grace)
        self.job_name = job_name or f"nbcluster-{self.pool_id}"
        self._cmd = {"sbatch": sbatch, "squeue": squeue, "scancel": scancel, "sinfo": sinfo}

    # ------------------------------------------------------------------ the job script
    def job_script(self) -> str:
        """The batch script every job is submitted with, exactly (it holds no secret)."""
        opts = [
            f"--job-name={self.job_name}",
            "--nodes=1",
            "--ntasks=1",
            f"--cpus-per-task={self.cpus}",
            f"--output={self.workdir / 'slurm-%j.out'}",
        ]
        if self.gpus:
            opts.append(f"--gres=gpu:{self.gpus}")
        if self.memory:
            opts.append(f"--mem={self.memory}")
        if self.partition:
            opts.append(f"--partition={self.partition}")
        if self.account:
            opts.append(f"--account={self.account}")
        if self.walltime:
            opts.append(f"--time={self.walltime}")
            # B: the batch shell only, which is the agent (exec): it drains before the end.
            opts.append(f"--signal=B:TERM@{self.signal_grace}")
        opts += self.directives
        resources = {"memory": float(memory_bytes(self.memory))} if self.memory else None
        agent = self.agent_command(
            "$SLURM_JOB_ID",
            num_cpus=self.cpus,
            num_gpus=self.gpus,
            resources=resources,
        )
        lines = ["#!/bin/bash", *(f"#SBATCH {o}" for o in opts), ""]
        lines += [
            "# nbcluster node agent: joins the head, exits when it drains, when the head has",
            f"# been unreachable for {self.head_timeout:g} s, or when its owner is gone.",
            "umask 077",
            *self.setup,
        ]
        if self.gpus:
            # Only the GPUs Slurm gave this job (some sites set just SLURM_JOB_GPUS).
            lines.append(
                'if [ -z "${CUDA_VISIBLE_DEVICES:-}" ] && [ -n "${SLURM_JOB_GPUS:-}" ]; then '
                'export CUDA_VISIBLE_DEVICES="$SLURM_JOB_GPUS"; fi'
            )
        lines.append("exec " + shell_command(agent))
        return "\n".join(lines) + "\n"

    def node_resources(self) -> dict[str, float]:
        out = {"CPU": float(self.cpus)}
        if self.gpus:
            out["GPU"] = float(self.gpus)
        if self.memory:
            out["memory"] = float(memory_bytes(self.memory))
        return out

    def _describe(self) -> str:
        parts = [f"{self.cpus} CPU"]
        if self.gpus:
            parts.append(f"{self.gpus} GPU")
        if self.memory:
            parts.append(self.memory)
        if self.partition:
            parts.append(f"partition {self.partition}")
        if self.walltime:
            parts.append(f"walltime {self.walltime}")
        return "per job: " + ", ".join(parts)

    # ------------------------------------------------------------------ engine calls
    def _run(self, tool: str, args: list[str], stdin: str | None = None) -> str:
        exe = self._cmd[tool]
        env = {k: v for k, v in os.environ.items() if k not in (TOKEN_ENV, TOKEN_FILE_ENV)}
        try:
            r = subprocess.run(
                [exe, *args], input=stdin, capture_output=True, text=True, timeout=60, env=env
            )
        except FileNotFoundError:
            raise PoolError(
                f"{self.name}: {exe!r} not found: run this where Slurm's commands are (a login "
                f"node), or pass {tool}='/path/to/{tool}'"
            ) from None
        except subprocess.TimeoutExpired:
            raise PoolError(f"{self.name}: {exe} did not answer within 60 s") from None
        if r.returncode != 0:
            raise PoolError((r.stderr or r.stdout).strip() or f"{exe} exited with {r.returncode}")
        return r.stdout

    def _submit(self, count: int) -> list[str]:
        script = self.job_script()
        self.token_file()  # the secret's file (and the private folder) before any job starts
        path = self.workdir / "job.sh"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(script)
        ids: list[str] = []
        for i in range(count):
            try:
                out = self._run("sbatch", ["--parsable"], stdin=script)
            except PoolError as exc:
                what = f"job {i + 1} of {count} ({self.job_name}, script {path})"
                if ids:  # those already queued stay: the pool lists them
                    self._record_partial(ids)
                raise PoolError(f"{self.name}: sbatch refused {what}: {exc}") from None
            ids.append(out.strip().split(";")[0])
        return ids

    def _record_partial(self, ids: list[str]) -> None:
        with self._lock:
            for i in ids:
                self._jobs.setdefault(i, PoolJob(i, JobState.PENDING))

    def _poll(self, job_ids: Sequence[str]) -> dict[str, BackendStatus]:
        fmt = _SEP.join(("%i", "%T", "%r", "%N"))
        out = self._run("squeue", ["-h", "--states=all", f"--name={self.job_name}", "-o", fmt])
        seen: dict[str, BackendStatus] = {}
        for line in out.splitlines():
            parts = line.split(_SEP)
            if len(parts) != 4:
                continue
            jid, state, reason, nodes = (p.strip() for p in parts)
            reason = "" if reason in ("None", "(null)") else reason
            if state in _ENDED:
                failed = _ENDED[state]
                why = state.lower() + (f" ({reason})" if reason else "")
                seen[jid] = BackendStatus(JobState.GONE, why, nodes, failed)
            elif state in _WAITING:
                seen[jid] = BackendStatus(JobState.PENDING, reason or state.lower(), nodes)
            else:  # RUNNING, COMPLETING, ...
                seen[jid] = BackendStatus(JobState.RUNNING, "", nodes)
        return {
            j: seen.get(j, BackendStatus(JobState.GONE, "no longer in squeue")) for j in job_ids
        }

    def _cancel(self, job_ids: Sequence[str]) -> None:
        if job_ids:
            # Plain scancel: SIGTERM first (the agent drains), SIGKILL after Slurm's KillWait.
            self._run("scancel", list(job_ids))

    def _log_tail(self, job_id: str) -> str:
        path = self.workdir / f"slurm-{job_id}.out"
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 4000))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-20:])

    def _leaves_this_host(self) -> bool:
        """Whether the partition (default: the default one) has nodes other than this host."""
        try:
            out = self._run("sinfo", ["-h", "-N", "-o", f"%N{_SEP}%P"])
        except PoolError:
            return False  # sbatch's own error will say it better
        names = set()
        for line in out.splitlines():
            node, _, part = line.strip().partition(_SEP)
            default = part.endswith("*")
            if (part.rstrip("*") == self.partition) if self.partition else default:
                names.add(node)
        here = {socket.gethostname(), socket.gethostname().split(".")[0], "localhost"}
        return bool(names) and not names <= here  # none listed: sbatch will say why
