"""SambaLM: token embedding -> pre-norm residual sub-layers -> final RMSNorm -> (tied) LM head.

Each sub-layer computes h = h + mixer(RMSNorm(h)) (or LayerNorm, `config.norm`), the mixer being
Mamba, sliding-window attention, full attention or a SwiGLU MLP (or SambaY's kinds, which hand a
memory or keys and values up the stack in `Shared`), as `config.layers` lists them. The residual
stream h is kept in
float32 (float64 in a float64 model) whatever the compute dtype. The add of a sub-layer's output
and the next norm are one op (`ops.add_rmsnorm`), so each sub-layer hands on its output and the next
one adds it. Training, chunked prefill and token-by-token decode all run `forward`; they differ only
in the state passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .config import DIFFERENTIAL_KINDS, WINDOWED_KINDS, SambaConfig
from .documents import check_document_ids, document_starts
from .layers import (GMU, Attention, CrossDifferentialAttention, DifferentialAttention, LayerNorm, Mamba, RMSNorm,
                     SwiGLU, build_norm)
from .ops import autocast_dtype, linear, linear_cross_entropy, recomputed
from .state import SambaState, start_positions


@dataclass
class SambaOutput:
    logits: torch.Tensor | None  # [B, T, vocab] (or [B, logits_to_keep, vocab]); None when labels were given
    state: SambaState | None
    loss: torch.Tensor | None = None  # with labels: mean next-token cross-entropy, a float32 (float64) scalar
    losses: torch.Tensor | None = None  # with labels: [B, T] float32 (float64) per-position losses, 0 at -100;
    # no gradient flows through them (it flows through loss)


def build_mixer(kind: str, cfg: SambaConfig, index: int = 0) -> nn.Module:
    """Sub-layer `index` of `cfg.layers`, of kind `kind`."""
    if kind in ("mamba", "mamba_mem"):
        return Mamba(cfg.d_model, cfg.d_inner, cfg.d_state, cfg.d_conv, cfg.dt_rank,
                     cfg.dt_min, cfg.dt_max, cfg.dt_init_floor, memory=kind == "mamba_mem")
    if kind == "gmu":
        return GMU(cfg.d_model, cfg.d_inner)
    if kind == "mlp":
        return SwiGLU(cfg.d_model, cfg.mlp_hidden)
    args = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.window if kind in WINDOWED_KINDS else 0,
            cfg.rope_base, cfg.rope, cfg.attention_bias)
    if kind in DIFFERENTIAL_KINDS:
        depth = sum(k != "mlp" for k in cfg.layers[:index])  # the block's index: a mixer and its MLP
        if kind == "dcross":
            return CrossDifferentialAttention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                                              cfg.attention_bias, depth, cfg.norm_eps)
        layer = DifferentialAttention(*args, depth=depth, eps=cfg.norm_eps)
        # A full layer hands its keys and values to the cross layers above, up to the next full one.
        above = cfg.layers[index + 1:]
        layer.share_kv = kind == "dattn" and "dcross" in above[:above.index("dattn") if "dattn" in above else None]
        return layer
    return Attention(*args)


POSITION_WISE_KINDS = ("mlp", "gmu", "dcross")  # no state; a position's output needs no other's input


def _tail(n: int, h, delta, positions, documents, shared):
    """The last n positions of what the sub-layers above see (YOCO); the shared keys stay whole."""
    def cut(t):
        return None if t is None else t[:, -n:]

    documents = None if documents is None else type(documents)(*(cut(t) for t in documents))
    return cut(h), cut(delta), cut(positions), documents, shared._replace(memory=cut(shared.memory))


class Shared(NamedTuple):
    """What SambaY's sub-layers hand up the stack within one call: the memory of the latest "mamba_mem"
    layer (for "gmu") and the keys and values of the latest sharing "dattn" (for "dcross")."""
    memory: torch.Tensor | None = None
    kv: object = None  # layers.attention.SharedKV


class Residual(nn.Module):
    def __init__(self, kind: str, cfg: SambaConfig, index: int = 0):
        super().__init__()
        self.kind = kind
        self.norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.mixer = build_mixer(kind, cfg, index)

    def forward(self, h, delta, positions, state=None, documents=None, shared=Shared()):
        """(h + delta, this sub-layer's output, `Shared` for the layers above): delta is the previous
        sub-layer's output (None first)."""
        # Every mixer starts with a matmul: under autocast the norm writes the bf16 it would cast to.
        h, x = self.norm(h, delta, autocast_dtype(h))
        if self.kind == "gmu":
            return h, self.mixer(x, positions, state, documents, memory=shared.memory), shared
        if self.kind == "dcross":
            return h, self.mixer(x, positions, state, documents, kv=shared.kv), shared
        out = self.mixer(x, positions, state, documents)
        if self.kind == "mamba_mem":
            return h, out[0], shared._replace(memory=out[1])
        if getattr(self.mixer, "share_kv", False):
            return h, out[0], shared._replace(kv=out[1])
        return h, out, shared


class SambaLM(nn.Module):
    def __init__(self, config: SambaConfig):
        super().__init__()
        if not isinstance(config, SambaConfig):
            raise ValueError(f"config must be a SambaConfig, got {type(config).__name__}")
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Residual(kind, config, i) for i, kind in enumerate(config.layers))
        self.norm_f = build_norm(config.norm, config.d_model, config.norm_eps)
        # YOCO (SambaY's prefill): from this sub-layer up no layer keeps a state or mixes positions, but
        # for cross layers, which read the shared keys and values of every position. So a forward that
        # keeps only the last logits runs those layers for the kept positions alone, exactly.
        stateful = [i for i, kind in enumerate(config.layers) if kind not in POSITION_WISE_KINDS]
        self.position_wise_from = stateful[-1] + 1 if stateful else 0
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        # Activation checkpointing (a trainer option): in training without a state, keep only each
        # sub-layer's inputs and recompute its activations in the backward.
        self.checkpoint_layers = False
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """(Re)initialise every tensor; call after `to_empty()` when the model was built on meta.

        | tensor                                       | rule                                        |
        |----------------------------------------------|---------------------------------------------|
        | embedding.weight                             | N(0, init_std)                              |
        | every Linear and conv1d                      | PyTorch default (kaiming uniform, bias U)   |
        | residual outputs: out_proj, mlp down_proj    | default, then / sqrt(number of sub-layers)  |
        | untied lm_head                               | PyTorch default                             |
        | mamba dt_proj.weight                         | U(+-dt_rank^-0.5)                           |
        | mamba dt_proj.bias                           | softplus^-1(dt), dt log-U[dt_min, dt_max]   |
        | mamba A_log, D                               | log(1..d_state) per channel, 1              |
        | differential attention lambdas, subln        | N(0, 0.1), 1                                |
        | RMSNorm / LayerNorm weights, LayerNorm bias  | 1, 0                                        |

        The residual scale is the official 1/sqrt(2 * n_blocks), with a block = mixer + MLP.
        """
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d)):
                m.reset_parameters()
        for m in self.modules():
            if isinstance(m, (Mamba, RMSNorm, LayerNorm, DifferentialAttention, CrossDifferentialAttention)):
                m.reset_parameters()
        nn.init.normal_(self.embedding.weight, std=self.config.init_std)
        for layer in self.layers:
            out = layer.mixer.down_proj if layer.kind == "mlp" else layer.mixer.out_proj
            out.weight.div_(math.sqrt(self.config.n_layers))

    def init_state(self, batch_size: int, device=None, dtype=None, start=None, capacity: int | None = None
                   ) -> SambaState:
        """Allocate the streaming state for `batch_size` rows (defaults: the model's device and dtype).

        start: each row's first position (a list or CPU tensor; default 0): -n for a row whose first n
        tokens are left padding, which then stays out of every layer's state. capacity: the slots that
        full-attention layers allocate at once (default 256, doubling when full); generation gives
        prompt + new tokens, so that its cache never moves and a captured step serves every length."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if capacity is not None and (not isinstance(capacity, int) or capacity < 1):
            raise ValueError(f"capacity must be a positive int or None, got {capacity!r}")
        device = device or self.embedding.weight.device
        dtype = dtype or self.embedding.weight.dtype
        pos, bound = start_positions(start, batch_size, device)
        records = [layer.mixer.init_state(batch_size, device, dtype, capacity, bound)
                   if isinstance(layer.mixer, Attention) else layer.mixer.init_state(batch_size, device, dtype)
                   for layer in self.layers]
        return SambaState(records, pos, self.config)

    def forward(self, input_ids: torch.Tensor, state: SambaState | None = None,
                logits_to_keep: int = 0, labels: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None) -> SambaOutput:
        """input_ids [B, T] -> logits [B, T, vocab]; with a state, continues its stream in place.

        logits_to_keep > 0 computes logits for the last that many positions only (prefill).
        labels [B, T] (int64, each position's next token, -100 ignored): the loss instead of the logits,
        by `ops.linear_cross_entropy`, which never holds [B, T, vocab]: `losses` per position and `loss`
        their mean over the labelled ones. For training, and with a state for streaming evaluation
        (`eval ppl`); not with logits_to_keep.
        document_ids [B, T] (integers, non-decreasing along each row): packed documents, each seeing
        only itself (`samba_lm.documents`); a state remembers each row's document across calls."""
        batch, T = self._check_inputs(input_ids, state, logits_to_keep)
        self._check_labels(labels, input_ids, logits_to_keep)
        start = state.pos[:, None] if state is not None else 0
        positions = (start + torch.arange(T, device=input_ids.device)[None]).expand(batch, T)
        documents = None
        if document_ids is not None:
            check_document_ids(document_ids, input_ids)
            documents = document_starts(document_ids, positions, state)
        h = self.embedding(input_ids)
        h, delta, shared = h.to(torch.promote_types(h.dtype, torch.float32)), None, Shared()
        recompute = self.checkpoint_layers and self.training and torch.is_grad_enabled() and state is None
        for i, layer in enumerate(self.layers):
            if logits_to_keep and i == self.position_wise_from and logits_to_keep < T:
                h, delta, positions, documents, shared = _tail(logits_to_keep, h, delta, positions, documents, shared)
            if recompute:
                h, delta, shared = recomputed(layer, h, delta, positions, None, documents, shared)
            else:
                h, delta, shared = layer(h, delta, positions, state.layers[i] if state is not None else None,
                                         documents, shared)
        if state is not None:
            state.pos += T
            if documents is not None:
                state.doc.copy_(document_ids[:, -1])
                state.doc_start.copy_(documents.start[:, -1])
        if logits_to_keep:
            h, delta = h[:, -logits_to_keep:], delta[:, -logits_to_keep:]  # no-ops if _tail cut them already
        _, x = self.norm_f(h, delta)
        weight = (self.lm_head if self.lm_head is not None else self.embedding).weight
        if labels is not None:
            # One chunked pass gives both; the mean's gradient is computed in that pass already.
            loss, losses = linear_cross_entropy(x, weight, labels, return_losses=True)
            return SambaOutput(None, state, loss, losses)
        return SambaOutput(linear(x, weight), state)

    @staticmethod
    def _check_labels(labels, input_ids, logits_to_keep):
        if labels is None:
            return
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64:
            got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"labels must be an int64 tensor of next-token ids (-100 ignored), got {got}")
        if labels.shape != input_ids.shape or labels.device != input_ids.device:
            raise ValueError(f"labels must have input_ids' shape {tuple(input_ids.shape)} on {input_ids.device}, "
                             f"got {tuple(labels.shape)} on {labels.device}")
        if logits_to_keep:
            raise ValueError("labels cannot be combined with logits_to_keep: the loss needs every position "
                             "(compute it from the kept logits instead)")

    def _check_inputs(self, input_ids, state, logits_to_keep):
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be int64 or int32 token ids, got {input_ids.dtype}")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must have shape [batch, time] with time >= 1, got {tuple(input_ids.shape)}")
        if not (torch.compiler.is_compiling() or _capturing(input_ids.device)):
            check_token_ids(input_ids, self.config.vocab_size)
        if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0 (0 = all positions), got {logits_to_keep!r}")
        if state is not None:
            if not isinstance(state, SambaState):
                raise ValueError(f"state must be a SambaState from model.init_state(), got {type(state).__name__}")
            if state.config != self.config:
                raise ValueError("state was made for a different model config; use this model's init_state()")
            if state.batch_size != input_ids.shape[0]:
                raise ValueError(f"state was made for batch size {state.batch_size}, "
                                 f"input_ids has batch size {input_ids.shape[0]}")
        return input_ids.shape


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def check_token_ids(ids: torch.Tensor, vocab_size: int):
    """Token ids in [0, vocab_size). On a CPU, a ValueError now; on a GPU, a device-side assertion, so
    that no call waits for the device (the message shows with the CUDA error at the next sync)."""
    message = f"input_ids must lie in [0, vocab_size={vocab_size})"
    if ids.device.type == "cpu":
        lo, hi = ids.min().item(), ids.max().item()
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{message}, got values in [{lo}, {hi}]")
    else:
        torch._assert_async(((ids >= 0) & (ids < vocab_size)).all(), message)
