"""ray.wait patterns from Ray's docs: results in completion order, a bound on pending tasks,
and a pipeline of work-queue actor plus prefetching worker actors."""

import time

import ray

ray.init(num_cpus=4)


@ray.remote
def slow_square(x, delay):
    time.sleep(delay)
    return x * x


# Process results in the order they finish, not the order submitted.
delays = [1.0, 0.05, 0.5, 0.2]
refs = [slow_square.remote(i, d) for i, d in enumerate(delays)]
order = []
remaining = refs
while remaining:
    done, remaining = ray.wait(remaining, num_returns=1)
    order.append(ray.get(done[0]))
assert sorted(order) == [0, 1, 4, 9]
assert order[-1] == 0, order  # the 1 s task finished last

# timeout=0 returns at once with what is ready.
pending = slow_square.remote(7, 2.0)
done, not_done = ray.wait([pending], timeout=0)
assert done == [] and not_done == [pending]
ray.cancel(pending, force=True)

# Limit the number of pending tasks (Ray's "Pattern: using ray.wait to limit pending tasks").
MAX_PENDING = 3
result_refs = []
finished = []
for i in range(12):
    if len(result_refs) >= MAX_PENDING:
        ready, result_refs = ray.wait(result_refs, num_returns=1)
        finished.extend(ray.get(ready))
    result_refs.append(slow_square.remote(i, 0.01))
finished.extend(ray.get(result_refs))
assert sorted(finished) == [i * i for i in range(12)]


# Pipelining: workers prefetch their next work item while processing the current one.
@ray.remote
class WorkQueue:
    def __init__(self, items):
        self.queue = list(items)

    def get_work_item(self):
        if self.queue:
            return self.queue.pop(0)
        return None


@ray.remote
class WorkerWithPipelining:
    def __init__(self, work_queue):
        self.work_queue = work_queue
        self.processed = []

    def process(self, work_item):
        self.processed.append(work_item * 10)

    def run(self):
        self.work_item_ref = self.work_queue.get_work_item.remote()
        while True:
            work_item = ray.get(self.work_item_ref)
            if work_item is None:
                break
            self.work_item_ref = self.work_queue.get_work_item.remote()
            self.process(work_item)
        return self.processed


work_queue = WorkQueue.remote(range(30))
workers = [WorkerWithPipelining.remote(work_queue) for _ in range(2)]
results = ray.get([w.run.remote() for w in workers])
assert sorted(results[0] + results[1]) == [i * 10 for i in range(30)]

ray.shutdown()
print("COMPAT OK")
