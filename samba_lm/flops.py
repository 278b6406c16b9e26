"""Forward FLOPs per token of a SambaConfig (multiply-adds count 2), for logs and `samba-lm info`.

Matmuls: 2 x every projection weight, LM head included. Attention: 4 x heads x head_dim x the mean
number of keys a query sees at this sequence length (its window, or its prefix); differential
attention 6 x (its scores are head_dim wide, its values twice that). A gated memory unit: its two
projections and the gate. Mamba: the depthwise
conv (2 x d_inner x d_conv) and the scan (about 9 x d_inner x d_state: decay exp and multiply,
B*x, the state update, C.h). Training costs about 3x the forward.
"""

from __future__ import annotations

from .config import SambaConfig


def flops_per_token(cfg: SambaConfig, seq_len: int) -> float:
    d, E, N = cfg.d_model, cfg.d_inner, cfg.d_state
    mamba = 2 * (d * 2 * E + E * (cfg.dt_rank + 2 * N) + cfg.dt_rank * E + E * d) + 2 * E * cfg.d_conv + 9 * E * N
    qkv_out = 2 * (d * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim + cfg.n_heads * cfg.head_dim * d)

    def attention(window: int, per_key: int = 4) -> float:
        w = min(window, seq_len)  # query i sees min(i + 1, window) keys
        keys = (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len
        return qkv_out + per_key * cfg.n_heads * cfg.head_dim * keys

    per_kind = {"mamba": mamba, "mlp": 2 * 3 * d * cfg.mlp_hidden,
                "swa": attention(cfg.window), "attn": attention(seq_len),
                "dswa": attention(cfg.window, 6), "dattn": attention(seq_len, 6),
                "mamba_mem": mamba, "gmu": 2 * 2 * d * E + E,
                "dcross": attention(seq_len, 6) - 2 * d * 2 * cfg.n_kv_heads * cfg.head_dim}  # no K, V of its own
    return sum(per_kind[k] for k in cfg.layers) + 2 * d * cfg.vocab_size
