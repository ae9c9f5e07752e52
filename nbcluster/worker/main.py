"""The worker process: receives tasks from the drivers leasing it, runs them one at a time."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import traceback
import types
from collections import deque
from typing import Any

import zmq

from nbcluster import context
from nbcluster.exceptions import ProtocolError, TaskCancelledError, TaskError
from nbcluster.protocol.codec import decode, encode
from nbcluster.protocol.messages import Kind
from nbcluster.protocol.security import derive_keys, token_from_environment
from nbcluster.serialization import dumps, loads, loads_args
from nbcluster.transport import Transport
from nbcluster.worker.output import LineForwarder


def restore_filenames(fn: Any, filename: str) -> Any:
    """Give code pickled by value (cloudpickle says ``<dynamic-code>``) its file name back.

    Tracebacks then name the real file and line, as they would in the driver.
    """

    def fix(code: types.CodeType) -> types.CodeType:
        consts = tuple(fix(c) if isinstance(c, types.CodeType) else c for c in code.co_consts)
        if code.co_filename == "<dynamic-code>":
            return code.replace(co_filename=filename, co_consts=consts)
        return code.replace(co_consts=consts)

    code = getattr(fn, "__code__", None)
    if filename and isinstance(code, types.CodeType):
        with contextlib.suppress(Exception):
            fn.__code__ = fix(code)
    return fn


class Worker:
    """Runs tasks in the main thread; a control thread handles cancellation of the running one."""

    def __init__(
        self, transport: Transport, sock: Any, ctrl: Any, ident: context.WorkerIdentity
    ) -> None:
        self.transport = transport
        self.sock = sock
        self.ctrl = ctrl
        self.ident = ident
        self.functions: dict[str, Any] = {}
        self.queue: deque[tuple[bytes, dict[str, Any], list[Any]]] = deque()
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._running: str | None = None  # task id running now
        self._cancel_requested: str | None = None
        self._main = threading.main_thread()
        self._pending_lines: list[tuple[bytes, str, str, str, list[str]]] = []
        self._out_target: tuple[bytes, str, str] | None = None  # (ident, tid, name)
        self.stdout = LineForwarder("stdout", sys.stdout)
        self.stderr = LineForwarder("stderr", sys.stderr)
        self._orig_cuda = os.environ.get("CUDA_VISIBLE_DEVICES")

    # ----------------------------------------------------------------------------- output
    def _sink(self, stream: str, lines: list[str]) -> None:
        target = self._out_target
        if target is None:
            return
        ident, tid, name = target
        if threading.current_thread() is self._main:
            self._send(
                ident,
                {
                    "k": Kind.LOG,
                    "tid": tid,
                    "stream": stream,
                    "lines": lines,
                    "name": name,
                    "pid": self.pid,
                },
            )
        else:  # zmq sockets are single-threaded: the main thread sends these later
            with self._lock:
                self._pending_lines.append((ident, tid, name, stream, lines))

    def _flush_pending_lines(self) -> None:
        with self._lock:
            pending, self._pending_lines = self._pending_lines, []
        for ident, tid, name, stream, lines in pending:
            self._send(
                ident,
                {
                    "k": Kind.LOG,
                    "tid": tid,
                    "stream": stream,
                    "lines": lines,
                    "name": name,
                    "pid": self.pid,
                },
            )

    def _send(self, ident: bytes, header: dict[str, Any], payload: list[Any] | None = None) -> None:
        try:
            self.sock.send_multipart([ident, *encode(header, payload or ())], copy=False)
        except zmq.ZMQError:
            pass  # the driver is gone; the head will recycle this worker

    # ----------------------------------------------------------------------------- main loop
    def run(self) -> None:
        sys.stdout = self.stdout
        sys.stderr = self.stderr
        threading.Thread(target=self._control_loop, name="nbcluster-control", daemon=True).start()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while True:
            try:
                if not self.queue:
                    poller.poll()
                while self.sock.poll(0):
                    self._receive(self.sock.recv_multipart(copy=False))
                if self.queue:
                    ident, h, payload = self.queue.popleft()
                    self._execute(ident, h, payload)
            except KeyboardInterrupt:
                continue  # a cancellation that arrived just after its task finished

    def _receive(self, frames: list[Any]) -> None:
        ident = frames[0].bytes
        try:
            h, payload = decode(frames[1:])
        except ProtocolError:
            return
        kind = h["k"]
        if kind == Kind.TASK:
            self.queue.append((ident, h, payload))
        elif kind == Kind.BIND:
            self._bind(h)
        elif kind == Kind.CANCEL:
            for i, (qident, qh, _) in enumerate(self.queue):
                if qh["tid"] == h["tid"]:
                    del self.queue[i]
                    self._send_error(qident, qh["tid"], TaskCancelledError(qh["tid"]), "cancelled")
                    break

    def _bind(self, h: dict[str, Any]) -> None:
        if self.ident.job_id is None:
            self.ident.job_id = h["job_id"]
        for p in h.get("sys_path", []):
            if p not in sys.path:
                sys.path.append(p)

    # ----------------------------------------------------------------------------- tasks
    def _execute(self, ident: bytes, h: dict[str, Any], payload: list[Any]) -> None:
        tid: str = h["tid"]
        name: str = h.get("name", "task")
        try:
            fn, pos = self._function(h, payload)
            nargs = h["nargs"]
            args_frames = payload[pos : pos + nargs]
            pos += nargs
            dep_values = []
            for count in h.get("deps", []):
                dep_values.append(loads(payload[pos : pos + count]))
                pos += count
            args, kwargs = loads_args(args_frames, dep_values)
        except Exception as exc:
            self._send_error(ident, tid, self._task_error(name, exc, skip=0), "exc")
            return
        gpus = h.get("gpus")
        if gpus:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
        elif self._orig_cuda is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = self._orig_cuda
        ctx = context.TaskContext(
            task_id=tid,
            job_id=self.ident.job_id or "",
            name=name,
            node_id=self.ident.node_id,
            worker_id=self.ident.worker_id,
            assigned=h.get("assigned") or {},
        )
        token = context.current_task.set(ctx)
        self._out_target = (ident, tid, name)
        self.stdout.sink = self.stderr.sink = self._sink
        with self._lock:
            self._running = tid
        ok = False
        result: Any = None
        error: BaseException | None = None
        cancelled = False
        try:
            try:
                result = fn(*args, **kwargs)
                ok = True
            except KeyboardInterrupt as exc:
                cancelled = self._cancel_requested == tid
                error = exc
            except BaseException as exc:  # user code may raise anything, SystemExit included
                error = exc
            finally:
                with self._lock:
                    self._running = None
        except KeyboardInterrupt:  # cancellation landed between the call and the bookkeeping
            cancelled = not ok
        finally:
            self._cancel_requested = None
            context.current_task.reset(token)
            self.stdout.drain()
            self.stderr.drain()
            self.stdout.sink = self.stderr.sink = None
            self._flush_pending_lines()
            self._out_target = None
        if cancelled:
            self._send_error(ident, tid, TaskCancelledError(tid), "cancelled")
        elif not ok:
            assert error is not None
            self._send_error(ident, tid, self._task_error(name, error, skip=1), "exc")
        else:
            self._send_result(ident, tid, name, h.get("nret", 1), result)

    def _function(self, h: dict[str, Any], payload: list[Any]) -> tuple[Any, int]:
        fid = h["fn"]
        if h.get("fnb"):
            if fid not in self.functions:
                fn, filename = loads([payload[0]])
                self.functions[fid] = restore_filenames(fn, filename)
            return self.functions[fid], 1
        return self.functions[fid], 0

    def _send_result(self, ident: bytes, tid: str, name: str, nret: int, result: Any) -> None:
        try:
            if nret == 1:
                parts = [dumps(result)]
            elif nret == 0:
                parts = []
            else:
                values = tuple(result) if isinstance(result, list | tuple) else None
                if values is None or len(values) != nret:
                    got = f"{len(values)} values" if values is not None else type(result).__name__
                    raise ValueError(f"task {name} declared num_returns={nret} but returned {got}")
                parts = [dumps(v) for v in values]
        except Exception as exc:
            self._send_error(
                ident, tid, self._task_error(name, exc, skip=0, what="its result"), "exc"
            )
            return
        frames = [f for p in parts for f in p]
        self._send(
            ident, {"k": Kind.RESULT, "tid": tid, "ok": True, "n": [len(p) for p in parts]}, frames
        )

    def _task_error(self, name: str, exc: BaseException, skip: int, what: str = "") -> TaskError:
        tb = exc.__traceback__
        for _ in range(skip):
            if tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
        frames = [
            (f.filename, f.lineno or 0, f.name, f.line or "") for f in traceback.extract_tb(tb)
        ]
        # The stack is sent as frames (the driver fills in source lines it alone has, such as
        # notebook cells); the text holds the exception itself, chained ones included.
        text = "".join(traceback.format_exception_only(type(exc), exc))
        chained = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if chained is not None:
            text = "".join(traceback.format_exception(chained)) + "\nThe above led to:\n" + text
        if what:
            text = f"{text}(raised while serializing {what})"
        where = f"pid={self.pid}, node={self.ident.node_name}"
        return TaskError(name, text, exc, where, frames)

    def _send_error(self, ident: bytes, tid: str, err: BaseException, kind: str) -> None:
        try:
            frames = dumps(err)
        except Exception:
            if isinstance(err, TaskError):  # the original exception does not pickle
                err = TaskError(err.function_name, err.traceback_str, None, err.where, err.frames)
            frames = dumps(err)
        self._send(
            ident,
            {"k": Kind.RESULT, "tid": tid, "ok": False, "err": kind, "n": [len(frames)]},
            frames,
        )

    # ----------------------------------------------------------------------------- control
    def _control_loop(self) -> None:
        agent_pid = int(os.environ.get("NBCLUSTER_AGENT_PID", "0"))
        while True:
            if self.ctrl.poll(500):
                frames = self.ctrl.recv_multipart()
                with contextlib.suppress(ProtocolError):
                    h, _ = decode(frames[1:])
                    if h["k"] == Kind.CANCEL:
                        self._cancel_running(h["tid"], bool(h.get("force")))
            if agent_pid and os.getppid() != agent_pid:
                os._exit(0)  # our agent is gone: nobody will ever use us again

    def _cancel_running(self, tid: str, force: bool) -> None:
        with self._lock:
            if self._running != tid:
                return
            if force:
                os.kill(self.pid, signal.SIGKILL)
            self._cancel_requested = tid
            os.kill(self.pid, signal.SIGINT)


def main() -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    token = token_from_environment()
    if not token:
        print("nbcluster worker: no cluster secret in the environment", file=sys.stderr)
        sys.exit(2)
    transport = Transport(derive_keys(token))
    host = os.environ.get("NBCLUSTER_BIND_HOST", "127.0.0.1")
    sock, addr = transport.server(zmq.ROUTER, f"tcp://{host}:0", aio=False)
    ctrl, ctrl_addr = transport.server(zmq.ROUTER, f"tcp://{host}:0", aio=False)
    ident = context.WorkerIdentity(
        worker_id=os.environ.get("NBCLUSTER_WORKER_ID", "worker"),
        node_id=os.environ.get("NBCLUSTER_NODE_ID", ""),
        node_name=os.environ.get("NBCLUSTER_NODE_NAME", ""),
        head_address=os.environ.get("NBCLUSTER_HEAD", ""),
    )
    context.worker_identity = ident
    sys.stdout.write(f"NBCLUSTER_WORKER_READY {addr} {ctrl_addr} {os.getpid()}\n")
    sys.stdout.flush()
    Worker(transport, sock, ctrl, ident).run()
