"""Every message kind of the nbcluster wire protocol, in one place.

A message is a ZeroMQ multipart message: one msgpack-encoded header (a dict whose ``"k"`` key is
one of the kinds below) followed by zero or more payload frames (pickle bytes and protocol-5
out-of-band buffers). Headers never carry pickled data; only payload frames do, and payload frames
are only ever unpickled after the connection was authenticated by CurveZMQ.

The fields and payload frames of each kind are declared in :mod:`nbcluster.protocol.schema`;
every receive loop checks what it receives against them (:mod:`nbcluster.protocol.validation`).
"""

from __future__ import annotations

from enum import StrEnum

#: Bumped on every incompatible change; checked in the HELLO / REGISTER handshakes.
PROTOCOL_VERSION = 2

#: A re-registration with a restarted head (a driver's ``HELLO {rejoin}``, an agent's
#: ``REGISTER``) unanswered this long is sent again.
REJOIN_AGAIN_S = 3.0


#: How a worker's death report (``WORKER_DIED`` ``reason``, then ``LEASE_LOST``) begins when the
#: node's memory monitor killed it: drivers raise ``OutOfMemoryError`` for such tasks.
OOM_REASON = "out of memory"


class Kind(StrEnum):
    """Message kinds. Values are short because they travel in every header."""

    # --- any peer <-> head -----------------------------------------------------------------
    HELLO = "hello"  # client -> head
    WELCOME = "welcome"  # head -> client
    ERROR = "error"  # either way: a request failed
    PING = "ping"  # client/agent -> head: liveness (an agent's carries store figures, metrics)
    PONG = "pong"  # head -> client/agent
    GOODBYE = "bye"  # client -> head: disconnecting cleanly
    WARNING = "warn"  # head -> driver: something the user should know (logged)

    # --- leases (driver <-> head) ----------------------------------------------------------
    LEASE_REQUEST = "lreq"  # driver -> head
    LEASE_GRANTED = "lgrant"  # head -> driver
    LEASE_INFEASIBLE = "linf"  # head -> driver: no node has that much
    LEASE_FAILED = "lfail"  # head -> client: it can never be placed (hard affinity)
    LEASE_CANCEL = "lcancel"  # driver -> head
    LEASE_RETURN = "lret"  # driver -> head
    LEASE_LOST = "llost"  # head -> client
    NODE_DIED = "ndied"  # head -> clients: objects stored there are lost
    WORKER_BLOCKED = "wblock"  # worker-as-client -> head
    WORKER_UNBLOCKED = "wunblock"  # worker-as-client -> head

    # --- queries (any client <-> head) -----------------------------------------------------
    QUERY = "query"  # client -> head
    QUERY_REPLY = "qreply"  # head -> client
    SHUTDOWN_CLUSTER = "shutdown"  # owner driver -> head: stop head and every agent
    PG_CREATE = "pgcreate"  # client -> head: reserve a placement group -> QUERY_REPLY
    PG_REMOVE = "pgremove"  # client -> head: remove one -> QUERY_REPLY
    PG_WAIT = "pgwait"  # client -> head: answered (QUERY_REPLY) once the group is placed
    LOG_READ = "logread"  # client -> head: part of a worker's log -> QUERY_REPLY

    # --- observability (driver <-> head) ---------------------------------------------------
    TASK_EVENTS = "tevents"  # driver -> head: task state changes (client/events.py)
    TASK_CANCEL = "tcancel"  # head -> driver: cancel a task you submitted

    # --- node agent <-> head ---------------------------------------------------------------
    REGISTER_NODE = "reg"  # agent -> head
    NODE_REGISTERED = "regok"  # head -> agent
    START_WORKER = "wstart"  # head -> agent
    WORKER_READY = "wready"  # agent -> head
    WORKER_DIED = "wdied"  # agent -> head
    KILL_WORKER = "wkill"  # head -> agent
    STOP_NODE = "stop"  # head -> agent
    LOG_FETCH = "logfetch"  # head -> agent: read a worker's log
    LOG_DATA = "logdata"  # agent -> head: what LOG_FETCH read
    STORE_LIST = "slist"  # head -> agent: the store's largest objects (``nbcluster memory``)
    STORE_LISTING = "slisting"  # agent -> head: its answer

    # --- driver <-> worker -----------------------------------------------------------------
    BIND = "bind"  # driver -> worker
    TASK = "task"  # driver -> worker
    CANCEL = "cancel"  # driver -> worker (and its control socket)
    RESULT = "result"  # worker -> driver
    LOG = "log"  # worker -> driver
    STREAM_ITEM = "sitem"  # worker -> driver: one value a generator task yielded
    STREAM_ACK = "sack"  # driver -> worker: how many items of a stream were consumed
    STEAL = "steal"  # driver -> worker's control socket: give back these queued tasks
    STOLEN = "stolen"  # worker -> driver: these queued tasks were taken out, never run
    BATCH = "batch"  # driver <-> worker: several whole messages in one (tasks out, results back)

    # --- actors ------------------------------------------------------------------------------
    ACTOR_CREATE = "acreate"  # driver -> head: + class and argument frames
    ACTOR_CREATED = "acreated"  # head -> driver
    ACTOR_RESOLVE = "aresolve"  # client -> head: subscribe to its state
    ACTOR_STATE = "astate"  # head -> client: + [init error]
    ACTOR_KILL = "akill"  # client -> head
    ACTOR_RELEASE = "arelease"  # creator -> head: every handle is gone
    ACTOR_INIT = "ainit"  # head -> worker: + class and argument frames
    ACTOR_READY = "aready"  # worker -> head
    ACTOR_FAILED = "afailed"  # worker -> head: + [error]
    ACTOR_EXIT = "aexit"  # worker -> head: exit_actor() was called
    ACTOR_ATTACH = "aattach"  # head -> worker: a restarted head now watches this actor
    ACTOR_CALL = "acall"  # driver -> worker

    # --- the node's object store (local processes <-> their node agent) ----------------------
    STORE_RESERVE = "sreserve"  # process -> its agent -> STORE_REPLY
    STORE_SEAL = "sseal"  # process -> its agent -> STORE_REPLY
    STORE_LOCATE = "slocate"  # process -> its agent -> STORE_REPLY; pins the object
    STORE_PIN = "spin"  # (no reply) a reader mapped it straight from shared memory
    STORE_UNPIN = "sunpin"  # (no reply)
    STORE_FREE = "sfree"  # (no reply)
    STORE_PULL = "spull"  # process -> its agent: copy a remote node's object here, then LOCATE it
    STORE_READ = "sread"  # agent -> agent -> STORE_CHUNKs or STORE_BULK (or STORE_REPLY)
    STORE_CHUNK = "schunk"  # holder -> puller: + [bytes]
    STORE_BULK = "sbulk"  # holder -> puller: key and port of an AES-GCM bulk transfer
    STORE_CREDIT = "scredit"  # puller -> holder: n more chunks; n == 0: stop the stream
    STORE_STATS = "sstats"  # -> STORE_REPLY: the store's and transfer figures
    STORE_REPLY = "sreply"  # agent -> process
    JOB_ENDED = "jobend"  # head -> agent: free that job's objects

    # --- object transfer (borrower <-> owner) ----------------------------------------------
    GET_OBJECT = "oget"  # borrower -> owner
    BORROW_DEL = "bdel"  # borrower -> owner: a callee that kept the ref let go of it
    ESCAPE = "escape"  # borrower -> owner: keep it until the job ends
    OBJECT = "obj"  # owner -> borrower: + its frames


# --- actor states, as ACTOR_STATE carries them (and the head's directory and clients use) -------
PENDING = "PENDING"  # not placed yet
ALIVE = "ALIVE"
RESTARTING = "RESTARTING"  # its worker died; being placed again (max_restarts)
DEAD = "DEAD"
