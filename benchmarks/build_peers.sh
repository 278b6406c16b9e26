#!/usr/bin/env bash
# Build the peers (mamba_ssm's CUDA selective scan, causal_conv1d) from their PyPI sdists for sm_90
# only. The sdists are fetched on a machine with network into vendor/ (never committed):
#   MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE pip download --no-deps \
#     --no-build-isolation --no-binary :all: mamba-ssm==2.3.2.post1 causal-conv1d==1.7.0 -d vendor
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${PEERS_DIR:-/tmp/peers}
mkdir -p "$work" && cd "$work"
for f in "$repo"/vendor/mamba_ssm-*.tar.gz "$repo"/vendor/causal_conv1d-*.tar.gz; do tar xzf "$f"; done
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
(cd causal_conv1d-* && install > "$logs/build_causal_conv1d.log" 2>&1) &
(cd mamba_ssm-* && install > "$logs/build_mamba_ssm.log" 2>&1) &
wait
PYTHONPATH="$work/site" python3 -c "import causal_conv1d, mamba_ssm; print('peers built:', causal_conv1d.__version__, mamba_ssm.__version__)"
