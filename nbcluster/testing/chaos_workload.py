"""The chaos workload: tasks whose answers are known in advance, submitted and checked.

Used by :mod:`nbcluster.testing.chaos`. Each task's answer follows from ``(seed, key)``, so the
driver knows every answer before it asks: small tasks, large results (stored in the object
store), tasks that consume large results of earlier tasks, and actor calls. Each execution
appends a line to a ``runs`` file, which counts re-executions (retries, lineage rebuilds, actor
replays).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import random
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nbcluster as nb

if TYPE_CHECKING:
    from nbcluster.testing.chaos import ChaosConfig


# ====================================================================== the workload's tasks
def payload(seed: int, key: int, nbytes: int) -> bytes:
    """The bytes a task with ``key`` produces: fixed by ``(seed, key, nbytes)``."""
    return random.Random(seed * 1_000_003 + key).randbytes(nbytes)


def digest(data: bytes | memoryview) -> str:
    """SHA-256 of ``data``, in hex."""
    return hashlib.sha256(data).hexdigest()


def _note_run(runs: str, tag: str) -> None:
    # One short appended line per execution (O_APPEND: atomic), to count re-executions.
    with open(runs, "a") as f:
        f.write(f"{tag} {os.getpid()}\n")


@nb.remote
def chaos_small(runs: str, seed: int, key: int, work_s: float) -> str:
    """A small task: the digest of its payload, after ``work_s`` of work."""
    _note_run(runs, f"small:{key}")
    time.sleep(work_s)
    return digest(payload(seed, key, 4096))


@nb.remote
def chaos_big(runs: str, seed: int, key: int, nbytes: int, work_s: float) -> bytes:
    """A large result (stored in the node's object store)."""
    _note_run(runs, f"big:{key}")
    time.sleep(work_s)
    return payload(seed, key, nbytes)


@nb.remote
def chaos_consume(runs: str, key: int, data: bytes, work_s: float = 0.0) -> str:
    """Reads a large result of an earlier task (passed as a ref): its digest."""
    _note_run(runs, f"consume:{key}")
    time.sleep(work_s)
    return digest(data)


class _ChaosActor:
    """An actor whose answers depend only on its constructor's arguments and the call's key."""

    def __init__(self, seed: int, salt: int) -> None:
        self.seed = seed
        self.salt = salt

    def compute(self, runs: str, key: int) -> str:
        _note_run(runs, f"actor:{key}")
        return digest(payload(self.seed, self.salt * 7919 + key, 4096))


#: The actor class (restarted on any failure; its calls are retried).
ChaosActor: Any = nb.remote(max_restarts=-1, max_task_retries=-1)(_ChaosActor)


# ====================================================================== records
@dataclass
class Fault:
    """One injected fault: what, to whom, when (monotonic), and how long the injection took."""

    kind: str
    victim: str
    at: float
    done: float = 0.0
    note: str = ""


@dataclass
class Item:
    """One submitted piece of work and its known answer."""

    kind: str
    key: int
    ref: nb.ObjectRef
    expected: str | None  # digest; None: only that it completes (a big result not read here)
    submitted: float
    actor: int | None = None
    may_die: bool = False  # a call on an actor that was killed: ActorDiedError is right
    must_die: bool = False  # submitted after the kill: only ActorDiedError is right


# ====================================================================== the workload
class ChaosHang(Exception):
    """A result did not arrive in time; the message says what was outstanding."""


class Workload:
    """Keeps ``config.inflight`` results outstanding and checks each one as it arrives.

    Mix: small tasks, large results (1-10 MB, in the object store), tasks that consume the large
    results of earlier tasks (lineage rebuilds them when their node died), and actor calls.
    Runs in the driver's main thread, which owns the client.
    """

    def __init__(
        self,
        config: ChaosConfig,
        runs: Path,
        requests: queue.Queue[str],
        context: Callable[[], list[str]],
    ) -> None:
        self.config = config
        self.runs = str(runs)
        self.context = context  # the driver's log and the cluster's logs, for a hang report
        self.t0 = time.monotonic()
        self.requests = requests
        self.rng = random.Random(config.seed * 7 + 1)
        self.pending: dict[nb.ObjectRef, Item] = {}
        self.recent_big: deque[tuple[int, int, nb.ObjectRef]] = deque(maxlen=4)
        self.actors: list[Any] = []
        self.salts: list[int] = []
        self.next_key = 0
        self.done: Counter[str] = Counter()
        self.completions: list[tuple[float, float]] = []  # (submitted, done)
        self.wrong: list[str] = []
        self.errors: list[str] = []
        self.error_details: list[str] = []  # the full text of the first few errors
        self.expected_errors = 0
        self.slowest: tuple[float, str] = (0.0, "")
        self.faults: list[Fault] = []  # the ones this loop injects (actor_kill)
        self.injector_faults: list[Fault] = []  # the injector's, for a hang report

    # ------------------------------------------------------------------ submitting
    def _key(self) -> int:
        self.next_key += 1
        return self.next_key

    def _new_actor(self, i: int | None = None) -> None:
        salt = self._key()
        a = ChaosActor.remote(self.config.seed, salt)
        if i is None:
            self.actors.append(a)
            self.salts.append(salt)
        else:
            self.actors[i] = a
            self.salts[i] = salt

    def start(self) -> None:
        """Create the actors and wait until each answers once (the cluster is up)."""
        for _ in range(self.config.actors):
            self._new_actor()
        for i in range(len(self.actors)):
            self._submit_actor(i)
        self._collect_all(time.monotonic() + self.config.item_timeout_s)

    def _add(self, item: Item) -> None:
        self.pending[item.ref] = item

    def _submit_actor(self, i: int) -> None:
        key = self._key()
        ref = self.actors[i].compute.remote(self.runs, key)
        want = digest(payload(self.config.seed, self.salts[i] * 7919 + key, 4096))
        self._add(Item("actor", key, ref, want, time.monotonic(), actor=i))

    def _submit_one(self) -> None:
        cfg, rng = self.config, self.rng
        opts = {"max_retries": cfg.max_retries}
        work_s = rng.uniform(0.0, 0.2)
        r = rng.random()
        key = self._key()
        now = time.monotonic()
        if r < 0.4 or (r < 0.6 and not self.recent_big):
            ref = chaos_small.options(**opts).remote(self.runs, cfg.seed, key, work_s)
            self._add(Item("small", key, ref, digest(payload(cfg.seed, key, 4096)), now))
        elif r < 0.6:
            bkey, nbytes, big = rng.choice(self.recent_big)
            ref = chaos_consume.options(**opts).remote(self.runs, key, big, work_s)
            self._add(Item("consume", key, ref, digest(payload(cfg.seed, bkey, nbytes)), now))
        elif r < 0.8 and self.actors:
            self._submit_actor(rng.randrange(len(self.actors)))
        else:
            nbytes = rng.randint(*cfg.big_bytes)
            ref = chaos_big.options(**opts).remote(self.runs, cfg.seed, key, nbytes, work_s)
            want = digest(payload(cfg.seed, key, nbytes)) if cfg.driver_reads_big else None
            self._add(Item("big", key, ref, want, now))
            self.recent_big.append((key, nbytes, ref))

    def _kill_actor(self) -> None:
        if not self.actors:
            return
        i = self.rng.randrange(len(self.actors))
        victim = self.actors[i]
        at = time.monotonic()
        for item in self.pending.values():
            if item.actor == i:
                item.may_die = True  # in flight when killed: a result or ActorDiedError
                item.actor = None
        nb.kill(victim)
        key = self._key()
        ref = victim.compute.remote(self.runs, key)
        self._add(Item("after_kill", key, ref, None, time.monotonic(), must_die=True))
        self._new_actor(i)
        self.faults.append(Fault("actor_kill", f"actor {self.salts[i]}", at, time.monotonic()))

    # ------------------------------------------------------------------ checking
    def _check(self, item: Item) -> None:
        del self.pending[item.ref]
        # With when it was submitted, in seconds since the run began (errors add when it ended).
        name = f"{item.kind}:{item.key} (submitted +{item.submitted - self.t0:.1f}s)"
        try:
            if item.expected is None and not item.must_die:
                value: Any = None  # a big result this driver does not read: consumers check it
            else:
                left = item.submitted + self.config.item_timeout_s - time.monotonic()
                value = nb.get(item.ref, timeout=max(1.0, left))
        except nb.exceptions.GetTimeoutError:
            self.pending[item.ref] = item
            raise ChaosHang(self.dump(f"get({name}) timed out")) from None
        except nb.exceptions.ActorDiedError as exc:
            if item.may_die or item.must_die:
                self.expected_errors += 1
            else:
                self.errors.append(f"{self._now()} {name}: {_first_line(exc)}")
            self._completed(item)
            return
        except Exception as exc:
            self.errors.append(f"{self._now()} {name}: {type(exc).__name__}: {_first_line(exc)}")
            if len(self.error_details) < 3:
                self.error_details.append(f"{name}: {type(exc).__name__}: {exc}")
            self._completed(item)
            return
        if item.must_die:
            self.wrong.append(
                f"{self._now()} {name}: a call on a killed actor returned {value!r:.40}"
            )
        elif item.expected is not None:
            got = digest(value) if item.kind == "big" else value
            if got != item.expected:
                self.wrong.append(
                    f"{self._now()} {name}: got {got!r:.20}, expected {item.expected:.16}"
                )
        self._completed(item)

    def _now(self) -> str:
        return f"+{time.monotonic() - self.t0:.1f}s"

    def _completed(self, item: Item) -> None:
        now = time.monotonic()
        self.done[item.kind.split("[")[0]] += 1
        self.completions.append((item.submitted, now))
        took = now - item.submitted
        if took > self.slowest[0]:
            self.slowest = (took, f"{item.kind}:{item.key}")

    def _collect(self, timeout: float) -> None:
        if not self.pending:
            return
        ready, _ = nb.wait(list(self.pending), num_returns=1, timeout=timeout)
        for ref in ready:
            self._check(self.pending[ref])
        now = time.monotonic()
        late = [i for i in self.pending.values() if now - i.submitted > self.config.item_timeout_s]
        if late:
            raise ChaosHang(self.dump(f"{len(late)} result(s) older than the item timeout"))

    def _collect_all(self, deadline: float) -> None:
        while self.pending:
            if time.monotonic() > deadline:
                raise ChaosHang(self.dump("the drain did not finish in time"))
            self._collect(0.5)

    def run(self, until: float) -> None:
        """Submit and check work until ``until`` (monotonic), serving driver-side faults."""
        while time.monotonic() < until:
            with contextlib.suppress(queue.Empty):
                if self.requests.get_nowait() == "actor_kill":
                    self._kill_actor()
            while len(self.pending) < self.config.inflight:
                self._submit_one()
            self._collect(0.5)

    def drain(self) -> None:
        """Wait for every outstanding result (bounded by ``config.drain_s``)."""
        self._collect_all(time.monotonic() + self.config.drain_s)

    def probe_nodes(self, names: list[str]) -> None:
        """Run a task on each node named in ``names``: every node is back and still serves.

        Catches a node left unable to run work (e.g. with no workers), which the rest of the
        cluster would hide, and a node that never came back.
        """
        cfg = self.config
        deadline = time.monotonic() + cfg.item_timeout_s
        alive: dict[str, str] = {}
        while True:  # a node cut off a moment ago may still be joining again
            with contextlib.suppress(Exception):
                alive = {n["name"]: n["node_id"] for n in nb.nodes() if n["alive"]}
            if set(names) <= set(alive) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        for name in sorted(names):
            if name not in alive:
                self.errors.append(f"node {name} is not alive at the end of the run")
                continue
            key = self._key()
            where = nb.NodeAffinitySchedulingStrategy(alive[name], soft=False)
            ref = chaos_small.options(scheduling_strategy=where).remote(self.runs, cfg.seed, key, 0)
            want = digest(payload(cfg.seed, key, 4096))
            self._add(Item(f"probe[{name}]", key, ref, want, time.monotonic()))
        self._collect_all(time.monotonic() + cfg.item_timeout_s + 5.0)

    # ------------------------------------------------------------------ reports
    def dump(self, why: str) -> str:
        """What is outstanding, the recent faults, and the context (logs)."""
        now = time.monotonic()
        lines = [f"{why} at +{now - self.t0:.1f}s; seed {self.config.seed}; outstanding:"]
        for item in sorted(self.pending.values(), key=lambda i: i.submitted):
            lines.append(
                f"  {item.kind}:{item.key} {item.ref!r} submitted {now - item.submitted:.1f}s ago"
                + (f" actor {item.actor}" if item.actor is not None else "")
            )
        faults = sorted([*self.injector_faults, *self.faults], key=lambda f: f.at)[-12:]
        lines.append("recent faults:")
        lines += [f"  +{f.at - self.t0:.1f}s {f.kind} {f.victim} {f.note}" for f in faults]
        lines += self.context()
        return "\n".join(lines)


def _first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message and, for a remote traceback, its last line."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return text[:400]
