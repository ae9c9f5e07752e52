"""The client runtime of a driver (or of a worker that submits tasks): its user-facing side.

User threads call the synchronous methods of :class:`CoreClient` (``submit``, ``get``, ``wait``,
...). All network I/O happens on one background thread (:class:`~nbcluster.client.shell.IoShell`)
which owns the sockets and the client's :class:`~nbcluster.client.state.ClientState`; user
threads hand it typed commands (:mod:`nbcluster.client.commands`) and wait on events of the
shared :class:`~nbcluster.client.objects.ObjectTable` (``get``: one for all its refs). Tasks
go straight from this client to leased workers and results come straight back (the head only
hands out leases), so a task costs two hops.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from nbcluster.client.commands import (
    ActorEscaped,
    CallActor,
    CancelTask,
    Command,
    CountActorHandle,
    CreateActor,
    FetchObject,
    KillActor,
    Rebuild,
    SetBlocked,
    StreamConsumed,
    SubmitTask,
    TellOwner,
)
from nbcluster.client.lineage import MAX_RECONSTRUCTIONS, Lineage, lost_error
from nbcluster.client.objects import FAILED, PENDING, READY, Entry, ObjectTable
from nbcluster.client.shell import IoShell
from nbcluster.client.streams import STREAMING, StreamBuffer
from nbcluster.client.tasks import EMPTY, TaskRecord
from nbcluster.client.wire import is_ref
from nbcluster.exceptions import (
    ConnectionFailedError,
    GetTimeoutError,
    NbclusterError,
    ObjectLostError,
    OwnerDiedError,
    SerializationError,
    TaskError,
)
from nbcluster.protocol.messages import Kind
from nbcluster.refs import ObjectRef, serialized_refs
from nbcluster.scheduling import strategy_key
from nbcluster.serialization import copy_frames, dumps, dumps_args, loads
from nbcluster.store.client import StoreClient, is_stored
from nbcluster.store.errors import ObjectStoreError
from nbcluster.store.fetch import fetch_stored
from nbcluster.transport.sockets import check_frame_sizes, max_message_bytes

log = logging.getLogger("nbcluster")

#: How long ``kill()`` waits for the head to have taken the kill (it is sent regardless).
KILL_ACK_TIMEOUT_S = 5.0


class CoreClient:
    """A connection to a cluster through which tasks are submitted and objects owned.

    Every method is for user threads (any thread but the I/O thread, unless said otherwise).

    Parameters
    ----------
    head_address
        ``host:port`` of the head.
    token
        The cluster secret.
    job_id, worker_id
        Set when this client lives in a worker: it joins the worker's job.
    """

    def __init__(
        self,
        head_address: str,
        token: str,
        *,
        job_id: str | None = None,
        worker_id: str | None = None,
        node_id: str | None = None,
        bind_host: str | None = None,
        log_to_driver: bool = True,
        namespace: str | None = None,
    ) -> None:
        self.head_address = head_address
        self._token = token  # pools hand it to the nodes they start (nbcluster.deploy)
        self.worker_id = worker_id
        self.node_id = node_id or ""
        self.namespace = namespace or ""
        self.log_to_driver = log_to_driver
        self.objects = ObjectTable()
        self._prefix = os.urandom(5).hex()
        self._ids = itertools.count(1)
        self._closing = False
        self.closed = threading.Event()
        self._settling: set[concurrent.futures.Future[None]] = set()  # see ref_from
        # One copy of what every task of a shape shares (a million queued tasks: a million
        # dicts and tuples otherwise), and of the arguments of a call without any.
        self._shapes: dict[tuple[Any, ...], tuple[dict[str, float], tuple[Any, ...]]] = {}
        self._no_args: list[Any] = copy_frames(dumps_args("", (), {}, is_ref)[0])
        # Output routing hooks (set in a notebook kernel by nbcluster.magics): ``output_tag`` is
        # called when a task is submitted, ``on_output(stream, text, tag)`` gets its output lines.
        self.on_output: Callable[[str, str, Any], None] | None = None
        self.output_tag: Callable[[], Any] | None = None
        self.io = IoShell(
            self.objects,
            self,
            head_address,
            token,
            job_id=job_id or "",
            worker_id=worker_id,
            node_id=self.node_id,
            bind_host=bind_host or os.environ.get("NBCLUSTER_BIND_HOST", "127.0.0.1"),
            log_to_driver=log_to_driver,
            namespace=self.namespace,
        )

    @property
    def job_id(self) -> str:
        """The job this client belongs to (given by the head when we connect)."""
        return self.io.job_id

    @property
    def owner_address(self) -> str:
        """Our owner socket's address: where others fetch the objects we own."""
        return self.io.owner_address

    @property
    def store(self) -> StoreClient | None:
        """Our link to the node's shared-memory store, if this process has one."""
        return self.io.store

    # ================================================================== lifecycle
    def connect(self, timeout: float = 30.0) -> None:
        """Start the I/O thread, authenticate with the head and join (or create) a job."""
        self.io.start()
        try:
            self.io.ready.result(timeout)
        except concurrent.futures.TimeoutError:
            self.close()
            raise ConnectionFailedError(
                f"could not connect to the nbcluster head at {self.head_address} "
                f"within {timeout:.0f} s"
            ) from None
        except BaseException:
            self.close()
            raise

    def close(self, shutdown_cluster: bool = False) -> None:
        """Disconnect (telling the head, so our workers and leases are released)."""
        if self._closing:
            self.closed.wait(10)
            return
        self._closing = True
        for fut in list(self._settling):  # answers nobody will get now
            fut.cancel()
        self.io.stop(shutdown_cluster)
        self.closed.set()

    def attach_store(self, address: str, store_id: str) -> None:
        """Use the node agent's shared-memory store at ``address`` for large values."""
        assert self.io.transport is not None
        self.io.store = StoreClient(self.io.transport, address, store_id)
        self.io.store.before_large_write = self._send_releases

    def _send_releases(self) -> None:
        # Refs dropped since the I/O thread last looked are counted within 0.1 s; a large put
        # waits for them (when there are any), so segments they free reach the store's pool
        # before our reservation and the put reuses one (pages that exist: 4x faster).
        if self.io.released and threading.current_thread() is not self.io.thread:
            try:
                self.io.call(self.io.send_releases(), timeout=5.0)
            except Exception as exc:  # (closing, or a stalled loop: the put goes on without it)
                log.debug("could not send dropped refs before a put: %r", exc)

    def _post(self, command: Command) -> None:
        self.io.post(command)

    # ================================================================== refs (any thread)
    def add_local_ref(self, oid: str, owner: str, borrowed: bool) -> None:
        """An ``ObjectRef`` of ``oid`` was made in this process."""
        self.objects.add_ref(oid, owned=not borrowed, owner=owner)

    def remove_local_ref(self, oid: str) -> None:
        """An ``ObjectRef`` of ``oid`` was collected."""
        # Called from ObjectRef.__del__, which the garbage collector may run at any allocation,
        # even inside a section holding the object table's lock: never take a lock here. The
        # I/O thread does the bookkeeping, whenever it wakes and at least every 0.1 s.
        self.io.released.append(oid)

    def mark_escaped(self, oid: str) -> None:
        """A ref to ``oid`` was sent elsewhere for good: keep the value."""
        self.objects.mark_escaped(oid)

    def new_id(self) -> str:
        """A new id, unique across the cluster (task ids, object ids, actor ids)."""
        return f"{self._prefix}{next(self._ids):x}"

    # ================================================================== the head
    def query(self, what: str, timeout: float = 10.0) -> Any:
        """Ask the head (``"nodes"``, ``"actors"``, ``"head"``).

        Raises
        ------
        ConnectionFailedError
            If the head did not answer within ``timeout`` seconds (a restarting head is waited
            for within that time).
        """
        return self._ask(self.io.query(what, timeout), what, timeout)

    def query_args(self, what: str, timeout: float = 10.0, **args: Any) -> Any:
        """Ask the head a question with arguments (``"actor"``, name=..., ns=...)."""
        return self._ask(self.io.query(what, timeout, **args), what, timeout)

    def request(self, header: dict[str, Any], timeout: float = 10.0) -> Any:
        """Send the head an idempotent request of another kind than ``QUERY`` (``header``:
        its ``k`` and fields) and return the ``result`` of its ``QUERY_REPLY``."""
        return self._ask(self.io.request(header, timeout), str(header.get("k")), timeout)

    def ref_from(self, coro: Any) -> ObjectRef:
        """An object owned by this client whose value is what ``coro`` returns once it is
        awaited on the I/O thread (what it raises becomes the object's error): a ref to an
        answer of the head, such as a placement group's ``ready()``. Small values only (kept
        inline, never in the store)."""
        oid = f"{self.new_id()}.p"
        ref = ObjectRef(oid, self.owner_address, self)

        async def settle() -> None:
            try:
                frames, state = dumps(await coro), READY
            except Exception as exc:  # the object's error, raised by get()
                frames, state = dumps(exc), FAILED
            self.objects.complete(oid, state, frames)

        assert self.io.loop is not None
        fut = asyncio.run_coroutine_threadsafe(settle(), self.io.loop)
        self._settling.add(fut)
        fut.add_done_callback(self._settling.discard)
        return ref

    def _ask(self, coro: Any, what: str, timeout: float) -> Any:
        try:
            return self.io.call(coro, timeout + 5)
        except concurrent.futures.TimeoutError:
            raise ConnectionFailedError(
                f"no answer to the {what!r} query from the nbcluster head at "
                f"{self.head_address}: this client's I/O thread is stuck"
            ) from None

    def task_rows(self, timeout: float = 10.0) -> list[list[str]]:
        """This client's unfinished tasks: id, name, state, where (read on the I/O thread)."""

        async def rows() -> list[list[str]]:
            state = self.io.state
            with self.io.lock:  # (a user thread may be handling a task meanwhile)
                return state.task_rows() if state is not None else []

        return list(self.io.call(rows(), timeout))

    # ================================================================== submission (user thread)
    def submit(
        self,
        name: str,
        fn_id: str,
        fn_blob: bytes,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        shape: dict[str, float],
        num_returns: int,
        max_retries: int,
        retry_exceptions: bool | tuple[type[BaseException], ...],
        strategy: dict[str, Any] | None = None,
        runtime_env: dict[str, Any] | None = None,
        gen: int = 0,
        backpressure: int = 0,
        max_calls: int = 0,
    ) -> list[Any]:
        """Queue a task; returns one ref per return value.

        ``strategy`` is a scheduling strategy in wire form (:func:`nbcluster.scheduling.
        strategy_spec`); tasks of one shape and strategy share leases. ``runtime_env`` is the
        environment in wire form (:mod:`nbcluster.runtime_env.upload`): its tasks get workers of
        their own. ``gen`` makes it a generator task (:mod:`nbcluster.client.streams`): a
        streaming one returns ``[ObjectRefGenerator]``. ``max_calls``: a worker that ran this
        function so often retires (0: never).
        """
        rec, refs = self._new_record(name, args, kwargs, num_returns, gen, backpressure)
        rec.max_calls = max_calls
        if 0 <= max_message_bytes() < len(fn_blob):  # (the check and its message only then)
            check_frame_sizes([fn_blob], f"function {name} (pickled)")
        rec.fn_id, rec.fn_blob = fn_id, fn_blob
        rec.shape, rec.shape_key = self._shape(shape)
        if strategy is not None:
            rec.strategy = strategy
            rec.shape_key += (("@strategy", strategy_key(strategy)),)
        if runtime_env is not None:
            rec.renv = runtime_env
            rec.shape_key += (("@env", runtime_env["key"]),)
        rec.max_retries, rec.retry_exceptions = max_retries, retry_exceptions
        self._post(SubmitTask(rec))
        return self._returned(rec, refs, num_returns)

    def _shape(self, shape: dict[str, float]) -> tuple[dict[str, float], tuple[Any, ...]]:
        """The shared copy of ``shape`` and its key (records never change them)."""
        key = tuple(sorted(shape.items()))
        known = self._shapes.get(key)
        if known is None:
            if len(self._shapes) > 1024:  # (shapes made on the fly, e.g. from a loop variable)
                self._shapes.clear()
            known = self._shapes[key] = (dict(shape), key)
        return known

    def _returned(self, rec: TaskRecord, refs: list[ObjectRef], num_returns: int) -> list[Any]:
        if rec.gen == STREAMING:
            from nbcluster.generators import ObjectRefGenerator

            return [ObjectRefGenerator(refs[0], rec.stream, self)]
        return refs if num_returns != 0 else []

    def set_blocked(self, blocked: bool) -> None:
        """In a worker: its task waits (its CPUs are lent back, see ``WORKER_BLOCKED``)."""
        if self.worker_id:
            self._post(SetBlocked(blocked))

    def stream_consumed(self, tid: str, consumed: int) -> None:
        """The consumer of a streaming generator took ``consumed`` items (any thread)."""
        self._post(StreamConsumed(tid, consumed))

    def _new_record(
        self,
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        num_returns: int,
        gen: int = 0,
        backpressure: int = 0,
    ) -> tuple[TaskRecord, list[ObjectRef]]:
        """Serialize a call's arguments and make the refs of its return values."""
        tid = self.new_id()
        args_oid: str | None = None
        nested: list[Any] = EMPTY
        deps: list[Any] = EMPTY
        if not args and not kwargs:
            frames = self._no_args  # (shared: a record's frames are never changed)
        else:
            with serialized_refs() as nested:
                frames, deps = dumps_args(name, args, kwargs, is_ref, copy=False)
            nested, deps = nested or EMPTY, deps or EMPTY
            frames, args_oid = self._place_args(tid, name, frames)
        return_ids = [f"{tid}.{i}" for i in range(max(num_returns, 1))]
        refs = [ObjectRef(oid, self.owner_address, self) for oid in return_ids]
        rec = TaskRecord(
            tid=tid,
            name=name,
            fn_id="",
            fn_blob=b"",
            args=frames,
            deps=deps,
            return_ids=return_ids,
            shape={},
            shape_key=(),
            max_retries=0,
            retry_exceptions=False,
            nret=num_returns,
            nested=nested,
            args_oid=args_oid,
        )
        if gen:
            rec.gen, rec.bp = gen, backpressure if gen == STREAMING else 0
            rec.stream = StreamBuffer(tid, gen, rec.bp)
        tag = self.output_tag
        if tag is not None:  # e.g. the notebook cell submitting it (see nbcluster.magics)
            rec.tag = tag()
        return rec, refs

    def _place_args(self, tid: str, name: str, frames: list[Any]) -> tuple[list[Any], str | None]:
        """A call's serialized arguments as they travel, and their object id if stored."""
        # Large arguments go into the node's store (copied once, read zero-copy by the worker);
        # small ones travel in the message.
        store = self.store
        if store is not None:
            frames = store.put_frames(f"{tid}.a", frames, self.job_id)
            return frames, f"{tid}.a" if is_stored(frames) else None
        check_frame_sizes(frames, f"an argument of {name}")  # inline: no store here
        return copy_frames(frames), None

    def put(self, value: Any) -> ObjectRef:
        """Store ``value`` as an object owned by this client."""
        oid = f"{self.new_id()}.p"
        try:
            with serialized_refs() as inner:
                frames = self._serialize_value(oid, value)
        except NbclusterError:
            raise  # the store is full: its message says why
        except Exception as exc:
            raise SerializationError(
                f"could not serialize the value passed to put(): {type(exc).__name__}: {exc}"
            ) from exc
        ref = ObjectRef(oid, self.owner_address, self)
        if inner:
            # Refs inside the value live as long as it does; ones we only borrowed, their
            # owners must keep (we cannot follow where the value goes).
            self.objects.set_contained(oid, inner)
            for r in inner:
                if r.owner_address != self.owner_address:
                    self._post(TellOwner(r.owner_address, {"k": Kind.ESCAPE, "oid": r.oid}))
        self.objects.complete(oid, READY, frames)
        return ref

    def _serialize_value(self, oid: str, value: Any) -> list[Any]:
        store = self.store
        if store is not None:
            return store.put(oid, value, self.job_id)
        frames = dumps(value)
        check_frame_sizes(frames, "the value passed to put()")  # inline: no store here
        return frames

    def cancel(self, ref: ObjectRef, force: bool) -> None:
        self._post(CancelTask(ref.oid, force))

    # ================================================================== user thread
    def create_actor(
        self,
        cls_name: str,
        cls_blob: bytes,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        spec: dict[str, Any],
    ) -> dict[str, Any]:
        """Create an actor; returns the head's answer (``aid``, ``methods``, ``existing``...).

        Named actors wait for the head's answer (a taken name is an error, or with
        ``get_if_exists`` the existing actor is returned); anonymous ones return at once.
        """
        frames, deps = dumps_args(f"{cls_name}.__init__", args, kwargs, is_ref)
        # Constructor arguments travel inline, through the head.
        check_frame_sizes([cls_blob, *frames], f"the class or an argument of {cls_name}")
        aid = self.new_id()
        header = {
            "k": Kind.ACTOR_CREATE,
            "aid": aid,
            "cls_name": cls_name,
            **spec,
            "nargs": len(frames),
        }
        fut: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        self._post(CreateActor(header, [cls_blob, *frames], deps, fut))
        if spec.get("name"):
            return fut.result(60)
        return {
            "aid": aid,
            "existing": False,
            "methods": spec.get("methods", {}),
            "cls_name": cls_name,
            "max_task_retries": spec.get("max_task_retries", 0),
        }

    def submit_actor_call(
        self,
        aid: str,
        cls_name: str,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        num_returns: int,
        gen: int = 0,
        backpressure: int = 0,
        concurrency_group: str = "",
    ) -> list[Any]:
        rec, refs = self._new_record(
            f"{cls_name}.{method}", args, kwargs, num_returns, gen, backpressure
        )
        rec.name, rec.actor_id, rec.method = cls_name, aid, method
        rec.group = concurrency_group
        self._post(CallActor(rec, cls_name))
        return self._returned(rec, refs, num_returns)

    def actor_handle_added(self, aid: str, cls_name: str, owned: bool) -> None:
        self._post(CountActorHandle(aid, cls_name, owned, 1))

    def actor_handle_removed(self, aid: str) -> None:
        try:
            self._post(CountActorHandle(aid, "", False, -1))
        except Exception:  # the client is closed
            pass

    def actor_escaped(self, aid: str) -> None:
        self._post(ActorEscaped(aid))

    def kill_actor(self, aid: str, no_restart: bool) -> None:
        """Ask the head to kill ``aid``; with ``no_restart`` it is dead here when this returns.

        The worker hosting the actor may run a while before the head's kill reaches it: the
        actor is marked dead on this side first, so that no call made after ``kill()`` (nor one
        still in flight) can be answered with a result.
        """
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._post(KillActor(aid, no_restart, done))
        if threading.current_thread() is not self.io.thread:
            done.result(30)
            # Returns once the head has it: the head takes one peer's messages in order, so its
            # answer to a question asked after the kill means it buried the actor. A call that
            # another process makes after kill() (it asks the head where the actor is) then
            # never reaches the dying worker, however fast our message to that process went.
            try:
                self.query("head", timeout=KILL_ACK_TIMEOUT_S)
            except ConnectionFailedError as exc:  # (the kill is sent: the head has it when back)
                log.debug("kill of %s: no word from the head: %s", aid, exc)

    # ================================================================== get / wait (user thread)
    def prefetch(self, refs: Sequence[ObjectRef]) -> None:
        """Start fetching the values of borrowed ``refs`` (``get`` and ``wait`` do first)."""
        for ref in refs:
            e = self.objects.get(ref.oid)
            if e is not None and e.state == PENDING and not e.owned and not e.fetching:
                self._post(FetchObject(ref.oid, ref.owner_address))

    def get(self, refs: Sequence[ObjectRef], timeout: float | None) -> list[Any]:
        """Values of ``refs`` (errors re-raised), waiting at most ``timeout`` seconds in all."""
        self.prefetch(refs)
        deadline = None if timeout is None else time.monotonic() + timeout
        blocked = False
        waiter = self.objects.waiter([ref.oid for ref in refs])
        try:
            if waiter is not None:
                if self.worker_id and not waiter.event.is_set():
                    blocked = True
                    self._post(SetBlocked(True))
                if not _wait_event(waiter.event, deadline):
                    raise GetTimeoutError(
                        f"get() timed out after {timeout} s waiting for {self._pending(refs)!r}"
                    )
        finally:
            if waiter is not None and not waiter.event.is_set():
                waiter.cancel()  # (timed out, or interrupted)
            if blocked:
                self._post(SetBlocked(False))
        out = []
        for ref in refs:
            for _ in range(MAX_RECONSTRUCTIONS + 1):
                try:
                    out.append(self._value(ref))
                    break
                except (ObjectLostError, ObjectStoreError) as exc:
                    e = self.objects.get(ref.oid)
                    if e is None or not e.owned or e.state != READY or not is_stored(e.frames):
                        raise
                    left = None if deadline is None else max(0.0, deadline - time.monotonic())
                    self._recover(ref, str(exc), left)
            else:
                raise lost_error(ref, "it was lost again each time it was rebuilt")
        return out

    def _pending(self, refs: Sequence[ObjectRef]) -> ObjectRef:
        """The first of ``refs`` whose value is not here yet (the first one if none)."""
        for ref in refs:
            e = self.objects.get(ref.oid)
            if e is not None and e.state == PENDING:
                return ref
        return refs[0]

    def _value(self, ref: ObjectRef) -> Any:
        e = self.objects.get(ref.oid)
        if e is None:
            raise OwnerDiedError(f"{ref!r} is not known here: its value was freed or lost")
        if e.state == READY:
            if Lineage.is_lost(e):
                raise ObjectLostError("the node that stored it died")
            if self.store is None and is_stored(e.frames):
                # No store of our own: read it from the node that holds it, into our memory.
                return fetch_stored(self.io.transport, e.frames, lambda _store: e.lost)
            return loads(e.frames, self.store)
        if e.state == FAILED:
            err = loads(e.frames)
            if isinstance(err, TaskError):
                raise err.as_instanceof_cause()
            raise err
        raise NbclusterError(f"{ref!r} is not ready")  # pragma: no cover

    def wait(
        self, refs: Sequence[ObjectRef], num_returns: int, timeout: float | None
    ) -> tuple[list[ObjectRef], list[ObjectRef]]:
        """Ray's ``wait``: the first ``num_returns`` ready refs, in the order given."""
        self.prefetch(refs)
        pending = [r for r in refs if self.objects.event_for(r.oid) is not None]
        need = num_returns - (len(refs) - len(pending))
        if need > 0 and (timeout is None or timeout > 0):
            ev = threading.Event()
            lock = threading.Lock()
            count = [0]

            def one_done(_e: Entry) -> None:
                with lock:
                    count[0] += 1
                    if count[0] >= need:
                        ev.set()

            for r in pending:
                if not self.objects.on_ready(r.oid, one_done):
                    one_done(None)  # type: ignore[arg-type]
            blocked = bool(self.worker_id)
            if blocked:
                self._post(SetBlocked(True))
            try:
                _wait_event(ev, None if timeout is None else time.monotonic() + timeout)
            finally:
                if blocked:
                    self._post(SetBlocked(False))
        ready: list[ObjectRef] = []
        not_ready: list[ObjectRef] = []
        for r in refs:
            e = self.objects.get(r.oid)
            done = e is None or e.state != PENDING
            (ready if done and len(ready) < num_returns else not_ready).append(r)
        return ready, not_ready

    async def await_ref(self, ref: ObjectRef) -> Any:
        """Await ``ref`` from any asyncio loop."""
        fut = self.ref_future(ref)
        return await asyncio.wrap_future(fut)

    def ref_future(self, ref: ObjectRef) -> concurrent.futures.Future[Any]:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def settle() -> None:
            try:
                fut.set_result(self._value(ref))
            except BaseException as exc:
                fut.set_exception(exc)

        def resolve(e: Entry | None = None) -> None:
            # A stored value may have to come from another node: never wait for that on the
            # I/O thread (it also delivers the NODE_DIED that would end such a wait).
            if e is not None and e.state == READY and is_stored(e.frames):
                threading.Thread(target=settle, name="nbcluster-fetch", daemon=True).start()
            else:
                settle()

        self.prefetch([ref])
        if not self.objects.on_ready(ref.oid, resolve):
            settle()
        return fut

    def _can_rebuild(self, oid: str) -> bool:
        # A read of the I/O thread's lineage from a user thread: one dict lookup, and a wrong
        # answer only changes which error comes first (the rebuild itself runs on the I/O thread).
        state = self.io.state
        return state is not None and state.lineage.can_rebuild(oid)

    def _recover(self, ref: ObjectRef, why: str, timeout: float | None) -> None:
        """Rebuild ``ref`` and wait for it (user thread); raises when it cannot be rebuilt."""
        oid = ref.oid
        if not self._can_rebuild(oid):
            raise lost_error(ref, why)
        ev = threading.Event()
        self._post(Rebuild(oid, ev))
        if not ev.wait(timeout if timeout is not None else 3600.0):
            raise lost_error(ref, f"{why}; rebuilding it did not finish in time")


def _wait_event(ev: threading.Event, deadline: float | None) -> bool:
    """Wait in short slices so that Ctrl-C (KeyboardInterrupt) is noticed promptly."""
    while True:
        if deadline is None:
            if ev.wait(0.25):
                return True
            continue
        left = deadline - time.monotonic()
        if left <= 0:
            return ev.is_set()
        if ev.wait(min(left, 0.25)):
            return True
