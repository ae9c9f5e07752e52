"""Directories and files that only the current user may control.

Local mode keeps its session (token, logs, spill files) under ``$TMPDIR``, which every local user
can write to. A path there may have been created first by someone else, or be a symbolic link
they planted; a file read from it may be theirs. So every such directory is opened once without
following links (``O_NOFOLLOW``) and checked through its descriptor (owner, mode, type), and the
files in it are opened relative to that descriptor and checked the same way. One module, so that
the launcher, the object store, the agent and token reading apply the same rules.

The rule: a *private* directory or file is not a symbolic link, is owned by the current user, and
has no group or other permission bits (mode ``0700`` for a directory, ``0600`` for a file).
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile

from nbcluster.exceptions import ConfigurationError

__all__ = [
    "UnsafePathError",
    "check_private",
    "open_private_dir",
    "open_private_file",
    "user_dir",
]

#: Permission bits a private directory or file must not have.
OTHERS_MASK = stat.S_IRWXG | stat.S_IRWXO


class UnsafePathError(ConfigurationError):
    """A directory or file that another local user could control; it was not used."""


def check_private(st: os.stat_result, path: str, what: str, *, directory: bool) -> None:
    """Raise :class:`UnsafePathError` unless ``st`` describes a private directory or file.

    Parameters
    ----------
    st
        ``fstat`` of a descriptor opened with ``O_NOFOLLOW``.
    path
        Its path, for the message.
    what
        What it is, for the message (``"spill directory"``, ``"token file"``).
    directory
        Whether a directory (else a regular file) is expected.
    """
    want_type = stat.S_ISDIR if directory else stat.S_ISREG
    if not want_type(st.st_mode):
        kind = "a directory" if directory else "a regular file"
        raise UnsafePathError(f"{what} {path} is not {kind}; remove it")
    uid = os.getuid()
    if st.st_uid != uid:
        raise UnsafePathError(
            f"{what} {path} is owned by uid {st.st_uid}, not by you (uid {uid}): another user "
            "may control it; remove it (or use another path)"
        )
    if st.st_mode & OTHERS_MASK:
        mode = "700" if directory else "600"
        raise UnsafePathError(
            f"{what} {path} is accessible by other users (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run: chmod {mode} {path}"
        )


def _open_nofollow(path: str, flags: int, what: str, dir_fd: int | None) -> int:
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        # ELOOP: the last component is a symbolic link; ENOTDIR: not a directory.
        if exc.errno in (errno.ELOOP, errno.EMLINK, errno.ENOTDIR):
            kind = "directory" if flags & os.O_DIRECTORY else "file"
            raise UnsafePathError(
                f"{what} {path} is a symbolic link or not a {kind}; remove it"
            ) from None
        raise


def open_private_dir(path: str | os.PathLike[str], what: str, *, create: bool = True) -> int:
    """Open a private directory (created with mode 0700 if missing) and return its descriptor.

    Missing parents are created with mode 0700 too. The caller should then create and open its
    files relative to the descriptor (``dir_fd``), so that a later swap of the path cannot
    redirect them.

    Raises
    ------
    UnsafePathError
        If the directory is a symbolic link, not a directory, not owned by the current user, or
        has group/other permission bits.
    FileNotFoundError
        If it does not exist and ``create`` is false.
    """
    p = os.fspath(path)
    if create:
        parent = os.path.dirname(os.path.abspath(p))
        os.makedirs(parent, mode=0o700, exist_ok=True)
        try:
            os.mkdir(p, 0o700)
        except FileExistsError:
            pass  # checked below, whoever made it
    fd = _open_nofollow(p, os.O_RDONLY | os.O_DIRECTORY, what, None)
    try:
        check_private(os.fstat(fd), p, what, directory=True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_private_file(
    path: str | os.PathLike[str], what: str, *, dir_fd: int | None = None, display: str = ""
) -> int:
    """Open a private regular file read-only (no symbolic link, ours, no group/other bits).

    ``O_NONBLOCK`` keeps a planted FIFO from blocking the open; it does not change reads of a
    regular file.

    Parameters
    ----------
    path
        The file (relative to ``dir_fd`` when given).
    what
        What it is, for the message.
    dir_fd
        Descriptor of the (checked) directory holding it.
    display
        The path to show in messages (default ``path``).

    Raises
    ------
    UnsafePathError
        If it is a symbolic link or not a regular file, not owned by the current user, or has
        group/other permission bits.
    FileNotFoundError
        If there is no such file.
    """
    shown = display or os.fspath(path)
    fd = _open_nofollow(os.fspath(path), os.O_RDONLY | os.O_NONBLOCK, what, dir_fd)
    try:
        check_private(os.fstat(fd), shown, what, directory=False)
    except BaseException:
        os.close(fd)
        raise
    return fd


def user_dir_path() -> str:
    """``$TMPDIR/nbcluster-<uid>``: the current user's folder for sessions and spill files."""
    return os.path.join(tempfile.gettempdir(), f"nbcluster-{os.getuid()}")


def user_dir() -> str:
    """Create or check the current user's folder (:func:`user_dir_path`) and return its path.

    Raises
    ------
    UnsafePathError
        If something that is not a private directory of this user already has its name (another
        local user may have made it first).
    """
    path = user_dir_path()
    os.close(open_private_dir(path, "the per-user folder"))
    return path
