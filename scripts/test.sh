#!/usr/bin/env bash
# The test suite. Installs first on a fresh checkout; napari widget tests need a display, so
# without one the suite runs under a virtual X server (Xvfb).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/install.sh
. .venv/bin/activate
export HISTO_WSSS_DEVICE="${HISTO_WSSS_DEVICE:-cpu}"
if [ -z "${DISPLAY:-}" ]; then
  if ! command -v xvfb-run >/dev/null 2>&1; then
    echo "No display and no xvfb-run: run scripts/install.sh as root (or install xvfb)." >&2
    exit 1
  fi
  exec xvfb-run -a -s "-screen 0 1280x1024x24" python -m pytest "$@"
fi
exec python -m pytest "$@"
