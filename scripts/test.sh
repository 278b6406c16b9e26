#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite, one pytest worker per CPU (pytest-xdist: the
# interpreter-run kernel tests are single-threaded); extra arguments go to pytest (-n 0: one process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/python -m pytest -q -n auto "$@"
