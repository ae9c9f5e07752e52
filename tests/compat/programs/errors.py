"""Errors as Ray raises them (Ray's "Fault Tolerance" and "ray.exceptions" docs): a task's
error is a RayTaskError that is also the user's exception type, passes through dependent tasks,
GetTimeoutError, and cancelled tasks."""

import time

import ray
from ray.exceptions import GetTimeoutError, RayError, RayTaskError, TaskCancelledError

ray.init(num_cpus=4)


class MyError(Exception):
    def __init__(self, code):
        super().__init__(f"code {code}")
        self.code = code


@ray.remote
def raises(code):
    raise MyError(code)


@ray.remote
def divide(a, b):
    return a / b


@ray.remote
def add_one(x):
    return x + 1


@ray.remote
def sleeper(seconds):
    # Short sleeps: Ray cancels a running task by raising KeyboardInterrupt in it, which
    # lands between Python bytecodes, not inside one long time.sleep().
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.05)
    return seconds


# The error is both a RayTaskError and the user's class, with its attributes.
try:
    ray.get(raises.remote(7))
except MyError as err:
    assert isinstance(err, RayTaskError) and isinstance(err, RayError)
    assert err.code == 7
    assert "code 7" in str(err)
else:
    raise AssertionError("no error")

try:
    ray.get(divide.remote(1, 0))
except ZeroDivisionError as err:
    assert isinstance(err, RayTaskError)

# A task whose argument failed fails with that error, without running.
try:
    ray.get(add_one.remote(divide.remote(1, 0)))
except ZeroDivisionError:
    pass
else:
    raise AssertionError("the dependency's error did not propagate")

# Errors are values: they can be waited on before get raises.
bad = raises.remote(1)
ready, _ = ray.wait([bad], timeout=30)
assert ready == [bad]

# get(timeout=) raises GetTimeoutError, which is a TimeoutError.
slow = sleeper.remote(3)
try:
    ray.get(slow, timeout=0.3)
except GetTimeoutError as err:
    assert isinstance(err, TimeoutError)
else:
    raise AssertionError("get(timeout=) did not time out")

# Cancelling a running task: get raises TaskCancelledError.
long = sleeper.remote(60)
time.sleep(1.0)  # let it start
ray.cancel(long)
try:
    ray.get(long, timeout=30)
except TaskCancelledError:
    pass
else:
    raise AssertionError("a cancelled task returned a value")

# force=True kills the worker; the task is cancelled too.
long = sleeper.remote(60)
time.sleep(0.5)
ray.cancel(long, force=True)
try:
    ray.get(long, timeout=30)
except (TaskCancelledError, ray.exceptions.WorkerCrashedError):
    pass
else:
    raise AssertionError("a force-cancelled task returned a value")

assert ray.get(slow) == 3  # the timed-out get did not affect the task

ray.shutdown()
print("COMPAT OK")
