"""Chaos testing: a seeded fault injector and a workload with exact answers, run together.

Like Ray's node-killer release tests and Dask's failed-worker tests: a real cluster
(:class:`~nbcluster.testing.cluster.ProcessCluster`: a head with a restart snapshot and node
agents) runs a steady workload while a :class:`FaultInjector` SIGKILLs workers, agents and the
head (restarting what it killed so the cluster keeps its size), kills actors, and cuts network
links. Then :func:`run_chaos` checks that

- every result is exact (each task's answer is known in advance),
- nothing hangs (every wait is bounded; a stuck result dumps what is outstanding and the logs),
- nothing leaks (processes, ``/dev/shm`` files, the driver's file descriptors and memory).

``tests/test_chaos.py`` runs short seeded versions in CI; ``benchmarks/chaos.py --minutes N`` is
the long run. The seed fixes which faults are injected when, which victims are picked and what
the workload submits; the timing of a run on a real machine is not replayable, so a seed gives
the same schedule, not necessarily the same failure.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import signal
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import psutil

import nbcluster as nb
from nbcluster.testing.chaos_workload import ChaosHang, Fault, Workload
from nbcluster.testing.cluster import Leaks, ProcessCluster

__all__ = [
    "FAULT_KINDS",
    "SEED_ENV",
    "ChaosConfig",
    "ChaosHang",
    "ChaosReport",
    "Fault",
    "FaultInjector",
    "LinkControl",
    "default_layout",
    "run_chaos",
    "seed_from_env",
]

#: Environment variable that sets the seed of a chaos run (to replay a failure).
SEED_ENV = "NBCLUSTER_CHAOS_SEED"

#: The kinds of fault, and what each does.
FAULT_KINDS: dict[str, str] = {
    "worker": "SIGKILL one worker process (of any node; actors' workers included)",
    "worker_burst": "SIGKILL all workers of one node (starting ones too), burst_kills times, "
    "every burst_gap_s",
    "agent": "SIGKILL a node agent (never the driver's node), start it again after agent_down_s",
    "head": "SIGKILL the head, start it again from its snapshot after head_down_s",
    "actor_kill": "nb.kill() a workload actor; a call on it afterwards must raise ActorDiedError",
    "link": "cut a host's network link for a time in link_cut_s, then heal it",
}


def seed_from_env() -> int:
    """The seed in ``$NBCLUSTER_CHAOS_SEED``, else a new random one (print it: it replays)."""
    raw = os.environ.get(SEED_ENV, "").strip()
    return int(raw) if raw else random.SystemRandom().randrange(1, 2**31)


@dataclass
class ChaosConfig:
    """What a chaos run does; the defaults are the realistic rates CI uses.

    Attributes
    ----------
    seed
        Fixes the fault schedule, the victims and the workload.
    duration_s
        How long faults are injected while the workload runs; then the outstanding work drains.
    faults
        Kinds of fault to inject (keys of :data:`FAULT_KINDS`), picked at random each time.
    interval_s
        Mean time between two faults (each gap is uniform in 0.5x..1.5x of it).
    nodes
        Node agents, the driver's own node (never killed: the driver uses its store) included.
    cpus_per_node
        ``--num-cpus`` of each agent.
    actors
        Workload actors (``max_restarts=-1``, ``max_task_retries=-1``).
    inflight
        Results outstanding at once.
    big_bytes
        Size range of the large results (stored in the object store).
    driver_reads_big
        Whether the driver ``get``s large results itself (needs a node on the driver's host);
        consumers tasks always read them.
    item_timeout_s
        Longest a result may take from submission; past it the run fails as a hang.
    drain_s
        Longest the final drain may take, overall.
    max_retries
        ``max_retries`` of the workload's tasks.
    agent_down_s, head_down_s
        How long a killed agent / the head stays down before it is started again.
    burst_kills, burst_gap_s
        Kills per ``worker_burst`` fault and the time between them.
    link_cut_s
        Range of how long a ``link`` fault keeps a link cut.
    rss_limit_mb, fd_slack
        Leak bounds: growth of the driver's RSS, and file descriptors left open, after shutdown.
    """

    seed: int = 1
    duration_s: float = 15.0
    faults: tuple[str, ...] = ("worker",)
    interval_s: float = 3.0
    nodes: int = 3
    cpus_per_node: int = 2
    actors: int = 2
    inflight: int = 12
    big_bytes: tuple[int, int] = (1 << 20, 10 << 20)
    driver_reads_big: bool = True
    item_timeout_s: float = 45.0
    drain_s: float = 90.0
    max_retries: int = 10
    agent_down_s: float = 3.0
    head_down_s: float = 1.0
    burst_kills: int = 6
    burst_gap_s: float = 0.05
    link_cut_s: tuple[float, float] = (2.0, 14.0)
    rss_limit_mb: float = 250.0
    fd_slack: int = 8

    def __post_init__(self) -> None:
        unknown = set(self.faults) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kind(s) {sorted(unknown)}; known: {list(FAULT_KINDS)}")


class LinkControl(Protocol):
    """Cuts and heals a host's network link (see ``tests/test_netns.py``)."""

    hosts: dict[str, str]

    def cut(self, host: str) -> None: ...
    def heal(self, host: str) -> None: ...


@dataclass
class ChaosReport:
    """The outcome of a chaos run; :meth:`violations` lists what breaks the rules."""

    seed: int
    config: ChaosConfig
    t0: float = 0.0  # monotonic time the run began (the workload's first submission)
    elapsed_s: float = 0.0
    done: Counter[str] = field(default_factory=Counter)
    faults: list[Fault] = field(default_factory=list)
    retries: int = 0
    reexecutions: int = 0
    wrong: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    error_details: list[str] = field(default_factory=list)
    expected_errors: int = 0
    hang: str = ""
    injector_errors: list[str] = field(default_factory=list)
    slowest_result: tuple[float, str] = (0.0, "")
    slowest_next_result: tuple[float, str] = (0.0, "")
    slowest_serving: tuple[float, str] = (0.0, "")
    leaks: Leaks = field(default_factory=Leaks)
    fd_delta: int = 0
    rss_delta_mb: float = 0.0
    rss_peak_mb: float = 0.0

    def violations(self) -> list[str]:
        """Every broken rule, one line each (empty: the run passed)."""
        out = [f"wrong result: {w}" for w in self.wrong]
        out += [f"error: {e}" for e in self.errors]
        if self.hang:
            out.append(f"hang: {self.hang.splitlines()[0]}")
        out += [f"injector: {e}" for e in self.injector_errors]
        out += [f"leaked process: {p}" for p in self.leaks.processes]
        out += [f"leaked /dev/shm file: {f}" for f in self.leaks.shm_files]
        if self.fd_delta > self.config.fd_slack:
            out.append(f"driver fds: {self.fd_delta} more than before the run")
        if self.rss_delta_mb > self.config.rss_limit_mb:
            out.append(f"driver RSS grew {self.rss_delta_mb:.0f} MB")
        return out

    def format(self) -> str:
        """A human summary (what ``benchmarks/chaos.py`` prints)."""
        kinds = Counter(f.kind for f in self.faults)
        lines = [
            f"chaos seed={self.seed} faults={','.join(self.config.faults)} "
            f"interval={self.config.interval_s}s ran {self.elapsed_s:.1f}s",
            f"  tasks done:        {sum(self.done.values())} ({_counts(self.done)})",
            f"  faults injected:   {len(self.faults)} ({_counts(kinds)})",
            f"  retries:           {self.retries} (driver log); re-executions: "
            f"{self.reexecutions} (retries + lineage rebuilds + actor replays)",
            f"  wrong results:     {len(self.wrong)}",
            f"  errors:            {len(self.errors)} (+{self.expected_errors} expected "
            "ActorDiedError after kill)",
            f"  slowest result:    {_slow(self.slowest_result)}",
            f"  slowest recovery:  {_slow(self.slowest_next_result)} to the next result; "
            f"{_slow(self.slowest_serving)} to serving again",
            f"  leaks:             {len(self.leaks.processes)} process(es), "
            f"{len(self.leaks.shm_files)} /dev/shm file(s), driver fds {self.fd_delta:+d}, "
            f"driver RSS {self.rss_delta_mb:+.0f} MB (peak {self.rss_peak_mb:.0f} MB)",
        ]
        if self.faults:
            lines.append("  fault timeline (s since the run began, time the injection took):")
            for f in self.faults[-40:]:
                lines.append(
                    f"    +{f.at - self.t0:6.1f}s {f.kind:<12} {f.victim} ({f.done - f.at:.1f}s)"
                    + (f" {f.note}" if f.note else "")
                )
        for v in self.violations():
            lines.append(f"  VIOLATION {v}")
        if self.error_details:
            lines.append("  first errors in full:")
            lines += self.error_details
        if self.hang:
            lines.append(self.hang)
        return "\n".join(lines)


def _counts(c: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "-"


def _slow(s: tuple[float, str]) -> str:
    return f"{s[0]:.1f}s ({s[1]})" if s[1] else "-"


class _DriverLog(logging.Handler):
    """Counts the driver's retry messages and keeps the last ones for a hang report."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.retries = 0
        self.tail: deque[str] = deque(maxlen=40)

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "retrying" in msg or "running it elsewhere" in msg:
            self.retries += 1
        self.tail.append(f"{time.strftime('%H:%M:%S')} {record.levelname} {msg}")


# ====================================================================== fault injection
class FaultInjector(threading.Thread):
    """Injects faults of ``config.faults`` at seeded random times until :meth:`stop`.

    Faults on processes run in this thread (a killed agent or head is started again before the
    next fault). Faults that need the driver's API (``actor_kill``) are handed to the workload
    loop through ``requests``, since it owns the driver's client.
    """

    def __init__(
        self,
        config: ChaosConfig,
        cluster: ProcessCluster,
        killable: Sequence[str],
        link: LinkControl | None,
        requests: queue.Queue[str],
    ) -> None:
        super().__init__(name="chaos-injector", daemon=True)
        self.config = config
        self.cluster = cluster
        self.killable = list(killable)
        self.link = link
        self.requests = requests
        self.rng = random.Random(config.seed)
        self.faults: list[Fault] = []
        self.errors: list[str] = []
        self._halt = threading.Event()

    def stop(self, timeout: float = 120.0) -> None:
        """Stop after the fault in progress (a killed process is started again first)."""
        if self._halt.is_set():
            return
        self._halt.set()
        if self.ident is not None:
            self.join(timeout)
        if self.is_alive():
            self.errors.append(f"the injector did not finish its last fault within {timeout} s")

    def run(self) -> None:
        while not self._halt.wait(self.config.interval_s * self.rng.uniform(0.5, 1.5)):
            kind = self.rng.choice(self.config.faults)
            try:
                self.inject(kind)
            except Exception as exc:  # a restart that failed: the run must say so
                self.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
                return

    def inject(self, kind: str) -> None:
        """Inject one fault of ``kind`` now."""
        if kind == "actor_kill":
            self.requests.put(kind)
            return
        method: Callable[[], None] = getattr(self, f"_{kind}")
        method()

    def _record(self, kind: str, victim: str, at: float, note: str = "") -> Fault:
        f = Fault(kind, victim, at, time.monotonic(), note)
        self.faults.append(f)
        return f

    def _worker(self) -> None:
        pids = sorted(self.cluster.worker_pids())
        if not pids:
            return
        pid = self.rng.choice(pids)
        at = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self._record("worker", f"pid {pid}", at)

    def _worker_burst(self) -> None:
        # Every round kills all of the node's workers, those still starting included (a worker
        # that dies before its ready line takes another path through the agent and the head).
        name = self.rng.choice(sorted(self.cluster.agents))
        at = time.monotonic()
        killed: set[int] = set()
        for _ in range(self.config.burst_kills):
            for pid in self.cluster.worker_pids(name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            time.sleep(self.config.burst_gap_s)
        self._record("worker_burst", f"node {name}", at, f"{len(killed)} worker(s) killed")

    def _agent(self) -> None:
        if not self.killable:
            return
        name = self.rng.choice(self.killable)
        at = time.monotonic()
        self.cluster.kill_agent(name)
        time.sleep(self.config.agent_down_s)
        node_id = self.cluster.restart_agent(name)
        self._record("agent", f"node {name}", at, f"back as {node_id}")

    def _head(self) -> None:
        at = time.monotonic()
        self.cluster.kill_head()
        time.sleep(self.config.head_down_s)
        self.cluster.start_head()
        self._record("head", "head", at)

    def _link(self) -> None:
        if self.link is None:
            raise RuntimeError("a link fault needs a LinkControl (network namespaces)")
        host = self.rng.choice(sorted(self.link.hosts))
        cut_s = self.rng.uniform(*self.config.link_cut_s)
        at = time.monotonic()
        self.link.cut(host)
        try:
            time.sleep(cut_s)
        finally:
            self.link.heal(host)
        self._record("link", f"host {host}", at, f"cut {cut_s:.1f}s")


# ====================================================================== one run
def default_layout(config: ChaosConfig) -> Callable[[ProcessCluster], list[str]]:
    """Start ``config.nodes`` agents; the first carries this host's name (the driver's node).

    Returns the names of the nodes that may be killed (all but the driver's).
    """

    def layout(cluster: ProcessCluster) -> list[str]:
        flags = ("--num-cpus", str(config.cpus_per_node), "--prestart", "1")
        cluster.join(socket.gethostname(), *flags)
        names = [f"chaos{i}" for i in range(1, config.nodes)]
        for name in names:
            cluster.join(name, *flags)
        return names

    return layout


def _recoveries(
    faults: list[Fault], completions: list[tuple[float, float]], t0: float
) -> tuple[tuple[float, str], tuple[float, str]]:
    """Slowest (fault to the next result, fault to a result of work submitted after it)."""
    nxt: tuple[float, str] = (0.0, "")
    serving: tuple[float, str] = (0.0, "")
    for f in faults:
        label = f"{f.kind} {f.victim} at +{f.at - t0:.1f}s"
        after = [d for _, d in completions if d > f.at]
        if after and min(after) - f.at > nxt[0]:
            nxt = (min(after) - f.at, label)
        fresh = [d for s, d in completions if s >= f.at]
        if fresh and min(fresh) - f.at > serving[0]:
            serving = (min(fresh) - f.at, label)
    return nxt, serving


def run_chaos(
    config: ChaosConfig,
    workdir: Path,
    *,
    layout: Callable[[ProcessCluster], list[str]] | None = None,
    link: LinkControl | None = None,
    host: str = "127.0.0.1",
    progress: Callable[[str], None] | None = None,
    progress_every_s: float = 30.0,
) -> ChaosReport:
    """Start a cluster in ``workdir``, run the workload under faults, stop it, check for leaks.

    Parameters
    ----------
    config
        What to inject and how hard.
    workdir
        An empty folder for logs, the token and the head's snapshot.
    layout
        Starts the node agents on a cluster whose head runs; returns the names of the nodes the
        injector may kill (default: :func:`default_layout`).
    link
        Cuts and heals hosts' links, for ``link`` faults.
    host
        Address the head binds.
    progress
        Called with a one-line status every ``progress_every_s`` while faults are injected.

    Returns
    -------
    ChaosReport
        Never raises for what the cluster did wrong: see :meth:`ChaosReport.violations`.
    """
    report = ChaosReport(config.seed, config)
    me = psutil.Process()
    nb.shutdown()
    fds0, rss0 = me.num_fds(), me.memory_info().rss
    cluster = ProcessCluster(workdir, host=host)
    handler = _DriverLog()
    logger = logging.getLogger("nbcluster")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    requests: queue.Queue[str] = queue.Queue()
    injector: FaultInjector | None = None
    work: Workload | None = None
    peak = [rss0]

    def context() -> list[str]:
        return ["driver log:", *(f"  {m}" for m in handler.tail), cluster.log_tail(2500)]

    start = time.monotonic()
    try:
        cluster.start_head()
        killable = (layout or default_layout(config))(cluster)
        nb.init(address=cluster.address, token_file=str(cluster.token_file))
        work = Workload(config, workdir / "runs", requests, context)
        work.start()
        injector = FaultInjector(config, cluster, killable, link, requests)
        work.injector_faults = injector.faults
        injector.start()
        end = time.monotonic() + config.duration_s
        next_note = time.monotonic() + progress_every_s
        while time.monotonic() < end:
            work.run(min(end, time.monotonic() + 1.0))
            peak.append(me.memory_info().rss)
            if progress is not None and time.monotonic() >= next_note:
                next_note += progress_every_s
                progress(
                    f"+{time.monotonic() - start:.0f}s: {sum(work.done.values())} done, "
                    f"{len(injector.faults) + len(work.faults)} faults, "
                    f"{len(work.wrong)} wrong, {len(work.errors)} errors"
                )
        injector.stop()
        work.drain()
        work.probe_nodes(sorted(cluster.agents))
    except ChaosHang as exc:
        report.hang = str(exc)
    finally:
        if injector is not None:
            injector.stop()
            report.faults = list(injector.faults)
            report.injector_errors = list(injector.errors)
        report.elapsed_s = time.monotonic() - start
        if work is not None:
            _fill(report, work)
        nb.shutdown()
        cluster.close()
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    report.retries = handler.retries
    report.reexecutions = _reexecutions(workdir / "runs")
    report.leaks = cluster.leaks()
    cluster.purge()
    report.fd_delta = me.num_fds() - fds0
    rss = me.memory_info().rss
    report.rss_delta_mb = (rss - rss0) / 2**20
    report.rss_peak_mb = max([*peak, rss]) / 2**20
    return report


def _fill(report: ChaosReport, work: Workload) -> None:
    report.t0 = work.t0
    report.faults = sorted([*report.faults, *work.faults], key=lambda f: f.at)
    report.done = work.done
    report.wrong = work.wrong
    report.errors = work.errors
    report.error_details = work.error_details
    report.expected_errors = work.expected_errors
    report.slowest_result = work.slowest
    report.slowest_next_result, report.slowest_serving = _recoveries(
        report.faults, work.completions, work.t0
    )


def _reexecutions(runs: Path) -> int:
    """Task and actor-call executions beyond the first of each."""
    try:
        tags = [line.split()[0] for line in runs.read_text().splitlines() if line.strip()]
    except OSError:
        return 0
    return len(tags) - len(set(tags))
