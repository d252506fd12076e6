#!/usr/bin/env bash
# The main job: create the environment if needed, then register a pair and write every output.
# With no arguments it registers the built-in demo pair into output/demo (no data needed);
# any arguments are passed to `learnedreg register`, e.g.
#   bash scripts/run.sh --fixed F.nii.gz --moving M.nii.gz --output-dir output/mine
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$root/scripts/setup_env.sh")"
if [ "$#" -eq 0 ]; then
    set -- --output-dir "$root/output/demo"
fi
exec "$venv/bin/learnedreg" register "$@"
