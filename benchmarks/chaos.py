"""The long chaos run: a real cluster under a steady workload while workers, agents and the head
are SIGKILLed (and restarted), actors killed; then checks that every result was exact, nothing
hung and nothing leaked.

::

    python benchmarks/chaos.py --minutes 30                       # new seed, printed
    python benchmarks/chaos.py --minutes 3 --seed 42 --faults worker,head --interval 2
    NBCLUSTER_CHAOS_SEED=42 python benchmarks/chaos.py --minutes 3

Prints tasks done, faults injected (by kind), retries, wrong results (must be 0), the slowest
recovery (from a fault to the next completed result, and to a result of work submitted after
it), and the leak figures after shutdown. Exits 1 when a rule was broken (wrong result, error,
hang, leak). The harness is :mod:`nbcluster.testing.chaos`; the short CI version is
``tests/test_chaos.py``. ``link`` faults need network namespaces (root): only the pytest runs
them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from nbcluster.testing.chaos import FAULT_KINDS, SEED_ENV, ChaosConfig, run_chaos, seed_from_env

DEFAULT_FAULTS = "worker,worker_burst,agent,head,actor_kill"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0, help="time faults are injected")
    p.add_argument("--seed", type=int, help=f"default: ${SEED_ENV}, else a new one (printed)")
    p.add_argument(
        "--faults",
        default=DEFAULT_FAULTS,
        help="comma-separated kinds: " + "; ".join(f"{k}: {v}" for k, v in FAULT_KINDS.items()),
    )
    p.add_argument("--interval", type=float, default=4.0, help="mean seconds between faults")
    p.add_argument("--nodes", type=int, default=3, help="node agents, the driver's included")
    p.add_argument("--cpus", type=int, default=2, help="CPUs per node")
    p.add_argument("--inflight", type=int, default=12, help="results outstanding at once")
    p.add_argument("--item-timeout", type=float, default=60.0, help="longest a result may take")
    p.add_argument("--workdir", type=Path, help="keep logs here (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)

    seed = args.seed if args.seed is not None else seed_from_env()
    config = ChaosConfig(
        seed=seed,
        duration_s=args.minutes * 60.0,
        faults=tuple(k for k in args.faults.split(",") if k),
        interval_s=args.interval,
        nodes=args.nodes,
        cpus_per_node=args.cpus,
        inflight=args.inflight,
        item_timeout_s=args.item_timeout,
        drain_s=max(90.0, args.item_timeout * 2),
    )
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="nbcluster-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"chaos: seed {seed} (replay: --seed {seed}), logs in {workdir}", flush=True)
    started = time.monotonic()
    report = run_chaos(config, workdir, progress=lambda line: print(line, flush=True))
    print(report.format())
    print(f"total {time.monotonic() - started:.0f}s")
    if args.json:
        figures = {
            "seed": seed,
            "config": dataclasses.asdict(config),
            "done": dict(report.done),
            "faults": [dataclasses.asdict(f) for f in report.faults],
            "retries": report.retries,
            "reexecutions": report.reexecutions,
            "wrong": report.wrong,
            "errors": report.errors,
            "slowest_result_s": report.slowest_result,
            "slowest_next_result_s": report.slowest_next_result,
            "slowest_serving_s": report.slowest_serving,
            "leaks": dataclasses.asdict(report.leaks),
            "fd_delta": report.fd_delta,
            "rss_delta_mb": report.rss_delta_mb,
            "violations": report.violations(),
        }
        args.json.write_text(json.dumps(figures, indent=1))
    failed = bool(report.violations())
    if not failed and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)  # logs are kept when something went wrong
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
