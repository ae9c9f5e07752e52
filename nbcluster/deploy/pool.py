"""``Pool``: node agents started as jobs of another engine (Slurm, SSH hosts, Kubernetes).

A pool adds nodes to the cluster this process is connected to. Each *job* (a Slurm job, an SSH
session, a pod) runs one node agent (``python -m nbcluster.agent``). The base class keeps the
books: which jobs were asked for, which joined (and as which node), which failed and why; it
scales up and down, adapts to the head's demand, and ends every job it started when it closes or
when its owner goes away. A subclass only talks to its engine, through four methods:

``_submit(count) -> list[str]``
    Start ``count`` jobs, each running :meth:`Pool.agent_command` (with its job id, or a
    placeholder the engine expands, as ``job``). Returns the engines' ids of the jobs started.
    Raises :class:`PoolError` when none could be started (say why and name the job/host); a job
    that fails later is reported by ``_poll`` as :attr:`JobState.GONE` with its reason.
``_poll(job_ids) -> dict[str, BackendStatus]``
    What the engine says of each job: :attr:`JobState.PENDING` (queued, with the scheduler's
    reason), :attr:`JobState.RUNNING`, or :attr:`JobState.GONE` (ended; the reason when it
    failed). A job missing from the answer counts as gone.
``_cancel(job_ids)``
    End those jobs. A running job's agent must get SIGTERM first (it drains: the head moves its
    tasks and actors elsewhere before it goes), and be killed only if it does not exit.
``_log_tail(job_id) -> str``
    The last lines of the job's output (shown when it failed); ``""`` when there is none.

and, optionally, :meth:`Pool.node_resources` (what one job offers, for :meth:`Pool.adapt`),
:meth:`Pool._leaves_this_host` (whether jobs may run on other machines: then a head on loopback
is refused with a message naming the setting that fixes it) and :meth:`Pool._describe` (one line
for reprs).

**How a job is recognised once it joins.** :meth:`Pool.agent_command` passes the agent
``--label nbcluster.pool=POOL_ID --label nbcluster.job=JOB``; the agent reports its labels in
its node's info, so ``nodes()`` shows them and the pool maps job -> node id. It also passes
``--head-timeout`` (the agent exits when the head has been unreachable that long, which ends its
job) and, unless the pool is ``lifetime="detached"``, ``--exit-with-job`` with the owner's job id
(the agent drains and exits when the driver or kernel that owns the pool is gone).
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import html
import logging
import os
import secrets
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from nbcluster.deploy.util import LOOPBACK_HINT, is_loopback, nodes_needed, parse_duration
from nbcluster.exceptions import ConfigurationError, ConnectionFailedError, NbclusterError
from nbcluster.protocol.security import write_token_file

log = logging.getLogger(__name__)

#: Labels an agent started by a pool carries (see the module docstring).
POOL_LABEL = "nbcluster.pool"
JOB_LABEL = "nbcluster.job"
#: Default seconds an agent waits for an unreachable head before it exits.
HEAD_TIMEOUT_S = 120.0
LIFETIMES = ("owned", "detached")


class PoolError(NbclusterError):
    """A pool could not start, scale or stop its jobs (the message names the job and the cause)."""


class JobState(enum.StrEnum):
    """Where one job of a pool stands."""

    PENDING = "pending"  # submitted, not running yet, or running but its agent has not joined
    RUNNING = "running"  # its agent joined: a node of the cluster
    DRAINING = "draining"  # asked to stop: its node leaves, its tasks move elsewhere
    GONE = "gone"  # ended (on purpose, or failed: see ``reason``)


@dataclass(frozen=True)
class BackendStatus:
    """What the engine says of one job (the answer of ``_poll``)."""

    state: JobState
    """:attr:`JobState.PENDING`, :attr:`JobState.RUNNING` or :attr:`JobState.GONE`."""
    reason: str = ""
    """The engine's reason: why it waits (``"Resources"``), why it ended (``"FAILED"``...)."""
    host: str = ""
    """Where it runs, when known."""
    failed: bool = False
    """It ended with an error (the base then reads its log tail)."""


@dataclass
class PoolJob:
    """One job of a pool, as :meth:`Pool.status` lists it."""

    job_id: str
    """The engine's id (Slurm job id, ``host#n`` for SSH, pod name)."""
    state: JobState
    node_id: str | None = None
    """The cluster node its agent registered as, once it joined."""
    host: str = ""
    reason: str = ""
    """Why it waits or why it failed (the engine's reason); empty when nothing to say."""
    log_tail: str = ""
    """The last lines of its output when it failed."""
    submitted_at: float = field(default_factory=time.time)
    joined_at: float | None = None
    ended_at: float | None = None
    stop_requested: bool = False
    """The pool asked it to stop (scale down, close, idle): its end is no failure."""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (REST, panel)."""
        return {
            "job_id": self.job_id,
            "state": self.state.value,
            "node_id": self.node_id,
            "host": self.host,
            "reason": self.reason,
            "log_tail": self.log_tail,
            "submitted_at": self.submitted_at,
            "joined_at": self.joined_at,
            "ended_at": self.ended_at,
        }


class HeadLink(Protocol):
    """What a pool needs from the cluster it grows: where agents connect, the secret, queries.

    :class:`ClientLink` is the driver's (this process's ``init()``); the Jupyter extension has
    one for the head it hosts.
    """

    @property
    def address(self) -> str:
        """``HOST:PORT`` node agents connect to."""
        ...

    def secret(self) -> str:
        """The cluster secret (written to a private file for the jobs, never passed in argv)."""
        ...

    def owner_job(self) -> str | None:
        """The job id whose end ends the pool's jobs (``None``: no owner to follow)."""
        ...

    def query(self, what: str) -> Any:
        """A head query (``"nodes"``, ``"demand"``)."""
        ...


class ClientLink:
    """The :class:`HeadLink` of this process's connection (what ``nbcluster.init()`` made)."""

    def __init__(self) -> None:
        from nbcluster.client import current

        client = current.get()
        if client is None:
            raise ConfigurationError(
                "a pool adds nodes to the cluster this process is connected to: call "
                "nbcluster.init() first"
            )
        self._client = client

    @property
    def address(self) -> str:
        return str(self._client.head_address)

    def secret(self) -> str:
        return str(self._client._token)  # the secret this process proved it knows

    def owner_job(self) -> str | None:
        return str(self._client.job_id) or None

    def query(self, what: str) -> Any:
        if self._client.closed.is_set():  # shut down: no head to ask
            raise ConnectionFailedError("this process disconnected from the cluster")
        return self._client.query(what)


class Pool:
    """Nodes of this cluster started as jobs of another engine (see the module docstring).

    Parameters
    ----------
    name
        A name for status displays (default: the pool's id, e.g. ``slurm-1a2b3c4d``).
    lifetime
        ``"owned"`` (default): the jobs end when the pool is closed, when this process exits,
        and when the driver or kernel whose job owns the pool is gone. ``"detached"``: they
        outlive this process (ended by :meth:`close`, or their agents' head timeout).
    head_timeout
        Seconds an agent keeps trying to reach an unreachable head before it exits, which ends
        its job (default 120; also ``"2min"``).
    poll_interval
        Seconds between two looks at the engine and the head.
    head
        The cluster to grow (default: this process's connection, :class:`ClientLink`).
    python
        The Python the jobs run the agent with (default: this one, ``sys.executable``).
    workdir
        Private folder (made mode 0700) for the secret, job scripts and logs. It must be
        visible to the jobs at the same path where they run elsewhere (a shared home).
        Default: ``~/.nbcluster/pools/POOL_ID``.
    agent_options
        Extra ``nbcluster-worker`` flags for every job's agent (e.g. ``["--prestart", "2"]``).
    """

    #: The engine's short name (``"slurm"``, ``"ssh"``, ``"kubernetes"``).
    kind = "pool"

    def __init__(
        self,
        *,
        name: str | None = None,
        lifetime: str = "owned",
        head_timeout: float | str = HEAD_TIMEOUT_S,
        poll_interval: float = 1.0,
        head: HeadLink | None = None,
        python: str | None = None,
        workdir: str | os.PathLike[str] | None = None,
        agent_options: Sequence[str] = (),
    ) -> None:
        if lifetime not in LIFETIMES:
            raise ValueError(f"lifetime must be one of {LIFETIMES}, got {lifetime!r}")
        timeout = parse_duration(head_timeout)
        if not timeout or timeout <= 0:
            raise ValueError(f"head_timeout must be positive, got {head_timeout!r}")
        self.pool_id = f"{self.kind}-{secrets.token_hex(4)}"
        self.name = name or self.pool_id
        self.lifetime = lifetime
        self.head_timeout = timeout
        self.poll_interval = float(poll_interval)
        self.python = python or sys.executable
        self.agent_options = [str(a) for a in agent_options]
        self._head = head if head is not None else ClientLink()
        self.workdir = Path(
            workdir
            if workdir is not None
            else Path(os.environ.get("NBCLUSTER_HOME", Path.home() / ".nbcluster"))
            / "pools"
            / self.pool_id
        ).expanduser()
        self._jobs: dict[str, PoolJob] = {}
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._tick_lock = threading.Lock()  # the monitor and waiting callers take turns
        self._adaptive: dict[str, Any] | None = None
        self._closed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._token_file: Path | None = None
        self._last_demand: dict[str, Any] = {}
        self._checked_reachable = False
        if lifetime == "owned":
            # Closed at exit with a weak reference: the pool may be collected before that.
            self._atexit: Any = _closer(weakref.ref(self))
            atexit.register(self._atexit)

    # ------------------------------------------------------------------ for subclasses
    def _submit(self, count: int) -> list[str]:
        """Start ``count`` jobs; return their ids (see the module docstring)."""
        raise NotImplementedError

    def _poll(self, job_ids: Sequence[str]) -> dict[str, BackendStatus]:
        """The engine's word on each job (see the module docstring)."""
        raise NotImplementedError

    def _cancel(self, job_ids: Sequence[str]) -> None:
        """End those jobs, SIGTERM first (see the module docstring)."""
        raise NotImplementedError

    def _log_tail(self, job_id: str) -> str:
        """The last lines of a job's output (``""``: none)."""
        return ""

    def _leaves_this_host(self) -> bool:
        """Whether jobs may run on another machine (then a loopback head is refused)."""
        return True

    def _describe(self) -> str:
        """One line about what each job asks for (reprs)."""
        return ""

    def node_resources(self) -> dict[str, float]:
        """What one job's node offers (``{"CPU": 8, "GPU": 1}``); used by :meth:`adapt`."""
        return {}

    # ------------------------------------------------------------------ helpers for subclasses
    @property
    def head_address(self) -> str:
        """``HOST:PORT`` the agents connect to."""
        return self._head.address

    def token_file(self) -> Path:
        """The secret in a 0600 file inside the private (0700) :attr:`workdir`; made once."""
        if self._token_file is None:
            self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.workdir, 0o700)  # also when it existed: nobody else may look in
            path = self.workdir / "token"
            write_token_file(path, self._head.secret())
            self._token_file = path
        return self._token_file

    def secret(self) -> str:
        """The cluster secret, for engines that pass it over a private channel (SSH, Secret)."""
        return self._head.secret()

    def agent_command(
        self,
        job: str,
        *,
        token_file: str | None = None,
        num_cpus: float | None = None,
        num_gpus: float | None = None,
        resources: Mapping[str, float] | None = None,
    ) -> list[str]:
        """The agent's command line for one job (argv; the secret is passed by file path).

        Parameters
        ----------
        job
            The job's id, or what the engine's shell expands to it (``$SLURM_JOB_ID``): quote
            with :func:`nbcluster.deploy.util.shell_command`, which leaves ``$NAME``
            references expandable.
        token_file
            Where the job reads the secret (default: :meth:`token_file`).
        """
        cmd = [
            self.python,
            "-m",
            "nbcluster.agent",
            "--address",
            self.head_address,
            "--token-file",
            token_file or str(self.token_file()),
            "--bind-host",
            "auto",
            "--head-timeout",
            f"{self.head_timeout:g}",
            "--label",
            f"{POOL_LABEL}={self.pool_id}",
            "--label",
            f"{JOB_LABEL}={job}",
        ]
        owner = self._head.owner_job() if self.lifetime == "owned" else None
        if owner:
            cmd += ["--exit-with-job", owner]
        if num_cpus is not None:
            cmd += ["--num-cpus", f"{num_cpus:g}"]
        if num_gpus is not None:
            cmd += ["--num-gpus", f"{num_gpus:g}"]
        if resources:
            import json

            cmd += ["--resources", json.dumps(dict(resources))]
        return [*cmd, *self.agent_options]

    # ------------------------------------------------------------------ public API
    def scale(self, n: int) -> list[PoolJob]:
        """Have ``n`` jobs: submit the missing ones, or stop the extra ones (pending ones first,
        then the nodes with the least work, each drained). Turns adaptive scaling off.

        Returns
        -------
        list of PoolJob
            The jobs submitted now (empty when scaling down).

        Raises
        ------
        PoolError
            The engine refused the jobs (the message names them and says why).
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"scale() takes a whole number of jobs >= 0, got {n!r}")
        with self._lock:
            self._adaptive = None
        return self._scale_to(n)

    def adapt(
        self,
        minimum: int = 0,
        maximum: int = 8,
        idle_timeout: float | str = "5min",
    ) -> None:
        """Grow and shrink with the cluster's demand, between ``minimum`` and ``maximum`` jobs.

        Tasks and actors waiting for resources that one of this pool's nodes has (a GPU task
        for a GPU pool, a CPU task for a CPU pool) make it submit jobs; it does not submit more
        while its jobs still wait in the engine's queue. A node with no running work and no
        actors for ``idle_timeout`` is drained and its job ended. :meth:`scale` turns it off.
        """
        if minimum < 0 or maximum < minimum:
            raise ValueError(f"need 0 <= minimum <= maximum, got {minimum}, {maximum}")
        idle = parse_duration(idle_timeout)
        assert idle is not None
        self._check_reachable()
        with self._lock:
            self._adaptive = {"minimum": int(minimum), "maximum": int(maximum), "idle": idle}
        self._ensure_monitor()
        self._tick()

    def status(self) -> list[PoolJob]:
        """Every job of this pool, oldest first (copies)."""
        with self._lock:
            return [replace(j) for j in self._jobs.values()]

    def refresh(self) -> list[PoolJob]:
        """Ask the engine and the head now (the monitor does it every ``poll_interval``)."""
        self._tick()
        return self.status()

    @property
    def adaptive(self) -> dict[str, Any] | None:
        """The :meth:`adapt` bounds in force (``None``: fixed size)."""
        with self._lock:
            return dict(self._adaptive) if self._adaptive else None

    def wait_for_nodes(self, n: int, timeout: float = 120.0) -> list[PoolJob]:
        """Block until ``n`` jobs joined the cluster; returns them.

        Raises
        ------
        PoolError
            Too many jobs failed for ``n`` to join (naming them and why), or ``timeout`` passed
            (with each job's state).
        """
        deadline = time.monotonic() + timeout
        self._ensure_monitor()
        while True:
            with self._lock:
                jobs = list(self._jobs.values())
            running = [j for j in jobs if j.state == JobState.RUNNING]
            if len(running) >= n:
                return [replace(j) for j in running]
            live = [j for j in jobs if j.state in (JobState.PENDING, JobState.RUNNING)]
            if len(live) < n:
                raise PoolError(
                    f"{self.name}: {n} node(s) wanted, {len(live)} job(s) live:\n" + self.summary()
                )
            left = deadline - time.monotonic()
            if left <= 0:
                raise PoolError(
                    f"{self.name}: {n} node(s) not joined after {timeout:.0f} s:\n" + self.summary()
                )
            self._tick()  # ask the head often while waiting: a join is seen within ~0.2 s
            with self._changed:
                self._changed.wait(min(left, self.poll_interval, 0.2))

    def close(self, wait: bool = True, timeout: float = 60.0) -> None:
        """End every job (drained first) and stop watching; idempotent.

        Parameters
        ----------
        wait
            Wait until the engine shows them gone (at most ``timeout`` s).
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._adaptive = None
            live = [j for j in self._jobs.values() if j.state != JobState.GONE]
        if getattr(self, "_atexit", None) is not None:
            atexit.unregister(self._atexit)
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10.0)
        if live:
            self._stop_jobs(live, "pool closed")
        if wait and live:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                self._tick(force=True)
                if all(j.state == JobState.GONE for j in self._jobs.values()):
                    break
                time.sleep(min(1.0, self.poll_interval))
            left = [j.job_id for j in self._jobs.values() if j.state != JobState.GONE]
            if left:
                log.warning("%s: jobs %s still listed after %.0f s", self.name, left, timeout)
        if self._token_file is not None and (not live or wait):
            with contextlib.suppress(OSError):
                self._token_file.unlink()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ display
    def summary(self) -> str:
        """One line per job: id, state, node, reason (plain text)."""
        lines = []
        for j in self.status():
            line = f"  {j.job_id:<14} {j.state.value:<9} {j.node_id or '-':<14} {j.host or ''}"
            if j.reason:
                line += f"  {j.reason}"
            if j.log_tail and j.state == JobState.GONE and not j.stop_requested:
                tail = "\n".join("      " + ln for ln in j.log_tail.splitlines()[-5:])
                line += f"\n{tail}"
            lines.append(line.rstrip())
        return "\n".join(lines) or "  (no jobs)"

    def counts(self) -> dict[str, int]:
        """Jobs per state (``{"pending": 1, "running": 2, ...}``)."""
        out = {s.value: 0 for s in JobState}
        for j in self.status():
            out[j.state.value] += 1
        return out

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready description (REST ``pools`` route, panel)."""
        return {
            "name": self.name,
            "pool_id": self.pool_id,
            "kind": self.kind,
            "describe": self._describe(),
            "lifetime": self.lifetime,
            "adaptive": self.adaptive,
            "closed": self._closed,
            "counts": self.counts(),
            "jobs": [j.as_dict() for j in self.status()],
        }

    def __repr__(self) -> str:
        c = self.counts()
        what = f" {self._describe()}" if self._describe() else ""
        return (
            f"<{type(self).__name__} {self.name}{what}: {c['running']} running, "
            f"{c['pending']} pending, {c['draining']} draining>"
        )

    def _repr_html_(self) -> str:
        rows = []
        for j in self.status():
            why = html.escape(j.reason)
            if j.log_tail and j.state == JobState.GONE and not j.stop_requested:
                why += f"<pre>{html.escape(j.log_tail[-1500:])}</pre>"
            rows.append(
                f"<tr><td><code>{html.escape(j.job_id)}</code></td><td>{j.state.value}</td>"
                f"<td><code>{html.escape(j.node_id or '')}</code></td>"
                f"<td>{html.escape(j.host)}</td><td>{why}</td></tr>"
            )
        head = (
            f"<b>{html.escape(type(self).__name__)}</b> <code>{html.escape(self.name)}</code> "
            f"{html.escape(self._describe())}"
        )
        if self._adaptive:
            a = self._adaptive
            head += f" (adaptive {a['minimum']}..{a['maximum']})"
        return (
            f"<div>{head}<table><tr><th>job</th><th>state</th><th>node</th><th>host</th>"
            f"<th>reason</th></tr>{''.join(rows)}</table></div>"
        )

    # ------------------------------------------------------------------ internals
    def _check_reachable(self) -> None:
        if self._checked_reachable:
            return
        if is_loopback(self.head_address) and self._leaves_this_host():
            raise ConfigurationError(
                f"{self.name}: " + LOOPBACK_HINT.format(address=self.head_address)
            )
        self._checked_reachable = True

    def _scale_to(self, n: int) -> list[PoolJob]:
        with self._lock:
            if self._closed:
                raise PoolError(f"{self.name} is closed")
            live = [
                j for j in self._jobs.values() if j.state in (JobState.PENDING, JobState.RUNNING)
            ]
        if n > len(live):
            self._check_reachable()
            added = self._add(n - len(live))
            self._ensure_monitor()
            return added
        if n < len(live):
            self._stop_jobs(self._victims(live, len(live) - n), "scaled down")
        self._ensure_monitor()
        return []

    def _add(self, count: int) -> list[PoolJob]:
        ids = self._submit(count)
        jobs = [PoolJob(str(i), JobState.PENDING) for i in ids]
        with self._changed:
            for j in jobs:
                self._jobs[j.job_id] = j
            self._changed.notify_all()
        log.info("%s: submitted %s", self.name, ", ".join(ids))
        return [replace(j) for j in jobs]

    def _victims(self, live: list[PoolJob], k: int) -> list[PoolJob]:
        idle = self._last_demand.get("idle") or {}
        # Pending jobs first (nothing runs there), newest first; then nodes idle the longest.
        pending = sorted(
            (j for j in live if j.state == JobState.PENDING), key=lambda j: -j.submitted_at
        )
        running = sorted(
            (j for j in live if j.state == JobState.RUNNING),
            key=lambda j: (-float(idle.get(j.node_id or "", -1.0)), -j.submitted_at),
        )
        return (pending + running)[:k]

    def _stop_jobs(self, jobs: Iterable[PoolJob], why: str) -> None:
        jobs = list(jobs)
        if not jobs:
            return
        with self._changed:
            for j in jobs:
                cur = self._jobs[j.job_id]
                cur.stop_requested = True
                cur.reason = why
                cur.state = JobState.DRAINING if cur.state == JobState.RUNNING else cur.state
            self._changed.notify_all()
        try:
            self._cancel([j.job_id for j in jobs])
        except Exception as exc:
            raise PoolError(
                f"{self.name}: could not stop {', '.join(j.job_id for j in jobs)}: {exc}"
            ) from exc

    def _ensure_monitor(self) -> None:
        with self._lock:
            if self._thread is not None or self._closed:
                return
            self._thread = threading.Thread(
                target=self._monitor, name=f"nbcluster-pool-{self.pool_id}", daemon=True
            )
            self._thread.start()

    def _monitor(self) -> None:
        while not self._stop.wait(self.poll_interval):
            try:
                self._tick()
            except Exception:  # a bug or a flaky engine command: say it and keep watching
                log.exception("%s: watching the jobs failed", self.name)

    def _tick(self, force: bool = False) -> None:
        """One look at the engine and the head; then one adaptive step (one at a time)."""
        with self._tick_lock:
            self._tick_once(force)

    def _tick_once(self, force: bool) -> None:
        with self._lock:
            if self._closed and not force:
                return
            watch = [j.job_id for j in self._jobs.values() if j.state != JobState.GONE]
        nodes = self._query("nodes") or []
        if watch:
            answer = self._poll(watch)
            self._update(watch, answer, nodes)
        if self._adaptive is not None and not self._closed:
            self._adapt_step()

    def _query(self, what: str) -> Any:
        try:
            return self._head.query(what)
        except Exception as exc:  # the driver disconnected: the engine still answers
            log.debug("%s: head query %s failed: %s", self.name, what, exc)
            return None

    def _update(
        self, watch: list[str], answer: Mapping[str, BackendStatus], nodes: list[dict[str, Any]]
    ) -> None:
        joined: dict[str, dict[str, Any]] = {}
        for n in nodes:
            labels = n.get("labels") or {}
            mine = labels.get(POOL_LABEL) == self.pool_id and labels.get(JOB_LABEL)
            # A job that rejoined as a new node: the alive one counts.
            if mine and (n.get("alive") or labels[JOB_LABEL] not in joined):
                joined[str(labels[JOB_LABEL])] = n
        failed: list[PoolJob] = []
        with self._changed:
            for job_id in watch:
                j = self._jobs[job_id]
                st = answer.get(job_id, BackendStatus(JobState.GONE, "no longer listed"))
                if st.host:
                    j.host = st.host
                node = joined.get(job_id)
                if st.state == JobState.GONE:
                    j.state = JobState.GONE
                    j.ended_at = time.time()
                    if not j.stop_requested:
                        j.reason = st.reason or "ended"
                        failed.append(j)
                    continue
                if node is not None and node.get("alive"):
                    if j.node_id is None:
                        j.joined_at = time.time()
                    j.node_id = str(node["node_id"])
                    if j.state == JobState.PENDING:
                        j.state = JobState.RUNNING
                        j.reason = ""
                elif node is not None and j.state == JobState.RUNNING:
                    # Its node left (drained on SIGTERM, walltime): the job is ending.
                    j.state = JobState.DRAINING
                    j.reason = j.reason or "its node left the cluster"
                elif j.state == JobState.PENDING:
                    j.reason = st.reason if st.state == JobState.PENDING else "starting the agent"
            self._changed.notify_all()
        for j in failed:
            tail = ""
            with contextlib.suppress(Exception):
                tail = self._log_tail(j.job_id)
            with self._lock:
                j.log_tail = tail
            log.warning("%s: job %s ended: %s", self.name, j.job_id, j.reason)

    def _adapt_step(self) -> None:
        a = self._adaptive
        if a is None:
            return
        demand = self._query("demand") or {}
        self._last_demand = demand
        offer = self.node_resources()
        with self._lock:
            live = [
                j for j in self._jobs.values() if j.state in (JobState.PENDING, JobState.RUNNING)
            ]
            waiting = [j for j in live if j.state == JobState.PENDING]
        need = nodes_needed(demand.get("pending") or [], offer)
        # Jobs still in the queue (or starting) are capacity on its way: no more until they join.
        grow = max(0, need - len(waiting))
        target = min(a["maximum"], max(a["minimum"], len(live) + grow))
        if target > len(live):
            try:
                self._add(target - len(live))
            except PoolError as exc:
                log.error("%s: adapt could not submit: %s", self.name, exc)
            return
        if need:
            return  # demand for our nodes: nothing is idle for long
        idle = demand.get("idle") or {}
        spare = len(live) - a["minimum"]
        victims = [
            j
            for j in live
            if j.state == JobState.RUNNING
            and j.node_id is not None
            and float(idle.get(j.node_id, -1.0)) >= a["idle"]
        ][: max(0, spare)]
        if victims:
            log.info("%s: releasing idle %s", self.name, ", ".join(j.job_id for j in victims))
            self._stop_jobs(victims, f"idle for {a['idle']:g} s")


def _closer(ref: weakref.ref[Pool]) -> Any:
    def close() -> None:
        pool = ref()
        if pool is not None:
            try:
                pool.close(wait=False)
            except Exception as exc:  # at exit: say it, the interpreter ends anyway
                log.error("%s: %s", pool.name, exc)

    return close
