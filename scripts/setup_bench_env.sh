#!/usr/bin/env bash
# Creates (or reuses) the benchmark's own virtual environment in .venv-bench: the project plus the
# peer tools compared in scripts/benchmark.py (ANTs via antspyx, elastix via itk-elastix). It
# inherits nothing from .venv or the system site-packages. torch is installed FIRST with an exact
# pin (a bare torch requirement pulls the newest CUDA build, several GB), then this package, then
# the peers, pinned to versions checked to install and run here (pip download --no-deps).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LEARNEDREG_BENCH_VENV:-$root/.venv-bench}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
stamp="$venv/.learnedreg-bench-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ] || [ "${BASH_SOURCE[0]}" -nt "$stamp" ]; then
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet "torch==${LEARNEDREG_TORCH_VERSION:-2.13.0}"
    "$venv/bin/python" -m pip install --quiet -e "$root"
    "$venv/bin/python" -m pip install --quiet "antspyx==0.6.3" "itk-elastix==0.25.4" "matplotlib>=3.7"
    touch "$stamp"
fi
echo "$venv"
