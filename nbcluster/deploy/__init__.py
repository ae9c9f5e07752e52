"""Growing a cluster on the engines users already have: Slurm, SSH hosts, Kubernetes.

Every pool is a :class:`~nbcluster.deploy.pool.Pool`: ``scale(n)``, ``adapt(minimum, maximum,
idle_timeout)``, ``status()``, ``close()``, usable as a context manager.
"""

from nbcluster.deploy.kubernetes import KubernetesCluster
from nbcluster.deploy.pool import (
    BackendStatus,
    ClientLink,
    HeadLink,
    JobState,
    Pool,
    PoolError,
    PoolJob,
)
from nbcluster.deploy.slurm import SlurmCluster
from nbcluster.deploy.ssh import SSHCluster

__all__ = [
    "BackendStatus",
    "ClientLink",
    "HeadLink",
    "JobState",
    "KubernetesCluster",
    "Pool",
    "PoolError",
    "PoolJob",
    "SSHCluster",
    "SlurmCluster",
]
