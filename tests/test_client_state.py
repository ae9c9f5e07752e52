"""The client's pure state: events in, instructions out, invariants after every event.

``ClientState`` is driven here without sockets or threads: a ``Sim`` plays the head, the
workers, the other owners and the timers, answering the instructions the state returns. The
refs are real ``ObjectRef`` objects of a ``CoreClient`` that never connects.
"""

from __future__ import annotations

import concurrent.futures
import gc
import random
from typing import Any

import msgpack
import pytest

from nbcluster.client import events as task_events
from nbcluster.client.commands import (
    CallActor,
    CancelTask,
    CountActorHandle,
    CreateActor,
    FetchObject,
    KillActor,
    StreamConsumed,
    SubmitTask,
)
from nbcluster.client.core import CoreClient
from nbcluster.client.inputs import (
    ActorStateChanged,
    Event,
    FlushTaskEvents,
    LeaseFailed,
    LeaseGranted,
    LeaseLost,
    NodeDied,
    ObjectArrived,
    ObjectRequested,
    Rejoined,
    Released,
    StreamItemArrived,
    TaskOutput,
    TaskResult,
    TasksStolen,
)
from nbcluster.client.instructions import (
    AwaitReply,
    CancelOnWorker,
    CloseWorker,
    Instruction,
    OpenWorker,
    ReplyObject,
    ShowOutput,
    StartTimer,
    ToControl,
    ToHead,
    ToOwner,
    ToWorker,
)
from nbcluster.client.leasing import request_cap
from nbcluster.client.objects import FAILED, PENDING, READY
from nbcluster.client.state import ClientState
from nbcluster.client.streams import DYNAMIC, STREAMING, StreamBuffer
from nbcluster.client.tasks import TaskRecord
from nbcluster.client.workers import WorkerConn
from nbcluster.exceptions import TaskCancelledError, WorkerCrashedError
from nbcluster.protocol.messages import ALIVE, DEAD, RESTARTING, Kind
from nbcluster.refs import ObjectRef
from nbcluster.serialization import dumps, loads
from nbcluster.store.client import MARKER

ME = "tcp://127.0.0.1:1"
OTHER = "tcp://127.0.0.1:2"
SHAPE = {"CPU": 1.0}


def stored(store: str, n: int = 1) -> list[Any]:
    """A stored value's frames: a marker naming the store that holds it."""
    return [MARKER + msgpack.packb({"store": store, "size": 100 * n, "oid": f"o{n}"})]


class Sim:
    """Plays everyone around one ``ClientState``: head, workers, owners and timers."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.client = CoreClient("127.0.0.1:1", "token")
        self.state = ClientState(self.client.objects, ME, self.client, node_id="n1")
        self.now = 0.0
        self.timers: list[tuple[float, Event]] = []  # (due, event)
        self.requests: dict[int, dict[str, Any]] = {}  # outstanding lease requests
        self.open: set[WorkerConn] = set()
        self.sent: dict[WorkerConn, list[dict[str, Any]]] = {}  # tasks on each worker, in order
        self.fetches: list[str] = []  # GET_OBJECT we sent, unanswered
        self.replies: list[tuple[bytes, dict[str, Any]]] = []  # our answers to GET_OBJECT
        self.creations: list[int] = []  # ACTOR_CREATE rids
        self.shown: list[str] = []
        self.held: list[ObjectRef] = []  # what the "user" holds
        self.workers = 0
        self.ids = 0
        self.steals: list[tuple[WorkerConn, list[str]]] = []  # STEALs no worker answered yet

    # ------------------------------------------------------------------ plumbing
    def feed(self, event: Event) -> list[Instruction]:
        self.now += 0.01
        out = self.state.handle(event, self.now)
        self.carry_out(out)
        self.state.validate_state()
        return out

    def carry_out(self, out: list[Instruction]) -> None:
        for ins in out:
            match ins:
                case ToHead(header):
                    k = header["k"]
                    if k == Kind.LEASE_REQUEST:
                        assert header["rid"] not in self.requests
                        self.requests[header["rid"]] = header
                    elif k == Kind.LEASE_CANCEL:
                        self.requests.pop(header["rid"], None)
                    elif k == Kind.ACTOR_CREATE:
                        self.creations.append(header["rid"])
                case OpenWorker(conn):
                    assert conn not in self.open
                    self.open.add(conn)
                    self.sent[conn] = []
                case CloseWorker(conn):
                    self.open.discard(conn)
                case ToWorker(conn, header):
                    assert conn in self.open, f"{header['k']} sent to a closed worker"
                    self.sent[conn].append(header)
                case CancelOnWorker(conn):
                    assert conn in self.open, "CANCEL sent to a closed worker"
                case ToControl(conn, header):
                    assert conn in self.open and header["k"] == Kind.STEAL
                    self.steals.append((conn, header["tids"]))
                case StartTimer(delay, event):
                    self.timers.append((self.now + delay, event))
                case ToOwner(owner, header):
                    assert owner != ME, "we never ask ourselves"
                    if header["k"] == Kind.GET_OBJECT:
                        self.fetches.append(header["oid"])
                case ReplyObject(ident, header):
                    self.replies.append((ident, header))
                case ShowOutput(_, text):
                    self.shown.append(text)
                case AwaitReply():
                    pass

    def new_id(self) -> str:
        self.ids += 1
        return f"t{self.ids}"

    def record(
        self, deps: list[ObjectRef], nret: int = 1, retries: int = 1, gen: int = 0
    ) -> TaskRecord:
        tid = self.new_id()
        if gen:
            nret = 1
        return_ids = [f"{tid}.{i}" for i in range(max(nret, 1))]
        refs = [ObjectRef(oid, ME, self.client) for oid in return_ids]
        self.held.extend(refs)
        rec = TaskRecord(
            tid=tid,
            name=f"f{tid}",
            fn_id="fn1",
            fn_blob=b"fn",
            args=[b"args"],
            deps=list(deps),
            return_ids=return_ids,
            shape=dict(SHAPE),
            shape_key=tuple(sorted(SHAPE.items())),
            max_retries=retries,
            retry_exceptions=False,
            nret=nret,
        )
        if gen:
            rec.gen, rec.bp = gen, 2 if gen == STREAMING else 0
            rec.stream = StreamBuffer(tid, gen, rec.bp)
        return rec

    def item(self, conn: WorkerConn, rec: TaskRecord, index: int | None = None) -> None:
        """The worker of ``rec`` yields its next value (or item ``index`` again)."""
        buf = rec.stream
        assert buf is not None
        i = len(buf.items) if index is None else index
        self.feed(StreamItemArrived(conn, rec.tid, i, [], dumps(i)))

    def take(self, rec: TaskRecord) -> None:
        """The consumer takes the next item, as ``ObjectRefGenerator`` does."""
        buf = rec.stream
        assert buf is not None
        oid, _ = buf.take(0)
        if oid is None:
            return
        self.held.append(ObjectRef(oid, ME, self.client))
        self.client.remove_local_ref(oid)
        if buf.backpressure:
            self.feed(StreamConsumed(rec.tid, buf.taken))

    def borrowed(self) -> ObjectRef:
        ref = ObjectRef(f"b{self.new_id()}.0", OTHER, self.client, borrowed=True)
        self.held.append(ref)
        return ref

    def grant(self, rid: int, addr: str | None = None) -> None:
        self.requests.pop(rid, None)
        self.workers += 1
        wid = f"w{self.workers}"
        addr = addr or f"tcp://w{self.workers}"
        self.feed(
            LeaseGranted(rid, f"L{wid}", wid, addr, addr + "c", 1, "n1", "node1", [], dict(SHAPE))
        )

    def running(self) -> list[tuple[WorkerConn, TaskRecord]]:
        """Tasks on a leased worker now."""
        out = []
        for lease in self.state.leasing.leases.values():
            for rec in lease.inflight:
                out.append((lease.conn, rec))
        return out

    def result(
        self,
        conn: WorkerConn,
        rec: TaskRecord,
        *,
        ok: bool = True,
        store: str = "",
        lost: Any = None,
    ) -> None:
        n = max(rec.nret, 1)
        if ok:
            one = stored(store) if store else dumps(rec.tid)
            payload, counts = one * n, [len(one)] * n
        else:
            payload, counts = dumps(RuntimeError("boom")), []
        self.feed(TaskResult(conn, rec.tid, ok, counts, None, lost, [], [], payload))

    def answer_steal(self, i: int) -> None:
        """The worker of STEAL ``i`` gives back the asked tasks it has not started (all but
        the first it was sent: it runs them in order)."""
        conn, tids = self.steals.pop(i)
        lease = conn.lease
        if lease is None or conn not in self.open:
            return  # the worker is gone: nobody answers
        waiting = {rec.tid for rec in list(lease.inflight)[1:]}
        back = [t for t in tids if t in waiting]
        if back:
            self.feed(TasksStolen(conn, back))

    def fire_timers(self) -> None:
        """Fire timers, each at its time (the clock moves on to it), until none is left (a
        timer may set another: a lease used since it was armed lingers on)."""
        for _ in range(100):
            if not self.timers:
                return
            self.timers.sort(key=lambda t: t[0])
            due, ev = self.timers.pop(0)
            self.now = max(self.now, due)
            self.feed(ev)
        raise AssertionError(f"timers keep setting timers: {self.timers}")

    def release(self, k: int) -> None:
        for _ in range(min(k, len(self.held))):
            self.held.pop(self.rng.randrange(len(self.held)))
        gc.collect()
        released = self.client.io.released
        oids = [released.popleft() for _ in range(len(released))]
        if oids:
            self.feed(Released(oids))

    def settle(self, rounds: int = 200) -> None:
        """Answer everything until no task is left: every task must finish."""
        for _ in range(rounds):
            if not self.state.tasks.by_tid and not self.timers:
                return
            for lease in list(self.state.leasing.leases.values()):
                if lease.conn.closed:  # another worker took its address: this one died
                    self.feed(LeaseLost(lease.lease_id, "exited with code 1"))
            for rid in list(self.requests):
                self.grant(rid)
            for conn, rec in self.running():
                self.result(conn, rec)
            for oid in list(self.fetches):
                self.fetches.remove(oid)
                self.feed(ObjectArrived(OTHER, oid, True, False, dumps(oid)))
            for aid, ar in list(self.state.actors.actors.items()):
                if ar.conn is not None and ar.conn.closed:  # its worker died
                    self.feed(ActorStateChanged(aid, RESTARTING, reason="exited with code 1"))
                if ar.state not in (ALIVE, DEAD):
                    self.feed(ActorStateChanged(aid, ALIVE, addr=f"tcp://actor-{aid}"))
                for rec in list(ar.inflight.values()):
                    assert ar.conn is not None
                    self.result(ar.conn, rec)
            self.fire_timers()
        raise AssertionError(f"tasks never finished: {list(self.state.tasks.by_tid)}")


# ---------------------------------------------------------------------------- examples
def test_submit_lease_result_and_linger() -> None:
    sim = Sim()
    rec = sim.record([])
    sim.feed(SubmitTask(rec))
    assert list(sim.requests) and rec.tid in sim.state.tasks.by_tid
    sim.grant(next(iter(sim.requests)))
    ((conn, running),) = sim.running()
    assert running is rec
    task = sim.sent[conn][0]
    assert task["k"] == Kind.TASK and task["fnb"] == 1  # the function goes once per worker
    sim.result(conn, rec)
    e = sim.client.objects.get(rec.return_ids[0])
    assert e is not None and e.state == READY and loads(e.frames) == rec.tid
    # The idle lease lingers; a second task of the shape reuses it without a new request.
    rec2 = sim.record([])
    sim.feed(SubmitTask(rec2))
    assert not sim.requests and sim.sent[conn][-1]["tid"] == rec2.tid
    assert "fnb" not in sim.sent[conn][-1]
    sim.result(conn, rec2)
    before = len(sim.state.leasing.leases)
    sim.fire_timers()
    assert before == 1 and not sim.state.leasing.leases  # returned once idle


def test_dependency_waits_and_failed_dependency_fails_the_task() -> None:
    sim = Sim()
    a = sim.record([])
    sim.feed(SubmitTask(a))
    b = sim.record([ObjectRef(a.return_ids[0], ME, sim.client)])
    sim.feed(SubmitTask(b))
    assert b.waiting_deps == 1 and len(sim.state.leasing.classes[b.shape_key].queue) == 1
    sim.grant(next(iter(sim.requests)))
    ((conn, rec),) = sim.running()
    sim.result(conn, rec, ok=False)
    e = sim.client.objects.get(b.return_ids[0])
    assert e is not None and e.state == FAILED  # its argument failed


def test_worker_death_retries_then_fails() -> None:
    sim = Sim()
    rec = sim.record([], retries=1)
    sim.feed(SubmitTask(rec))
    sim.grant(next(iter(sim.requests)))
    lease = next(iter(sim.state.leasing.leases.values()))
    sim.feed(LeaseLost(lease.lease_id, "killed by SIGKILL"))
    assert rec.attempts == 1 and rec.tid in sim.state.tasks.by_tid
    sim.grant(next(iter(sim.requests)))
    lease = next(iter(sim.state.leasing.leases.values()))
    sim.feed(LeaseLost(lease.lease_id, "killed by SIGKILL"))
    e = sim.client.objects.get(rec.return_ids[0])
    assert e is not None and e.state == FAILED
    assert isinstance(loads(e.frames), WorkerCrashedError)


def test_cancel_queued_task_withdraws_its_lease_request() -> None:
    sim = Sim()
    rec = sim.record([])
    sim.feed(SubmitTask(rec))
    assert sim.requests
    sim.feed(CancelTask(rec.return_ids[0], False))
    assert not sim.requests  # LEASE_CANCEL sent
    e = sim.client.objects.get(rec.return_ids[0])
    assert e is not None and e.state == FAILED
    assert isinstance(loads(e.frames), TaskCancelledError)


def test_stored_result_is_rebuilt_when_its_node_dies() -> None:
    sim = Sim()
    a = sim.record([])
    sim.feed(SubmitTask(a))
    sim.grant(next(iter(sim.requests)))
    ((conn, rec),) = sim.running()
    sim.result(conn, rec, store="s1")
    assert a.return_ids[0] in sim.state.lineage.records
    sim.feed(NodeDied("n1", "s1"))
    # A task taking it as an argument makes the owner run its producer again first.
    b = sim.record([ObjectRef(a.return_ids[0], ME, sim.client)])
    sim.feed(SubmitTask(b))
    assert a.rebuilds == 1 and a.tid in sim.state.tasks.by_tid
    sim.settle()
    e = sim.client.objects.get(b.return_ids[0])
    assert e is not None and e.state == READY


def test_owner_answers_get_object_when_ready() -> None:
    sim = Sim()
    rec = sim.record([])
    sim.feed(SubmitTask(rec))
    sim.feed(ObjectRequested(b"peer", rec.return_ids[0]))
    assert not sim.replies  # pending: answered once ready
    sim.settle()
    ((ident, header),) = sim.replies
    assert ident == b"peer" and header["ok"] and header["oid"] == rec.return_ids[0]
    sim.feed(ObjectRequested(b"peer", "unknown.0"))
    assert sim.replies[-1][1]["err"] == "lost"


def test_actor_calls_go_in_order_and_fail_when_dead() -> None:
    sim = Sim()
    aid = "a1"
    reply: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
    header = {"k": Kind.ACTOR_CREATE, "aid": aid, "cls_name": "C", "nargs": 0}
    sim.feed(CreateActor(header, [b"cls"], [], reply))
    assert sim.creations
    calls = []
    for _ in range(3):
        rec = sim.record([])
        rec.actor_id, rec.method = aid, "m"
        sim.feed(CallActor(rec, "C"))
        calls.append(rec)
    sim.feed(ActorStateChanged(aid, ALIVE, addr="tcp://actor"))
    ar = sim.state.actors.actors[aid]
    assert ar.conn is not None
    assert [h["tid"] for h in sim.sent[ar.conn]] == [r.tid for r in calls]
    sim.result(ar.conn, calls[0])
    sim.feed(ActorStateChanged(aid, DEAD, reason="gone"))
    for rec in calls[1:]:
        e = sim.client.objects.get(rec.return_ids[0])
        assert e is not None and e.state == FAILED


def test_output_lines_are_shown_with_the_task() -> None:
    sim = Sim()
    rec = sim.record([])
    sim.feed(SubmitTask(rec))
    sim.grant(next(iter(sim.requests)))
    ((conn, _),) = sim.running()
    sim.feed(TaskOutput(conn, rec.tid, "f", 42, "stdout", ["hello"]))
    assert sim.shown == ["(f pid=42) hello\n"]


def test_stream_items_arrive_in_order_and_repeats_are_skipped() -> None:
    sim = Sim()
    rec = sim.record([], gen=STREAMING)
    sim.feed(SubmitTask(rec))
    sim.grant(next(iter(sim.requests)))
    ((conn, _),) = sim.running()
    assert sim.sent[conn][0]["gen"] == STREAMING and sim.sent[conn][0]["bp"] == 2
    sim.item(conn, rec)
    sim.item(conn, rec)
    buf = rec.stream
    assert buf is not None and buf.items == [f"{rec.tid}.1", f"{rec.tid}.2"]
    sim.item(conn, rec, index=5)  # out of order: dropped
    assert len(buf.items) == 2
    sim.take(rec)
    assert sim.sent[conn][-1] == {"k": Kind.STREAM_ACK, "tid": rec.tid, "consumed": 1}
    sim.item(conn, rec, index=0)  # a re-run's repeat: skipped, its worker told to go on
    assert len(buf.items) == 2 and sim.sent[conn][-1]["consumed"] == 1
    e = sim.client.objects.get(f"{rec.tid}.2")
    assert e is not None and e.state == READY and loads(e.frames) == 1
    assert not buf.done
    sim.result(conn, rec)
    assert buf.done and rec.tid not in sim.state.tasks.by_tid


def test_dynamic_result_holds_its_items() -> None:
    sim = Sim()
    rec = sim.record([], gen=DYNAMIC)
    sim.feed(SubmitTask(rec))
    sim.grant(next(iter(sim.requests)))
    ((conn, _),) = sim.running()
    sim.item(conn, rec)
    sim.item(conn, rec)
    sim.result(conn, rec)
    e = sim.client.objects.get(rec.return_ids[0])
    assert e is not None and e.state == READY
    assert [r.oid for r in e.contained] == [f"{rec.tid}.1", f"{rec.tid}.2"]
    for oid in (f"{rec.tid}.1", f"{rec.tid}.2"):
        item = sim.client.objects.get(oid)
        assert item is not None and item.refs == 1  # the value's refs alone hold it


def test_a_stream_ends_when_the_client_closes() -> None:
    sim = Sim()
    rec = sim.record([], gen=STREAMING)
    sim.feed(SubmitTask(rec))
    buf = rec.stream
    assert buf is not None and not buf.done
    sim.state.fail_all("the client closed")
    assert buf.done and buf.take(0) == (None, True)  # its consumer stops waiting
    e = sim.client.objects.get(rec.return_ids[0])
    assert e is not None and e.state == FAILED  # ... and gets the error


def test_tasks_beyond_the_shown_ones_are_counted(monkeypatch: Any) -> None:
    monkeypatch.setattr(task_events, "SHOWN_TASKS", 2)
    sim = Sim()
    sent: list[Any] = []  # the task events the head is sent
    carry_out = sim.carry_out

    def carry(out: list[Instruction]) -> None:
        sent.extend(e for i in out if isinstance(i, ToHead) for e in i.header.get("events", []))
        carry_out(out)

    monkeypatch.setattr(sim, "carry_out", carry)

    def flush() -> None:
        sim.timers = [t for t in sim.timers if not isinstance(t[1], FlushTaskEvents)]
        sim.feed(FlushTaskEvents())

    recs = [sim.record([]) for _ in range(5)]
    for rec in recs:
        sim.feed(SubmitTask(rec))
    flush()
    assert [e[1] for e in sent if e[0] == "s"] == [recs[0].tid, recs[1].tid]
    counts = sorted(e for e in sent if e[0] == "n")
    assert counts == [("n", r.name, sim.now, SHAPE, "", 1, 0) for r in recs[2:]]
    sent.clear()
    sim.settle()
    flush()
    # Each counted group ends at zero: the head forgets it.
    finals = {(e[1], e[4]): e[5:] for e in sent if e[0] == "n"}
    assert finals and all(v == (0, 0) for v in finals.values())
    assert not sim.state.events.counts and sim.state.events.shown == 0


def test_an_idle_worker_steals_the_tasks_waiting_behind_a_busy_one() -> None:
    sim = Sim()
    recs = [sim.record([]) for _ in range(6)]
    for rec in recs:
        sim.feed(SubmitTask(rec))
    first = min(sim.requests)
    sim.grant(first)  # one lease: every task is pipelined on it
    (conn_a,) = sim.open
    assert [h["tid"] for h in sim.sent[conn_a]] == [r.tid for r in recs]
    assert len(sim.requests) == 5  # the five waiting behind the first still want workers
    sim.grant(min(sim.requests))  # a second worker: nothing is queued here, so it steals
    ((conn, tids),) = sim.steals
    assert conn is conn_a and tids == [r.tid for r in recs[3:]][::-1]  # the back half
    sim.answer_steal(0)
    (conn_b,) = sim.open - {conn_a}
    assert [h["tid"] for h in sim.sent[conn_b]] == [r.tid for r in recs[3:]]  # in order
    assert [r.tid for r in sim.state.leasing.leases["Lw1"].inflight] == [r.tid for r in recs[:3]]
    for conn, rec in sim.running():
        sim.result(conn, rec)
    sim.settle()
    for rec in recs:
        e = sim.client.objects.get(rec.return_ids[0])
        assert e is not None and e.state == READY


# ---------------------------------------------------------------------------- random sequences
@pytest.mark.parametrize("seed", range(12))
def test_random_event_sequences_keep_invariants(seed: int, monkeypatch: Any) -> None:
    if seed % 2:  # the head is told of most tasks in counts, not one by one
        monkeypatch.setattr(task_events, "SHOWN_TASKS", 2)
    sim = Sim(seed)
    rng = sim.rng
    stores = ["s1", "s2"]
    actors: list[str] = []
    for _step in range(400):
        op = rng.random()
        if op < 0.18:  # submit, with arguments among what the user holds
            deps = rng.sample(sim.held, min(len(sim.held), rng.choice([0, 0, 1, 2])))
            if rng.random() < 0.1:
                deps.append(sim.borrowed())
            gen = rng.choice([0, 0, 0, 0, STREAMING, DYNAMIC])
            sim.feed(SubmitTask(sim.record(deps, nret=rng.choice([0, 1, 1, 2]), gen=gen)))
        elif op < 0.30 and sim.requests:
            rid = rng.choice(list(sim.requests))
            reuse = sorted(c.addr for c in sim.open) if rng.random() < 0.1 else []
            sim.grant(rid, rng.choice(reuse) if reuse else None)
        elif op < 0.45 and sim.running():
            conn, rec = rng.choice(sim.running())
            r = rng.random()
            if rec.stream is not None and r < 0.5:
                sim.item(conn, rec, None if r < 0.4 else rng.randrange(len(rec.stream.items) + 2))
                if rng.random() < 0.5:
                    sim.take(rec)
            elif r < 0.6:
                sim.result(conn, rec, store=rng.choice(["", *stores]))
            elif r < 0.8:
                sim.result(conn, rec, ok=False)
            elif rec.deps:
                sim.result(conn, rec, ok=False, lost=[rng.randrange(len(rec.deps))])
        elif op < 0.50 and sim.state.leasing.leases:
            lease = rng.choice(list(sim.state.leasing.leases.values()))
            sim.feed(LeaseLost(lease.lease_id, "killed by SIGKILL", rng.random() < 0.3))
        elif op < 0.55 and sim.requests and rng.random() < 0.2:
            sim.feed(LeaseFailed(rng.choice(list(sim.requests)), "affinity to a dead node"))
        elif op < 0.58:
            sim.fire_timers()
        elif op < 0.60 and sim.steals:
            sim.answer_steal(rng.randrange(len(sim.steals)))
        elif op < 0.64:
            sim.feed(NodeDied(f"n{sim.ids}", rng.choice(stores)))
        elif op < 0.70 and sim.state.tasks.producer:
            oid = rng.choice(list(sim.state.tasks.producer))
            sim.feed(CancelTask(oid, rng.random() < 0.5))
        elif op < 0.76:
            sim.release(rng.randrange(4))
        elif op < 0.80 and sim.fetches:
            oid = sim.fetches.pop(rng.randrange(len(sim.fetches)))
            r = rng.random()
            frames = stored(rng.choice(stores)) if r < 0.3 else dumps(oid)
            sim.feed(ObjectArrived(OTHER, oid, r < 0.9, r > 0.95, frames))
        elif op < 0.83 and sim.held:
            sim.feed(ObjectRequested(b"peer", rng.choice(sim.held).oid))
        elif op < 0.86:
            if not actors or rng.random() < 0.3:
                aid = f"a{len(actors)}"
                actors.append(aid)
                fut: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
                header = {"k": Kind.ACTOR_CREATE, "aid": aid, "cls_name": "C", "nargs": 0}
                deps = rng.sample(sim.held, min(len(sim.held), rng.choice([0, 1])))
                sim.feed(CreateActor(header, [b"cls"], deps, fut))
                sim.feed(CountActorHandle(aid, "C", True, 1))
            aid = rng.choice(actors)
            gen = rng.choice([0, 0, 0, STREAMING])
            rec = sim.record(rng.sample(sim.held, min(len(sim.held), rng.choice([0, 1]))), gen=gen)
            rec.actor_id, rec.method = aid, "m"
            sim.feed(CallActor(rec, "C"))
        elif op < 0.92 and actors:
            aid = rng.choice(actors)
            state = rng.choice([ALIVE, ALIVE, RESTARTING, "PENDING", DEAD])
            addr = f"tcp://actor-{aid}-{rng.randrange(2)}"
            sim.feed(ActorStateChanged(aid, state, addr=addr, worker_id=addr, reason="test"))
        elif op < 0.95 and actors:
            ar = sim.state.actors.actors.get(rng.choice(actors))
            if ar is not None and ar.inflight and ar.conn is not None:
                rec = rng.choice(list(ar.inflight.values()))
                if rec.stream is not None and rng.random() < 0.5:
                    sim.item(ar.conn, rec)
                else:
                    sim.result(ar.conn, rec, ok=rng.random() < 0.8)
        elif op < 0.96 and actors:
            sim.feed(KillActor(rng.choice(actors), rng.random() < 0.5, None))
        elif op < 0.97:
            for rid in list(sim.requests):  # a restarted head forgot them: asked again
                sim.requests.pop(rid)
            sim.feed(Rejoined())
        elif sim.held:
            ref = rng.choice(sim.held)
            sim.feed(FetchObject(ref.oid, ref.owner_address))
    assert len(sim.requests) <= sum(
        request_cap(c.strategy) for c in sim.state.leasing.classes.values()
    )
    sim.settle()
    for ref in sim.held:
        e = sim.client.objects.get(ref.oid)
        assert e is None or e.state != PENDING or not e.owned, f"{ref} never finished"
