"""What checking every received message against its schema costs.

Three figures:

- per message, in µs: decoding the header (msgpack) and validating it
  (``nbcluster.protocol.validation.validate``), against decoding it straight into its typed
  message (``receive_message``: one ``msgspec`` decoder for the tagged union of every kind), for
  the hot-path kinds (``TASK``, ``RESULT``, ``LEASE_REQUEST``, ``LEASE_GRANTED``, ``ACTOR_CALL``)
  as the code sends them;
- per message, in µs: building and encoding the header as a dict (msgpack) against building its
  typed message and encoding that (``msgspec``);
- the no-op task round trip: ``nb.get(f.remote())`` in a loop on a local cluster, in µs per task.
  Run it under the code before and after a change (``PYTHONPATH=<checkout>``) to compare.

    python benchmarks/validate_cost.py                 # both
    python benchmarks/validate_cost.py --micro         # per message only
    python benchmarks/validate_cost.py --roundtrip 2000 --repeat 3
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
import timeit
from collections.abc import Callable
from typing import Any

#: Headers of the hot-path kinds, with the fields the code sends.
HOT: dict[str, tuple[dict[str, Any], int]] = {
    "task": (
        {
            "k": "task",
            "tid": "a3f01c2e0001.1f",
            "fn": "5d0e3b1f8a9c4e7f6a2b1c0d",
            "name": "noop",
            "nargs": 1,
            "nret": 1,
            "assigned": {"CPU": 1.0},
        },
        1,
    ),
    "result": ({"k": "result", "tid": "a3f01c2e0001.1f", "ok": True, "n": [1]}, 1),
    "lreq": ({"k": "lreq", "rid": 17, "shape": {"CPU": 1.0}, "name": "noop"}, 0),
    "lgrant": (
        {
            "k": "lgrant",
            "rid": 17,
            "lease_id": "L1a",
            "worker_id": "n1-w3",
            "worker_addr": "tcp://127.0.0.1:40001",
            "control_addr": "tcp://127.0.0.1:40002",
            "pid": 4242,
            "node_id": "n1",
            "node_name": "host",
            "gpus": [],
            "shape": {"CPU": 1.0},
        },
        0,
    ),
    "acall": (
        {
            "k": "acall",
            "tid": "a3f01c2e0001.20",
            "method": "add",
            "name": "Counter",
            "nargs": 1,
            "nret": 1,
        },
        1,
    ),
}


def micro(number: int = 200_000) -> dict[str, dict[str, float]]:
    """µs per message: decode alone, validate alone, decode + validate."""
    from nbcluster.protocol.codec import decode, encode
    from nbcluster.protocol.validation import receive, receive_message, validate

    out = {}
    for kind, (header, nframes) in HOT.items():
        frames = encode(header, [b"x"] * nframes)
        decoded, payload = decode(frames)
        runs: dict[str, Callable[[], object]] = {
            "decode_us": functools.partial(decode, frames),
            "validate_us": functools.partial(validate, decoded, payload),
            "receive_us": functools.partial(receive, frames),
            "typed_us": functools.partial(receive_message, frames),
        }
        out[kind] = {
            what: min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6
            for what, fn in runs.items()
        }
    return out


def encoding(number: int = 200_000) -> dict[str, dict[str, float]]:
    """µs per header: a dict packed with msgpack against a typed message encoded by msgspec."""
    import msgspec

    from nbcluster.protocol.codec import encode
    from nbcluster.protocol.schema import SCHEMAS

    enc = msgspec.msgpack.Encoder()
    out = {}
    for kind, (header, _) in HOT.items():
        cls = SCHEMAS[kind]
        fields = {k: v for k, v in header.items() if k != "k"}

        def as_dict(fields: dict[str, Any] = fields, kind: str = kind) -> object:
            return encode({"k": kind, **fields})

        def as_struct(fields: dict[str, Any] = fields, cls: Any = cls) -> object:
            return [enc.encode(cls(**fields))]

        out[kind] = {
            "dict_us": min(timeit.repeat(as_dict, number=number, repeat=5)) / number * 1e6,
            "struct_us": min(timeit.repeat(as_struct, number=number, repeat=5)) / number * 1e6,
        }
    return out


def roundtrip(n: int, repeat: int) -> list[float]:
    """µs per no-op task (``nb.get(f.remote())`` one after the other), one figure per repeat."""
    import nbcluster as nb

    nb.init(num_cpus=2)
    try:

        @nb.remote
        def noop() -> None:
            return None

        for _ in range(200):  # warm up: workers started, function sent, leases held
            nb.get(noop.remote())
        runs = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            for _ in range(n):
                nb.get(noop.remote())
            runs.append((time.perf_counter() - t0) / n * 1e6)
        return runs
    finally:
        nb.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro", action="store_true", help="per-message cost only")
    parser.add_argument("--roundtrip", type=int, default=0, help="tasks per round-trip run")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.micro or not args.roundtrip:
        print(
            f"{'kind':8} {'decode µs':>10} {'validate µs':>12} {'decode+validate µs':>19} "
            f"{'typed decode µs':>16}"
        )
        for kind, r in micro().items():
            print(
                f"{kind:8} {r['decode_us']:10.2f} {r['validate_us']:12.2f} "
                f"{r['receive_us']:19.2f} {r['typed_us']:16.2f}"
            )
        print(f"{'kind':8} {'dict+msgpack µs':>16} {'struct+msgspec µs':>18}")
        for kind, r in encoding().items():
            print(f"{kind:8} {r['dict_us']:16.2f} {r['struct_us']:18.2f}")
    if args.roundtrip or not args.micro:
        runs = roundtrip(args.roundtrip or 2000, args.repeat)
        print(
            f"no-op task round trip: median {statistics.median(runs):.0f} µs/task "
            f"(runs: {', '.join(f'{r:.0f}' for r in runs)})"
        )


if __name__ == "__main__":
    main()
