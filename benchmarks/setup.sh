#!/usr/bin/env bash
# Create the benchmark virtualenv (.venv-bench at the repo root) with Ray,
# psutil, numpy and dask-jobqueue, plus an editable install of nbcluster when available.
# Ray lives only in this venv; it is never a dependency of nbcluster.
# Idempotent: re-running skips steps that are already done.
# Usage: bash benchmarks/setup.sh [--force]   (--force re-runs pip install -e .)
set -euo pipefail

FORCE=0
[[ "${1:-}" == "--force" ]] && FORCE=1

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REPO_ROOT}/.venv-bench"
PY="${VENV}/bin/python"
PYTHON="${PYTHON:-python3}"

cd "${REPO_ROOT}"

if [[ ! -x "${PY}" ]]; then
    echo "[setup] creating ${VENV}"
    "${PYTHON}" -m venv "${VENV}"
    "${PY}" -m pip install --quiet --upgrade pip
else
    echo "[setup] ${VENV} already exists"
fi

if "${PY}" -c "import ray, psutil, numpy" 2>/dev/null; then
    echo "[setup] ray, psutil, numpy already installed ($("${PY}" -c 'import ray; print("ray", ray.__version__)'))"
else
    echo "[setup] installing ray, psutil, numpy"
    "${PY}" -m pip install --quiet ray psutil numpy
fi

if [[ -f "${REPO_ROOT}/pyproject.toml" ]]; then
    if [[ "${FORCE}" != 1 ]] && "${PY}" -m pip show --quiet nbcluster >/dev/null 2>&1; then
        echo "[setup] nbcluster already installed (use --force to reinstall)"
        # Its dependencies may have grown since (an editable install does not follow them).
        "${PY}" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
            | xargs -d '\n' "${PY}" -m pip install --quiet
    else
        echo "[setup] installing nbcluster (pip install -e .)"
        if ! "${PY}" -m pip install --quiet -e "${REPO_ROOT}"; then
            echo "[setup] WARNING: 'pip install -e .' failed (nbcluster still in progress?)." >&2
            echo "[setup] Ray benchmarks still work; nbcluster will be reported as not" >&2
            echo "[setup] importable. Re-run this script once the package builds." >&2
        fi
    fi
else
    echo "[setup] no pyproject.toml yet: skipping nbcluster install (re-run later)"
fi

# dask-jobqueue: the baseline of benchmarks/slurm_launch.py (its SLURMCluster).
if "${PY}" -c "import dask_jobqueue" 2>/dev/null; then
    echo "[setup] dask-jobqueue already installed"
else
    echo "[setup] installing dask-jobqueue"
    "${PY}" -m pip install --quiet dask-jobqueue
fi

echo "[setup] done. Run: ${PY} benchmarks/run.py"
