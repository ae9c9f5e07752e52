"""Map-reduce word count, after Ray's "A Simple MapReduce Example with Ray Core".

No ``ray.init()``: the first ``.remote()`` starts a local cluster, as in Ray.
"""

from collections import Counter

import ray

NUM_PARTITIONS = 3
TEXT = "the quick brown fox jumps over the lazy dog and the dog sleeps while the fox runs away"
CORPUS = TEXT.split()
DOCUMENTS = [" ".join(CORPUS[i : i + 5]) for i in range(0, len(CORPUS), 5)]


def map_function(document):
    for word in document.lower().split():
        yield word, 1


@ray.remote
def apply_map(documents, num_partitions):
    map_results = [[] for _ in range(num_partitions)]
    for document in documents:
        for word, count in map_function(document):
            map_results[ord(word[0]) % num_partitions].append((word, count))
    return map_results


@ray.remote
def apply_reduce(*results):
    reduce_results = {}
    for res in results:
        for key, value in res:
            reduce_results[key] = reduce_results.get(key, 0) + value
    return reduce_results


chunks = [DOCUMENTS[i::3] for i in range(3)]
map_results = [
    apply_map.options(num_returns=NUM_PARTITIONS).remote(chunk, NUM_PARTITIONS) for chunk in chunks
]
assert all(len(refs) == NUM_PARTITIONS for refs in map_results)
outputs = [
    apply_reduce.remote(*[map_results[j][i] for j in range(len(chunks))])
    for i in range(NUM_PARTITIONS)
]
counts = {}
for partition in ray.get(outputs):
    assert not set(partition) & set(counts), "a word was reduced in two partitions"
    counts.update(partition)

assert counts == dict(Counter(CORPUS)), counts
assert counts["the"] == 4 and counts["fox"] == 2
assert ray.is_initialized()
ray.shutdown()
print("COMPAT OK")
