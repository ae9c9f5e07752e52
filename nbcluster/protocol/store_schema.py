"""Message schemas of the node's object store and of object transfers between owners and
borrowers (re-exported by :mod:`nbcluster.protocol.schema`, where every kind is collected)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from nbcluster.protocol.base import Count, Message
from nbcluster.protocol.messages import Kind


# --- the node's object store --------------------------------------------------------------------
class StoreReserve(Message, tag=Kind.STORE_RESERVE.value):
    expects_reply = True
    summary = "process -> its agent: a file for a new object -> STORE_REPLY {path}"
    rid: int
    oid: str
    size: Count
    job: str | None = None
    w: str = ""  # the worker writing it: what it never sealed is freed when it dies


class StoreSeal(Message, tag=Kind.STORE_SEAL.value):
    expects_reply = True
    summary = "process -> its agent: the object is written -> STORE_REPLY"
    rid: int
    oid: str
    w: str = ""


class StoreLocate(Message, tag=Kind.STORE_LOCATE.value):
    expects_reply = True
    summary = "process -> its agent: -> STORE_REPLY {path}; pins the object"
    rid: int
    oid: str


class StorePin(Message, tag=Kind.STORE_PIN.value):
    summary = "process -> its agent (no reply): a reader mapped it from shared memory"
    oid: str


class StoreUnpin(Message, tag=Kind.STORE_UNPIN.value):
    summary = "process -> its agent (no reply)"
    oid: str


class StoreFree(Message, tag=Kind.STORE_FREE.value):
    summary = "process -> its agent (no reply)"
    oids: list[str]


class StorePull(Message, tag=Kind.STORE_PULL.value):
    expects_reply = True
    summary = "process -> its agent: copy a remote node's object here, then LOCATE it"
    rid: int
    oid: str
    from_: str = msgspec.field(name="from")
    job: str | None = None


class StoreRead(Message, tag=Kind.STORE_READ.value):
    expects_reply = True
    summary = (
        "agent -> agent: stream an object -> STORE_CHUNKs, or STORE_BULK when ``streams`` > 0 "
        "(or STORE_REPLY on error)"
    )
    rid: int
    oid: str
    chunk: Count | None = None
    window: Count = 1
    streams: Count = 0


class StoreBulk(Message, tag=Kind.STORE_BULK.value):
    summary = (
        "holder -> puller: the object's ``size``; open ``streams`` TCP connections to ``port``, "
        "AES-256-GCM with ``key`` (fresh per transfer), ``chunk`` bytes per sealed chunk"
    )
    rid: int
    size: Count
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    tid: Annotated[bytes, msgspec.Meta(min_length=16, max_length=16)]
    key: Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
    chunk: Annotated[int, msgspec.Meta(ge=1)]
    streams: Count


class StoreChunk(Message, tag=Kind.STORE_CHUNK.value):
    frame_count = 1
    summary = "holder -> puller: + [bytes ``off``.. of an object of ``size`` bytes]"
    rid: int
    off: Count
    size: Count


class StoreCredit(Message, tag=Kind.STORE_CREDIT.value):
    summary = "puller -> holder: ``n`` more chunks; ``n`` == 0: stop the stream"
    rid: int
    n: Count


class StoreStats(Message, tag=Kind.STORE_STATS.value):
    expects_reply = True
    summary = "-> STORE_REPLY {stats}: the store's and transfer figures"
    rid: int


class StoreReply(Message, tag=Kind.STORE_REPLY.value):
    summary = (
        "agent -> process (``err``: full, missing, exists or error; ``args``: a full store's "
        "figures, or an existing object's size and whether it is sealed)"
    )
    ok: bool
    rid: int | None = None
    path: str | None = None
    err: str | None = None
    msg: str | None = None
    args: list[Any] | None = None
    stats: dict[str, Any] | None = None


class JobEnded(Message, tag=Kind.JOB_ENDED.value):
    summary = "head -> agent: free that job's objects"
    job_id: str


# --- object transfer (borrower <-> owner) -------------------------------------------------------
class GetObject(Message, tag=Kind.GET_OBJECT.value):
    expects_reply = True
    summary = "borrower -> owner"
    oid: str


class BorrowDel(Message, tag=Kind.BORROW_DEL.value):
    summary = "borrower -> owner: a callee that kept the ref let go of it ``n`` times"
    oid: str
    n: int = 1


class Escape(Message, tag=Kind.ESCAPE.value):
    summary = "borrower -> owner: keep it until the job ends"
    oid: str


class Object(Message, tag=Kind.OBJECT.value):
    frame_count = None
    summary = "owner -> borrower: + its frames (``err``: lost)"
    oid: str
    ok: bool
    err: str | None = None
