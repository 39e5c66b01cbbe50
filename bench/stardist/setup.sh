#!/usr/bin/env bash
# Create (if missing) the bench-only StarDist venv and install bench/stardist/requirements.txt into it.
# Idempotent: a second run only checks that the pins are satisfied and re-verifies the import.
# This environment is for the benchmark only; kerasnuc itself does not depend on stardist.
#   bash bench/stardist/setup.sh            # venv at bench/.venv-stardist
#   VENV=/some/where bash bench/stardist/setup.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="${VENV:-$ROOT/bench/.venv-stardist}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating venv $VENV"
    "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)'; then
    echo "note: requirements.txt was pinned on Python 3.11; $("$VENV/bin/python" -V) may need other pins" >&2
fi
"$VENV/bin/python" -m pip install --disable-pip-version-check -q -r "$HERE/requirements.txt"
TF_CPP_MIN_LOG_LEVEL=2 "$VENV/bin/python" - <<'PY'
import stardist, csbdeep, tensorflow as tf, keras
from stardist.models import StarDist2D  # noqa: F401
print(f"ok: stardist {stardist.__version__}, csbdeep {csbdeep.__version__}, "
      f"tensorflow {tf.__version__}, keras {keras.__version__}")
PY
