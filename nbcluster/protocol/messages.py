"""Every message kind of the nbcluster wire protocol, in one place.

A message is a ZeroMQ multipart message: one msgpack-encoded header (a dict whose ``"k"`` key is
one of the kinds below) followed by zero or more payload frames (pickle bytes and protocol-5
out-of-band buffers). Headers never carry pickled data; only payload frames do, and payload frames
are only ever unpickled after the connection was authenticated by CurveZMQ.
"""

from __future__ import annotations

from enum import StrEnum

#: Bumped on every incompatible change; checked in the HELLO / REGISTER handshakes.
PROTOCOL_VERSION = 2


class Kind(StrEnum):
    """Message kinds. Values are short because they travel in every header."""

    # --- any peer <-> head -----------------------------------------------------------------
    HELLO = "hello"  # client -> head: {v, role, pid, job_id?, worker_id?}
    WELCOME = "welcome"  # head -> client: {job_id, node_id?}
    ERROR = "error"  # either way: {msg, code, rid?}
    PING = "ping"  # client/agent -> head (liveness); an agent's carries {store, metrics}
    PONG = "pong"  # head -> client/agent
    GOODBYE = "bye"  # client -> head: disconnecting cleanly
    WARNING = "warn"  # head -> driver: {msg, code}: something the user should know (logged)

    # --- leases (driver <-> head) ----------------------------------------------------------
    LEASE_REQUEST = "lreq"  # {rid, shape, name, strategy?, locality?: {store id: bytes}}
    LEASE_GRANTED = "lgrant"  # {rid, lease_id, worker_id, worker_addr, control_addr, node_id, gpus}
    LEASE_INFEASIBLE = "linf"  # {rid, missing, shape}
    LEASE_FAILED = "lfail"  # head -> client: {rid, msg}: it can never be placed (hard affinity)
    LEASE_CANCEL = "lcancel"  # {rid}
    LEASE_RETURN = "lret"  # {lease_id}
    LEASE_LOST = "llost"  # head -> client: {lease_id, reason, drain?}
    NODE_DIED = "ndied"  # head -> clients: {node_id, store_id}: objects stored there are lost
    WORKER_BLOCKED = "wblock"  # worker-as-client -> head: {worker_id}
    WORKER_UNBLOCKED = "wunblock"  # {worker_id}

    # --- queries (any client <-> head) -----------------------------------------------------
    QUERY = "query"  # {rid, what: "nodes"}
    QUERY_REPLY = "qreply"  # {rid, result}
    SHUTDOWN_CLUSTER = "shutdown"  # owner driver -> head: stop head and every agent

    # --- observability (driver <-> head) ---------------------------------------------------
    TASK_EVENTS = "tevents"  # driver -> head: {events: [[code, tid, time, ...]]} (events.py)
    TASK_CANCEL = "tcancel"  # head -> driver: {tid, force}: cancel a task you submitted

    # --- node agent <-> head ---------------------------------------------------------------
    REGISTER_NODE = "reg"  # {v, name, address, resources, pid, gpus}
    NODE_REGISTERED = "regok"  # {node_id}
    START_WORKER = "wstart"  # head -> agent: {}
    WORKER_READY = "wready"  # agent -> head: {worker_id, addr, control_addr, pid}
    WORKER_DIED = "wdied"  # agent -> head: {worker_id, reason, never_ready?, requested?}
    KILL_WORKER = "wkill"  # head -> agent: {worker_id}
    STOP_NODE = "stop"  # head -> agent

    # --- driver <-> worker -----------------------------------------------------------------
    BIND = "bind"  # driver -> worker: {job_id, sys_path}
    TASK = "task"  # driver -> worker: {tid, fn, fnb?, nargs, deps, nret, name, gpus, ...}
    CANCEL = "cancel"  # driver -> worker (and its control socket): {tid, force}
    RESULT = "result"  # worker -> driver: {tid, ok, n: [frame counts], err?}
    LOG = "log"  # worker -> driver: {tid, stream, lines, name, pid}

    # --- actors ------------------------------------------------------------------------------
    ACTOR_CREATE = "acreate"  # driver -> head: {rid, aid, cls_name, name, ns, ...} + [cls, args]
    ACTOR_CREATED = "acreated"  # head -> driver: {rid, aid, existing, methods, cls_name}
    ACTOR_RESOLVE = "aresolve"  # client -> head: {aid} (subscribes to its state)
    ACTOR_STATE = "astate"  # head -> client: {aid, state, addr?, reason?} + [init error?]
    ACTOR_KILL = "akill"  # client -> head: {aid, no_restart}
    ACTOR_RELEASE = "arelease"  # creator -> head: every handle is gone
    ACTOR_INIT = "ainit"  # head -> worker: {aid, job_id, sys_path, gpus, ...} + [cls, args]
    ACTOR_READY = "aready"  # worker -> head: {aid}
    ACTOR_FAILED = "afailed"  # worker -> head: {aid} + [error]
    ACTOR_EXIT = "aexit"  # worker -> head: {aid} (exit_actor() was called)
    ACTOR_ATTACH = "aattach"  # head -> worker: {aid}: a restarted head now watches this actor
    ACTOR_CALL = "acall"  # driver -> worker: {tid, method, nargs, deps, nret, name}

    # --- the node's object store (local processes <-> their node agent) ----------------------
    STORE_RESERVE = "sreserve"  # {rid, oid, size, job} -> STORE_REPLY {rid, path} (or error)
    STORE_SEAL = "sseal"  # {rid, oid} -> STORE_REPLY
    STORE_LOCATE = "slocate"  # {rid, oid} -> STORE_REPLY {rid, path}; pins the object
    STORE_PIN = "spin"  # {oid} (no reply): a reader mapped it straight from shared memory
    STORE_UNPIN = "sunpin"  # {oid} (no reply)
    STORE_FREE = "sfree"  # {oids} (no reply)
    STORE_PULL = "spull"  # {rid, oid, from}: copy a remote node's object here, then LOCATE it
    STORE_READ = "sread"  # agent -> agent: {rid, oid, chunk, window} -> STORE_CHUNKs (or REPLY)
    STORE_CHUNK = "schunk"  # holder -> puller: {rid, off, size} + [bytes off..off+len of size]
    STORE_CREDIT = "scredit"  # puller -> holder: {rid, n}: n more chunks; n == 0: stop the stream
    STORE_STATS = "sstats"  # {rid} -> STORE_REPLY {rid, stats}: the store's and transfer figures
    STORE_REPLY = "sreply"  # {rid, ok, path?, err?, args?}
    JOB_ENDED = "jobend"  # head -> agent: {job_id}: free that job's objects

    # --- object transfer (borrower <-> owner) ----------------------------------------------
    GET_OBJECT = "oget"  # {oid}
    BORROW_DEL = "bdel"  # borrower -> owner: {oid, n}: a callee that kept the ref let go of it
    ESCAPE = "escape"  # borrower -> owner: {oid}: keep it until the job ends
    OBJECT = "obj"  # {oid, ok, err?} + frames
