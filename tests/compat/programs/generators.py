"""Ray generators (Ray's "Ray Generators" guide): streaming generator tasks and actor methods,
errors mid-stream, ``async for``, ``ray.wait`` on a generator, and ``num_returns="dynamic"``."""

import asyncio

import ray

ray.init(num_cpus=4)


@ray.remote
def stream(n):
    for i in range(n):
        yield i * i


@ray.remote
def fails_after(n):
    # Not ``yield from``: Ray's worker fails on it ("'range_iterator' object has no attribute
    # 'send'").
    for i in range(n):  # noqa: UP028
        yield i
    raise ValueError("stream broke")


@ray.remote(num_returns="dynamic")
def dynamic(n):
    for i in range(n):
        yield [i] * i


@ray.remote
class Reader:
    def lines(self, n):
        for i in range(n):
            yield f"line {i}"

    async def async_lines(self, n):
        for i in range(n):
            await asyncio.sleep(0)
            yield i


gen = stream.remote(5)
assert isinstance(gen, ray.ObjectRefGenerator)
assert [ray.get(ref) for ref in gen] == [0, 1, 4, 9, 16]

gen = fails_after.remote(2)
assert ray.get(next(gen)) == 0
assert ray.get(next(gen)) == 1
try:
    ray.get(next(gen))
except ValueError as err:
    assert "stream broke" in str(err)
else:
    raise AssertionError("the error did not reach the ref after the last value")
try:
    next(gen)
except StopIteration:
    pass
else:
    raise AssertionError("the generator went on after its error")

reader = Reader.remote()
assert [ray.get(r) for r in reader.lines.remote(3)] == ["line 0", "line 1", "line 2"]
assert [ray.get(r) for r in reader.async_lines.remote(4)] == [0, 1, 2, 3]

# ray.wait on a generator: ready once its next ref is.
gen = stream.remote(3)
ready, _ = ray.wait([gen], timeout=30)
assert ready == [gen]
assert ray.get(next(gen)) == 0


async def consume():
    out = []
    async for ref in stream.remote(4):
        out.append(await ref)
    return out


assert asyncio.run(consume()) == [0, 1, 4, 9]

dyn_ref = dynamic.remote(4)
refs = ray.get(dyn_ref)
assert isinstance(refs, ray.DynamicObjectRefGenerator)
assert [ray.get(r) for r in refs] == [[], [1], [2, 2], [3, 3, 3]]

ray.shutdown()
print("COMPAT OK")
