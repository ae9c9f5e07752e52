"""Nested tasks (Ray's "Nested Remote Functions" and "Pattern: using nested tasks to achieve
nested parallelism"): tasks that submit tasks and wait on them, refs returned from tasks.

No ``ray.init()``: auto-start.
"""

import random

import ray


@ray.remote
def leaf(x):
    return x + 1


@ray.remote
def returns_refs(n):
    return [leaf.remote(i) for i in range(n)]


@ray.remote
def sums_children(n):
    return sum(ray.get([leaf.remote(i) for i in range(n)]))


def partition(collection):
    pivot = collection.pop()
    greater, lesser = [], []
    for element in collection:
        (greater if element > pivot else lesser).append(element)
    return lesser, pivot, greater


@ray.remote
def quick_sort_distributed(collection):
    if len(collection) <= 50:
        return sorted(collection)
    lesser, pivot, greater = partition(collection)
    lesser = quick_sort_distributed.remote(lesser)
    greater = quick_sort_distributed.remote(greater)
    return [*ray.get(lesser), pivot, *ray.get(greater)]


@ray.remote
def fib(n):
    if n < 2:
        return n
    return sum(ray.get([fib.remote(n - 1), fib.remote(n - 2)]))


refs = ray.get(returns_refs.remote(5))
assert all(isinstance(r, ray.ObjectRef) for r in refs)
assert ray.get(refs) == [1, 2, 3, 4, 5]
assert ray.get(sums_children.remote(10)) == sum(range(1, 11))

rng = random.Random(7)
unsorted = [rng.randint(0, 10_000) for _ in range(400)]
assert ray.get(quick_sort_distributed.remote(list(unsorted))) == sorted(unsorted)

assert ray.get(fib.remote(5)) == 5

ray.shutdown()
print("COMPAT OK")
