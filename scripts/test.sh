#!/usr/bin/env bash
# The test suite: core tests need no display; napari widget tests run under a virtual X server.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] && . .venv/bin/activate
export HISTO_WSSS_DEVICE="${HISTO_WSSS_DEVICE:-cpu}"
if [ -z "${DISPLAY:-}" ] && command -v xvfb-run >/dev/null 2>&1; then
  exec xvfb-run -a -s "-screen 0 1280x1024x24" python -m pytest "$@"
fi
exec python -m pytest "$@"
