"""ray.util.multiprocessing.Pool (Ray's "Distributed multiprocessing.Pool"): a drop-in for
multiprocessing.Pool. No ``ray.init()``: the Pool starts Ray itself."""

import ray
from ray.util.multiprocessing import Pool


def square(x):
    return x * x


def add(a, b):
    return a + b


def fail(x):
    raise ValueError(f"bad {x}")


with Pool(processes=2) as pool:
    assert pool.map(square, range(20)) == [x * x for x in range(20)]
    assert pool.map(square, range(20), chunksize=3) == [x * x for x in range(20)]
    assert sorted(pool.imap_unordered(square, range(10))) == [x * x for x in range(10)]
    assert list(pool.imap(square, range(10))) == [x * x for x in range(10)]
    assert pool.starmap(add, [(1, 2), (3, 4)]) == [3, 7]
    assert pool.apply(add, (20, 22)) == 42
    result = pool.apply_async(square, (9,))
    assert result.get(timeout=30) == 81 and result.successful()
    async_map = pool.map_async(square, [1, 2, 3])
    async_map.wait(timeout=30)
    assert async_map.ready() and async_map.get() == [1, 4, 9]
    try:
        pool.map(fail, [1])
    except ValueError as err:
        assert "bad 1" in str(err)
    else:
        raise AssertionError("the function's error did not reach the caller")

assert ray.is_initialized()
ray.shutdown()
print("COMPAT OK")
