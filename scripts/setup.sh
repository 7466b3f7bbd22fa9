#!/usr/bin/env bash
# Create .venv and install gigamil with its cucim and dev extras. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[cucim,dev]'
.venv/bin/gigamil --version
