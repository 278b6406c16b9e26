#!/usr/bin/env bash
# The main job: set up, tokenize Shakespeare, train the `tiny` Samba (about 6 minutes on 2 CPU
# cores), then stream a generated sample. Re-running resumes/reuses what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh train
[ -f data/shakespeare/index.json ] || .venv/bin/samba-lm data --source shakespeare --out data/shakespeare
.venv/bin/samba-lm train --data data/shakespeare --out-dir runs/quickstart "$@"
.venv/bin/samba-lm generate --model runs/quickstart --prompt "ROMEO:" --max-new-tokens 150 --temperature 0.8 --seed 0
