"""The store service a node agent runs: local processes reserve, seal, locate and free objects."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from nbcluster.exceptions import ObjectLostError
from nbcluster.protocol.codec import encode
from nbcluster.protocol.messages import Kind
from nbcluster.store.errors import ObjectNotFoundError, ObjectStoreError, ObjectStoreFullError
from nbcluster.store.manager import StoreManager
from nbcluster.store.transfer import ObjectPuller, read_segment_file

log = logging.getLogger(__name__)


class StoreService:
    """Answers store requests on the agent's loop; file copies (spill/restore) run off it.

    Every object is recorded with the job it belongs to, so that the objects of a job whose
    driver is gone can be freed at once.
    """

    def __init__(self, manager: StoreManager, puller: ObjectPuller | None = None) -> None:
        self.manager = manager
        self.puller = puller
        self._jobs: dict[str, str] = {}  # oid -> job id

    async def handle(
        self, send: Callable[[list[Any]], None], ident: bytes, h: dict[str, Any]
    ) -> None:
        """Answer one request (``send`` queues the reply frames on the agent's socket)."""
        kind = h["k"]
        loop = asyncio.get_running_loop()
        m = self.manager
        if kind == Kind.STORE_UNPIN:
            m.unpin(h["oid"])
            return
        if kind == Kind.STORE_PIN:
            with contextlib.suppress(ObjectStoreError):  # freed meanwhile: nothing to pin
                m.pin(h["oid"])
            return
        if kind == Kind.STORE_FREE:
            for oid in h["oids"]:
                self._jobs.pop(oid, None)
            # Off the loop: freeing pages must not hold up the next put.
            await loop.run_in_executor(None, lambda: [m.free(oid) for oid in h["oids"]])
            return
        reply: dict[str, Any] = {"k": Kind.STORE_REPLY, "rid": h.get("rid"), "ok": True}
        payload: list[Any] = []
        try:
            if kind == Kind.STORE_RESERVE:
                reply["path"] = await loop.run_in_executor(None, m.reserve, h["oid"], h["size"])
                if h.get("job"):
                    self._jobs[h["oid"]] = h["job"]
            elif kind == Kind.STORE_SEAL:
                m.seal(h["oid"])
            elif kind == Kind.STORE_LOCATE:
                reply["path"] = await loop.run_in_executor(None, lambda: m.locate(h["oid"], True))
            elif kind == Kind.STORE_PULL:
                if self.puller is None:
                    raise ObjectStoreError("this node cannot fetch objects from other nodes")
                await self.puller.pull(h["oid"], h["from"])
                if h.get("job"):  # the copy goes with its job, like the original
                    self._jobs.setdefault(h["oid"], h["job"])
                reply["path"] = await loop.run_in_executor(None, lambda: m.locate(h["oid"], True))
            elif kind == Kind.STORE_READ:
                path = await loop.run_in_executor(None, lambda: m.locate(h["oid"], True))
                try:
                    payload = [await loop.run_in_executor(None, read_segment_file, path)]
                finally:
                    m.unpin(h["oid"])
            else:
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
        except Exception as exc:  # a bug or an OS error: report it, never crash the node
            log.exception("store request %s failed", kind)
            reply.update(ok=False, err="error", msg=f"{type(exc).__name__}: {exc}")
        send([ident, *encode(reply, payload)])

    def job_ended(self, job_id: str) -> int:
        """Free every object of ``job_id``; returns how many."""
        oids = [oid for oid, job in self._jobs.items() if job == job_id]
        for oid in oids:
            del self._jobs[oid]
            self.manager.free(oid)
        return len(oids)
