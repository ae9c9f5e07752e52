"""A ``runtime_env`` as the user writes it: validated into a :class:`RuntimeEnvSpec`.

Only Ray's code-shipping keys are supported: ``working_dir``, ``py_modules``, ``excludes`` and
``env_vars``. Package managers and containers are refused with "not supported yet", any other key
as unknown; both before anything is packed or sent.
"""

from __future__ import annotations

import os
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: The keys nbcluster implements.
SUPPORTED_KEYS = ("env_vars", "excludes", "py_modules", "working_dir")

#: Ray's other keys: refused as not supported yet (rather than as unknown).
NOT_YET_KEYS = frozenset(
    {
        "pip",
        "conda",
        "uv",
        "container",
        "image_uri",
        "java_jars",
        "nsight",
        "mpi",
        "py_executable",
        "worker_process_setup_hook",
        "config",
    }
)


class RuntimeEnvError(ValueError):
    """A ``runtime_env`` that cannot be used: an unknown or unsupported key, a bad value, a
    directory that does not exist or is too large."""


@dataclass(frozen=True)
class RuntimeEnvSpec:
    """A validated ``runtime_env`` (paths made absolute when it was given).

    ``keys`` names the fields the user set: a task's or actor's environment replaces the job's
    ``working_dir``/``py_modules`` only when it sets them, and adds its ``env_vars`` to the
    job's (as Ray merges them).
    """

    working_dir: str | None = None
    py_modules: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()
    env_vars: tuple[tuple[str, str], ...] = ()
    keys: frozenset[str] = frozenset()

    def as_dict(self) -> dict[str, Any]:
        """The environment in Ray's dict form (what the runtime context reports)."""
        out: dict[str, Any] = {}
        if "working_dir" in self.keys:
            out["working_dir"] = self.working_dir
        if "py_modules" in self.keys:
            out["py_modules"] = list(self.py_modules)
        if "excludes" in self.keys:
            out["excludes"] = list(self.excludes)
        if "env_vars" in self.keys:
            out["env_vars"] = dict(self.env_vars)
        return out


def parse(runtime_env: Any) -> RuntimeEnvSpec | None:
    """Validate a user's ``runtime_env``; ``None`` (or an empty one) means none.

    Raises
    ------
    RuntimeEnvError
        Naming the key (an unknown one, one not supported yet) or the bad value.
    """
    if runtime_env is None or isinstance(runtime_env, RuntimeEnvSpec):
        return runtime_env or None
    if not isinstance(runtime_env, Mapping):
        raise RuntimeEnvError(f"runtime_env must be a dict, got {type(runtime_env).__name__}")
    if not runtime_env:
        return None
    for key in runtime_env:
        if key in SUPPORTED_KEYS:
            continue
        if key in NOT_YET_KEYS:
            raise RuntimeEnvError(
                f"runtime_env key {key!r} is not supported yet by nbcluster (supported: "
                f"{', '.join(SUPPORTED_KEYS)}); install packages on every node instead"
            )
        raise RuntimeEnvError(
            f"unknown runtime_env key {key!r}; nbcluster supports {', '.join(SUPPORTED_KEYS)}"
        )
    working_dir = runtime_env.get("working_dir")
    if working_dir is not None:
        working_dir = _local_path("working_dir", working_dir)
    modules = runtime_env.get("py_modules")
    if modules is not None and not isinstance(modules, list | tuple):
        raise RuntimeEnvError(f"py_modules must be a list, got {type(modules).__name__}")
    excludes = runtime_env.get("excludes")
    if excludes is not None and (
        not isinstance(excludes, list | tuple) or not all(isinstance(e, str) for e in excludes)
    ):
        raise RuntimeEnvError("excludes must be a list of strings (gitignore-style patterns)")
    env_vars = runtime_env.get("env_vars")
    if env_vars is not None and (
        not isinstance(env_vars, Mapping)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items())
    ):
        raise RuntimeEnvError("env_vars must be a dict of str to str")
    for name in env_vars or ():
        if not name or "=" in name or "\0" in name:
            raise RuntimeEnvError(f"env_vars: {name!r} is not a valid variable name")
    return RuntimeEnvSpec(
        working_dir=working_dir,
        py_modules=tuple(_module_path(m) for m in modules or ()),
        excludes=tuple(excludes or ()),
        env_vars=tuple(sorted((env_vars or {}).items())),
        keys=frozenset(k for k in runtime_env if runtime_env[k] is not None),
    )


def _local_path(key: str, value: Any) -> str:
    if not isinstance(value, str | os.PathLike):
        raise RuntimeEnvError(f"{key} must be a path, got {type(value).__name__}")
    path = os.fspath(value)
    if "://" in path:
        raise RuntimeEnvError(f"{key} {path!r}: remote URIs are not supported yet (a local path)")
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise RuntimeEnvError(f"{key} {path!r} is not a directory")
    return path


def _module_path(module: Any) -> str:
    """A ``py_modules`` entry as a local path: a package directory or one ``.py`` file."""
    if isinstance(module, types.ModuleType):
        paths = getattr(module, "__path__", None)
        if paths:
            return _local_path("py_modules", next(iter(paths)))
        file = getattr(module, "__file__", None)
        if not file or not file.endswith(".py"):
            raise RuntimeEnvError(
                f"py_modules: module {module.__name__!r} is neither a package nor a .py file"
            )
        return os.path.abspath(str(file))
    if not isinstance(module, str | os.PathLike):
        raise RuntimeEnvError(
            f"py_modules entries must be paths or modules, got {type(module).__name__}"
        )
    path = os.fspath(module)
    if "://" in path or path.endswith((".whl", ".zip")):
        raise RuntimeEnvError(
            f"py_modules {path!r}: remote URIs, wheels and zip files are not supported yet"
        )
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(path) and path.endswith(".py"):
        return path
    return _local_path("py_modules", path)
