#!/usr/bin/env bash
# Build the peers (mamba_ssm's CUDA selective scan, causal_conv1d) from their PyPI sdists for sm_90
# only. The sdists are fetched on a machine with network into vendor/ (never committed):
#   MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE pip download --no-deps \
#     --no-build-isolation --no-binary :all: mamba-ssm==2.3.2.post1 causal-conv1d==1.7.0 -d vendor
# PEERS="causal_conv1d" builds only that one (about a minute; mamba_ssm takes about four).
set -euo pipefail
peers=${PEERS:-causal_conv1d mamba_ssm}
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${PEERS_DIR:-/tmp/peers}
mkdir -p "$work" && cd "$work"
for p in $peers; do tar xzf "$repo"/vendor/$p-*.tar.gz; done
# Keep only the sm_90 -gencode pair: the full list compiles for eight architectures.
python3 - <<'PY'
import glob, re
for path in glob.glob("*/setup.py"):
    s = open(path).read()
    s = re.sub(r'(\n[ \t]*)cc_flag\.append\("-gencode"\)\s*cc_flag\.append\("arch=compute_(?!90\b)\d+a?,code=sm_\d+a?"\)',
               r"\1pass", s)
    open(path, "w").write(s)
PY
# Installed into $work/site (add it to PYTHONPATH); build logs beside it, or in $OUT when set.
export MAX_JOBS=8 TORCH_CUDA_ARCH_LIST=9.0 MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE
logs=${OUT:-$work}
install() { python3 -m pip install --no-index --no-deps --no-build-isolation --target "$work/site" . ; }
for p in $peers; do (cd $p-* && install > "$logs/build_$p.log" 2>&1) & done
wait
for p in $peers; do PYTHONPATH="$work/site" python3 -c "import $p; print('peer built:', '$p', $p.__version__)"; done
echo "peers built"
