"""``ray.util.joblib``: a joblib parallel backend whose workers are cluster processes.

joblib is not a dependency of nbcluster: it is imported when a backend is registered.
"""

from __future__ import annotations

from typing import Any

from nbcluster.api import cluster_resources
from nbcluster.util.multiprocessing import Pool

__all__ = ["register_nbcluster", "register_ray"]

_BACKEND_NAMES = ("ray", "nbcluster")
_backend: type | None = None


def _backend_class() -> type:
    global _backend
    if _backend is not None:
        return _backend
    try:
        from joblib._parallel_backends import MultiprocessingBackend
    except ImportError as exc:
        raise ImportError(
            "the joblib backend of nbcluster needs joblib, which is not installed: "
            "pip install joblib"
        ) from exc

    # joblib has no type information: its base class is Any to mypy.
    class NbclusterBackend(MultiprocessingBackend):  # type: ignore[misc]
        """joblib's multiprocessing backend with :class:`~nbcluster.util.multiprocessing.Pool`.

        Each joblib batch is one ``apply_async`` of the pool, so it runs in an actor of the
        cluster. ``n_jobs=-1`` means every CPU of the cluster (not of this machine).
        """

        def __init__(
            self,
            nesting_level: int | None = None,
            inner_max_num_threads: int | None = None,
            ray_remote_args: dict[str, Any] | None = None,
            **kwargs: Any,
        ) -> None:
            super().__init__(
                nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads, **kwargs
            )
            self._remote_args = ray_remote_args

        def effective_n_jobs(self, n_jobs: int | None) -> int:
            # The cluster's CPUs, not this machine's; no daemon-process check: an actor of the
            # pool is no child of this process.
            if n_jobs == 0:
                raise ValueError("n_jobs == 0 in Parallel has no meaning")
            if n_jobs is None:
                return 1
            if n_jobs < 0:
                cpus = int(cluster_resources().get("CPU", 1))
                return max(cpus + 1 + n_jobs, 1)
            return int(n_jobs)

        def configure(
            self,
            n_jobs: int | None = 1,
            parallel: Any = None,
            prefer: Any = None,
            require: Any = None,
            **kwargs: Any,
        ) -> int:
            n = self.effective_n_jobs(n_jobs)
            self._pool = Pool(n, ray_remote_args=self._remote_args)
            self.parallel = parallel
            return n

    _backend = NbclusterBackend
    return _backend


def register_ray() -> None:
    """Register the joblib backends ``"ray"`` and ``"nbcluster"`` (Ray's ``register_ray``).

    After this, ``with joblib.parallel_backend("ray"):`` runs ``joblib.Parallel`` work, and
    scikit-learn's ``n_jobs``, on the cluster (started if needed).

    Raises
    ------
    ImportError
        If joblib is not installed.
    """
    backend = _backend_class()
    from joblib import register_parallel_backend

    for name in _BACKEND_NAMES:
        register_parallel_backend(name, backend)


def register_nbcluster() -> None:
    """The same as :func:`register_ray`, under nbcluster's name."""
    register_ray()
