#!/usr/bin/env bash
# The test suite: create the environment if needed, then run pytest (extra arguments go to pytest).
# Tests that need ../shared/data skip when it is absent, and fail instead with LEARNEDREG_REQUIRE_DATA=1.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$root/scripts/setup_env.sh")"
cd "$root"
exec "$venv/bin/python" -m pytest "$@"
