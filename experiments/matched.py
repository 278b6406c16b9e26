"""What the small-scale experiments share: their models (Samba, Llama, Llama-SWA, Mamba) built at one
parameter count, the number of repeated blocks being the free knob."""

from __future__ import annotations

import samba_lm
import torch

PATTERNS = {"samba": ("mamba", "mlp", "swa", "mlp"), "llama": ("attn", "mlp"), "llama-swa": ("swa", "mlp"),
            "mamba": ("mamba",)}


def model_args(name: str, repeats: int, d_model: int, window: int) -> dict:
    heads = max(1, d_model // 32)
    return dict(layers=PATTERNS[name] * repeats, d_model=d_model, n_heads=heads, n_kv_heads=heads, head_dim=32,
                mlp_hidden=(8 * d_model // 3 + 31) // 32 * 32, window=window)


def count_params(args: dict, vocab: int) -> int:
    """Parameters without the (tied) embedding, which is the same for every model."""
    with torch.device("meta"):
        model = samba_lm.SambaLM(samba_lm.SambaConfig.from_preset("tiny", vocab_size=vocab, **args))
    return sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)


def matched_args(names, d_model: int, window: int, vocab: int, samba_repeats: int) -> dict[str, dict]:
    """Each named model at the Samba model's parameter count (of `samba_repeats` blocks)."""
    target = count_params(model_args("samba", samba_repeats, d_model, window), vocab)
    chosen = {}
    for name in names:
        best = min(range(1, 8 * samba_repeats + 1),
                   key=lambda r: abs(count_params(model_args(name, r, d_model, window), vocab) - target))
        chosen[name] = model_args(name, best, d_model, window)
    return chosen
