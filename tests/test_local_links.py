"""Local links (``transport/local.py``): a driver reaches the workers of its own host over a Unix
socket. Real clusters (the driver's, with two workers) and, for the refusals, a process of
another user (uid 65534, as in ``test_hardening_security.py``)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import nbcluster as nb
from nbcluster.client import current
from nbcluster.transport import local
from nbcluster.transport.local import MAX_FRAMES, LocalLinkError, ReadBuffer, Unpacker, pack
from tests.test_hardening_security import OTHER, as_other_user

ROOT_ONLY = pytest.mark.skipif(os.getuid() != 0, reason="simulates another user (root)")


@pytest.fixture(scope="module")
def cluster() -> Iterator[nb.ClusterInfo]:
    nb.shutdown()
    info = nb.init(num_cpus=2)
    yield info
    nb.shutdown()


def _links() -> list[Any]:
    client = current.get()
    assert client is not None and client.io._links is not None
    return list(client.io._links._links.values())


@nb.remote
def echo(x: Any) -> Any:
    return x


@nb.remote
class Counter:
    def __init__(self) -> None:
        self.n = 0

    def add(self, k: int) -> int:
        self.n += k
        return self.n


# ------------------------------------------------------------------------------ framing
def test_frames_round_trip_however_the_stream_is_cut() -> None:
    messages = [[b"h"], [b"header", b"", b"x" * 70_000], [b"a", b"b", b"c"] * 100]
    stream = b"".join(pack(m) for m in messages)
    for step in (1, 7, 4096, len(stream)):
        u, got = Unpacker(0), []
        for i in range(0, len(stream), step):
            got += u.feed(stream[i : i + step])
        assert got == messages, step


def test_messages_read_into_one_reused_buffer_stay_whole() -> None:
    # A thread reads every link into one buffer: what a message left there for the next read
    # must be kept (copied) before the buffer is overwritten.
    messages = [[b"h" * 10, bytes(range(256)) * 40], [b"x"], [b"y" * 5000, b"z"]] * 20
    stream = b"".join(pack(m) for m in messages)
    a, b = socket.socketpair()
    with a, b:
        b.setblocking(False)
        rbuf, u, got = ReadBuffer(1000), Unpacker(0), []
        for i in range(0, len(stream), 777):
            a.sendall(stream[i : i + 777])
            while True:
                try:
                    view = rbuf.recv(b)
                except BlockingIOError:
                    break
                got += u.feed(view)
        assert got == messages


@pytest.mark.parametrize(
    ("data", "why"),
    [
        ((0).to_bytes(4, "little"), "0 frames"),
        ((MAX_FRAMES + 1).to_bytes(4, "little"), f"{MAX_FRAMES + 1} frames"),
        (pack([b"x" * 2000]), "at most 1000"),
    ],
)
def test_a_stream_that_is_not_messages_is_refused(data: bytes, why: str) -> None:
    with pytest.raises(LocalLinkError, match=why):
        Unpacker(1000).feed(data)


def test_the_name_needs_the_cluster_secret() -> None:
    a = local.local_name(b"k" * 40, "tcp://127.0.0.1:5000")
    assert a.startswith(b"\0nbcluster-")
    assert a != local.local_name(b"j" * 40, "tcp://127.0.0.1:5000")
    assert a != local.local_name(b"k" * 40, "tcp://127.0.0.1:5001")


def test_a_listener_with_a_full_backlog_is_not_waited_for() -> None:
    """A worker that does not accept (busy in a long call, many callers): the driver's loop must
    not wait on it (it uses TCP then). A blocking connect would hang here."""
    name = b"\0nbcluster-test-full-backlog-%d" % os.getpid()
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(name)
    lst.listen(0)
    queued = []
    try:
        while True:
            t0 = time.monotonic()
            s = local.connect(name)
            assert time.monotonic() - t0 < 1.0  # (at once, full or not: µs, not a timeout)
            if s is None:
                break
            queued.append(s)  # (each waits in the backlog)
            assert len(queued) < 100, "the backlog never filled"
        assert queued  # one got in before it filled
    finally:
        for s in queued:
            s.close()
        lst.close()


# ------------------------------------------------------------------------------ in use
def test_the_driver_reaches_its_host_s_workers_on_local_links(cluster: nb.ClusterInfo) -> None:
    assert nb.get([echo.remote(i) for i in range(20)]) == list(range(20))
    c = Counter.remote()
    assert nb.get([c.add.remote(1) for _ in range(50)])[-1] == 50
    links = _links()
    assert len(links) >= 2 and all(link.local is not None for link in links)
    assert all(link.sock is None for link in links)  # no ZeroMQ task socket opened


@nb.remote
def ping_through(handle: Any) -> str:
    return str(nb.get(handle.ping.remote(), timeout=30))


@nb.remote
class Pong:
    def ping(self) -> str:
        return "pong"


def test_a_handle_passed_on_at_once_finds_its_actor(cluster: nb.ClusterInfo) -> None:
    """The task carrying a new actor's handle reaches its worker (local link) before the
    actor's creation reaches the head (another connection): the worker's lookup waits for the
    creation instead of being told "no such actor" (it was, one time in ten)."""
    for _ in range(60):
        actor = Pong.remote()
        assert nb.get(ping_through.remote(actor), timeout=60) == "pong"
        nb.kill(actor)


def test_large_messages_both_ways_through_full_socket_buffers(cluster: nb.ClusterInfo) -> None:
    """Arguments and results just under the inline limit, 200 at once: far more than a Unix
    socket's buffer (~200 KB), so both ends write in parts and wait to be writable."""
    blobs = [bytes([i % 256]) * 90_000 for i in range(200)]
    assert nb.get([echo.remote(b) for b in blobs], timeout=60) == blobs


def test_a_worker_killed_over_a_local_link_is_retried(cluster: nb.ClusterInfo) -> None:
    @nb.remote(max_retries=2)
    def pid_then_work(marker: str) -> int:
        if not os.path.exists(marker):
            Path(marker).write_text(str(os.getpid()))
            time.sleep(60)
        return os.getpid()

    marker = f"/tmp/nbc-local-kill-{os.getpid()}"
    try:
        ref = pid_then_work.remote(marker)
        deadline = time.monotonic() + 30
        while not os.path.exists(marker) or not Path(marker).read_text():
            assert time.monotonic() < deadline, "the task never started"
            time.sleep(0.05)
        victim = int(Path(marker).read_text())
        os.kill(victim, 9)
        assert nb.get(ref, timeout=60) != victim
    finally:
        Path(marker).unlink(missing_ok=True)


def test_shutdown_closes_every_local_link() -> None:
    nb.shutdown()
    me = psutil.Process()
    before = me.num_fds()
    nb.init(num_cpus=2)
    try:
        actors = [Counter.remote() for _ in range(6)]
        assert nb.get([a.add.remote(1) for a in actors]) == [1] * 6
        assert sum(link.local is not None for link in _links()) >= 6
    finally:
        nb.shutdown()
    assert me.num_fds() - before <= 2


def test_links_stay_on_zeromq_when_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    nb.shutdown()
    monkeypatch.setenv(local.LOCAL_LINKS_ENV, "0")
    nb.init(num_cpus=1)
    try:
        assert nb.get([echo.remote(i) for i in range(5)]) == list(range(5))
        links = _links()
        assert links and all(link.local is None and link.sock is not None for link in links)
    finally:
        nb.shutdown()


# ------------------------------------------------------------------------------ refusals
@ROOT_ONLY
def test_a_process_of_another_user_is_refused_unread(
    cluster: nb.ClusterInfo, tmp_path: Path
) -> None:
    """It knows the name (it has the secret, say): the worker closes the connection without
    reading the task it sent (which would have created a file on unpickling)."""
    assert nb.get(echo.remote(1)) == 1
    client = current.get()
    assert client is not None and client.io.transport is not None
    name = local.local_name(client.io.transport.keys.server_secret, _links()[0].conn.addr)
    marker = tmp_path / "pwned"
    tmp_path.chmod(0o777)

    def attack() -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(name)
        s.settimeout(10)
        header = b"\x82\xa1k\xa4task\xa3tid\xa1x"  # (msgpack; never read anyway)
        evil = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
        try:
            s.sendall(pack([header, evil]))
            answer = s.recv(100)
        except (BrokenPipeError, ConnectionResetError):
            return  # closed already
        if answer != b"":
            raise AssertionError("the worker answered another user")

    assert as_other_user(attack) == "ok"
    assert not marker.exists()
    assert nb.get(echo.remote(2)) == 2  # and it serves on


@ROOT_ONLY
def test_a_driver_never_talks_to_another_user_s_listener() -> None:
    """Someone else took the name first: the driver does not use it (it falls back to TCP)."""
    name = b"\0nbcluster-test-squatter-%d" % os.getpid()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        os.setgroups([])
        os.setgid(OTHER)
        os.setuid(OTHER)
        lst = local.listen(name)
        os.write(w, b"ready")
        time.sleep(30)
        lst.close()
        os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 5) == b"ready"
        assert local.connect(name) is None
        assert local.connect(b"\0nbcluster-nobody-listens-here") is None
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(r)


# ------------------------------------------------------------------ the calling thread sends
@nb.remote
def started_at(path: str) -> float:
    Path(path).write_text(repr(time.time()))
    return time.time()


def test_a_task_for_a_waiting_worker_leaves_without_the_io_thread(
    cluster: nb.ClusterInfo, tmp_path: Path
) -> None:
    import threading

    nb.get([started_at.remote(str(tmp_path / f"warm{i}")) for i in range(4)], timeout=60)
    client = current.get()
    assert client is not None and client.io.loop is not None
    held, release = threading.Event(), threading.Event()

    def hold() -> None:  # the I/O thread, stuck until we let it go
        held.set()
        release.wait(30)

    client.io.loop.call_soon_threadsafe(hold)
    assert held.wait(30)
    try:
        ref = started_at.remote(str(tmp_path / "mark"))
        # The task reached a worker and ran while the I/O thread could do nothing.
        deadline = time.monotonic() + 20
        while not (tmp_path / "mark").exists():
            assert time.monotonic() < deadline, "the task waited for the I/O thread"
            time.sleep(0.01)
    finally:
        release.set()
    assert nb.get(ref, timeout=60) > 0


def test_tasks_and_actor_calls_from_many_threads_keep_their_order(
    cluster: nb.ClusterInfo,
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    @nb.remote
    class Log:
        def __init__(self) -> None:
            self.seen: dict[int, list[int]] = {}

        def note(self, who: int, i: int) -> int:
            self.seen.setdefault(who, []).append(i)
            return i

        def get(self) -> dict[int, list[int]]:
            return self.seen

    log = Log.remote()

    def caller(who: int) -> list[Any]:
        refs, out = [], []
        for i in range(300):
            refs.append(log.note.remote(who, i))
            refs.append(echo.remote((who, i)))
            if i % 50 == 49:  # some waits between: both of the client's paths get used
                out += nb.get(refs, timeout=120)
                refs = []
        return out + nb.get(refs, timeout=120)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(caller, range(4)))
    for who, got in enumerate(results):
        assert got[0::2] == list(range(300))
        assert got[1::2] == [(who, i) for i in range(300)]
    assert nb.get(log.get.remote(), timeout=60) == {w: list(range(300)) for w in range(4)}


# (A Ctrl-C can also land in a finalizer run meanwhile, e.g. ObjectRef.__del__: Python reports
# it as unraisable and goes on; that is not what this test is about.)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_ctrl_c_during_submits_loses_no_task_and_leaves_the_state_whole(
    cluster: nb.ClusterInfo,
) -> None:
    import _thread
    import signal
    import threading

    client = current.get()
    assert client is not None and client.io.state is not None
    assert threading.current_thread() is threading.main_thread()  # (signals go to it)
    nb.get([echo.remote(i) for i in range(8)], timeout=60)
    stop, armed = threading.Event(), [False]

    def on_sigint(signum: int, frame: Any) -> None:
        # Ctrl-C, but only inside remote(): a KeyboardInterrupt anywhere else would end the
        # test, not the submit. (It disarms itself: one per submit.)
        if armed[0]:
            armed[0] = False
            raise KeyboardInterrupt

    def pester() -> None:  # Ctrl-C, again and again, wherever the main thread is
        while not stop.is_set():
            _thread.interrupt_main()
            stop.wait(0.0003)

    refs: dict[int, Any] = {}
    caught = i = 0
    old = signal.signal(signal.SIGINT, on_sigint)
    t = threading.Thread(target=pester)
    t.start()
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline or caught < 100:
            assert time.monotonic() < deadline + 30, f"only {caught} interrupts caught"
            armed[0] = True
            try:
                ref = echo.remote(i)
            except KeyboardInterrupt:
                caught += 1
                continue
            finally:
                armed[0] = False
            refs[i] = ref
            i += 1
    finally:
        stop.set()
        t.join(10)
        armed[0] = False
        time.sleep(0.05)  # (the last interrupt reaches our disarmed handler, not the next one)
        signal.signal(signal.SIGINT, old)
    assert caught >= 100 and len(refs) > 100
    # Every task whose submit returned runs; the state's invariants hold.
    assert nb.get(list(refs.values()), timeout=120) == list(refs.keys())
    with client.io.lock:
        client.io.state.validate_state()
    assert nb.get(echo.remote("after"), timeout=60) == "after"


def test_the_interrupt_guard_holds_ctrl_c_until_the_outermost_section_ends() -> None:
    import signal
    import threading

    from nbcluster.client.interrupts import InterruptGuard

    before = signal.getsignal(signal.SIGINT)
    guard = InterruptGuard()
    try:
        assert guard.enter() and guard.enter()  # (a finalizer that posts, inside a post)
        signal.raise_signal(signal.SIGINT)
        guard.leave()  # the inner section: still held
        with pytest.raises(KeyboardInterrupt):
            guard.leave()
        assert guard.enter()
        guard.leave()  # nothing pending: nothing raised
        with pytest.raises(KeyboardInterrupt):  # outside a section: at once, as before
            signal.raise_signal(signal.SIGINT)
            time.sleep(1)
        held: list[bool] = []
        t = threading.Thread(target=lambda: held.append(guard.enter()))
        t.start()
        t.join(10)
        assert held == [False]  # other threads get no signals to hold
    finally:
        signal.signal(signal.SIGINT, before)
