"""One forward+backward of the Triton scan (bf16, N=16), for Nsight Compute. Default B=8, L=4096,
E=4096; samba-421m's Mamba layers are `--d-inner 3072`. SEQUENTIAL_BACKWARD=0 in the environment:
the chunked backward after the step-at-a-time forward.

    ncu --kernel-name regex:_scan_ --launch-skip 2 --launch-count 2 --section SpeedOfLight \\
        --section LaunchStats --section Occupancy --section WarpStateStats python benchmarks/profile_scan.py
"""

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scan import scan_inputs  # noqa: E402

from samba_lm import ops  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--batch", type=int, default=8, help="rows (default: 8)")
p.add_argument("--length", type=int, default=4096, help="time steps (default: 4096)")
p.add_argument("--d-inner", type=int, default=4096, help="channels E (default: 4096)")
a = p.parse_args()
args = {k: v.requires_grad_(k != "A") for k, v in scan_inputs(a.batch, a.length, E=a.d_inner).items()}
with ops.use_kernels("triton"), ops.tuned(scan=dict(sequential_backward=os.environ.get("SEQUENTIAL_BACKWARD") != "0")):
    for _ in range(2):  # the first pass compiles; ncu skips it with --launch-skip
        y, _ = ops.selective_scan(**args)
        y.backward(torch.randn_like(y))
torch.cuda.synchronize()
