"""Converters to and from the checkpoints of the official Samba code (microsoft/Samba, built on lit_gpt).

What their pretrain.py writes: `fabric.save(path, state)` with state = {"model", "optimizer", "hparams",
"iter_num", "step_count"} (pretrain.py:165, 290), under FSDP with full state dicts (pretrain.py:116).
Fabric saves the FSDP module itself, so the keys carry no wrapper prefix; "hparams" holds pretrain.py's
module-level scalars, among them `model_name` (pretrain.py:33, 105). Their eval.py:22-23 loads
`checkpoint["model"]` strictly into `GPT(Config.from_name(name))`, which is what `to_official` writes for.

Their module tree (lit_gpt/model.py), for block i of `config.n_layer`, against our flat `layers`:

    transformer.wte.weight                       embedding.weight
    transformer.h.i.norm_1.weight                layers.j.norm.weight       (mixer sub-layer)
    transformer.h.i.attn.{in_proj,...}           layers.j.mixer.*           Mamba: same names (model.py:333)
    transformer.h.i.attn.attn.weight             layers.j.mixer.qkv_proj    attention: regrouped, see below
    transformer.h.i.attn.proj.weight             layers.j.mixer.out_proj
    transformer.h.i.norm_2.weight                layers.j+1.norm.weight     (MLP sub-layer)
    transformer.h.i.mlp.swiglu.w1 / w2           layers.j+1.mixer.gate_up_proj  rows [gate; up]
    transformer.h.i.mlp.swiglu.w3                layers.j+1.mixer.down_proj
    transformer.ln_f.weight                      norm_f.weight
    lm_head.weight                               lm_head.weight (untied) / embedding (tied)

Block i's mixer is Mamba when i % mb_per_layer == 0 (or i not in attn_layer_pos), else attention,
sliding-window when i % full_per_layer < full_per_layer - 1 and local_window > -1 (model.py:319-339,
452, 585-589). Mamba_SWA_MLP blocks hold norm_m/mb, norm_attn/attn, norm_2/mlp (model.py:310-314);
pure Mamba models hold MBlocks: norm/mixer (model.py:83-97, 409-410). The weights are tied when
config.mamba or config.mamba_init (model.py:118-120); a tied model's state dict still lists
lm_head.weight (the same tensor as wte), and their strict load needs it.
"""

from __future__ import annotations

import ast
import math
import os
from pathlib import Path

import torch

from ..checkpoint import save_pretrained
from ..config import ATTENTION_KINDS, PRESETS, SambaConfig
from ..model import SambaLM

# lit_gpt's Config defaults for the fields that shape the weights (lit_gpt/config.py:19-74).
OFFICIAL_DEFAULTS = dict(
    name="lit-GPT", vocab_size=50254, padding_multiple=512, padded_vocab_size=None, n_layer=16, n_head=32,
    n_embd=4096, rotary_percentage=0.25, parallel_residual=True, bias=True, local_window=-1, mlp=True,
    full_per_layer=1000000, mb_per_layer=-1, ret_per_layer=-1, gla_per_layer=-1, nope=False, mamba=False,
    sc_attn=False, rms_norm=True, mamba_init=False, attn_layer_pos=None, use_mega=False, abl_mamba=False,
    mamba_swa_mlp=False, n_query_groups=None, shared_attention_norm=False, _norm_class="LayerNorm",
    norm_eps=1e-5, _mlp_class="GptNeoxMLP", intermediate_size=None, condense_ratio=1)
# Their Config fields that leave the weights and the function alone (training length, fused kernels).
IGNORED_FIELDS = ("org", "block_size", "residual_in_fp32", "fused_add_norm")

# Every config of lit_gpt/config.py that samba_lm can represent, with the fields it sets (block_size
# left out). Not here, as samba_lm has no such layer: S6Mega_* (use_mega), *_abl_mamba (an MLP of
# hidden 2d in place of Mamba), *_nope (no RoPE), *_gla, *_ret, LLaMA_438M_SWA_paral (parallel_residual).
_LIT = dict(vocab_size=32000, padding_multiple=64, rotary_percentage=1.0, parallel_residual=False, bias=False,
            _norm_class="FusedRMSNorm", norm_eps=1e-5, _mlp_class="LLaMAMLP")  # config.py:124-958, every entry
_D438 = dict(_LIT, n_layer=12, n_head=12, n_embd=1536, intermediate_size=4096)
_D13 = dict(_LIT, n_layer=18, n_head=18, n_embd=2304, intermediate_size=6144)
_MAMBA = dict(mamba=True, padding_multiple=64, vocab_size=32000, norm_eps=1e-5, rms_norm=True)  # config.py:963-1001
OFFICIAL_CONFIGS: dict[str, dict] = {
    # the canonical five first: to_official names a model after the first entry that builds it
    "Samba_421M": dict(_D438, mb_per_layer=2, local_window=2048, mamba_init=True),  # config.py:404
    "Samba_1.3B": dict(_D13, mb_per_layer=2, local_window=2048, mamba_init=True),  # config.py:726
    "LLaMA_438M": dict(_D438),  # config.py:125
    "LLaMA_438M_SWA": dict(_D438, local_window=2048),  # config.py:162
    "Mamba_430M": dict(_MAMBA, n_layer=60, n_embd=1024),  # config.py:977 (the paper's Mamba-432M)
    "LLaMA_438M_SWA_full": dict(_D438, local_window=2048, full_per_layer=2),  # config.py:180
    "LLaMA_438M_SWA_mqa": dict(_D438, intermediate_size=4608, local_window=2048, n_query_groups=1),  # :199
    "LLaMA_438M_SWA_mqa6": dict(_D438, n_head=6, intermediate_size=4608, local_window=2048, n_query_groups=1),
    "LLaMA_438M_SWA_gqa2": dict(_D438, intermediate_size=4608, local_window=2048, n_query_groups=2),  # :237
    "LLaMA_438M_SWA_gqa4": dict(_D438, intermediate_size=4608, local_window=2048, n_query_groups=4),  # :256
    "LLaMA_438M2k": dict(_D438),  # config.py:275
    "LLaMA_438M8k_SWA": dict(_D438, local_window=2048),  # config.py:292
    "LLaMA_438M16k_SWA": dict(_D438, local_window=2048),  # config.py:311
    "LLaMA_438M32k_SWA": dict(_D438, local_window=2048),  # config.py:329
    "LLaMA_438M_SWA_8k4k": dict(_D438, n_layer=14, local_window=4096, mamba_init=True),  # config.py:366
    "LLaMA_438M_SWA_8k2k": dict(_D438, n_layer=14, local_window=2048, mamba_init=True),  # config.py:385
    "Mamba_SWA_MLP_400M": dict(_D438, n_layer=8, mamba_swa_mlp=True, local_window=2048, mamba_init=True),  # :445
    "LLaMA_449M_full_mamba_0": dict(_D438, mamba_init=True, attn_layer_pos="[0,]"),  # config.py:486
    "LLaMA_449M_full_mamba_11": dict(_D438, mamba_init=True, attn_layer_pos="[11,]"),  # config.py:505
    "LLaMA_449M_full_mamba_5": dict(_D438, mamba_init=True, attn_layer_pos="[5,]"),  # config.py:524
    "LLaMA_443M_full_mamba_1,5": dict(_D438, mamba_init=True, attn_layer_pos="[1,5]"),  # config.py:543
    "Samba_421M_mqa": dict(_D438, mb_per_layer=2, intermediate_size=4608, local_window=2048, mamba_init=True,
                           n_query_groups=1),  # config.py:562
    "Samba_421M_gqa4": dict(_D438, mb_per_layer=2, intermediate_size=4608, local_window=2048, mamba_init=True,
                            n_query_groups=4),  # config.py:583
    "Samba_421M_gqa2": dict(_D438, mb_per_layer=2, intermediate_size=4608, local_window=2048, mamba_init=True,
                            n_query_groups=2),  # config.py:604
    "Samba_421M_mqa6": dict(_D438, mb_per_layer=2, n_head=6, intermediate_size=4608, local_window=2048,
                            mamba_init=True, n_query_groups=1),  # config.py:625
    "Samba_421M_1k_window": dict(_D438, mb_per_layer=2, local_window=1024, mamba_init=True),  # config.py:685
    "Samba_421M_512_window": dict(_D438, mb_per_layer=2, local_window=512, mamba_init=True),  # config.py:705
    "Mamba_SWA_MLP_1.3B": dict(_D13, n_layer=12, mamba_swa_mlp=True, local_window=2048, mamba_init=True),  # :788
    "LLaMA_1.3B_SWA": dict(_D13, n_layer=20, local_window=2048, mamba_init=True),  # config.py:868
    "LLaMA_1.3B_SWA_8k4k": dict(_D13, n_layer=20, local_window=4096, mamba_init=True),  # config.py:887
    "LLaMA_1.3B_SWA_8k2k": dict(_D13, n_layer=20, local_window=2048, mamba_init=True),  # config.py:906
    "LLaMA_1.3B": dict(_D13, n_layer=20, mamba_init=True),  # config.py:925
    "LLaMA_2.9B": dict(_LIT, n_layer=24, n_head=24, n_embd=3072, intermediate_size=8192),  # config.py:943
    "Mamba_370M": dict(_MAMBA, n_layer=48, n_embd=1024),  # config.py:964
    "Mamba_1.3B": dict(_MAMBA, n_layer=48, n_embd=2048),  # config.py:990
}

MAMBA_PARAMS = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
                "dt_proj.bias", "A_log", "D", "out_proj.weight")  # mamba_simple.py:57-110, the same as ours
# Wrapper segments that torch.compile, Fabric, DDP/FSDP or activation checkpointing put into keys when a
# wrapped module's state_dict() is saved directly (fabric.save itself strips them).
WRAPPER_SEGMENTS = ("_orig_mod.", "_forward_module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


# ------------------------------------------------------------------------------------- configs
def official_fields(config: str | dict) -> dict:
    """Their Config's fields, resolved as Config.__post_init__ does (config.py:76-91), from a name in
    OFFICIAL_CONFIGS or a dict of their fields (for a config not in their file)."""
    if isinstance(config, str):
        if config not in OFFICIAL_CONFIGS:
            raise ValueError(f"unknown official config {config!r}; convertible: {', '.join(OFFICIAL_CONFIGS)}")
        config = dict(OFFICIAL_CONFIGS[config], name=config)
    unknown = sorted(set(config) - set(OFFICIAL_DEFAULTS) - set(IGNORED_FIELDS))
    if unknown:
        raise ValueError(f"unknown lit_gpt Config fields {unknown}; known: {', '.join(OFFICIAL_DEFAULTS)}")
    f = {**OFFICIAL_DEFAULTS, **{k: v for k, v in config.items() if k not in IGNORED_FIELDS}}
    if f["padded_vocab_size"] is None:
        k = f["padding_multiple"]
        f["padded_vocab_size"] = -(-f["vocab_size"] // k) * k  # lit_gpt/utils.py:26 find_multiple
    if f["n_query_groups"] is None:
        f["n_query_groups"] = f["n_head"]
    if f["intermediate_size"] is None:
        f["intermediate_size"] = 4 * f["n_embd"]
    return f


def official_blocks(f: dict) -> list[tuple[str, ...]]:
    """Our sub-layer kinds for each of their blocks, in order; refuses what samba_lm cannot represent."""
    def refuse(ok, why):
        if not ok:
            raise ValueError(f"official config {f['name']!r}: {why}; samba_lm has no equivalent")

    if f["mamba"]:  # MBlocks: RMSNorm (rms_norm) or LayerNorm with a bias, then Mamba (model.py:56-60)
        refuse(f["rms_norm"], "rms_norm=False (LayerNorm)")
        return [("mamba",)] * f["n_layer"]
    refuse(not f["use_mega"], "use_mega (S6 gated attention)")
    refuse(not f["nope"], "nope (attention without RoPE)")
    refuse(not f["sc_attn"], "sc_attn (short convolutions on q, k, v)")
    refuse(not f["bias"], "bias=True (linear biases)")
    refuse(not f["parallel_residual"] and not f["shared_attention_norm"], "parallel_residual/shared_attention_norm")
    refuse(f["rotary_percentage"] == 1.0, f"rotary_percentage={f['rotary_percentage']} (partial RoPE)")
    refuse(f["condense_ratio"] == 1, f"condense_ratio={f['condense_ratio']} (interpolated positions)")
    refuse(f["_norm_class"] in ("RMSNorm", "FusedRMSNorm"), f"_norm_class={f['_norm_class']!r}")
    refuse(f["_mlp_class"] == "LLaMAMLP" or not f["mlp"], f"_mlp_class={f['_mlp_class']!r} (not SwiGLU)")
    fpl, mb, window = f["full_per_layer"], f["mb_per_layer"], f["local_window"]
    attn_pos = ast.literal_eval(f["attn_layer_pos"]) if f["attn_layer_pos"] is not None else None
    mlp = ("mlp",) if f["mlp"] else ()
    blocks = []
    for i in range(f["n_layer"]):
        attention = "swa" if i % fpl < fpl - 1 and window > -1 else "attn"  # model.py:452, 585-589
        if f["mamba_swa_mlp"]:
            blocks.append(("mamba", attention) + mlp)
            continue
        if attn_pos is not None:  # model.py:320-324: attn_layer_pos wins over the *_per_layer rules
            mamba = i not in attn_pos
        else:
            mamba = mb > 0 and i % mb == 0
            refuse(mamba or f["ret_per_layer"] <= 0 or i % f["ret_per_layer"], "ret_per_layer (RetNet)")
            refuse(mamba or f["gla_per_layer"] <= 0 or i % f["gla_per_layer"], "gla_per_layer (GLA)")
        refuse(not (mamba and f["abl_mamba"]), "abl_mamba (an MLP in place of Mamba)")
        blocks.append(("mamba" if mamba else attention,) + mlp)
    return blocks


def samba_config(config: str | dict) -> SambaConfig:
    """Our config for one of theirs (a name or a dict of fields); a preset when one builds the same model."""
    f = official_fields(config)
    layers = tuple(k for block in official_blocks(f) for k in block)
    kw = dict(d_model=f["n_embd"], vocab_size=f["padded_vocab_size"], layers=layers, norm_eps=f["norm_eps"],
              tie_embeddings=bool(f["mamba"] or f["mamba_init"]))
    if any(k in ATTENTION_KINDS for k in layers):
        # RoPE base: build_rope_cache's default, never overridden (model.py:265-272, 611)
        kw.update(n_heads=f["n_head"], n_kv_heads=f["n_query_groups"], head_dim=f["n_embd"] // f["n_head"],
                  rope_base=10000.0)
    if "swa" in layers:
        kw.update(window=f["local_window"])
    if "mlp" in layers:
        kw.update(mlp_hidden=f["intermediate_size"])
    if "mamba" in layers:  # Mamba(d_model) with its defaults (mamba_simple.py:30-33, model.py:56, 333)
        kw.update(d_state=16, d_conv=4, expand=2, dt_rank=math.ceil(f["n_embd"] / 16))
    cfg = SambaConfig(name=f["name"], **kw)
    return next((p for p in PRESETS.values() if network(p) == network(cfg)), cfg)


def network(cfg: SambaConfig) -> dict:
    """The fields that decide what a config computes (initialisation and unused fields left out)."""
    keys = ["d_model", "vocab_size", "layers", "norm", "norm_eps", "tie_embeddings"]
    if any(k in ATTENTION_KINDS for k in cfg.layers):
        keys += ["n_heads", "n_kv_heads", "head_dim", "rope", "rope_base", "attention_bias"]
    keys += ["window"] * ("swa" in cfg.layers) + ["mlp_hidden"] * ("mlp" in cfg.layers)
    keys += ["d_state", "d_conv", "expand", "dt_rank"] * ("mamba" in cfg.layers)
    return {k: getattr(cfg, k) for k in keys}


def official_config(cfg: SambaConfig) -> dict:
    """Their Config fields for our config: a named entry of OFFICIAL_CONFIGS when one builds the same
    model, else fields to pass to `Config(**fields)`. Refuses what their code cannot build."""
    for name in OFFICIAL_CONFIGS:
        if network(samba_config(name)) == network(cfg):
            return official_fields(name)
    f = dict(name=cfg.name, n_embd=cfg.d_model, vocab_size=cfg.vocab_size, padding_multiple=1,
             norm_eps=cfg.norm_eps, n_head=1, n_query_groups=1)
    kinds = cfg.layers
    if all(k == "mamba" for k in kinds):
        f.update(mamba=True, n_layer=len(kinds), rms_norm=True)
    else:
        f.update(_LIT, vocab_size=cfg.vocab_size, padding_multiple=1, norm_eps=cfg.norm_eps,
                 mamba_init=cfg.tie_embeddings, intermediate_size=cfg.mlp_hidden)
        f.update(_block_rules(cfg))
        if any(k in ATTENTION_KINDS for k in kinds):
            f.update(n_head=cfg.n_heads, n_query_groups=cfg.n_kv_heads)
    theirs, ours = network(samba_config(f)), network(cfg)
    mismatch = {k: (v, ours.get(k)) for k, v in theirs.items() if ours.get(k) != v}
    if mismatch:  # a rule their code hard-codes, e.g. RoPE base 10000 or Mamba's d_state 16
        raise ValueError(f"the official code cannot build this model: (theirs, ours) differ in {mismatch}")
    return official_fields(f)


def _block_rules(cfg: SambaConfig) -> dict:
    """mlp / mamba_swa_mlp / mb_per_layer / attn_layer_pos / local_window / full_per_layer for our layers."""
    kinds, n = cfg.layers, len(cfg.layers)
    if n % 3 == 0 and all(kinds[i] == "mamba" and kinds[i + 1] in ATTENTION_KINDS and kinds[i + 2] == "mlp"
                          for i in range(0, n, 3)):
        rules, mixers = dict(mamba_swa_mlp=True, n_layer=n // 3), [kinds[i + 1] for i in range(0, n, 3)]
    elif n % 2 == 0 and all(kinds[i] != "mlp" and kinds[i + 1] == "mlp" for i in range(0, n, 2)):
        rules, mixers = dict(n_layer=n // 2), list(kinds[::2])
    elif "mlp" not in kinds:
        rules, mixers = dict(mlp=False, n_layer=n), list(kinds)
    else:
        raise ValueError(f"the official code cannot build layers {kinds}: its blocks are [mixer, mlp], "
                         "[mamba, attention, mlp], [mixer] or pure Mamba")
    if not rules.get("mamba_swa_mlp"):
        mamba = [i for i, k in enumerate(mixers) if k == "mamba"]
        period = next((p for p in range(1, len(mixers) + 1)
                       if mamba == [i for i in range(len(mixers)) if i % p == 0]), None)
        if period:
            rules["mb_per_layer"] = period
        elif mamba:
            rules["attn_layer_pos"] = str([i for i, k in enumerate(mixers) if k != "mamba"])
    attention = {i: k for i, k in enumerate(mixers) if k in ATTENTION_KINDS}
    if "swa" in attention.values():
        rules["local_window"] = cfg.window
        if "attn" in attention.values():  # full attention where i % full_per_layer == full_per_layer - 1
            rules["full_per_layer"] = next((p for p in range(2, len(mixers) + 1) if all(
                (k == "swa") == (i % p < p - 1) for i, k in attention.items())), None)
            if rules["full_per_layer"] is None:
                raise ValueError(f"the official code cannot place full and sliding-window attention as in {kinds}")
    return rules


# ------------------------------------------------------------------------------------- weights
def _slots(f: dict):
    """(kind, their norm key, their mixer prefix) for each of our sub-layers, in order."""
    if f["mamba"]:
        names = [("norm", "mixer")]
    elif f["mamba_swa_mlp"]:
        names = [("norm_m", "mb"), ("norm_attn", "attn"), ("norm_2", "mlp")]
    else:
        names = [("norm_1", "attn"), ("norm_2", "mlp")]
    for i, kinds in enumerate(official_blocks(f)):
        for kind, (norm, mixer) in zip(kinds, names):
            yield kind, f"transformer.h.{i}.{norm}.weight", f"transformer.h.{i}.{mixer}."


def _qkv_from_official(w, n_heads, n_groups):
    """lit_gpt packs the QKV rows per query group: its q heads, its k head, its v head (model.py:508-519);
    ours are all q heads, then all k heads, then all v heads. Head h uses group h // (n_heads / n_groups)
    in both."""
    per = n_heads // n_groups
    q, k, v = w.unflatten(0, (n_groups, per + 2, -1)).split([per, 1, 1], dim=1)
    return torch.cat([q.flatten(0, 2), k.flatten(0, 2), v.flatten(0, 2)])


def _qkv_to_official(w, n_heads, n_groups):
    head_dim = w.shape[0] // (n_heads + 2 * n_groups)
    q, k, v = w.split([n_heads * head_dim, n_groups * head_dim, n_groups * head_dim])
    groups = [t.unflatten(0, (n_groups, -1, head_dim)) for t in (q, k, v)]
    return torch.cat(groups, dim=1).flatten(0, 2)


def official_state_dict(state: dict, f: dict) -> dict:
    """Our state dict -> theirs for official fields `f` (see official_fields)."""
    wte = state["embedding.weight"]
    out = {"transformer.wte.weight": wte}
    for j, (kind, norm, mixer) in enumerate(_slots(f)):
        ours = f"layers.{j}.mixer."
        out[norm] = state[f"layers.{j}.norm.weight"]
        if kind == "mamba":
            out.update({mixer + p: state[ours + p] for p in MAMBA_PARAMS})
        elif kind == "mlp":
            # xformers SwiGLU: w3(silu(w1 x) * w2 x) (xformers/ops/swiglu_op.py); ours: gate rows, then up
            gate, up = state[ours + "gate_up_proj.weight"].chunk(2)
            out[mixer + "swiglu.w1.weight"], out[mixer + "swiglu.w2.weight"] = gate, up
            out[mixer + "swiglu.w3.weight"] = state[ours + "down_proj.weight"]
        else:
            out[mixer + "attn.weight"] = _qkv_to_official(state[ours + "qkv_proj.weight"], f["n_head"],
                                                          f["n_query_groups"])
            out[mixer + "proj.weight"] = state[ours + "out_proj.weight"]
    out["transformer.ln_f.weight"] = state["norm_f.weight"]
    out["lm_head.weight"] = state.get("lm_head.weight", wte)  # tied: the same tensor, as GPT.state_dict() has it
    return out


def samba_state_dict(state: dict, f: dict) -> dict:
    """Their state dict -> ours for official fields `f` (the keys must be complete: see from_official)."""
    out = {"embedding.weight": state["transformer.wte.weight"]}
    for j, (kind, norm, mixer) in enumerate(_slots(f)):
        ours = f"layers.{j}.mixer."
        out[f"layers.{j}.norm.weight"] = state[norm]
        if kind == "mamba":
            out.update({ours + p: state[mixer + p] for p in MAMBA_PARAMS})
        elif kind == "mlp":
            out[ours + "gate_up_proj.weight"] = torch.cat([state[mixer + "swiglu.w1.weight"],
                                                           state[mixer + "swiglu.w2.weight"]])
            out[ours + "down_proj.weight"] = state[mixer + "swiglu.w3.weight"]
        else:
            out[ours + "qkv_proj.weight"] = _qkv_from_official(state[mixer + "attn.weight"], f["n_head"],
                                                               f["n_query_groups"])
            out[ours + "out_proj.weight"] = state[mixer + "proj.weight"]
    out["norm_f.weight"] = state["transformer.ln_f.weight"]
    if not (f["mamba"] or f["mamba_init"]):
        out["lm_head.weight"] = state["lm_head.weight"]
    return out


# ------------------------------------------------------------------------------------- files
def read_official(path: str | os.PathLike) -> tuple[dict, dict]:
    """(model state dict, the rest of the file) of a .pth that their pretrain.py wrote, or of a bare
    state dict; wrapper segments in the keys are removed."""
    ckpt = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: expected a dict (a state dict or {{'model': ...}}), got {type(ckpt).__name__}")
    meta = {}
    if isinstance(ckpt.get("model"), dict):
        meta, ckpt = {k: v for k, v in ckpt.items() if k != "model"}, ckpt["model"]
    state = {}
    for key, tensor in ckpt.items():
        for segment in WRAPPER_SEGMENTS:
            key = key.replace(segment, "")
        state[key] = tensor
    return state, meta


def from_official(ckpt_path: str | os.PathLike, config_name: str | dict | None = None,
                  out_dir: str | os.PathLike | None = None) -> SambaLM:
    """Load a checkpoint of the official Samba code as a SambaLM (and save_pretrained it to out_dir).

    config_name: a name of their lit_gpt/config.py (see OFFICIAL_CONFIGS) or a dict of their Config
    fields; by default the file's own "config" (written by to_official) or hparams["model_name"]
    (written by their pretrain.py). Tensors keep their stored dtype (their checkpoints hold fp32)."""
    state, meta = read_official(ckpt_path)
    if config_name is None:
        config_name = meta.get("config") or meta.get("hparams", {}).get("model_name")
        if config_name is None:
            raise ValueError(f"{ckpt_path} does not say which config it was trained with: pass config_name "
                             f"(one of {', '.join(OFFICIAL_CONFIGS)}) or a dict of lit_gpt Config fields")
    f = official_fields(config_name)
    cfg = samba_config(f)
    with torch.device("meta"):
        model = SambaLM(cfg)
    expected = official_state_dict(model.state_dict(), f)
    tied = cfg.tie_embeddings
    if tied and "lm_head.weight" in state:
        wte = state.get("transformer.wte.weight")
        if wte is not None and not torch.equal(state["lm_head.weight"], wte):
            raise ValueError(f"{ckpt_path}: lm_head.weight differs from transformer.wte.weight, but config "
                             f"{f['name']!r} ties them (lit_gpt/model.py:118-120): wrong config?")
        state.pop("lm_head.weight")
    missing = sorted(set(expected) - set(state) - ({"lm_head.weight"} if tied else set()))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        raise ValueError(f"{ckpt_path} does not match official config {f['name']!r}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, wrong shape "
                         f"{[(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in wrong[:5]]}")
    # clone: the tensors would otherwise stay views of the memory-mapped file
    model.load_state_dict({k: t.clone() for k, t in samba_state_dict(state, f).items()}, assign=True)
    if out_dir is not None:
        save_pretrained(model, out_dir)
    return model


def to_official(model: SambaLM, path: str | os.PathLike, config_name: str | dict | None = None) -> Path:
    """Write `model` as their pretrain.py saves a model: {"model": state dict, "hparams": {"model_name"}},
    plus "config": their Config fields (`Config(**config)` rebuilds a config that lit_gpt/config.py does
    not name). Their eval.py loads it; resuming their training needs an optimizer state, which it has not.

    config_name: their config to write for (checked against the model); default: the first of
    OFFICIAL_CONFIGS that builds the same model, else fields derived from model.config."""
    f = official_fields(config_name) if config_name is not None else official_config(model.config)
    theirs, ours = network(samba_config(f)), network(model.config)
    if theirs != ours:
        diff = {k: (theirs[k], ours.get(k)) for k in theirs if theirs[k] != ours.get(k)}
        raise ValueError(f"model does not match official config {f['name']!r}: (theirs, model) {diff}")
    state = {k: t.detach().cpu().contiguous() for k, t in model.state_dict().items()}
    config = {k: v for k, v in f.items() if v != OFFICIAL_DEFAULTS[k] or k == "name"}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": official_state_dict(state, f), "hparams": {"model_name": f["name"]}, "config": config},
               tmp)
    os.replace(tmp, path)
    return path
