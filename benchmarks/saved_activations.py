"""Bytes a Mamba mixer keeps for its backward, per token, with and without `--recompute-mamba`, against
mamba_ssm's count, scaled to samba-1.7b's mixer (d_model 2048, d_inner 4096, d_state 16) at B8 L4096.

    TRITON_INTERPRET=1 python benchmarks/saved_activations.py     # on a CPU, through the interpreter
    python benchmarks/saved_activations.py                        # on a GPU

It runs one training step of a Mamba-only model at d_model 32 (d_inner 64, d_state 16; bf16 autocast
on a GPU, bf16 weights on a CPU: bf16 activations either way) through the Triton kernels, with the step-at-a-time scan that B8 at d_inner 4096 takes, and counts the
distinct storages saved inside the mixers (parameters left out). Every saved tensor is [B, T, c x d]
or the scan's states [B, T / 8, N, E], so bytes per token scale with d at a fixed d_inner / d_model.

mamba_ssm 2.3.2 (`mamba_inner_fn`, checkpoint_lvl=1, its default) keeps xz [2E], x_dbl [R + 2N], B and
C again [N each], the scan output [E] (out_proj's input) and, outside it, in_proj's input [d]; its
scan states every 2048 steps are negligible.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import samba_lm  # noqa: E402
from samba_lm import ops  # noqa: E402

D_SMALL, D, E, N, R, B, L = 32, 2048, 4096, 16, 128, 8, 4096


def saved_per_token(recompute: bool) -> float:
    cuda = torch.cuda.is_available()
    cfg = samba_lm.SambaConfig(d_model=D_SMALL, vocab_size=64, layers=("mamba",), d_state=N)
    model = samba_lm.SambaLM(cfg).to("cuda" if cuda else "cpu", None if cuda else torch.bfloat16).train()
    model.layers[0].mixer.recompute = recompute
    mixer, saved, inside = model.layers[0].mixer, {}, []
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if inside and t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    mixer.register_forward_pre_hook(lambda *_: inside.append(1))
    mixer.register_forward_hook(lambda *_: inside.clear())
    batch, T = 2, 64
    ids = torch.randint(0, cfg.vocab_size, (batch, T + 1), device=next(model.parameters()).device)
    autocast = torch.autocast("cuda", torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    with ops.use_kernels("triton"), ops.tuned(scan=dict(sequential_min_programs_per_sm=0)), autocast, \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
    loss.backward()
    return sum(saved.values()) / (batch * T)


def main():
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("no GPU: run it with TRITON_INTERPRET=1 (the Triton interpreter)")
    scale, tokens = D / D_SMALL, B * L
    rows = [(label, saved_per_token(recompute) * scale)
            for label, recompute in (("samba-lm", False), ("samba-lm --recompute-mamba", True))]
    rows.append(("mamba_ssm 2.3.2 (count)", 2 * (D + 2 * E + (R + 2 * N) + 2 * N + E)))
    print(f"Saved for the backward per Mamba mixer, d_model {D}, d_inner {E}, d_state {N}, B{B} L{L}, bf16:")
    print("| | bytes per token | GB per layer | / mamba_ssm |")
    print("|---|---|---|---|")
    for label, per_token in rows:
        print(f"| {label} | {per_token:,.0f} | {per_token * tokens / 1e9:.2f} | {per_token / rows[-1][1]:.2f} |")


if __name__ == "__main__":
    main()
