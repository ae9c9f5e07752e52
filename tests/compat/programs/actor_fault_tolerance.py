"""Actor fault tolerance (Ray's "Actor Fault Tolerance"): ``max_restarts`` brings a crashed
actor back with fresh state, ``max_task_retries`` retries its calls, and an actor past its
restarts, killed, or exited is dead for good (``ActorDiedError``)."""

import os
import tempfile
import time

import ray
from ray.exceptions import ActorDiedError, RayActorError

ray.init(num_cpus=4)


@ray.remote(max_restarts=1)
class Counter:
    def __init__(self):
        self.count = 0

    def increment(self):
        self.count += 1
        return self.count

    def crash(self):
        os._exit(1)

    def restarted(self):
        return ray.get_runtime_context().was_current_actor_reconstructed


counter = Counter.remote()
assert ray.get([counter.increment.remote() for _ in range(3)]) == [1, 2, 3]
assert ray.get(counter.restarted.remote()) is False
try:
    ray.get(counter.crash.remote())
except RayActorError:
    pass
else:
    raise AssertionError("a call whose actor died did not raise RayActorError")
# Restarted once: state starts again from the constructor.
assert ray.get(counter.increment.remote()) == 1
assert ray.get(counter.restarted.remote()) is True
try:
    ray.get(counter.crash.remote())
except RayActorError:
    pass
try:
    ray.get(counter.increment.remote())
except ActorDiedError:
    pass
else:
    raise AssertionError("an actor past max_restarts still answered")


# max_task_retries: the call that crashed the actor runs again on the restarted actor.
@ray.remote(max_restarts=-1, max_task_retries=-1)
class Resilient:
    def __init__(self, marker):
        self.marker = marker

    def crash_once(self):
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return "second life"


marker = os.path.join(tempfile.mkdtemp(), "crashed")
resilient = Resilient.remote(marker)
assert ray.get(resilient.crash_once.remote()) == "second life"

# kill(): the actor is gone, its next call raises ActorDiedError.
victim = Counter.remote()
assert ray.get(victim.increment.remote()) == 1
ray.kill(victim)
try:
    ray.get(victim.increment.remote())
except ActorDiedError:
    pass
else:
    raise AssertionError("a killed actor still answered")

# kill(no_restart=False) restarts an actor that has restarts left.
phoenix = Counter.remote()
assert ray.get(phoenix.increment.remote()) == 1
ray.kill(phoenix, no_restart=False)
# The kill is asynchronous: a call made at once may still reach the old actor or fail with it.
# Within a few seconds the actor is back, with fresh state.
deadline = time.monotonic() + 30
value = None
while value != 1 and time.monotonic() < deadline:
    try:
        value = ray.get(phoenix.increment.remote(), timeout=30)
    except RayActorError:
        time.sleep(0.1)
assert value == 1, "the killed actor did not come back with fresh state"


# exit_actor() ends the actor from inside.
@ray.remote
class Quitter:
    def quit(self):
        ray.actor.exit_actor()

    def ping(self):
        return "pong"


quitter = Quitter.remote()
assert ray.get(quitter.ping.remote()) == "pong"
try:
    ray.get(quitter.quit.remote())
except RayActorError:
    pass
try:
    ray.get(quitter.ping.remote())
except ActorDiedError:
    pass
else:
    raise AssertionError("an exited actor still answered")

ray.shutdown()
print("COMPAT OK")
