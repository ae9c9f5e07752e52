"""Task fault tolerance (Ray's "Task Fault Tolerance"): ``max_retries`` re-runs a task whose
worker died, ``retry_exceptions`` re-runs on application errors (all, or listed ones)."""

import os
import tempfile

import ray

ray.init(num_cpus=4)

workdir = tempfile.mkdtemp()


def bump(name):
    """Count the runs of one task in a file (tasks share this host)."""
    path = os.path.join(workdir, name)
    with open(path, "a") as f:
        f.write("x")
    with open(path) as f:
        return len(f.read())


@ray.remote(max_retries=3)
def dies_twice(name):
    if bump(name) <= 2:
        os._exit(1)  # the worker process dies, as on a crash or OOM kill
    return "survived"


@ray.remote(max_retries=0)
def always_dies():
    os._exit(1)


@ray.remote(max_retries=3, retry_exceptions=True)
def flaky(name):
    if bump(name) <= 2:
        raise ConnectionError("transient")
    return "recovered"


@ray.remote(max_retries=3, retry_exceptions=[ConnectionError])
def wrong_error(name):
    bump(name)
    raise KeyError("not retried")


@ray.remote
def app_error(name):
    bump(name)
    raise ValueError("application errors are not retried by default")


assert ray.get(dies_twice.remote("dies_twice")) == "survived"
assert bump("dies_twice") == 4  # three runs, then this read

try:
    ray.get(always_dies.remote())
except ray.exceptions.WorkerCrashedError:
    pass
else:
    raise AssertionError("a crashed task with max_retries=0 did not raise WorkerCrashedError")

assert ray.get(flaky.remote("flaky")) == "recovered"
assert bump("flaky") == 4

try:
    ray.get(wrong_error.remote("wrong_error"))
except KeyError:
    pass
assert bump("wrong_error") == 2  # one run only: KeyError is not in the retry list

try:
    ray.get(app_error.remote("app_error"))
except ValueError:
    pass
assert bump("app_error") == 2

ray.shutdown()
print("COMPAT OK")
