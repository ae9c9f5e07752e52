"""Ray's ``runtime_env`` (``working_dir``, ``py_modules``, ``excludes``, ``env_vars``): code and
settings that reach the workers of other hosts.

:mod:`~nbcluster.runtime_env.spec` validates what the user wrote,
:mod:`~nbcluster.runtime_env.packaging` packs and hashes directories,
:mod:`~nbcluster.runtime_env.upload` uploads them once and merges job and task environments,
:mod:`~nbcluster.runtime_env.node` caches packages on a node and puts a worker in its environment.
"""
