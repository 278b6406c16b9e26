"""Microsoft's Phi-4-mini-flash-reasoning (`model_type` "phi4flash", SambaY) from its Hugging Face
directory: config.json, the safetensors shards (with model.safetensors.index.json, or one
model.safetensors), and tokenizer.json. No transformers and no remote code: the config maps onto
a SambaConfig (the `phi4-mini-flash` preset's kinds, ../shared/SAMBAY.md) and every tensor onto
ours by name. A tensor the map does not know, one it expects but does not find, and a shape that
differs are each an error that names the tensor.

Block N of theirs is our sub-layers 2N (the mixer) and 2N + 1 (the MLP):

    model.embed_tokens.weight                     embedding.weight (tied; lm_head.weight, if saved, must equal it)
    model.final_layernorm.{weight,bias}           norm_f.{weight,bias}
    model.layers.N.input_layernorm.*              layers.2N.norm.*
    model.layers.N.post_attention_layernorm.*     layers.2N+1.norm.*
    model.layers.N.mlp.fc1.weight / fc2.weight    layers.2N+1.mixer.gate_up_proj.weight / down_proj.weight
    model.layers.N.attn.<Mamba's or the GMU's names>   layers.2N.mixer.<the same names>
    model.layers.N.attn.Wqkv.{weight,bias}        layers.2N.mixer.qkv_proj.* (q_proj.* in a cross layer)
    model.layers.N.attn.out_proj.{weight,bias}    layers.2N.mixer.out_proj.*
    model.layers.N.attn.inner_cross_attn.lambda_{q1,k1,q2,k2}   layers.2N.mixer.lambda_*
    model.layers.N.attn.inner_cross_attn.subln.weight           layers.2N.mixer.subln_weight
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from ..config import SambaConfig, sambay_layers
from ..model import SambaLM
from ..weights import read_safetensors

MODEL_TYPE = "phi4flash"


def is_phi4flash(path: str | os.PathLike) -> bool:
    """Whether `path/config.json` says model_type "phi4flash" (an unreadable one says no: its reader
    reports it)."""
    config = Path(path) / "config.json"
    try:
        values = json.loads(config.read_text()) if config.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(values, dict) and values.get("model_type") == MODEL_TYPE


def phi4flash_config(values: dict) -> SambaConfig:
    """Their config.json as a SambaConfig; a ValueError names a field we cannot express."""
    if values.get("model_type") != MODEL_TYPE:
        raise ValueError(f"model_type is {values.get('model_type')!r}, not {MODEL_TYPE!r}")
    rules = [("mb_per_layer", 2, "one Mamba-type layer every 2"), ("hidden_act", "silu", "SwiGLU's SiLU"),
             ("mamba_conv_bias", True, "the conv has a bias"), ("mamba_proj_bias", False, "no projection biases"),
             ("mlp_bias", False, "an MLP without biases"), ("lm_head_bias", False, "an LM head without bias")]
    for name, ours, why in rules:
        if values.get(name, ours) != ours:
            raise ValueError(f"cannot convert a {MODEL_TYPE} model with {name}={values[name]!r}: samba-lm has {why}")
    blocks, d, heads = values["num_hidden_layers"], values["hidden_size"], values["num_attention_heads"]
    if blocks % 4:
        raise ValueError(f"num_hidden_layers={blocks}: SambaY's schedule needs a multiple of 4")
    window = values["sliding_window"]
    if isinstance(window, list):  # the config class expands it per layer (None where there is none)
        window = next((w for w in window if w is not None), None)
    dt_rank = values.get("mamba_dt_rank", "auto")
    return SambaConfig(
        name=values.get("_name_or_path") or MODEL_TYPE, layers=sambay_layers(blocks), d_model=d, n_heads=heads,
        n_kv_heads=values.get("num_key_value_heads") or heads, head_dim=d // heads, window=window,
        mlp_hidden=values["intermediate_size"], vocab_size=values["vocab_size"], norm="layer", attention_bias=True,
        rope=False, norm_eps=values.get("layer_norm_eps", 1e-5), tie_embeddings=values.get("tie_word_embeddings", True),
        d_state=values.get("mamba_d_state", 16), d_conv=values.get("mamba_d_conv", 4),
        expand=values.get("mamba_expand", 2), dt_rank=math.ceil(d / 16) if dt_rank == "auto" else dt_rank)


def our_name(name: str, cfg: SambaConfig) -> str | None:
    """Our name for one of their tensors (None: lm_head.weight of a tied model); KeyError if unknown."""
    fixed = {"model.embed_tokens.weight": "embedding.weight", "model.final_layernorm.weight": "norm_f.weight",
             "model.final_layernorm.bias": "norm_f.bias"}
    if name in fixed:
        return fixed[name]
    if name == "lm_head.weight":
        return None if cfg.tie_embeddings else "lm_head.weight"
    parts = name.split(".")
    if parts[:2] != ["model", "layers"] or len(parts) < 5 or not parts[2].isdigit():
        raise KeyError(name)
    block, rest = int(parts[2]), parts[3:]
    mixer, mlp = 2 * block, 2 * block + 1
    if mixer >= cfg.n_layers:
        raise KeyError(name)
    kind = cfg.layers[mixer]
    if rest[0] in ("input_layernorm", "post_attention_layernorm") and len(rest) == 2:
        return f"layers.{mixer if rest[0] == 'input_layernorm' else mlp}.norm.{rest[1]}"
    if rest[0] == "mlp" and len(rest) == 3:
        return f"layers.{mlp}.mixer.{ {'fc1': 'gate_up_proj', 'fc2': 'down_proj'}[rest[1]] }.{rest[2]}"
    if rest[0] != "attn":
        raise KeyError(name)
    rest = rest[1:]
    if rest[0] == "inner_cross_attn":
        tail = "subln_weight" if rest[1:] == ["subln", "weight"] else rest[1]
        return f"layers.{mixer}.mixer.{tail}"
    if rest[0] == "Wqkv":
        return f"layers.{mixer}.mixer.{'q_proj' if kind == 'dcross' else 'qkv_proj'}.{rest[1]}"
    return f"layers.{mixer}.mixer.{'.'.join(rest)}"


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's safetensors shards (per its index, or model.safetensors)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path} has neither model.safetensors.index.json nor model.safetensors")
    tensors = {}
    for file in files:
        tensors.update(read_safetensors(path / file))
    return tensors


def from_phi4flash(path: str | os.PathLike, device=None, dtype: torch.dtype | None = None) -> SambaLM:
    """The model of a phi4flash directory, every tensor accounted for (see module docstring)."""
    path = Path(path)
    cfg = phi4flash_config(json.loads((path / "config.json").read_text()))
    with torch.device("meta"):
        model = SambaLM(cfg)
    expected = {n: p.shape for n, p in model.state_dict().items()}
    ours, tied_head = {}, None
    for name, tensor in read_tensors(path).items():
        try:
            target = our_name(name, cfg)
        except KeyError:
            raise ValueError(f"{path}: tensor {name} {tuple(tensor.shape)} is not part of a {MODEL_TYPE} model "
                             f"with this config") from None
        if target is None:
            tied_head = tensor
            continue
        if target not in expected:
            raise ValueError(f"{path}: tensor {name} maps to {target}, which this config does not have")
        if tuple(tensor.shape) != tuple(expected[target]):
            raise ValueError(f"{path}: tensor {name} has shape {tuple(tensor.shape)}, expected "
                             f"{tuple(expected[target])} (our {target})")
        ours[target] = tensor
    missing = sorted(set(expected) - set(ours))
    if missing:
        raise ValueError(f"{path}: no tensor for our {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1
                                                                      else ""))
    if tied_head is not None and not torch.equal(tied_head, ours["embedding.weight"]):
        raise ValueError(f"{path}: lm_head.weight differs from model.embed_tokens.weight in a tied model")
    if dtype is not None:
        ours = {n: t.to(dtype) if t.is_floating_point() else t for n, t in ours.items()}
    model.load_state_dict({n: t.to(device or "cpu") for n, t in ours.items()}, assign=True)
    return model
