"""ray.util.ActorPool (Ray's "Utility Classes: Actor Pool")."""

import time

import ray
from ray.util import ActorPool

ray.init(num_cpus=4)


@ray.remote
class Doubler:
    def double(self, v):
        return 2 * v

    def slow_double(self, v):
        time.sleep(v)
        return 2 * v


a1, a2 = Doubler.remote(), Doubler.remote()
pool = ActorPool([a1, a2])
assert list(pool.map(lambda a, v: a.double.remote(v), [1, 2, 3, 4])) == [2, 4, 6, 8]

# map_unordered yields as results come: the short sleep first.
pool = ActorPool([Doubler.remote(), Doubler.remote()])
out = list(pool.map_unordered(lambda a, v: a.slow_double.remote(v), [1.0, 0.1]))
assert out == [0.2, 2.0], out

# submit / get_next / has_next, in submission order.
pool = ActorPool([a1, a2])
pool.submit(lambda a, v: a.double.remote(v), 1)
pool.submit(lambda a, v: a.double.remote(v), 2)
pool.submit(lambda a, v: a.double.remote(v), 3)  # queued until an actor is free
assert pool.has_next()
assert [pool.get_next(), pool.get_next(), pool.get_next()] == [2, 4, 6]
assert not pool.has_next()

# has_free / pop_idle / push.
pool = ActorPool([a1])
assert pool.has_free()
pool.submit(lambda a, v: a.double.remote(v), 5)
assert not pool.has_free()
assert pool.pop_idle() is None
assert pool.get_next() == 10
idle = pool.pop_idle()
assert idle is not None and not pool.has_free()
pool.push(idle)
pool.push(a2)
assert sorted(pool.map(lambda a, v: a.double.remote(v), range(6))) == [0, 2, 4, 6, 8, 10]

# get_next with a timeout raises TimeoutError while the result is not there.
pool = ActorPool([Doubler.remote()])
pool.submit(lambda a, v: a.slow_double.remote(v), 2.0)
try:
    pool.get_next(timeout=0.1)
except TimeoutError:
    pass
else:
    raise AssertionError("get_next(timeout=) did not time out")

ray.shutdown()
print("COMPAT OK")
