"""ray.util.queue.Queue (Ray's "Utility Classes: Message passing using Ray Queue"):
producers and consumers in tasks and actors, blocking and non-blocking, Empty and Full."""

import ray
from ray.util.queue import Empty, Full, Queue

ray.init(num_cpus=4)

queue = Queue(maxsize=100)


@ray.remote
def consumer(consumer_id, queue):
    got = []
    try:
        while True:
            got.append(queue.get(block=True, timeout=1))
    except Empty:
        pass
    return consumer_id, got


@ray.remote
class Producer:
    def __init__(self, queue):
        self.queue = queue

    def produce(self, items):
        for item in items:
            self.queue.put(item)
        return len(items)


for i in range(10):
    queue.put(i)
producer = Producer.remote(queue)
assert ray.get(producer.produce.remote(list(range(10, 20)))) == 10
consumers = [consumer.remote(cid, queue) for cid in range(2)]
results = ray.get(consumers)
assert sorted(cid for cid, _ in results) == [0, 1]
assert sorted(x for _, got in results for x in got) == list(range(20))
for _, got in results:
    assert got == sorted(got), "a consumer saw items out of FIFO order"
assert queue.empty() and queue.qsize() == 0

# Non-blocking use and the size limit.
small = Queue(maxsize=2)
small.put_nowait("a")
small.put("b", block=False)
assert small.full() and small.qsize() == 2 and len(small) == 2
try:
    small.put_nowait("c")
except Full:
    pass
else:
    raise AssertionError("put_nowait on a full queue did not raise Full")
try:
    small.put("c", timeout=0.2)
except Full:
    pass
else:
    raise AssertionError("put(timeout=) on a full queue did not raise Full")
assert small.get_nowait() == "a" and small.get() == "b"
try:
    small.get(timeout=0.2)
except Empty:
    pass
else:
    raise AssertionError("get(timeout=) on an empty queue did not raise Empty")

# Batches.
batch = Queue()
batch.put_nowait_batch([1, 2, 3, 4])
assert batch.size() == 4
assert batch.get_nowait_batch(3) == [1, 2, 3]
assert batch.get_nowait() == 4

ray.shutdown()
print("COMPAT OK")
