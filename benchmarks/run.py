"""Run the nbcluster-vs-Ray benchmarks and print a comparison table.

Every (backend, workload, repetition) runs ``benchmarks/workloads.py`` in a
fresh subprocess with a timeout, using ``.venv-bench/bin/python`` when it
exists (else the current interpreter).  Medians over ``--repeat`` runs are
tabulated and everything (raw runs included) is written to
``benchmarks/results.json``.

    .venv-bench/bin/python benchmarks/run.py
    .venv-bench/bin/python benchmarks/run.py --backends ray --workloads startup
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
WORKLOADS_PY = BENCH_DIR / "workloads.py"
VENV_PYTHON = REPO_ROOT / ".venv-bench" / "bin" / "python"

sys.path.insert(0, str(BENCH_DIR))
import cross_node  # noqa: E402,F401  (registers its workloads; they run from their own file)
import workloads as wl  # noqa: E402  (needs the sys.path entry above)

#: Column order in the table; the ratio is COLUMN_ORDER[0] / COLUMN_ORDER[1].
COLUMN_ORDER = ("nbcluster", "ray")

#: Ratios within this relative distance of 1 are reported as "about equal".
TIE_TOLERANCE = 0.03


@dataclass
class RunRecord:
    """Outcome of one subprocess run of one (backend, workload) pair."""

    backend: str
    workload: str
    ok: bool
    figures: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    elapsed_s: float = 0.0
    raw: dict[str, Any] | None = None
    stderr_tail: str = ""


def log(msg: str) -> None:
    """Progress message on stderr."""
    print(f"[run] {msg}", file=sys.stderr, flush=True)


def pick_python(explicit: str | None) -> str:
    """Interpreter for the subprocesses: explicit, .venv-bench, or ours."""
    if explicit:
        return explicit
    if VENV_PYTHON.exists():
        return str(VENV_PYTHON)
    return sys.executable


def _kill_tree(proc: subprocess.Popen[str]) -> None:
    """Kill ``proc``, its process group and all its descendants."""
    descendants: list[Any] = []
    try:
        import psutil

        descendants = psutil.Process(proc.pid).children(recursive=True)
    except Exception:  # psutil missing or process already gone
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for child in descendants:
        with contextlib.suppress(Exception):  # already gone
            child.kill()


def _parse_result(stdout: str) -> dict[str, Any] | None:
    """Last stdout line that is a JSON result record, if any."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict) and "backend" in data and "ok" in data:
            return data
    return None


def run_workload(python: str, backend: str, name: str, timeout: float) -> RunRecord:
    """Run one workload on one backend in a fresh subprocess."""
    script = WORKLOADS_PY
    if wl.REGISTRY[name].fn.__module__ == "cross_node":
        script = BENCH_DIR / "cross_node.py"
    cmd = [python, str(script), "--backend", backend, "--workload", name]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Its own process group (killed as one on a timeout), not its own session: a new
        # session is also a new scheduler autogroup, which on a host shared with other work
        # gets one share of the CPUs however many processes the backend starts; Ray's startup
        # then times out on a loaded host. Every run shares the caller's share instead.
        process_group=0,
    )
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_tree(proc)
        stdout, stderr = proc.communicate()
    elapsed = time.perf_counter() - t0
    tail = stderr[-3000:]
    data = _parse_result(stdout)

    if data is not None and data.get("ok"):
        record = RunRecord(backend, name, True, data.get("figures", {}), None)
        if timed_out:
            record.error = f"result produced but process hung (killed at {timeout}s)"
    elif data is not None:
        record = RunRecord(backend, name, False, error=data.get("error", "failed"))
    elif timed_out:
        record = RunRecord(backend, name, False, error=f"timeout after {timeout}s")
    else:
        last = stderr.strip().splitlines()[-1:] or ["no output"]
        record = RunRecord(backend, name, False, error=f"exit code {proc.returncode}: {last[0]}")
    record.elapsed_s = elapsed
    record.raw = data
    record.stderr_tail = "" if record.ok else tail
    return record


def check_backend(python: str, backend: str) -> dict[str, Any]:
    """Check that ``backend`` imports in a workload subprocess (same sys.path)."""
    cmd = [python, str(WORKLOADS_PY), "--backend", backend, "--check"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {"importable": False, "error": "import timed out after 120s"}
    data = _parse_result(res.stdout)
    if data is None:
        lines = res.stderr.strip().splitlines() or [f"exit code {res.returncode}"]
        return {"importable": False, "error": lines[-1]}
    if not data["ok"]:
        return {"importable": False, "error": data.get("error", "import failed")}
    return {"importable": True, "version": data.get("version"), "file": data.get("file")}


def median_figures(records: list[RunRecord]) -> dict[str, float]:
    """Per-metric median over the successful runs (None values skipped)."""
    keys: list[str] = []
    for rec in records:
        keys.extend(k for k in rec.figures if k not in keys)
    out: dict[str, float] = {}
    for key in keys:
        values = [
            r.figures[key] for r in records if r.ok and isinstance(r.figures.get(key), (int, float))
        ]
        if values:
            out[key] = statistics.median(values)
    return out


def fmt_value(value: float | None) -> str:
    """Compact number formatting for the table."""
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def build_rows(
    names: list[str],
    backends: list[str],
    summary: dict[str, dict[str, dict[str, Any]]],
) -> list[dict[str, Any]]:
    """One row per (workload, metric) with per-backend values and ratio."""
    rows: list[dict[str, Any]] = []
    num, den = COLUMN_ORDER
    for name in names:
        for i, metric in enumerate(wl.REGISTRY[name].metrics):
            row: dict[str, Any] = {
                "workload": name,
                "metric": f"{metric.key} [{metric.unit}]",
                "better": metric.better,
                "values": {},
                "cells": {},
            }
            for backend in backends:
                res = summary[name][backend]
                if not res["ok"]:
                    err = res["error"] or "failed"
                    short = err if len(err) <= 40 else err[:39] + "…"
                    cell = f"ERROR: {short}" if i == 0 else "ERROR"
                    row["values"][backend] = None
                else:
                    value = res["median"].get(metric.key)
                    row["values"][backend] = value
                    cell = fmt_value(value)
                row["cells"][backend] = cell
            a, b = row["values"].get(num), row["values"].get(den)
            row["ratio"] = a / b if a is not None and b else None
            rows.append(row)
    return rows


def render_table(rows: list[dict[str, Any]], backends: list[str]) -> str:
    """Plain-text table (ratio = nbcluster/ray)."""
    num, den = COLUMN_ORDER
    cols = [b for b in COLUMN_ORDER if b in backends]
    cols += [b for b in backends if b not in cols]
    show_ratio = num in backends and den in backends
    header = ["workload", "metric", *cols]
    if show_ratio:
        header += [f"ratio {num}/{den}", "better", "verdict"]
    else:
        header += ["better"]
    body: list[list[str]] = []
    for row in rows:
        line = [row["workload"], row["metric"], *(row["cells"][c] for c in cols)]
        if show_ratio:
            ratio = row["ratio"]
            verdict = "-"
            if ratio is not None and abs(ratio - 1) <= TIE_TOLERANCE:
                verdict = "about equal"
            elif ratio is not None:
                wins = ratio < 1 if row["better"] == "lower" else ratio > 1
                verdict = f"{num} better" if wins else f"{den} better"
            ratio_cell = "-" if ratio is None else f"{ratio:.2f}x"
            line += [ratio_cell, f"{row['better']} is better", verdict]
        else:
            line += [f"{row['better']} is better"]
        body.append(line)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), sep, *(fmt(r) for r in body)])


def host_info() -> dict[str, Any]:
    """Basic description of the machine the benchmark ran on."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "driver_python": sys.version.split()[0],
    }
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * page_size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return info


def parse_list(value: str, allowed: list[str], what: str) -> list[str]:
    """Parse a comma-separated list, validating against ``allowed``."""
    if value == "all":
        return list(allowed)
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)} (known: {allowed})")
    return items


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(
        description="Benchmark nbcluster against Ray (each run in a subprocess)."
    )
    parser.add_argument(
        "--backends",
        default="ray,nbcluster",
        help="comma-separated backends (default: ray,nbcluster)",
    )
    parser.add_argument(
        "--workloads",
        default="all",
        help=f"comma-separated workloads or 'all' (known: {','.join(wl.REGISTRY)})",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per pair; median is reported")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds per run (default 300)"
    )
    parser.add_argument(
        "--python", default=None, help="interpreter for runs (default: .venv-bench)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=BENCH_DIR / "results.json",
        help="where to write the JSON results",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 if any run failed")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")

    backends = parse_list(args.backends, list(wl.BACKENDS), "backends")
    names = parse_list(args.workloads, list(wl.REGISTRY), "workloads")
    python = pick_python(args.python)
    log(f"python: {python}")

    backend_info = {b: check_backend(python, b) for b in backends}
    for b, info in backend_info.items():
        state = f"version {info['version']}" if info["importable"] else info["error"]
        log(f"backend {b}: {state}")

    records: dict[tuple[str, str], list[RunRecord]] = {(n, b): [] for n in names for b in backends}
    for rep in range(args.repeat):
        for name in names:
            for backend in backends:
                info = backend_info[backend]
                if not info["importable"]:
                    err = f"not importable: {info['error']}"
                    records[(name, backend)].append(RunRecord(backend, name, False, error=err))
                    continue
                log(f"[{rep + 1}/{args.repeat}] {name} on {backend} ...")
                rec = run_workload(python, backend, name, args.timeout)
                status = "ok" if rec.ok else f"FAILED: {rec.error}"
                log(f"    {status} ({rec.elapsed_s:.1f}s) {rec.figures or ''}")
                records[(name, backend)].append(rec)

    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for name in names:
        summary[name] = {}
        for backend in backends:
            recs = records[(name, backend)]
            ok = [r for r in recs if r.ok]
            errors = [r.error for r in recs if not r.ok and r.error]
            summary[name][backend] = {
                "ok": bool(ok),
                "median": median_figures(ok),
                "n_ok": len(ok),
                "n_runs": len(recs),
                "error": errors[-1] if errors and not ok else None,
                "errors": errors,
                "runs": [
                    {
                        "ok": r.ok,
                        "figures": r.figures,
                        "error": r.error,
                        "elapsed_s": r.elapsed_s,
                        "details": (r.raw or {}).get("details"),
                        "version": (r.raw or {}).get("version"),
                        "stderr_tail": r.stderr_tail or None,
                    }
                    for r in recs
                ],
            }

    rows = build_rows(names, backends, summary)
    print(render_table(rows, backends))

    failures = [
        (n, b, s["error"]) for n, per in summary.items() for b, s in per.items() if not s["ok"]
    ]
    if failures:
        grouped: dict[tuple[str, str], list[str]] = {}
        for n, b, err in failures:
            grouped.setdefault((b, err or "failed"), []).append(n)
        print("\nErrors:")
        for (b, err), failed in grouped.items():
            print(f"  {b} [{', '.join(failed)}]: {err}")

    output = {
        "generated_at": dt.datetime.now(dt.UTC).isoformat(),
        "host": host_info(),
        "python": python,
        "repeat": args.repeat,
        "timeout_s": args.timeout,
        "init_kwargs": wl.INIT_KWARGS,
        "ray_env_defaults": wl.RAY_ENV_DEFAULTS,
        "backends": backend_info,
        "workloads": {
            n: {
                "description": wl.REGISTRY[n].description,
                "metrics": [m.__dict__ for m in wl.REGISTRY[n].metrics],
                "results": summary[n],
            }
            for n in names
        },
        "table": [
            {k: row[k] for k in ("workload", "metric", "better", "values", "ratio")} for row in rows
        ],
    }
    args.output.write_text(json.dumps(output, indent=2) + "\n")
    log(f"wrote {args.output}")
    return 1 if args.strict and failures else 0


if __name__ == "__main__":
    sys.exit(main())
