"""Objects (Ray's "Objects" and "Passing Objects by Reference"): put/get, refs as arguments
(top-level ones resolved, nested ones passed as refs), refs returned by tasks, large arrays."""

import numpy as np
import ray

ray.init(num_cpus=4)


@ray.remote
def echo(x):
    return x


@ray.remote
def kinds(top, nested):
    return type(top).__name__, [isinstance(r, ray.ObjectRef) for r in nested["refs"]]


@ray.remote
def deref(nested):
    return sum(ray.get(nested["refs"]))


@ray.remote
def total(array):
    return float(array.sum())


ref = ray.put({"a": [1, 2, 3]})
assert isinstance(ref, ray.ObjectRef)
assert ray.get(ref) == {"a": [1, 2, 3]}
assert ray.get([ray.put(i) for i in range(5)]) == list(range(5))

# Top-level ref arguments arrive as values; refs inside containers arrive as refs.
parts = [ray.put(i) for i in range(4)]
top_kind, nested_kinds = ray.get(kinds.remote(ray.put("value"), {"refs": parts}))
assert top_kind == "str" and nested_kinds == [True] * 4
assert ray.get(deref.remote({"refs": parts})) == 6

# A ref chain: the task's result is the ref's value.
assert ray.get(echo.remote(echo.remote(5))) == 5

# Large numpy arrays travel through the object store.
array = np.arange(2_000_000, dtype=np.float64)
array_ref = ray.put(array)
assert ray.get(total.remote(array_ref)) == float(array.sum())
back = ray.get(array_ref)
assert np.array_equal(back, array)
assert ray.get(total.remote(array)) == float(array.sum())

# An ObjectRef round-trips through its hex form.
assert ray.get(ray.ObjectRef(bytes.fromhex(ref.hex()))) == {"a": [1, 2, 3]}
assert ray.ObjectRef(ref.binary()) == ref

# get of a single ref, a list, and wait with num_returns.
refs = [echo.remote(i) for i in range(6)]
ready, not_ready = ray.wait(refs, num_returns=6, timeout=30)
assert len(ready) == 6 and not not_ready
assert ray.get(refs) == list(range(6))

ray.shutdown()
print("COMPAT OK")
