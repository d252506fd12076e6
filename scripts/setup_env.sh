#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv and installs the package with its
# test extra. torch is installed first with an exact pin: a bare or open-ended torch requirement
# would pull the newest CUDA build (several GB) from the registry.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LEARNEDREG_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
stamp="$venv/.learnedreg-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet "torch==${LEARNEDREG_TORCH_VERSION:-2.13.0}"
    "$venv/bin/python" -m pip install --quiet -e "$root[test]"
    touch "$stamp"
fi
echo "$venv"
