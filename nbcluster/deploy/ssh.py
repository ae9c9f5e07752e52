"""Node agents on SSH hosts, started through the system OpenSSH client.

Each host gets one ``ssh`` session running ``nbcluster-worker`` (``python -m nbcluster.agent``)
with the chosen Python. Using the ``ssh`` binary, not a Python SSH library, means the user's
``~/.ssh/config``, agent, jump hosts and known_hosts apply as they do in a terminal.

The cluster secret travels as the first line of the session's stdin (``--token-stdin``): it is
never in the remote command line (``ps`` shows that to every user of the host) or in an
environment variable set by the SSH server. The session's stdin stays open while the agent
runs: when it closes (the pool scales the host down, or this process exits or is killed, or the
connection drops) the agent drains and exits, and its workers with it. The agent also watches
its parent (the SSH server's session process) and exits with it.

Before the agent starts, a short probe run by the same Python checks that it is 3.11 or newer
and imports the same nbcluster version as this process; each failure (no route to the host,
authentication refused, no such Python, nbcluster missing or another version) ends that host's
session with a one-line reason naming the host.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from nbcluster._version import __version__
from nbcluster.deploy.pool import BackendStatus, JobState, Pool, PoolError
from nbcluster.deploy.util import is_loopback
from nbcluster.launch import AGENT_READY

#: The first word of a line the remote probe prints (on stderr) when it refuses to start.
PROBE_ERROR = "NBCLUSTER_SSH_ERROR"

#: ``ssh``'s exit status for its own errors (connection, authentication, host key).
SSH_FAILED = 255


@dataclass(frozen=True)
class SSHOptions:
    """How to reach the hosts: what is passed to the ``ssh`` client."""

    config: str | os.PathLike[str] | None = None
    """An ``ssh_config`` file (``-F``); default: the user's ``~/.ssh/config``."""
    identity_file: str | os.PathLike[str] | None = None
    """A private key (``-i``); default: the agent's and the config's keys."""
    options: Sequence[str] = ()
    """More ``ssh`` arguments, e.g. ``("-J", "bastion", "-o", "Port=2222")``."""
    connect_timeout: float = 15.0
    """Seconds to wait for a host's SSH server (``ConnectTimeout``)."""
    ssh: str = "ssh"
    """The client binary."""

    def argv(self, host: str, remote_command: str) -> list[str]:
        """The ``ssh`` command line running ``remote_command`` on ``host``.

        ``BatchMode`` turns a password or passphrase prompt (which nobody would answer) into an
        error; ``-T``: no terminal, so that stdin carries the secret and nothing echoes it.
        Host keys are checked as the user's configuration says: never turned off here.
        """
        argv = [self.ssh, "-T", "-o", "BatchMode=yes"]
        argv += ["-o", f"ConnectTimeout={max(1, round(self.connect_timeout))}"]
        # A dead connection ends the session (and so marks the host gone) within ~45 s.
        argv += ["-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=3"]
        if self.config is not None:
            argv += ["-F", str(self.config)]
        if self.identity_file is not None:
            argv += ["-i", str(self.identity_file)]
        argv += [*self.options, "--", host, remote_command]
        return argv


def probe_code(version: str = __version__) -> str:
    """Python run on the host before the agent: is this Python usable, with our nbcluster?

    It must parse on old Pythons too (no f-strings), to say which Python it found; it holds no
    single quote, so that it quotes cleanly into the remote shell line.
    """
    want = json.dumps(version)
    code = "\n".join(
        [
            "import sys",
            "def no(why):",
            f'    sys.stderr.write("{PROBE_ERROR} " + why + "\\n")',
            "    sys.exit(3)",
            "if sys.version_info < (3, 11):",
            '    no("%s is Python %d.%d; nbcluster needs 3.11 or newer"'
            " % (sys.executable, sys.version_info[0], sys.version_info[1]))",
            "try:",
            "    import nbcluster",
            "except Exception as e:",
            '    no("nbcluster is not importable by %s: %s" % (sys.executable, e))',
            f"if nbcluster.__version__ != {want}:",
            '    no("nbcluster %s is installed for %s, but this cluster runs nbcluster %s"'
            f" % (nbcluster.__version__, sys.executable, {want}))",
        ]
    )
    assert "'" not in code
    return code


def remote_script(python: str, agent_args: Sequence[str], setup: Sequence[str] = ()) -> str:
    """The POSIX shell script a host runs: ``setup`` lines, the probe, then the agent.

    The agent replaces the shell (``exec``), so its parent is the SSH server's session process,
    which it watches (``--parent-pid``). ``setup`` runs with stdin from ``/dev/null``: a command
    there must not eat the secret.
    """
    py = shlex.quote(python)
    lines = []
    if setup:
        lines += ["{", *setup, "} </dev/null"]
    missing = shlex.quote(f"{PROBE_ERROR} no Python {python} on this host")
    lines += [
        f"command -v {py} >/dev/null 2>&1 || {{ echo {missing} >&2; exit 127; }}",
        f"{py} -c {shlex.quote(probe_code())} </dev/null || exit $?",
        " ".join(
            [
                "exec",
                py,
                "-m",
                "nbcluster.agent",
                "--token-stdin",
                '--parent-pid "$PPID"',
                *(shlex.quote(a) for a in agent_args),
            ]
        ),
    ]
    return "\n".join(lines)


def remote_command(script: str) -> str:
    """The command string given to ``ssh``: ``script`` run by ``/bin/sh`` whatever the login
    shell is (the remote user's shell receives this one line)."""
    return f"exec /bin/sh -c {shlex.quote(script)}"


@dataclass
class SSHAgent:
    """One host's ``ssh`` session running a node agent.

    Parameters
    ----------
    host
        The host as ``ssh`` names it (an alias of the ssh config, ``user@name``, an address).
    argv
        The full ``ssh`` command line (:meth:`SSHOptions.argv`).
    token
        The cluster secret, written to the session's stdin.
    log
        File the session's output goes to: the remote agent's log and ``ssh``'s own errors.
    """

    host: str
    argv: list[str]
    token: str = field(repr=False)
    log: Path
    node_id: str = ""
    """Set once the remote agent has registered with the head."""
    started: float = 0.0
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log_file: IO[bytes] | None = field(default=None, repr=False)
    _reader: threading.Thread | None = field(default=None, repr=False)
    _ready: threading.Event = field(default_factory=threading.Event, repr=False)
    _stopping: bool = False

    def start(self, env: Mapping[str, str] | None = None) -> None:
        """Start the session and hand it the secret; returns at once (see :meth:`wait_ready`)."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.started = time.monotonic()
        try:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._log_file,
                env=dict(env) if env is not None else None,
                start_new_session=True,  # a Ctrl-C in the notebook is not for it
            )
        except OSError as exc:
            self._log_file.write(f"cannot run {self.argv[0]!r}: {exc}\n".encode())
            self._log_file.flush()
            self._ready.set()
            return
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(self.token.encode() + b"\n")
            self._proc.stdin.flush()
        except OSError:  # it exited already: its exit status says why
            pass
        self._reader = threading.Thread(
            target=self._read, name=f"nbcluster-ssh-{self.host}", daemon=True
        )
        self._reader.start()

    def _read(self) -> None:
        """Copy the session's stdout to the log, noting the agent's ready line."""
        assert self._proc is not None and self._proc.stdout is not None
        out = self._log_file
        with contextlib.suppress(OSError, ValueError):
            for line in self._proc.stdout:
                text = line.decode(errors="replace")
                if text.startswith(AGENT_READY) and not self.node_id:
                    words = text.split()
                    if len(words) >= 2:
                        self.node_id = words[1]
                        self._ready.set()
                if out is not None and not out.closed:
                    out.write(line)
                    out.flush()
        # The session ended: wake a waiter (the exit status tells it why).
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(5)
        self._ready.set()

    def wait_ready(self, timeout: float) -> bool:
        """Wait until the agent joined (``True``) or the session ended or ``timeout`` passed."""
        self._ready.wait(timeout)
        return bool(self.node_id) and self.returncode is None

    @property
    def returncode(self) -> int | None:
        """The ``ssh`` client's exit status, ``None`` while the session lasts."""
        if self._proc is None:
            return SSH_FAILED if self._ready.is_set() else None
        return self._proc.poll()

    def log_tail(self, lines: int = 20) -> list[str]:
        """The last ``lines`` lines of the session's log."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return []
        return text.splitlines()[-lines:]

    def failure(self) -> str | None:
        """Why the session ended, in one line naming the host; ``None`` while it runs or after a
        stop this pool asked for."""
        rc = self.returncode
        if rc is None or self._stopping:
            return None
        tail = self.log_tail(40)
        for line in reversed(tail):
            if line.startswith(PROBE_ERROR):
                return f"host {self.host}: {line[len(PROBE_ERROR) :].strip()}"
        # stdout (the ready line) and stderr reach the log by two paths, so their order may
        # differ from the host's: the agent's own last word ("nbcluster-worker: why") first.
        said = [ln.strip() for ln in tail if ln.strip() and not ln.startswith(AGENT_READY)]
        last = next((ln for ln in reversed(said) if ln.startswith("nbcluster-worker:")), "")
        last = last or (said[-1] if said else "")
        if rc == SSH_FAILED:
            return f"host {self.host}: ssh could not start the session: {last or 'no output'}"
        if self.node_id:
            return f"host {self.host}: the node agent exited with code {rc}: {last}"
        return f"host {self.host}: the node agent exited during start-up (code {rc}): {last}"

    def stop(self, timeout: float = 10.0) -> None:
        """End the session: close its stdin (the agent drains and exits), then wait for it;
        after ``timeout`` s end the ``ssh`` client, which closes the connection."""
        self._stopping = True
        proc = self._proc
        if proc is not None:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
        if self._reader is not None:
            self._reader.join(2.0)
        if self._log_file is not None:
            self._log_file.close()


class SSHCluster(Pool):
    """Node agents on SSH hosts: one per host, each in its own ``ssh`` session.

    Parameters
    ----------
    hosts
        The hosts as ``ssh`` names them: aliases of your ssh config, ``user@name``, addresses.
        One agent per host: :meth:`scale` takes the first free ones, in this order.
    python
        The Python on the hosts that has nbcluster (the same version as here) installed,
        e.g. ``"/opt/venv/bin/python"`` (default ``python3`` on the remote ``PATH``).
    ssh_config, identity_file, ssh_options, connect_timeout
        What is passed to ``ssh``: ``-F``, ``-i``, more arguments (``["-J", "bastion"]``),
        ``ConnectTimeout``. By default your own ``~/.ssh/config``, agent and known_hosts apply.
    setup
        Shell lines run on the host before the agent (``["module load cuda",
        "export PYTHONPATH=/srv/code"]``); their stdin is ``/dev/null``.
    cpus, gpus, resources
        What each host offers to the cluster (default: what its agent detects: the host's
        CPUs, its NVIDIA GPUs).
    bind_host
        Address the host's workers and object store listen on (default ``"auto"``: the
        host's address on its route to the head).
    stop_timeout
        Seconds a stopped host may take to drain before its session is cut.
    **options
        Those of :class:`~nbcluster.deploy.pool.Pool` (``name``, ``lifetime``,
        ``head_timeout``, ``workdir`` for the sessions' logs, ...).

    Notes
    -----
    The agent lives as long as its SSH session: scaling down or closing the pool closes the
    session's stdin (the agent drains: its tasks move, then it exits); this process exiting or
    being killed, or the connection dropping, does the same. It also exits when the head has
    been unreachable for ``head_timeout`` and, unless ``lifetime="detached"``, when the driver
    that owns the pool is gone.
    """

    kind = "ssh"

    def __init__(
        self,
        hosts: Sequence[str],
        *,
        python: str = "python3",
        ssh_config: str | os.PathLike[str] | None = None,
        identity_file: str | os.PathLike[str] | None = None,
        ssh_options: Sequence[str] = (),
        connect_timeout: float = 15.0,
        setup: Sequence[str] = (),
        cpus: float | None = None,
        gpus: float | None = None,
        resources: Mapping[str, float] | None = None,
        bind_host: str = "auto",
        stop_timeout: float = 30.0,
        **options: Any,
    ) -> None:
        if isinstance(hosts, str):
            hosts = [hosts]
        names = [str(h).strip() for h in hosts]
        if not names or any(
            not h or h.startswith("-") or any(c.isspace() for c in h) for h in names
        ):
            raise ValueError(f"hosts must be a non-empty list of ssh host names, got {hosts!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"a host is listed twice (one agent per host): {names}")
        super().__init__(python=python, **options)
        self.hosts = names
        self.ssh = SSHOptions(
            config=ssh_config,
            identity_file=identity_file,
            options=tuple(str(o) for o in ssh_options),
            connect_timeout=connect_timeout,
        )
        self.setup = [str(line) for line in setup]
        self.cpus = cpus
        self.gpus = gpus
        self.resources = dict(resources or {})
        self.bind_host = bind_host
        self.stop_timeout = float(stop_timeout)
        self._sessions: dict[str, SSHAgent] = {}
        self._serial = itertools.count()

    # ------------------------------------------------------------------ Pool backend
    def _free_hosts(self) -> list[str]:
        with self._lock:
            busy = {s.host for s in self._sessions.values() if s.returncode is None}
        return [h for h in self.hosts if h not in busy]

    def _agent_args(self, job: str) -> list[str]:
        """The agent's flags (after ``-m nbcluster.agent``), with the secret on stdin."""
        argv = self.agent_command(
            job,
            token_file="-",
            num_cpus=self.cpus,
            num_gpus=self.gpus,
            resources=self.resources or None,
        )
        argv = argv[argv.index("nbcluster.agent") + 1 :]
        i = argv.index("--token-file")
        del argv[i : i + 2]  # the remote command adds --token-stdin
        if self.bind_host != "auto":
            argv[argv.index("--bind-host") + 1] = self.bind_host
        return argv

    def _submit(self, count: int) -> list[str]:
        free = self._free_hosts()
        if count > len(free):
            raise PoolError(
                f"{self.name}: {count} more host(s) wanted, but only {len(free)} of its "
                f"{len(self.hosts)} hosts are free (one agent per host): {', '.join(free) or '-'}"
            )
        self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.workdir, 0o700)  # the logs may say more than others should read
        ids = []
        for host in free[:count]:
            job = f"{host}#{next(self._serial)}"
            script = remote_script(self.python, self._agent_args(job), self.setup)
            session = SSHAgent(
                host,
                self.ssh.argv(host, remote_command(script)),
                self.secret(),
                self.workdir / (re.sub(r"[^A-Za-z0-9@._-]", "_", job) + ".log"),
            )
            with self._lock:
                self._sessions[job] = session
            session.start()
            ids.append(job)
        return ids

    def _poll(self, job_ids: Sequence[str]) -> dict[str, BackendStatus]:
        out = {}
        for job in job_ids:
            session = self._sessions.get(job)
            if session is None:
                continue
            if session.returncode is None:
                out[job] = BackendStatus(JobState.RUNNING, host=session.host)
            else:
                why = session.failure()
                out[job] = BackendStatus(
                    JobState.GONE,
                    why or f"session ended (code {session.returncode})",
                    host=session.host,
                    failed=why is not None,
                )
        return out

    def _cancel(self, job_ids: Sequence[str]) -> None:
        # Closing stdin is the agent's SIGTERM (it drains); waiting for that happens off this
        # thread, so that scaling down many hosts takes one drain, not one per host.
        for job in job_ids:
            session = self._sessions.get(job)
            if session is not None:
                threading.Thread(
                    target=session.stop,
                    args=(self.stop_timeout,),
                    name=f"nbcluster-ssh-stop-{session.host}",
                    daemon=True,
                ).start()

    def _log_tail(self, job_id: str) -> str:
        session = self._sessions.get(job_id)
        return "\n".join(session.log_tail(20)) if session is not None else ""

    def _leaves_this_host(self) -> bool:
        return not all(is_loopback(h.rpartition("@")[2] + ":22") for h in self.hosts)

    def _describe(self) -> str:
        return f"{len(self.hosts)} SSH host(s), {self.python}"

    def node_resources(self) -> dict[str, float]:
        """What one host offers: the declared amounts, else what a joined host registered."""
        offer: dict[str, float] = dict(self.resources)
        if self.cpus is not None:
            offer["CPU"] = float(self.cpus)
        if self.gpus is not None:
            offer["GPU"] = float(self.gpus)
        if "CPU" in offer:
            return offer
        joined = {j.node_id for j in self.status() if j.node_id}
        for n in self._query("nodes") or []:
            if n.get("node_id") in joined:
                return {
                    **{k: float(v) for k, v in (n.get("resources_total") or {}).items()},
                    **offer,
                }
        return offer
