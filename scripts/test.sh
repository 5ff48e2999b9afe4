#!/usr/bin/env bash
# Install from nothing and run every test (the command README.md gives and .ci/run calls).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh .venv
source .venv/bin/activate
ruff check .
status=0
python -m pytest -q -p no:cacheprovider tests || status=$?
# pytest exits 5 when it collected no test: that is a failure, not a pass.
if [ "$status" -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi
exit "$status"
