"""The store service a node agent runs: local processes reserve, seal, locate and free objects."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import zmq

from nbcluster.exceptions import ObjectLostError
from nbcluster.protocol.codec import encode
from nbcluster.protocol.messages import Kind
from nbcluster.protocol.schema import (
    Message,
    StoreCredit,
    StoreFree,
    StoreLocate,
    StorePin,
    StorePull,
    StoreRead,
    StoreReserve,
    StoreSeal,
    StoreStats,
    StoreUnpin,
)
from nbcluster.store.bulk import CONNECT_TIMEOUT_S, STALL_TIMEOUT_S, BulkServer, Offer
from nbcluster.store.errors import (
    ObjectExistsError,
    ObjectNotFoundError,
    ObjectStoreError,
    ObjectStoreFullError,
)
from nbcluster.store.manager import StoreManager
from nbcluster.store.transfer import MAX_CHUNK, MAX_WINDOW, MIN_CHUNK, ObjectPuller, map_segment

log = logging.getLogger(__name__)


class StoreService:
    """Answers store requests on the agent's loop; file copies (spill/restore) run off it.

    Every object is recorded with the job it belongs to, so that the objects of a job whose
    driver is gone can be freed at once.
    """

    def __init__(
        self,
        manager: StoreManager,
        puller: ObjectPuller | None = None,
        bulk: BulkServer | None = None,
    ) -> None:
        self.manager = manager
        self.puller = puller
        #: This node's bulk listener (None: objects are only streamed over CurveZMQ).
        self.bulk = bulk
        self._jobs: dict[str, str] = {}  # oid -> job id
        # Worker id -> objects it reserved and has not sealed yet: freed if it dies first, else
        # a half-written object would stay "in the store" and unreadable for good.
        self._writing: dict[str, set[str]] = {}
        # (peer, rid) -> a stream's flow control, or a bulk transfer (which STORE_CREDIT 0 stops)
        self._streams: dict[tuple[bytes, Any], _Stream | Offer] = {}
        self.streams_served = 0  # objects sent to other nodes (one per pull, however many readers)
        self.bytes_out = 0

    async def handle(self, send: Callable[[list[Any]], None], ident: bytes, h: Message) -> None:
        """Answer one request (``send`` queues the reply frames on the agent's socket)."""
        loop = asyncio.get_running_loop()
        m = self.manager
        match h:
            case StoreCredit(rid=rid, n=n):
                stream = self._streams.get((ident, rid))
                if stream is not None:
                    stream.grant(n)
                return
            case StoreUnpin(oid=oid):
                m.unpin(oid)
                return
            case StorePin(oid=oid):
                with contextlib.suppress(ObjectStoreError):  # freed meanwhile: nothing to pin
                    m.pin(oid)
                return
            case StoreFree(oids=oids):
                for oid in oids:
                    self._jobs.pop(oid, None)
                # The books now, in order with the next reservation (which may reuse a freed
                # segment); unlinking, which frees pages, off the loop.
                finish = [m.release(oid)[1] for oid in oids]
                await loop.run_in_executor(None, lambda: [f() for f in finish])
                return
            case StoreRead():
                await self._stream(send, ident, h)
                return
        kind = h.__struct_config__.tag
        reply: dict[str, Any] = {"k": Kind.STORE_REPLY, "rid": getattr(h, "rid", None), "ok": True}
        payload: list[Any] = []
        try:
            match h:
                case StoreReserve(oid=oid, size=size, job=job, w=w):
                    path, reused = await loop.run_in_executor(None, m.reserve_segment, oid, size)
                    reply["path"] = path
                    if reused:  # a freed segment of ours: overwrite it in place
                        reply["reused"] = True
                    if job:
                        self._jobs[oid] = job
                    if w:
                        self._writing.setdefault(w, set()).add(oid)
                case StoreSeal(oid=oid, w=w):
                    m.seal(oid)
                    if w:
                        self._writing.get(w, set()).discard(oid)
                case StoreLocate(oid=oid):
                    reply["path"] = await loop.run_in_executor(None, lambda: m.locate(oid, True))
                case StorePull(oid=oid, from_=holder, job=job):
                    if self.puller is None:
                        raise ObjectStoreError("this node cannot fetch objects from other nodes")
                    await self.puller.pull(oid, holder)
                    if job:  # the copy goes with its job, like the original
                        self._jobs.setdefault(oid, job)
                    reply["path"] = await loop.run_in_executor(None, lambda: m.locate(oid, True))
                case StoreStats():
                    reply["stats"] = self.stats()
                case _:
                    reply.update(ok=False, err="unknown", msg=f"unknown store request {kind!r}")
        except ObjectStoreFullError as exc:
            reply.update(
                ok=False,
                err="full",
                args=[
                    exc.oid,
                    exc.requested,
                    exc.capacity,
                    exc.used,
                    exc.pinned,
                    exc.spilled,
                    exc.disk_limit,
                    exc.reason,
                ],
            )
        except (ObjectNotFoundError, ObjectLostError) as exc:
            reply.update(ok=False, err="missing", msg=str(exc))
        except ObjectExistsError as exc:
            reply.update(ok=False, err="exists", msg=str(exc), args=[exc.size, exc.sealed])
        except Exception as exc:  # a bug or an OS error: report it, never crash the node
            log.exception("store request %s failed", kind)
            reply.update(ok=False, err="error", msg=f"{type(exc).__name__}: {exc}")
        send([ident, *encode(reply, payload)])

    def drop_all(self) -> int:
        """Free every object (this node rejoined as a new incarnation: owners rebuilt them)."""
        return sum(self.job_ended(job) for job in set(self._jobs.values()))

    async def _stream(self, send: Callable[[list[Any]], None], ident: bytes, h: StoreRead) -> None:
        """Send a segment to another node's puller in chunks, ``window`` ahead of its credits.

        Chunks are views of this node's mapping of the file (zero-copy up to the socket). The
        object stays pinned (not spilled) for the stream; a puller that stops granting credit
        for :data:`STALL_TIMEOUT_S` is given up on.
        """
        loop = asyncio.get_running_loop()
        m, oid, rid = self.manager, h.oid, h.rid
        chunk = min(max(h.chunk if h.chunk is not None else MAX_CHUNK, MIN_CHUNK), MAX_CHUNK)
        stream = _Stream(min(max(h.window, 1), MAX_WINDOW))
        key = (ident, rid)
        try:
            path = await loop.run_in_executor(None, lambda: m.locate(oid, True))
        except Exception as exc:
            _refuse(send, ident, rid, exc)
            return
        self.streams_served += 1
        if h.streams and self.bulk is not None:
            await self._offer(send, ident, h, path, chunk)
            return
        self._streams[key] = stream
        try:
            data, size = await loop.run_in_executor(None, _map_located, oid, path)
            view = memoryview(data)
            off = 0
            while True:
                if not await stream.take(STALL_TIMEOUT_S):
                    log.info("object %s: the puller stopped after %d of %d bytes", oid, off, size)
                    return
                n = min(chunk, size - off)
                # A Frame is sent without copying; it keeps the mapping alive until it is sent.
                head = {"k": Kind.STORE_CHUNK, "rid": rid, "off": off, "size": size}
                send([ident, *encode(head, [zmq.Frame(view[off : off + n])])])
                off += n
                self.bytes_out += n
                if off >= size:
                    return
        except Exception as exc:  # e.g. an OS error mapping the file: tell the puller
            if not isinstance(exc, ObjectLostError):
                log.exception("streaming object %s failed", oid)
            _refuse(send, ident, rid, exc)
        finally:
            del self._streams[key]
            m.unpin(oid)

    async def _offer(
        self, send: Callable[[list[Any]], None], ident: bytes, h: StoreRead, path: str, chunk: int
    ) -> None:
        """Serve ``h`` on the bulk channel: a fresh key and transfer id, sent on this CurveZMQ
        connection only, then the holder's streams (threads) send the object encrypted.

        The object is pinned (by ``locate``) until every stream has finished, failed, or was not
        claimed within :data:`CONNECT_TIMEOUT_S`.
        """
        assert self.bulk is not None
        loop = asyncio.get_running_loop()
        key = (ident, h.rid)
        offer: Offer | None = None
        try:
            data, size = await loop.run_in_executor(None, _map_located, h.oid, path)
            offer = self.bulk.offer(h.oid, data, size, chunk, h.streams)
            self._streams[key] = offer
            reply = {"k": Kind.STORE_BULK, "rid": h.rid, "size": size, "port": self.bulk.port}
            reply.update(tid=offer.tid, key=offer.key, chunk=chunk, streams=offer.streams)
            send([ident, *encode(reply)])
            try:
                await asyncio.wait_for(offer.all_claimed.wait(), CONNECT_TIMEOUT_S)
            except TimeoutError:
                offer.cancel(f"its streams did not all connect within {CONNECT_TIMEOUT_S:.0f} s")
            await offer.finished.wait()
            if offer.error:
                log.info("object %s: bulk transfer ended early: %s", h.oid, offer.error)
        except Exception as exc:  # e.g. an OS error mapping the file: tell the puller
            if not isinstance(exc, ObjectLostError):
                log.exception("offering object %s failed", h.oid)
            _refuse(send, ident, h.rid, exc)
        finally:
            if offer is not None:
                if not offer.finished.is_set():  # cancelled (the agent is closing)
                    offer.cancel("the holder stopped serving it")
                self.bytes_out += offer.sent
                self.bulk.withdraw(offer.tid)
            self._streams.pop(key, None)
            self.manager.unpin(h.oid)

    def stats(self) -> dict[str, int]:
        """The store's figures (:meth:`StoreManager.stats`) and this node's transfers.

        Returns
        -------
        dict
            Also ``streams_served`` / ``bytes_out`` (objects and bytes sent to other nodes) and
            ``pulls`` / ``bytes_in`` (objects and bytes fetched from them).
        """
        stats = {**self.manager.stats(), "streams_served": self.streams_served}
        stats["bytes_out"] = self.bytes_out
        stats["pulls"] = self.puller.pulls if self.puller is not None else 0
        stats["bytes_in"] = self.puller.bytes_in if self.puller is not None else 0
        return stats

    def listing(self, limit: int) -> tuple[list[list[Any]], int]:
        """The ``limit`` largest objects as ``[oid, size, job, state, pins]`` (largest first;
        ``job`` is ``""`` when none was recorded) and how many objects the store holds."""
        top = self.manager.largest(limit)
        return [
            [oid, size, self._jobs.get(oid, ""), state, pins] for oid, size, state, pins in top
        ], self.manager.stats()["objects"]

    def writer_died(self, worker_id: str) -> int:
        """Free what ``worker_id`` reserved and never sealed; returns how many."""
        oids = self._writing.pop(worker_id, set())
        for oid in oids:
            self._jobs.pop(oid, None)
            self.manager.free(oid)
        return len(oids)

    def job_ended(self, job_id: str) -> int:
        """Free every object of ``job_id``; returns how many."""
        oids = [oid for oid, job in self._jobs.items() if job == job_id]
        for oid in oids:
            del self._jobs[oid]
            self.manager.free(oid)
        return len(oids)


class _Stream:
    """Flow control of one outgoing stream: how many chunks the puller still takes."""

    def __init__(self, window: int) -> None:
        self.credits = window
        self.stopped = False
        self._more = asyncio.Event()

    def grant(self, n: int) -> None:
        """``n`` more chunks; 0 means the puller gave up."""
        if n <= 0:
            self.stopped = True
        else:
            self.credits += n
        self._more.set()

    async def take(self, timeout: float) -> bool:
        """Wait for one credit and use it; False if the puller stopped or went quiet."""
        deadline = time.monotonic() + timeout
        while self.credits <= 0 and not self.stopped:
            self._more.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._more.wait(), left)
        if self.stopped:
            return False
        self.credits -= 1
        return True


def _map_located(oid: str, path: str) -> tuple[Any, int]:
    """:func:`map_segment` for an object just located (and pinned).

    Raises
    ------
    ObjectLostError
        If its file is gone: the object was freed meanwhile (its node rejoined as a new
        incarnation and dropped everything, its job ended). Its owner can rebuild it; an
        ``"error"`` reply would fail the reading task for good.
    """
    try:
        return map_segment(path)
    except FileNotFoundError:
        raise ObjectLostError(f"object {oid} was freed on the node that holds it") from None


def _refuse(send: Callable[[list[Any]], None], ident: bytes, rid: Any, exc: Exception) -> None:
    """Tell a puller why its read failed: ``"missing"`` (lost: its owner may rebuild it) or
    ``"error"``."""
    if isinstance(exc, ObjectNotFoundError | ObjectLostError):
        msg = {"k": Kind.STORE_REPLY, "rid": rid, "ok": False, "err": "missing", "msg": str(exc)}
    else:
        msg = {"k": Kind.STORE_REPLY, "rid": rid, "ok": False, "err": "error"}
        msg["msg"] = f"{type(exc).__name__}: {exc}"
    send([ident, *encode(msg)])
