"""The submitting side of ``runtime_env``: packing, uploading once, merging job and task envs.

A process's environments become their *wire form*, which travels with each task (``renv``) and
actor creation, and whose ``key`` keeps workers apart (the head leases a worker only for tasks
of the environment it first ran)::

    {"key": "<hash of all below>",
     "wd": {"hash", "oid", "owner", "size"} | None,   # the working_dir package
     "mods": [{"hash", "oid", "owner", "size"}, ...], # one package per py_modules entry
     "vars": {"NAME": "value", ...}}

Each package is ``put`` once per client as an object (through the node's store when large), kept
until the job ends, and found by its content hash: a second task or actor with the same code
uploads nothing. A directory is packed at its first use and packed again when its files change
(names, sizes or times, looked at most once a second), so editing a module beside a notebook
ships the new code with the next task.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nbcluster.runtime_env import node
from nbcluster.runtime_env.packaging import fingerprint, max_package_bytes, pack
from nbcluster.runtime_env.spec import RuntimeEnvError, RuntimeEnvSpec, parse

if TYPE_CHECKING:
    from nbcluster.client.core import CoreClient

#: How often (seconds) a packed directory is looked at again for changed files.
RECHECK_S = 1.0


@dataclass
class _Resolved:
    partial: dict[str, Any]  # the wire fields this spec sets
    prints: tuple[Any, ...]  # fingerprints of the packed directories
    checked: float


@dataclass
class _ClientEnvs:
    """What one client has uploaded and resolved."""

    uploads: dict[str, tuple[Any, dict[str, Any]]] = field(default_factory=dict)
    resolved: dict[RuntimeEnvSpec, _Resolved] = field(default_factory=dict)
    job: RuntimeEnvSpec | None = None
    stats: dict[str, int] = field(default_factory=lambda: {"uploads": 0, "bytes": 0, "packs": 0})
    lock: threading.Lock = field(default_factory=threading.Lock)


_clients: weakref.WeakKeyDictionary[Any, _ClientEnvs] = weakref.WeakKeyDictionary()
_clients_lock = threading.Lock()


def _envs(client: CoreClient) -> _ClientEnvs:
    with _clients_lock:
        envs = _clients.get(client)
        if envs is None:
            envs = _clients[client] = _ClientEnvs()
        return envs


def set_job_env(client: CoreClient, runtime_env: Any) -> RuntimeEnvSpec | None:
    """Make ``runtime_env`` the default of every task and actor this client submits.

    Packs and uploads its directories now (as Ray does at ``init``), so a bad or too large
    directory fails here. ``None`` clears it.
    """
    spec = parse(runtime_env)
    envs = _envs(client)
    if spec is not None:
        with envs.lock:
            envs.resolved.pop(spec, None)  # packed again: the user asked for it now
            _resolve(client, envs, spec)
    envs.job = spec
    return spec


def job_env(client: CoreClient) -> RuntimeEnvSpec | None:
    """The job-wide environment set on this client, if any."""
    envs = _clients.get(client)
    return envs.job if envs is not None else None


def upload_stats(client: CoreClient) -> dict[str, int]:
    """Counters of this client: ``uploads`` (packages put), ``bytes`` (their zip bytes) and
    ``packs`` (directories packed, changed ones again)."""
    return dict(_envs(client).stats)


def wire_env(client: CoreClient, spec: RuntimeEnvSpec | None) -> dict[str, Any] | None:
    """The environment a task or actor with ``spec`` runs in, in wire form (``None``: none).

    ``spec`` is merged over the job's environment (``init(runtime_env=...)``); inside a task,
    over the environment that task runs in (children inherit it, as in Ray).
    """
    envs = _clients.get(client)
    job = envs.job if envs is not None else None
    if spec is None and job is None:
        return node.applied()  # a task's children run where it runs
    envs = envs or _envs(client)
    with envs.lock:
        base: dict[str, Any] = {}
        if job is not None:
            base = _merge(node.applied() or {}, _resolve(client, envs, job), job.keys)
        else:
            base = dict(node.applied() or {})
        if spec is not None:
            base = _merge(base, _resolve(client, envs, spec), spec.keys)
    return _finish(base)


def _merge(parent: dict[str, Any], partial: dict[str, Any], keys: frozenset[str]) -> dict[str, Any]:
    """Ray's rule: a child's ``working_dir`` and ``py_modules`` replace the parent's, its
    ``env_vars`` are added to the parent's (the child's value wins)."""
    out = dict(parent)
    if "working_dir" in keys:
        out["wd"] = partial.get("wd")
    if "py_modules" in keys:
        out["mods"] = list(partial.get("mods") or [])
    if "env_vars" in keys:
        out["vars"] = {**(parent.get("vars") or {}), **(partial.get("vars") or {})}
    return out


def _finish(env: dict[str, Any]) -> dict[str, Any] | None:
    wd, mods, env_vars = env.get("wd"), list(env.get("mods") or []), dict(env.get("vars") or {})
    if wd is None and not mods and not env_vars:
        return None
    ident = json.dumps(
        [wd["hash"] if wd else "", [m["hash"] for m in mods], sorted(env_vars.items())]
    )
    key = hashlib.sha256(ident.encode()).hexdigest()[:24]
    return {"key": key, "wd": wd, "mods": mods, "vars": env_vars}


def _resolve(client: CoreClient, envs: _ClientEnvs, spec: RuntimeEnvSpec) -> dict[str, Any]:
    """The wire fields of ``spec``: its directories packed and uploaded (cached, re-checked)."""
    now = time.monotonic()
    known = envs.resolved.get(spec)
    if known is not None and now - known.checked < RECHECK_S:
        return known.partial
    dirs = ([spec.working_dir] if spec.working_dir else []) + list(spec.py_modules)
    for d in dirs:
        if not os.path.exists(d):
            raise RuntimeEnvError(f"runtime_env: {d} does not exist (any more)")
    prints = tuple(fingerprint(d, spec.excludes) for d in dirs)
    if known is not None and known.prints == prints:
        known.checked = now
        return known.partial
    limit = max_package_bytes()
    partial: dict[str, Any] = {}
    if spec.working_dir:
        partial["wd"] = _upload(client, envs, spec.working_dir, spec.excludes, False, limit)
    if spec.py_modules:
        partial["mods"] = [
            _upload(client, envs, m, spec.excludes, True, limit) for m in spec.py_modules
        ]
    if spec.env_vars:
        partial["vars"] = dict(spec.env_vars)
    envs.resolved[spec] = _Resolved(partial, prints, now)
    return partial


def _upload(
    client: CoreClient,
    envs: _ClientEnvs,
    path: str,
    excludes: tuple[str, ...],
    keep_name: bool,
    limit: int,
) -> dict[str, Any]:
    package = pack(path, excludes, keep_name=keep_name, limit=limit)
    envs.stats["packs"] += 1
    known = envs.uploads.get(package.hash)
    if known is not None:
        return known[1]
    try:
        ref = client.put(package.data)
    except Exception as exc:  # e.g. no store here and the zip is over the message limit
        raise RuntimeEnvError(
            f"runtime_env: could not upload {path} ({len(package.data)} bytes zipped): {exc}"
        ) from exc
    client.mark_escaped(ref.oid)  # workers fetch it by id: kept until the job ends
    wire = {
        "hash": package.hash,
        "oid": ref.oid,
        "owner": ref.owner_address,
        "size": len(package.data),
    }
    envs.uploads[package.hash] = (ref, wire)
    envs.stats["uploads"] += 1
    envs.stats["bytes"] += len(package.data)
    return wire
