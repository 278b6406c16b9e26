"""AdamW parameter groups and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def no_decay(name: str, param: nn.Parameter) -> bool:
    """The optional exemption: norms, biases, A_log and D (the official trainer decays everything)."""
    leaf = name.rsplit(".", 1)[-1]
    return param.dim() < 2 or leaf in ("bias", "A_log", "D")


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas, eps: float,
                    exempt_from_decay: bool) -> torch.optim.AdamW:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if exempt_from_decay:
        groups = [{"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": weight_decay},
                  {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0}]
    else:
        groups = [{"params": [p for _, p in named], "weight_decay": weight_decay}]
    # fused: one multi-tensor kernel per step, where foreach makes a pass per operation (samba-421m on
    # an H200: 9.3 ms of a 227 ms step with foreach); FSDP2's DTensor parameters take it too.
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=True)


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to peak * min_ratio at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - 1 - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
