#!/usr/bin/env bash
# Installs fedselect and its pinned dependencies into the Python found as $PYTHON (default:
# the `python` on PATH). Used twice, so both routes install the same thing:
#   - `make setup`, with PYTHON=.venv/bin/python;
#   - Snakemake, after it creates workflows/envs/fedselect.yaml (`--sdm conda`), inside that env.
# Run from the checkout root (Snakemake's working directory).
set -euo pipefail
PYTHON=${PYTHON:-python}
if [ ! -f requirements.txt ] || [ ! -f setup.py ]; then
    echo "fedselect install: requirements.txt and setup.py not found in $(pwd); run from the fedselect checkout root" >&2
    exit 1
fi
"$PYTHON" -m pip install --quiet --upgrade pip
"$PYTHON" -m pip install --quiet -r requirements.txt
# fedml's own pins break MLflow and numpy (see requirements.txt): install it without them
grep '^# nodeps:' requirements.txt | cut -d' ' -f3- | xargs "$PYTHON" -m pip install --quiet --no-deps
"$PYTHON" -m pip install --quiet --no-deps -e .
