"""Actors and their handles (Ray's "Actors" guide): state kept between calls, calls in
submission order, handles passed to tasks and other actors, resources per actor.

No ``ray.init()``: the first actor creation starts a local cluster.
"""

import ray


@ray.remote
class Counter:
    def __init__(self, start=0):
        self.value = start

    def increment(self, by=1):
        self.value += by
        return self.value

    def get_counter(self):
        return self.value


@ray.remote
def bump_many(counter, n):
    for _ in range(n):
        counter.increment.remote()
    return ray.get(counter.get_counter.remote())


@ray.remote(num_cpus=0.5)
class Forwarder:
    def __init__(self, counter):
        self.counter = counter

    def forward(self, by):
        return ray.get(self.counter.increment.remote(by))


counter = Counter.remote()
assert ray.get([counter.increment.remote() for _ in range(10)]) == list(range(1, 11))
assert ray.get(counter.get_counter.remote()) == 10

# Handles passed to tasks: calls from several callers all reach the one actor.
ray.get([bump_many.remote(counter, 5) for _ in range(3)])
assert ray.get(counter.get_counter.remote()) == 25

forwarder = Forwarder.remote(counter)
assert ray.get(forwarder.forward.remote(100)) == 125

# Constructor arguments and per-call options.
ten = Counter.options(num_cpus=0.5).remote(start=10)
assert ray.get(ten.increment.remote(by=5)) == 15

ray.shutdown()
print("COMPAT OK")
