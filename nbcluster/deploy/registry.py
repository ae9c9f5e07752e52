"""Pools by name, made from words or settings: what ``%nbcluster scale``, ``nbcluster up``, the
Jupyter server's ``c.NbclusterApp.pools`` and its ``pools`` REST route share.

``Pools`` holds the pools one owner made (a kernel's magics, a server, a command); a pool is
named after its kind unless ``--name`` says otherwise, so ``%nbcluster scale slurm 4`` and then
``%nbcluster scale slurm 2`` resize the same pool.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from nbcluster.deploy.pool import HeadLink, Pool, PoolError

#: Pool kinds and where their class lives (imported on first use).
KINDS = {
    "slurm": "nbcluster.deploy.slurm:SlurmCluster",
    "ssh": "nbcluster.deploy.ssh:SSHCluster",
    "kubernetes": "nbcluster.deploy.kubernetes:KubernetesCluster",
}
#: Options that are the registry's own, not the pool class's.
_OWN = {"kind", "name", "scale", "adapt"}


def pool_class(kind: str) -> type[Pool]:
    """The class of a pool kind (``"slurm"``...); a clear error for an unknown or missing one."""
    where = KINDS.get(kind)
    if where is None:
        raise ValueError(f"unknown pool kind {kind!r} (one of: {', '.join(KINDS)})")
    module, _, name = where.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise PoolError(f"{kind} pools are not available in this installation: {exc}") from exc
    assert isinstance(cls, type) and issubclass(cls, Pool)
    return cls


def option_parser(prog: str) -> argparse.ArgumentParser:
    """The pool options every surface accepts (each kind takes the ones it knows)."""
    p = argparse.ArgumentParser(prog=prog, add_help=False, exit_on_error=False)
    p.add_argument("--name")
    p.add_argument("--cpus", type=int)
    p.add_argument("--gpus", type=int)
    p.add_argument("--memory")
    p.add_argument("--partition")
    p.add_argument("--walltime")
    p.add_argument("--account")
    p.add_argument("--setup", action="append", help="a shell line run before the agent")
    p.add_argument("--directive", dest="directives", action="append", help="an #SBATCH option")
    p.add_argument("--python")
    p.add_argument("--hosts", help="comma-separated hosts (ssh)")
    p.add_argument("--image", help="container image (kubernetes)")
    p.add_argument("--namespace", help="namespace (kubernetes)")
    p.add_argument("--head-timeout")
    p.add_argument("--lifetime", choices=("owned", "detached"))
    return p


def parse_words(
    words: Sequence[str], parser: argparse.ArgumentParser
) -> tuple[argparse.Namespace, dict[str, Any]]:
    """Parse ``words``; returns the namespace and the pool options that were given.

    Raises
    ------
    ValueError
        For an unknown option or a bad value (the message names it).
    """
    try:
        ns, rest = parser.parse_known_args(list(words))
    except SystemExit as exc:
        if not exc.code:
            raise  # --help
        raise ValueError(f"{parser.prog}: bad arguments (see its --help)") from None
    except argparse.ArgumentError as exc:
        raise ValueError(f"{parser.prog}: {exc}") from None
    if rest:
        raise ValueError(f"{parser.prog}: unknown option(s) {' '.join(rest)}")
    opts = {
        k: v
        for k, v in vars(ns).items()
        if v is not None and k in {a.dest for a in option_parser("x")._actions}
    }
    if isinstance(opts.get("hosts"), str):
        opts["hosts"] = [h for h in opts["hosts"].split(",") if h]
    return ns, opts


class Pools:
    """The pools one owner made, by name.

    Parameters
    ----------
    head
        The cluster the pools grow (default: this process's connection).
    """

    def __init__(self, head: HeadLink | None = None) -> None:
        self._head = head
        self._pools: dict[str, Pool] = {}
        self._options: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def get(self, kind: str, options: Mapping[str, Any] | None = None) -> Pool:
        """The pool named ``options["name"]`` (default: ``kind``), made when missing.

        Raises
        ------
        ValueError
            The pool exists with other options (scale it to 0 first, or give another name).
        """
        opts = {k: v for k, v in (options or {}).items() if k not in _OWN}
        name = str((options or {}).get("name") or kind)
        with self._lock:
            pool = self._pools.get(name)
            if pool is not None and pool.closed:
                pool = None
            if pool is not None:
                if pool.kind != kind:
                    raise ValueError(f"pool {name!r} is a {pool.kind} pool, not {kind}")
                changed = {k for k, v in opts.items() if self._options[name].get(k) != v}
                if changed:
                    raise ValueError(
                        f"pool {name!r} exists with other {', '.join(sorted(changed))}: scale it "
                        f"to 0 first, or give the new one another --name"
                    )
                return pool
            cls = pool_class(kind)
            kwargs: dict[str, Any] = dict(opts)
            if self._head is not None:
                kwargs["head"] = self._head
            try:
                pool = cls(name=name, **kwargs)
            except TypeError as exc:
                raise ValueError(f"{kind} pool: {exc}") from None
            self._pools[name] = pool
            self._options[name] = opts
            return pool

    def scale(self, kind: str, n: int, options: Mapping[str, Any] | None = None) -> Pool:
        """Scale the pool (made when missing) to ``n`` jobs; ``0`` also closes and forgets it."""
        pool = self.get(kind, options)
        if n == 0:
            pool.close(wait=False)
            with self._lock:
                self._pools.pop(pool.name, None)
            return pool
        pool.scale(n)
        return pool

    def adapt(
        self,
        kind: str,
        minimum: int,
        maximum: int,
        idle_timeout: float | str,
        options: Mapping[str, Any] | None = None,
    ) -> Pool:
        """Make the pool (when missing) grow and shrink with demand."""
        pool = self.get(kind, options)
        pool.adapt(minimum=minimum, maximum=maximum, idle_timeout=idle_timeout)
        return pool

    def from_config(self, spec: Mapping[str, Any]) -> Pool:
        """A pool from a settings entry (``c.NbclusterApp.pools``)::

        {"kind": "slurm", "name": "gpu", "gpus": 1, "partition": "gpu",
         "adapt": {"minimum": 0, "maximum": 16, "idle_timeout": "5min"}}   # or "scale": 2
        """
        kind = str(spec.get("kind") or "")
        pool = self.get(kind, spec)
        if spec.get("adapt") is not None:
            a = dict(spec["adapt"] or {})
            pool.adapt(
                minimum=int(a.get("minimum", 0)),
                maximum=int(a.get("maximum", 8)),
                idle_timeout=a.get("idle_timeout", "5min"),
            )
        elif spec.get("scale"):
            pool.scale(int(spec["scale"]))
        return pool

    def find(self, name: str) -> Pool | None:
        """The pool called ``name``."""
        with self._lock:
            return self._pools.get(name)

    def all(self) -> list[Pool]:
        """Every pool, in the order they were made."""
        with self._lock:
            return list(self._pools.values())

    def as_list(self) -> list[dict[str, Any]]:
        """JSON-ready list (the REST route, the panel)."""
        return [p.as_dict() for p in self.all()]

    def summary(self) -> str:
        """Plain text: each pool, then its jobs."""
        out = []
        for p in self.all():
            c = p.counts()
            mode = ""
            if p.adaptive:
                mode = f", adaptive {p.adaptive['minimum']}..{p.adaptive['maximum']}"
            out.append(
                f"{p.name} ({p.kind}{mode}): {c['running']} running, {c['pending']} pending, "
                f"{c['draining']} draining, {c['gone']} gone"
            )
            out.append(p.summary())
        return "\n".join(out) or "no pools"

    def close_all(self, wait: bool = True) -> None:
        """Close every pool (their jobs end)."""
        for p in self.all():
            p.close(wait=wait)
        with self._lock:
            self._pools.clear()


def split_line(line: str) -> list[str]:
    """A magic's line as words (shell quoting)."""
    return shlex.split(line)
