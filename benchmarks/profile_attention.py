"""Forward+backward of the Triton sliding-window attention at B=4, L=4096, W=2048 (bf16; 16/4 heads x
128, or HEADS=32/4x64), for Nsight Compute:

    ncu --kernel-name regex:_attn_ --launch-skip 3 --launch-count 3 --section SpeedOfLight \\
        --section Occupancy --section WarpStateStats python benchmarks/profile_attention.py
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import WINDOW, make_inputs  # noqa: E402

from samba_lm import ops  # noqa: E402

heads, Dh = os.environ.get("HEADS", "16/4x128").split("x")
H, Hkv = (int(x) for x in heads.split("/"))
q, k, v = make_inputs(4, 4096, H, Hkv, int(Dh), grad=True)
pos = torch.arange(4096, device="cuda")[None].expand(4, 4096)
with ops.use_kernels("triton"):
    for _ in range(2):  # the first pass compiles; ncu skips it with --launch-skip
        ops.attention(q, k, v, pos, WINDOW).backward(torch.randn_like(q))
torch.cuda.synchronize()
