#!/usr/bin/env bash
# The registration in a web browser, on Slicer's own slice views (trame-slicer): creates the web
# environment if needed (.venv-web: this package with its `web` extra, which pins slicer-core
# 5.11.0.*, so the main .venv keeps 5.13), then runs `learnedreg serve`. Arguments go to it, e.g.
#   bash scripts/serve.sh --data-root ~/images            # inputs from, and results into, ~/images
#   bash scripts/serve.sh --data-root ~/images --port 8080
# With no --data-root it serves output/web (created; the built-in demo pair needs no files).
# It listens on 127.0.0.1 only (this machine) unless --host says otherwise, and prints the URL.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$root/scripts/setup_env.sh" --web)"
for argument in "$@"; do
    if [ "$argument" = "--data-root" ] || [[ "$argument" == --data-root=* ]]; then
        exec "$venv/bin/learnedreg" serve "$@"
    fi
done
mkdir -p "$root/output/web"
exec "$venv/bin/learnedreg" serve --data-root "$root/output/web" "$@"
