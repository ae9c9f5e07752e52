"""Hardening against other local users: private folders, spill files, token files.

The tests run as root; "another local user" is uid 65534 (nobody): files and folders are given to
it with ``chown``, and its actions run in a forked child that switched to it.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import zmq

import nbcluster as nb
from nbcluster._private_fs import UnsafePathError, open_private_dir, user_dir, user_dir_path
from nbcluster.client.launcher import LocalCluster
from nbcluster.exceptions import ConfigurationError
from nbcluster.protocol.security import derive_keys, new_token, read_token_file, write_token_file
from nbcluster.store import (
    ObjectStoreError,
    StoreManager,
    default_spill_dir,
    dumps_oob,
    map_segment,
    segment_name,
    segment_size,
    write_segment,
)
from nbcluster.store.segment import loads_frames
from nbcluster.transport.sockets import (
    DEFAULT_MAX_MESSAGE_BYTES,
    HANDSHAKE_TIMEOUT_MS,
    MAX_MESSAGE_ENV,
    MessageTooLargeError,
    Transport,
    check_frame_sizes,
    max_message_bytes,
)

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.getuid() != 0, reason="simulates another user with chown (root)"),
]

OTHER = 65534  # nobody
MB = 1 << 20


class _Evil:
    """Unpickling this creates a file: proof that someone else's bytes were deserialized."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, ...]:
        return (open, (self.path, "w"))


def as_other_user(action: Callable[[], None], timeout: float = 10.0) -> str:
    """Run ``action`` in a child process as uid/gid 65534; return ``"ok"`` or its error."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        try:
            os.setgroups([])
            os.setgid(OTHER)
            os.setuid(OTHER)
            action()
            result = "ok"
        except BaseException as exc:  # reported to the parent
            result = f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, OSError):
                result += traceback.format_exc()
        os.write(w, result.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return out


@pytest.fixture
def shared_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A stand-in for ``/tmp`` (mode 1777) that this process's ``tempfile`` uses."""
    base = Path(tempfile.mkdtemp(prefix="nbc-shared-tmp-"))
    base.chmod(0o1777)
    monkeypatch.setattr(tempfile, "tempdir", str(base))
    assert user_dir_path() == str(base / f"nbcluster-{os.getuid()}")
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _plant_dir(path: Path, mode: int = 0o777) -> Path:
    path.mkdir()
    os.chown(path, OTHER, OTHER)
    path.chmod(mode)
    return path


# ---------------------------------------------------------------- the checks themselves
def test_private_dir_checks(tmp_path: Path) -> None:
    fd = open_private_dir(tmp_path / "new", "test folder")  # created 0700
    os.close(fd)
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700
    theirs = _plant_dir(tmp_path / "theirs")
    with pytest.raises(UnsafePathError, match="owned by uid 65534"):
        open_private_dir(theirs, "test folder")
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    with pytest.raises(UnsafePathError, match=r"mode 755\); run: chmod 700"):
        open_private_dir(loose, "test folder")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "new")  # even to a folder of ours
    with pytest.raises(UnsafePathError, match="symbolic link"):
        open_private_dir(link, "test folder")


def test_per_user_folder_taken_over_is_refused(shared_tmp: Path) -> None:
    root = Path(user_dir_path())
    assert user_dir() == str(root)  # made now: ours, 0700
    assert root.stat().st_mode & 0o777 == 0o700
    root.rmdir()
    _plant_dir(root)
    with pytest.raises(UnsafePathError, match="owned by uid 65534"):
        user_dir()
    root.rmdir()
    target = _plant_dir(shared_tmp / "elsewhere")
    root.symlink_to(target)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        user_dir()


# ---------------------------------------------------------------- token files
def test_token_file_must_be_ours_and_not_a_link(tmp_path: Path) -> None:
    good = tmp_path / "token"
    write_token_file(good, "s3cret")
    assert read_token_file(good) == "s3cret"
    link = tmp_path / "link"
    link.symlink_to(good)
    with pytest.raises(ConfigurationError, match="symbolic link"):
        read_token_file(link)
    theirs = tmp_path / "theirs"
    write_token_file(theirs, "planted")
    os.chown(theirs, OTHER, OTHER)  # still mode 0600
    with pytest.raises(ConfigurationError, match=f"{theirs} is owned by uid 65534"):
        read_token_file(theirs)
    good.chmod(0o640)
    with pytest.raises(ConfigurationError, match=f"run: chmod 600 {good}"):
        read_token_file(good)
    with pytest.raises(ConfigurationError, match="does not exist"):
        read_token_file(tmp_path / "missing")


def test_token_file_write_does_not_follow_a_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (tmp_path / "token").symlink_to(victim)
    with pytest.raises(OSError):
        write_token_file(tmp_path / "token", "s3cret")
    assert victim.read_text() == "keep me"


# ---------------------------------------------------------------- spill directory and files
@pytest.fixture
def store(tmp_path: Path) -> Iterator[Callable[..., StoreManager]]:
    made: list[StoreManager] = []

    def make(spill_dir: Path | None = None, capacity: int = 3 * MB) -> StoreManager:
        shm = tmp_path / "shm"
        shm.mkdir(exist_ok=True)
        m = StoreManager(
            f"t{len(made)}", capacity, spill_dir or tmp_path / "spill", shm_dir=str(shm)
        )
        made.append(m)
        return m

    yield make
    for m in made:
        m.cleanup()


def _put(m: StoreManager, oid: str, value: object) -> None:
    frames = dumps_oob(value)
    write_segment(m.reserve(oid, segment_size(frames)), frames)
    m.seal(oid)


def _spill_one(m: StoreManager) -> str:
    """Put two 2 MB values in a 3 MB store: the first is spilled; return its path."""
    _put(m, "a", np.zeros(2 * MB, dtype=np.uint8))
    _put(m, "b", np.ones(2 * MB, dtype=np.uint8))
    assert m.stats()["spilled"] > 0
    return m.spill_path("a")


@pytest.mark.parametrize("how", ["other_owner", "group_readable", "symlink"])
def test_restore_refuses_a_planted_spill_file(
    store: Callable[..., StoreManager], tmp_path: Path, how: str
) -> None:
    m = store()
    path = _spill_one(m)
    marker = tmp_path / "pwned"
    os.unlink(path)  # the spilled object's file, replaced by another user's
    evil = str(tmp_path / "evil")
    write_segment(evil, dumps_oob(_Evil(str(marker))))
    if how == "symlink":
        os.symlink(evil, path)  # a segment of ours, mode 0600, reached through a link
    else:
        shutil.copyfile(evil, path)
        if how == "other_owner":
            os.chown(path, OTHER, OTHER)
            os.chmod(path, 0o600)
        else:
            os.chmod(path, 0o640)
    err: Exception | None = None
    try:
        loc = m.locate("a")
    except ObjectStoreError as exc:
        err = exc
    else:
        loads_frames(map_segment(loc))  # what a reader does with what locate() gives it
    assert not marker.exists(), "a planted spill file was unpickled"
    assert err is not None and "refusing" in str(err) and segment_name(m.store_id, "a") in str(err)
    # Nothing was copied into shared memory under the object's name.
    assert not os.path.exists(m.shm_path("a"))
    assert loads_frames(map_segment(m.locate("b")))[0] == 1  # the store carries on


def test_spill_directory_must_be_private(
    store: Callable[..., StoreManager], tmp_path: Path
) -> None:
    with pytest.raises(UnsafePathError, match="owned by uid 65534"):
        store(_plant_dir(tmp_path / "theirs"))
    real = tmp_path / "mine"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        store(link)


def test_spill_files_live_in_the_directory_that_was_checked(
    store: Callable[..., StoreManager], tmp_path: Path
) -> None:
    """Swapping the spill folder's path afterwards redirects nothing."""
    m = store()
    spill = tmp_path / "spill"
    spill.rename(tmp_path / "moved")
    _plant_dir(spill)  # someone else's folder now has the name
    _spill_one(m)
    name = segment_name(m.store_id, "a")
    assert (tmp_path / "moved" / name).exists() and not (spill / name).exists()
    assert loads_frames(map_segment(m.locate("a")))[0] == 0  # restored through the descriptor


def test_default_spill_dir_is_inside_the_checked_per_user_folder(shared_tmp: Path) -> None:
    path = default_spill_dir("abc")
    assert Path(path).parent == Path(user_dir_path())
    m = StoreManager("abc", MB, None, shm_dir=str(shared_tmp))
    try:
        assert Path(path).stat().st_mode & 0o777 == 0o700
        assert Path(user_dir_path()).stat().st_mode & 0o777 == 0o700
    finally:
        m.cleanup()
    assert not Path(path).exists()
    Path(user_dir_path()).rmdir()
    _plant_dir(Path(user_dir_path()))
    with pytest.raises(UnsafePathError, match="--spill-dir"):
        StoreManager("abd", MB, None, shm_dir=str(shared_tmp))


# ---------------------------------------------------------------- the launcher
def test_launcher_replaces_a_taken_per_user_folder(shared_tmp: Path) -> None:
    planted = _plant_dir(Path(user_dir_path()))
    cluster = LocalCluster(num_cpus=1)
    try:
        root = cluster.session_dir.parent
        assert root != planted and root.parent == shared_tmp
        st = root.stat()
        assert st.st_uid == os.getuid() and st.st_mode & 0o777 == 0o700
        assert cluster.session_dir.stat().st_mode & 0o777 == 0o700
    finally:
        cluster.stop()
    assert not root.exists()  # the fallback folder went with the session
    assert list(planted.iterdir()) == []


def test_launcher_does_not_follow_a_planted_link(shared_tmp: Path) -> None:
    target = _plant_dir(shared_tmp / "theirs")
    Path(user_dir_path()).symlink_to(target)
    cluster = LocalCluster(num_cpus=1)
    try:
        assert not os.path.realpath(cluster.session_dir).startswith(str(target))
        assert cluster.session_dir.parent.parent == shared_tmp
        assert not cluster.session_dir.parent.is_symlink()
    finally:
        cluster.stop()
    assert list(target.iterdir()) == []


@nb.remote
def _first_byte(a: np.ndarray) -> int:
    return int(a[0])


def test_attack_through_a_taken_per_user_folder_fails(shared_tmp: Path) -> None:
    """The reported attack, end to end: another user creates ``$TMPDIR/nbcluster-<uid>`` first,
    swaps the session folder for one of theirs and plants a spill file; a worker restoring the
    spilled object would unpickle it. Now the launcher does not use their folder, so the swap
    is refused by the kernel, and the object reads back intact."""
    planted = _plant_dir(Path(user_dir_path()))
    marker = shared_tmp / "pwned"
    evil = str(shared_tmp / "evil")
    write_segment(evil, dumps_oob(_Evil(str(marker))))
    payload = Path(evil).read_bytes()
    nb.shutdown()
    info = nb.init(num_cpus=1, object_store_memory=3 * MB)
    try:
        session = Path(info.session_dir or "")
        store_id = nb.nodes()[0]["store_id"]
        a = nb.put(np.full(2 * MB, 7, dtype=np.uint8))
        b = nb.put(np.full(2 * MB, 8, dtype=np.uint8))  # spills a
        name = segment_name(store_id, a.oid)
        assert (session / "spill" / name).exists()

        def attack() -> None:
            os.rename(session, f"{session}.old")
            os.makedirs(session / "spill")
            fd = os.open(session / "spill" / name, os.O_CREAT | os.O_WRONLY, 0o600)
            os.write(fd, payload)
            os.close(fd)

        outcome = as_other_user(attack)
        assert outcome.startswith("PermissionError"), outcome
        assert nb.get(_first_byte.remote(a), timeout=60) == 7
        assert not marker.exists()
        assert nb.get(_first_byte.remote(b), timeout=60) == 8
    finally:
        nb.shutdown()
    assert list(planted.iterdir()) == []


# ---------------------------------------------------------------- memory before authentication
# A ZMTP 3.0 greeting asking for CURVE, as a client: what any peer may send before it has
# proved anything.
GREETING = b"\xff" + b"\0" * 8 + b"\x7f" + bytes([3, 0]) + b"CURVE".ljust(20, b"\0") + b"\0" * 32


@pytest.fixture(scope="module")
def local() -> Iterator[nb.ClusterInfo]:
    nb.shutdown()
    info = nb.init(num_cpus=1)
    yield info
    nb.shutdown()


def _head(info: nb.ClusterInfo) -> tuple[psutil.Process, str, int]:
    procs = [
        p for p in psutil.Process().children(recursive=True) if "nbcluster.head" in p.cmdline()
    ]
    assert len(procs) == 1
    host, port = info.address.rsplit("/", 1)[-1].rsplit(":", 1)
    return procs[0], host, int(port)


def _wait_closed(sock: socket.socket, timeout: float) -> float:
    """Read until the peer closes the connection; return how long that took."""
    t0 = time.monotonic()
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:  # still open
        return timeout
    return time.monotonic() - t0


def test_unauthenticated_oversized_frame_is_not_buffered(local: nb.ClusterInfo) -> None:
    head, host, port = _head(local)
    before = head.memory_info().rss
    sent = 0
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(GREETING)
        s.sendall(b"\x06" + (1 << 30).to_bytes(8, "big"))  # a "HELLO" command of 1 GiB
        chunk = b"\0" * MB
        try:
            while sent < 192 * MB:  # what the head used to buffer for such a peer
                s.sendall(chunk)
                sent += len(chunk)
        except OSError:  # reset by the head, as it should be
            pass
        assert _wait_closed(s, 20) < 20
    assert sent < 64 * MB  # socket buffers take a few MB at most
    assert head.memory_info().rss - before < 32 * MB
    assert nb.get(nb.put(41), timeout=30) == 41  # the head carries on


def test_greeting_only_peer_is_dropped_after_the_handshake_timeout(local: nb.ClusterInfo) -> None:
    _, host, port = _head(local)
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(GREETING)
        took = _wait_closed(s, 40)
    assert HANDSHAKE_TIMEOUT_MS / 1000 - 1 < took < 20  # libzmq's default would be 30 s


def test_listening_sockets_bound_frames_and_enforce_zap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MAX_MESSAGE_ENV, str(3 * MB))
    t = Transport(derive_keys(new_token()))
    try:
        sock, _ = t.server(zmq.ROUTER, "tcp://127.0.0.1:*", aio=False)
        assert sock.getsockopt(zmq.MAXMSGSIZE) == 3 * MB
        assert sock.getsockopt(zmq.ZAP_ENFORCE_DOMAIN) == 1
        assert sock.getsockopt(zmq.HANDSHAKE_IVL) == HANDSHAKE_TIMEOUT_MS
    finally:
        t.close()
    monkeypatch.setenv(MAX_MESSAGE_ENV, "0")
    assert max_message_bytes() == -1  # no limit
    monkeypatch.setenv(MAX_MESSAGE_ENV, "lots")
    with pytest.raises(ConfigurationError, match=MAX_MESSAGE_ENV):
        max_message_bytes()
    monkeypatch.delenv(MAX_MESSAGE_ENV)
    assert max_message_bytes() == DEFAULT_MAX_MESSAGE_BYTES


@nb.remote(num_cpus=0)
class _Holder:
    def __init__(self, a: np.ndarray) -> None:
        self.n = len(a)

    def size(self) -> int:
        return self.n


def test_values_over_the_limit_fail_clearly_in_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """An actor's constructor arguments travel inline through the head: one over the limit is
    an error in the caller, not a connection the head drops."""
    monkeypatch.setenv(MAX_MESSAGE_ENV, str(8 * MB))  # the head and agent inherit it
    nb.shutdown()
    nb.init(num_cpus=1)
    try:
        head = [
            p for p in psutil.Process().children(recursive=True) if "nbcluster.head" in p.cmdline()
        ]
        assert head and head[0].environ()[MAX_MESSAGE_ENV] == str(8 * MB)
        with pytest.raises(MessageTooLargeError, match=MAX_MESSAGE_ENV):
            _Holder.remote(np.zeros(16 * MB, dtype=np.uint8))
        h = _Holder.remote(np.zeros(6 * MB, dtype=np.uint8))  # under the limit: fine
        assert nb.get(h.size.remote(), timeout=60) == 6 * MB
        # Large task arguments and values go through the store, whatever their size.
        ref = nb.put(np.ones(16 * MB, dtype=np.uint8))
        assert nb.get(_first_byte.remote(ref), timeout=60) == 1
        assert nb.get(_first_byte.remote(np.full(16 * MB, 3, dtype=np.uint8)), timeout=60) == 3
    finally:
        nb.shutdown()
    with pytest.raises(MessageTooLargeError, match="the value passed to put"):
        check_frame_sizes([b"x" * (9 * MB)], "the value passed to put()")
