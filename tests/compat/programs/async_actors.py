"""Async and threaded actors (Ray's "AsyncIO / Concurrency for Actors")."""

import asyncio
import threading
import time

import ray

ray.init(num_cpus=4)


@ray.remote
def remote_double(x):
    return 2 * x


@ray.remote
class AsyncActor:
    def __init__(self):
        self.running = 0
        self.peak = 0

    async def run_concurrent(self, seconds):
        self.running += 1
        self.peak = max(self.peak, self.running)
        await asyncio.sleep(seconds)
        self.running -= 1
        return "done"

    async def await_a_task(self, x):
        # An ObjectRef is awaitable inside an async actor.
        return await remote_double.remote(x)

    async def peak_concurrency(self):
        return self.peak


actor = AsyncActor.remote()
assert ray.get([actor.run_concurrent.remote(1.0) for _ in range(5)]) == ["done"] * 5
# All five were running at once (by count, not by time: the host may be loaded).
assert ray.get(actor.peak_concurrency.remote()) == 5
assert ray.get(actor.await_a_task.remote(21)) == 42

# max_concurrency bounds an async actor too.
limited = AsyncActor.options(max_concurrency=2).remote()
ray.get([limited.run_concurrent.remote(0.3) for _ in range(6)])
assert ray.get(limited.peak_concurrency.remote()) == 2


@ray.remote
class ThreadedActor:
    def __init__(self):
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0

    def work(self):
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        time.sleep(1.0)
        with self.lock:
            self.running -= 1
        return True

    def peak_concurrency(self):
        return self.peak


threaded = ThreadedActor.options(max_concurrency=3).remote()
assert all(ray.get([threaded.work.remote() for _ in range(3)]))
assert ray.get(threaded.peak_concurrency.remote()) == 3


# The driver can await refs too.
async def driver_side():
    values = await asyncio.gather(*[remote_double.remote(i) for i in range(4)])
    return list(values)


assert asyncio.run(driver_side()) == [0, 2, 4, 6]

ray.shutdown()
print("COMPAT OK")
