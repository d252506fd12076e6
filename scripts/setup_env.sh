#!/usr/bin/env bash
# Creates (or reuses) a virtual environment and prints its path.
#
#   bash scripts/setup_env.sh           # .venv: this package with its test extra (run.sh, test.sh)
#   bash scripts/setup_env.sh --bench   # .venv-bench: this package plus the peer tools compared in
#                                       # scripts/benchmark.py (ANTs via antspyx, elastix via itk-elastix)
#   bash scripts/setup_env.sh --web     # .venv-web: this package with its web extra (trame-slicer, which
#                                       # pins slicer-core 5.11.0.*; the main .venv keeps 5.13) and the test
#                                       # extra, plus selenium for Testing/test_web_app.py (scripts/serve.sh)
#
# torch is installed FIRST with an exact pin: a bare or open-ended torch requirement would pull the
# newest CUDA build (several GB) from the registry. The peers are pinned to versions checked to
# install and run here. Each environment inherits nothing from the other or from the system.
# An environment is (re)installed when pyproject.toml or this script is newer than its stamp.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
case "${1:-}" in
    "")
        venv="${LEARNEDREG_VENV:-$root/.venv}"
        package="$root[test]"
        extras=()
        ;;
    --bench)
        venv="${LEARNEDREG_BENCH_VENV:-$root/.venv-bench}"
        package="$root"
        extras=("antspyx==0.6.3" "itk-elastix==0.25.4" "matplotlib>=3.7")
        ;;
    --web)
        venv="${LEARNEDREG_WEB_VENV:-$root/.venv-web}"
        package="$root[test,web]"
        # The browser test drives Debian's chromium (apt-get install chromium chromium-driver).
        extras=("selenium==4.51.0")  # 4.52.0 needs a certifi release not yet on the registry
        ;;
    *)
        echo "usage: bash scripts/setup_env.sh [--bench | --web]" >&2
        exit 2
        ;;
esac
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
stamp="$venv/.learnedreg-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ] || [ "${BASH_SOURCE[0]}" -nt "$stamp" ]; then
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet "torch==${LEARNEDREG_TORCH_VERSION:-2.13.0}"
    "$venv/bin/python" -m pip install --quiet -e "$package"
    if [ "${#extras[@]}" -gt 0 ]; then
        "$venv/bin/python" -m pip install --quiet "${extras[@]}"
    fi
    touch "$stamp"
fi
echo "$venv"
