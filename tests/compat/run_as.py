"""Run one compatibility program against a backend: ``run_as.py BACKEND PROGRAM``.

The programs in ``tests/compat/programs`` are Ray programs (``import ray``,
``from ray.util.queue import Queue``, ...). With ``BACKEND`` ``ray`` this runs a program as it
is (Ray must be installed: the benchmark venv has it). With ``nbcluster`` it first installs an
import alias, so that ``ray`` and every ``ray.X.Y`` import the same module objects as
``nbcluster`` and ``nbcluster.X.Y``, then runs the unchanged file. Nothing of Ray is needed.

The file runs as ``__main__`` (``runpy.run_path``), so it behaves as ``python PROGRAM`` would.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import runpy
import sys
from collections.abc import Sequence
from types import ModuleType

#: The backends a program can run against.
BACKENDS = ("nbcluster", "ray")


class _AliasLoader(importlib.abc.Loader):
    """Loads ``ray.X`` as the module ``nbcluster.X`` (one object under both names)."""

    def __init__(self, finder: RayAlias, target: str) -> None:
        self.finder = finder
        self.target = target
        self._real_spec: importlib.machinery.ModuleSpec | None = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        """The target module itself, imported under its own name."""
        module = importlib.import_module(self.target)
        self._real_spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        """Give the module its own spec back (the import system set the alias's)."""
        module.__spec__ = self._real_spec
        self.finder.alias_loaded()


class RayAlias(importlib.abc.MetaPathFinder):
    """Maps the module ``alias`` (and its submodules) to ``target`` (and its submodules)."""

    def __init__(self, alias: str = "ray", target: str = "nbcluster") -> None:
        self.alias = alias
        self.target = target

    def alias_loaded(self) -> None:
        """Enter every imported ``target.*`` module in ``sys.modules`` as ``alias.*`` too.

        Done for all of them, not only the one asked for, so that a later ``import
        ray.util.placement_group`` finds its module there: coming through the import system
        instead, it would be set as an attribute of ``ray.util``, hiding the function
        ``placement_group`` that ``nbcluster.util`` exports under that name (as Ray does).
        """
        for name, module in list(sys.modules.items()):
            if name == self.target or name.startswith(self.target + "."):
                sys.modules.setdefault(self.alias + name[len(self.target) :], module)

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        """A spec for ``alias`` or ``alias.*`` naming the target module; None otherwise."""
        if fullname != self.alias and not fullname.startswith(self.alias + "."):
            return None
        real = self.target + fullname[len(self.alias) :]
        try:
            real_spec = importlib.util.find_spec(real)
        except ModuleNotFoundError:
            real_spec = None
        if real_spec is None:
            # Ray has this module and nbcluster does not: the program fails as it would
            # against a Ray lacking it.
            return None
        return importlib.machinery.ModuleSpec(
            fullname,
            _AliasLoader(self, real),
            is_package=real_spec.submodule_search_locations is not None,
        )


def install_alias() -> None:
    """Make ``import ray`` (and ``ray.X.Y``) import nbcluster's modules."""
    if any(isinstance(f, RayAlias) for f in sys.meta_path):
        return
    finder = RayAlias()
    sys.meta_path.insert(0, finder)
    importlib.import_module("nbcluster")
    finder.alias_loaded()


def main(argv: list[str] | None = None) -> int:
    """Command line: ``run_as.py BACKEND PROGRAM [ARGS...]``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or args[0] not in BACKENDS:
        print(f"usage: run_as.py {{{','.join(BACKENDS)}}} PROGRAM [ARGS...]", file=sys.stderr)
        return 2
    backend, program = args[0], args[1]
    if backend == "nbcluster":
        install_alias()
    sys.argv = [program, *args[2:]]
    runpy.run_path(program, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
