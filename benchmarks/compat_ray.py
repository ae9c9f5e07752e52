"""Run the compatibility suite (``tests/compat/programs``) against Ray and nbcluster.

Each program is a Ray program run unchanged, in a fresh subprocess, through
``tests/compat/run_as.py BACKEND PROGRAM``: against Ray as it is, against nbcluster through an
import alias (``ray`` -> ``nbcluster``). A program passes when it exits 0 and prints its
``COMPAT OK`` marker. Prints a pass table (status and seconds per backend)::

    .venv-bench/bin/python benchmarks/compat_ray.py
    .venv-bench/bin/python benchmarks/compat_ray.py --backends ray --programs queues,generators

Exits 1 when any program failed on any backend.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
COMPAT_DIR = REPO_ROOT / "tests" / "compat"
PROGRAMS_DIR = COMPAT_DIR / "programs"
RUN_AS = COMPAT_DIR / "run_as.py"
VENV_PYTHON = REPO_ROOT / ".venv-bench" / "bin" / "python"

#: What a program prints last when all its checks passed.
OK_MARKER = "COMPAT OK"

#: Ray's record of the running cluster; a stale one makes ``ray.init()`` try to join it.
RAY_CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")


@dataclass
class Outcome:
    """One program's run on one backend."""

    ok: bool
    seconds: float
    detail: str


def programs(names: str | None = None) -> list[Path]:
    """The suite's programs, sorted; only ``names`` (comma-separated stems) when given."""
    found = sorted(PROGRAMS_DIR.glob("*.py"))
    if not names:
        return found
    wanted = [n.strip().removesuffix(".py") for n in names.split(",") if n.strip()]
    by_stem = {p.stem: p for p in found}
    unknown = [n for n in wanted if n not in by_stem]
    if unknown:
        raise SystemExit(f"unknown programs: {', '.join(unknown)} (known: {', '.join(by_stem)})")
    return [by_stem[n] for n in wanted]


def run_program(python: str, backend: str, program: Path, timeout: float) -> Outcome:
    """Run ``program`` against ``backend`` in a new process group; kill it all on timeout."""
    if backend == "ray":
        RAY_CURRENT_CLUSTER.unlink(missing_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    # As benchmarks/workloads.py: Ray on loopback, no usage-stats reporting.
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [python, str(RUN_AS), backend, str(program)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # A process group, not a new session: a session would also be a new scheduler
        # autogroup, so the run would not share the caller's CPU share (``nice``).
        process_group=0,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return Outcome(False, time.monotonic() - t0, f"timed out after {timeout:.0f} s\n{output}")
    seconds = time.monotonic() - t0
    ok = proc.returncode == 0 and OK_MARKER in output.splitlines()
    return Outcome(ok, seconds, f"rc {proc.returncode}\n{output}")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="nbcluster,ray", help="default: nbcluster,ray")
    parser.add_argument("--programs", default=None, help="comma-separated names (default: all)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per program")
    parser.add_argument(
        "--python", default=None, help="interpreter (default: .venv-bench, else this one)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="print failures' output")
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [b for b in backends if b not in ("nbcluster", "ray")]
    if bad:
        parser.error(f"unknown backends: {', '.join(bad)}")
    python = args.python or (str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable)
    selected = programs(args.programs)

    results: dict[tuple[str, str], Outcome] = {}
    for program in selected:
        for backend in backends:  # interleaved, so a noisy minute hits both alike
            outcome = run_program(python, backend, program, args.timeout)
            results[(program.stem, backend)] = outcome
            state = "pass" if outcome.ok else "FAIL"
            print(
                f"[compat] {program.stem} on {backend}: {state} ({outcome.seconds:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
            if not outcome.ok and args.verbose:
                print(outcome.detail[-4000:], file=sys.stderr, flush=True)

    width = max(len(p.stem) for p in selected)
    print(f"{'program':<{width}}  " + "  ".join(f"{b:<14}" for b in backends))
    for program in selected:
        cells = []
        for backend in backends:
            o = results[(program.stem, backend)]
            cells.append(f"{'pass' if o.ok else 'FAIL'} {o.seconds:5.1f} s   ")
        print(f"{program.stem:<{width}}  " + "  ".join(cells))
    failed = [(p, b) for (p, b), o in results.items() if not o.ok]
    for b in backends:
        n_ok = sum(1 for p in selected if results[(p.stem, b)].ok)
        print(f"{b}: {n_ok}/{len(selected)} passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
