"""The node side of ``runtime_env``: a per-user cache of unpacked packages, and a worker
process entering its environment.

Packages are unpacked once per node, into ``<cache>/<content hash>/`` (the cache is
``$NBCLUSTER_RUNTIME_ENV_DIR``, by default ``runtime_env/`` in the per-user folder; it must be a
private directory, see :mod:`nbcluster._private_fs`). A package is fetched (an object owned by
the submitting driver, pulled through this node's store) only when its folder is missing; it
is unpacked into a temporary folder and renamed into place, so workers racing for the same
package never see half of it. Each unpack is logged (``runtime_env: unpacked package ...``) to
the worker's log.

A worker enters one environment for its whole life (the head leases it only for tasks of that
environment): its working directory becomes the unpacked ``working_dir``, which goes first on
``sys.path`` with the ``py_modules``, and ``env_vars`` are set (``${NAME}`` expands to the
node's value of ``NAME``).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import shutil
import sys
import tempfile
from typing import Any

from nbcluster._private_fs import open_private_dir, user_dir
from nbcluster.runtime_env.packaging import unpack
from nbcluster.runtime_env.spec import RuntimeEnvError

log = logging.getLogger(__name__)


def _log_to_worker_stderr() -> None:
    """Unpacks are reported at INFO on the process's real stderr (a worker's: its agent's log)."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.__stderr__)
        handler.setFormatter(logging.Formatter("nbcluster worker %(process)d: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


#: Seconds a worker waits for a package to arrive from its owner.
FETCH_TIMEOUT_S = 300.0

_HASH = re.compile(r"^[0-9a-f]{16,64}$")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

_applied: dict[str, Any] | None = None


def applied() -> dict[str, Any] | None:
    """The environment (wire form) this process runs in, or ``None``."""
    return _applied


def cache_dir() -> str:
    """The node's package cache for this user (created private, or checked to be)."""
    path = os.environ.get("NBCLUSTER_RUNTIME_ENV_DIR") or os.path.join(user_dir(), "runtime_env")
    os.close(open_private_dir(path, "runtime_env cache"))
    return path


def ensure_package(pkg: dict[str, Any]) -> str:
    """The folder holding the unpacked package ``pkg`` on this node (fetched if missing)."""
    digest = pkg.get("hash")
    if not isinstance(digest, str) or not _HASH.match(digest):
        raise RuntimeEnvError(f"malformed runtime_env package {pkg!r}")
    root = cache_dir()
    dest = os.path.join(root, digest)
    if os.path.isdir(dest) and not os.path.islink(dest):
        return dest
    _log_to_worker_stderr()
    data = _fetch(pkg)
    tmp = tempfile.mkdtemp(prefix=f".{digest}-", dir=root)
    try:
        files = unpack(data, tmp, digest)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not os.path.isdir(dest):  # not another worker's copy: a real failure
                raise
            log.info("runtime_env: package %s was unpacked by another worker", digest)
            return dest
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("runtime_env: unpacked package %s (%d files, %d bytes)", digest, files, len(data))
    return dest


def _fetch(pkg: dict[str, Any]) -> bytes:
    from nbcluster.client import current
    from nbcluster.refs import ObjectRef

    oid, owner = pkg.get("oid"), pkg.get("owner")
    if not isinstance(oid, str) or not isinstance(owner, str):
        raise RuntimeEnvError(f"malformed runtime_env package {pkg!r}")
    client = current.require()
    ref = ObjectRef(oid, owner, client, borrowed=True)
    data = client.get([ref], FETCH_TIMEOUT_S)[0]
    if not isinstance(data, bytes | bytearray | memoryview):
        raise RuntimeEnvError(f"runtime_env package {pkg['hash']} is not a zip archive")
    return bytes(data)


def apply(wire: Any) -> None:
    """Enter the environment ``wire`` (no-op when already in it).

    Raises
    ------
    RuntimeEnvError
        When this process already runs another environment, or a package cannot be had.
    """
    global _applied
    if not isinstance(wire, dict) or not isinstance(wire.get("key"), str):
        raise RuntimeEnvError(f"malformed runtime_env {wire!r}")
    if _applied is not None:
        if _applied["key"] == wire["key"]:
            return
        raise RuntimeEnvError(
            f"this worker runs runtime_env {_applied['key']}, not {wire['key']} (a bug: workers "
            "serve one environment)"
        )
    wd_pkg, mods, env_vars = wire.get("wd"), wire.get("mods") or [], wire.get("vars") or {}
    if not isinstance(mods, list) or not isinstance(env_vars, dict):
        raise RuntimeEnvError(f"malformed runtime_env {wire!r}")
    # Everything is fetched before anything changes: a failure leaves the process as it was.
    wd = ensure_package(wd_pkg) if wd_pkg else None
    mod_dirs = [ensure_package(m) for m in mods]
    for path in reversed([*([wd] if wd else []), *mod_dirs]):
        with contextlib.suppress(ValueError):
            sys.path.remove(path)
        sys.path.insert(0, path)
    if wd:
        os.chdir(wd)
    for name, value in env_vars.items():
        os.environ[str(name)] = _VAR.sub(lambda m: os.environ.get(m.group(1), ""), str(value))
    importlib.invalidate_caches()
    _applied = dict(wire)
