"""Packing a directory (or one ``.py`` file) into a content-hashed zip, and unpacking it safely.

The hash is taken over the files' relative paths, contents and executable bit (not their
times), so the same code packed twice, on any machine, has the same hash: that is what the
cluster keys its uploads and the nodes' caches by. ``excludes`` are gitignore-style patterns
relative to the packed directory, as in Ray; ``__pycache__`` folders and ``.pyc`` files are
always left out.
Unpacking refuses what a crafted zip could use to write outside its folder: absolute paths,
``..``, and symbolic links.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from nbcluster.runtime_env.spec import RuntimeEnvError

#: Largest package (bytes of its files, before compression) nbcluster ships, as Ray's 500 MiB.
#: ``NBCLUSTER_RUNTIME_ENV_MAX_BYTES`` overrides it.
MAX_PACKAGE_BYTES = 500 * 2**20

_ALWAYS_EXCLUDED = ["__pycache__/", "*.pyc"]


def max_package_bytes() -> int:
    """The size limit in force (:data:`MAX_PACKAGE_BYTES` unless the environment sets one)."""
    raw = os.environ.get("NBCLUSTER_RUNTIME_ENV_MAX_BYTES")
    if raw:
        try:
            return int(raw)
        except ValueError:
            raise RuntimeEnvError(
                f"NBCLUSTER_RUNTIME_ENV_MAX_BYTES must be a number of bytes, got {raw!r}"
            ) from None
    return MAX_PACKAGE_BYTES


@dataclass(frozen=True)
class Package:
    """A packed directory: its content hash, the zip's bytes and the files' total size."""

    hash: str
    data: bytes
    size: int
    files: int


def _files(root: str, top: str, excludes: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    """``(relative name, path)`` of each file to pack, sorted by name.

    ``top`` is prefixed to the names (a ``py_modules`` package keeps its own folder name).
    Symbolic links to files are packed as the files they point to; linked directories are not
    followed (they may loop, or lead anywhere).
    """
    import pathspec  # only when packing: it is a tenth of `import nbcluster` otherwise

    spec = pathspec.GitIgnoreSpec.from_lines([*_ALWAYS_EXCLUDED, *excludes])
    if os.path.isfile(root):
        name = os.path.basename(root)
        if not spec.match_file(name):
            yield name, root
        return
    found: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        kept = []
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if not os.path.islink(full) and not spec.match_file(rel_dir + d + "/"):
                kept.append(d)
        dirnames[:] = kept
        for f in filenames:
            rel = rel_dir + f
            full = os.path.join(dirpath, f)
            if spec.match_file(rel) or not os.path.isfile(full):
                continue
            found.append((top + rel, full))
    yield from sorted(found)


def fingerprint(root: str, excludes: tuple[str, ...]) -> tuple[tuple[str, int, int], ...]:
    """Names, sizes and modification times of what :func:`pack` would pack (cheap: no reads).

    A change here means the package must be made again.
    """
    out = []
    for name, path in _files(root, "", excludes):
        st = os.stat(path)
        out.append((name, st.st_size, st.st_mtime_ns))
    return tuple(out)


def pack(root: str, excludes: tuple[str, ...], *, keep_name: bool, limit: int) -> Package:
    """Zip ``root`` (a directory, or a ``.py`` file) and hash its contents.

    Parameters
    ----------
    root
        The directory (or file) to pack.
    excludes
        Gitignore-style patterns of files to leave out, relative to ``root``.
    keep_name
        Put the files under ``root``'s own name (a ``py_modules`` package), rather than at the
        top of the zip (a ``working_dir``).
    limit
        Largest total size of the files, in bytes.

    Raises
    ------
    RuntimeEnvError
        When the files add up to more than ``limit`` (before anything is read into memory).
    """
    top = os.path.basename(root.rstrip(os.sep)) + "/" if keep_name and os.path.isdir(root) else ""
    files = list(_files(root, top, excludes))
    total = 0
    for _, path in files:
        total += os.path.getsize(path)
    if total > limit:
        raise RuntimeEnvError(
            f"runtime_env: {root} holds {total / 2**20:.1f} MiB of files, more than the "
            f"{limit / 2**20:.0f} MiB limit; leave large files out with excludes=[...] "
            "(gitignore-style patterns) or raise NBCLUSTER_RUNTIME_ENV_MAX_BYTES"
        )
    digest = hashlib.sha256()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, path in files:
            with open(path, "rb") as fh:
                data = fh.read()
            mode = 0o700 if os.stat(path).st_mode & stat.S_IXUSR else 0o600
            _hash_entry(digest, name, data, mode)
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (stat.S_IFREG | mode) << 16
            zf.writestr(info, data)
    return Package(digest.hexdigest()[:32], buf.getvalue(), total, len(files))


def _hash_entry(digest: Any, name: str, data: bytes, mode: int) -> None:
    raw = name.encode()
    executable = b"x" if mode & stat.S_IXUSR else b"-"  # the one mode bit a package keeps
    digest.update(len(raw).to_bytes(4, "big") + raw + executable + len(data).to_bytes(8, "big"))
    digest.update(data)


def _safe_name(name: str) -> str:
    """The entry's path if it stays inside the folder it is unpacked into; else an error."""
    if not name or name.startswith("/") or "\\" in name or "\0" in name:
        raise RuntimeEnvError(f"refusing to unpack {name!r}: not a relative path")
    parts = name.split("/")
    if any(p in ("..", ".") for p in parts) or (len(parts) > 1 and "" in parts[:-1]):
        raise RuntimeEnvError(f"refusing to unpack {name!r}: it leaves its folder")
    return name


def unpack(data: bytes, dest: str, expected_hash: str) -> int:
    """Unpack a package made by :func:`pack` into the new, empty folder ``dest``.

    Only regular files and folders are made; the content hash is checked against
    ``expected_hash``, so what a cache holds under a hash is exactly that package.

    Returns
    -------
    int
        The number of files written.

    Raises
    ------
    RuntimeEnvError
        For an entry with an absolute path, ``..``, a symbolic link or another special file,
        or a hash that does not match.
    """
    digest = hashlib.sha256()
    count = 0
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = sorted(zf.infolist(), key=lambda i: i.filename)
        for info in infos:
            name = _safe_name(info.filename)
            mode = info.external_attr >> 16
            if name.endswith("/"):
                os.makedirs(os.path.join(dest, name), mode=0o700, exist_ok=True)
                continue
            if mode and not stat.S_ISREG(mode):
                raise RuntimeEnvError(f"refusing to unpack {name!r}: not a regular file")
            content = zf.read(info)
            perm = 0o700 if mode & stat.S_IXUSR else 0o600
            _hash_entry(digest, name, content, perm)
            path = os.path.join(dest, name)
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, perm)
            with os.fdopen(fd, "wb") as fh:
                fh.write(content)
            count += 1
    got = digest.hexdigest()[:32]
    if got != expected_hash:
        raise RuntimeEnvError(f"package {expected_hash} arrived with content hash {got}")
    return count
