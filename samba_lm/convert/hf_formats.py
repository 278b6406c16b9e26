"""The baseline presets to and from transformers' own models: Llama, Mistral and Mamba.

    layers ("attn", "mlp") * n    <->  LlamaForCausalLM
    layers ("swa", "mlp") * n     <->  MistralForCausalLM, sliding_window = window
    layers ("mamba",) * n         <->  MambaForCausalLM

Weights are copied exactly; only names and two fused matrices change:
- A transformer decoder layer is two of our residual sub-layers: attention (its pre-norm is
  `input_layernorm`) and MLP (`post_attention_layernorm`), each computing h + f(norm(h)) as ours do.
- Our `qkv_proj` stacks the query heads, then the key heads, then the value heads, each head's Dh
  rows contiguous: split by rows into q_proj, k_proj, v_proj. Query head h reads key/value head
  h // (H / Hkv) in both (HF's repeat_kv). `gate_up_proj` is the gate rows, then the up rows.
- RoPE needs no permutation: both rotate halves (x_i, x_{i+Dh/2}) by p * theta^(-2i/Dh), with
  the softmax scale Dh^-0.5 and no biases.
- Windows agree: our query i sees keys i - W + 1 .. i; HF's sliding window mask keeps kv > q - W.
- A MambaBlock is norm + mixer, exactly one of our "mamba" sub-layers, with mamba_ssm's names
  (in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj) and shapes on both sides: a rename of the
  prefixes. Ours keeps the residual in float32, HF's `residual_in_fp32=True`, which exports set.

transformers computes some things in float32 whatever the weights' dtype (norms, RoPE angles, the
Mamba scan's A, B and D) and keeps Llama's and Mistral's residual stream in the weights' dtype (ours:
float32), so a bf16 model gives near, not equal, logits in the two libraries.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

try:
    import transformers
except ImportError as e:  # an optional dependency: only conversion needs it
    raise ImportError("samba_lm.convert.hf_formats needs transformers: pip install 'transformers>=5'") from e

from ..checkpoint import load_pretrained, save_pretrained
from ..config import SambaConfig
from ..model import SambaLM

ARCHITECTURES = {  # our sub-layer pattern, repeated n times, for each transformers model_type
    "llama": ("attn", "mlp"),
    "mistral": ("swa", "mlp"),
    "mamba": ("mamba",),
}
TOKENIZER_FILE = "tokenizer.json"


# ---------------------------------------------------------------------------------------------- ours -> HF
def to_hf(model: SambaLM) -> transformers.PreTrainedModel:
    """A LlamaForCausalLM, MistralForCausalLM or MambaForCausalLM computing what `model` computes,
    chosen by its layers, in its dtype and on its device; ValueError for layers that fit none."""
    config = hf_config(model.config)  # first: a layer pattern that fits no architecture fails here
    weight = model.embedding.weight
    with torch.device(weight.device):
        hf = transformers.AutoModelForCausalLM.from_config(config, dtype=weight.dtype)
    # Copies; with tied embeddings both names hold the one tensor on both sides.
    hf.load_state_dict(_hf_tensors(model, config.model_type), strict=True)
    return hf.eval()


def architecture(layers: tuple[str, ...]) -> str:
    """The transformers model_type whose pattern `layers` repeats; ValueError naming them otherwise."""
    for arch, pattern in ARCHITECTURES.items():
        n, rest = divmod(len(layers), len(pattern))
        if not rest and tuple(layers) == pattern * n:
            return arch
    wanted = ", ".join(f"{arch.capitalize()} {pattern} * n" for arch, pattern in ARCHITECTURES.items())
    raise ValueError(f"layers {describe(layers)} match no transformers architecture; convertible are {wanted}")


def describe(layers: tuple[str, ...]) -> str:
    """`layers` as its shortest repeating unit times a count, e.g. ('mamba', 'mlp', 'swa', 'mlp') * 6."""
    layers = tuple(layers)
    for size in range(1, len(layers) + 1):
        n, rest = divmod(len(layers), size)
        if not rest and layers[:size] * n == layers:
            return f"{layers[:size]} * {n}"
    return str(layers)


def hf_config(cfg: SambaConfig) -> transformers.PretrainedConfig:
    """The LlamaConfig, MistralConfig or MambaConfig of `cfg`; ValueError for layers or variants that fit none."""
    arch = architecture(cfg.layers)
    variants = [("norm", "rms")] + [("rope", True), ("attention_bias", False)] * (arch != "mamba")
    for name, theirs in variants:  # these exports have RMSNorm, RoPE and no attention biases
        if getattr(cfg, name) != theirs:
            raise ValueError(f"SambaConfig.{name}={getattr(cfg, name)!r}: transformers' {arch} models have no such "
                             f"variant; only {name}={theirs!r} converts")
    # The model knows no tokenizer: leave the token ids unset rather than claim transformers' defaults.
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, tie_word_embeddings=cfg.tie_embeddings,
                  initializer_range=cfg.init_std, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if arch == "mamba":
        return transformers.MambaConfig(
            **common, num_hidden_layers=cfg.n_layers, state_size=cfg.d_state, conv_kernel=cfg.d_conv,
            expand=cfg.expand, time_step_rank=cfg.dt_rank, layer_norm_epsilon=cfg.norm_eps, use_bias=False,
            use_conv_bias=True, hidden_act="silu", residual_in_fp32=True, time_step_min=cfg.dt_min,
            time_step_max=cfg.dt_max, time_step_floor=cfg.dt_init_floor)
    attention = dict(
        **common, num_hidden_layers=cfg.n_layers // 2, intermediate_size=cfg.mlp_hidden,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        rms_norm_eps=cfg.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_base)},
        hidden_act="silu")
    if arch == "mistral":
        return transformers.MistralConfig(**attention, sliding_window=cfg.window)
    return transformers.LlamaConfig(**attention, attention_bias=False, mlp_bias=False)


def _hf_tensors(model: SambaLM, arch: str) -> dict[str, torch.Tensor]:
    cfg, ours = model.config, model.state_dict()
    head = ours.get("lm_head.weight", ours["embedding.weight"])
    if arch == "mamba":  # the same names under "backbone.", but for the embedding's
        tensors = {"backbone." + name.replace("embedding.", "embeddings.", 1): t for name, t in ours.items()
                   if name != "lm_head.weight"}
        return {**tensors, "lm_head.weight": head}
    tensors = {"model.embed_tokens.weight": ours["embedding.weight"], "model.norm.weight": ours["norm_f.weight"],
               "lm_head.weight": head}
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    for i in range(cfg.n_layers // 2):
        attn, mlp, hf = f"layers.{2 * i}.", f"layers.{2 * i + 1}.", f"model.layers.{i}."
        wq, wk, wv = ours[attn + "mixer.qkv_proj.weight"].split([q, kv, kv])
        gate, up = ours[mlp + "mixer.gate_up_proj.weight"].chunk(2)
        tensors.update({
            hf + "input_layernorm.weight": ours[attn + "norm.weight"],
            hf + "self_attn.q_proj.weight": wq, hf + "self_attn.k_proj.weight": wk,
            hf + "self_attn.v_proj.weight": wv, hf + "self_attn.o_proj.weight": ours[attn + "mixer.out_proj.weight"],
            hf + "post_attention_layernorm.weight": ours[mlp + "norm.weight"],
            hf + "mlp.gate_proj.weight": gate, hf + "mlp.up_proj.weight": up,
            hf + "mlp.down_proj.weight": ours[mlp + "mixer.down_proj.weight"],
        })
    return tensors


# ---------------------------------------------------------------------------------------------- HF -> ours
def from_hf(hf_model: transformers.PreTrainedModel) -> SambaLM:
    """The SambaLM computing what a LlamaForCausalLM, MistralForCausalLM or MambaForCausalLM computes,
    in its dtype and on its device, with copies of its weights; ValueError for anything we cannot express."""
    cfg = samba_config(hf_model.config)
    hf = hf_model.state_dict()
    if "lm_head.weight" not in hf:
        raise ValueError(f"from_hf needs a ...ForCausalLM model (with its LM head), got {type(hf_model).__name__}")
    with torch.device("meta"):
        model = SambaLM(cfg)
    # clone(): the new model owns its memory, whatever happens to the transformers one.
    tensors = {name: t.clone() for name, t in _our_tensors(cfg, hf, hf_model.config.model_type).items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()


def samba_config(c: transformers.PretrainedConfig) -> SambaConfig:
    """The SambaConfig of a Llama, Mistral or Mamba config; fields that model lacks keep their defaults."""
    arch = c.model_type
    if arch not in ARCHITECTURES:
        raise ValueError(f"cannot convert a transformers {arch!r} model; convertible are {', '.join(ARCHITECTURES)}")
    _require(c, "hidden_act", c.hidden_act == "silu", "ours are SiLU (SwiGLU, Mamba)")
    common = dict(d_model=c.hidden_size, vocab_size=c.vocab_size, tie_embeddings=bool(c.tie_word_embeddings),
                  init_std=float(c.initializer_range))
    if arch == "mamba":
        _require(c, "use_bias", not c.use_bias, "our Mamba in_proj and out_proj have no bias")
        return SambaConfig(**common, layers=("mamba",) * c.num_hidden_layers, d_state=c.state_size,
                           d_conv=c.conv_kernel, expand=c.expand, dt_rank=int(c.time_step_rank),
                           norm_eps=float(c.layer_norm_epsilon), dt_min=float(c.time_step_min),
                           dt_max=float(c.time_step_max), dt_init_floor=float(c.time_step_floor))
    rope = c.rope_parameters or {}
    _require(c, "rope_parameters", rope.get("rope_type", "default") == "default"
             and rope.get("partial_rotary_factor", 1.0) == 1.0, "ours is plain RoPE over the whole head")
    _require(c, "attention_bias", not getattr(c, "attention_bias", False), "our projections have no bias")
    _require(c, "mlp_bias", not getattr(c, "mlp_bias", False), "our projections have no bias")
    # A Mistral without a window is a Llama.
    window = getattr(c, "sliding_window", None)
    kind, extra = ("swa", dict(window=window)) if window is not None else ("attn", {})
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return SambaConfig(**common, **extra, layers=(kind, "mlp") * c.num_hidden_layers, n_heads=c.num_attention_heads,
                       n_kv_heads=c.num_key_value_heads or c.num_attention_heads, head_dim=head_dim,
                       mlp_hidden=c.intermediate_size, rope_base=float(rope.get("rope_theta", 10000.0)),
                       norm_eps=float(c.rms_norm_eps))


def _require(c, name: str, ok: bool, why: str):
    if not ok:
        raise ValueError(f"cannot convert a {c.model_type} model with {name}={getattr(c, name)!r}: {why}")


def _our_tensors(cfg: SambaConfig, hf: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    head = {} if cfg.tie_embeddings else {"lm_head.weight": hf["lm_head.weight"]}
    if arch == "mamba":
        tensors = {name.removeprefix("backbone.").replace("embeddings.", "embedding.", 1): t
                   for name, t in hf.items() if name.startswith("backbone.")}
        for i in range(cfg.n_layers):  # use_conv_bias=False is a zero bias in ours
            like = tensors[f"layers.{i}.mixer.D"]
            tensors.setdefault(f"layers.{i}.mixer.conv1d.bias", torch.zeros_like(like))
        return {**tensors, **head}
    tensors = {"embedding.weight": hf["model.embed_tokens.weight"], "norm_f.weight": hf["model.norm.weight"], **head}
    for i in range(cfg.n_layers // 2):
        attn, mlp, p = f"layers.{2 * i}.", f"layers.{2 * i + 1}.", f"model.layers.{i}."
        tensors.update({
            attn + "norm.weight": hf[p + "input_layernorm.weight"],
            attn + "mixer.qkv_proj.weight": torch.cat([hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]),
            attn + "mixer.out_proj.weight": hf[p + "self_attn.o_proj.weight"],
            mlp + "norm.weight": hf[p + "post_attention_layernorm.weight"],
            mlp + "mixer.gate_up_proj.weight": torch.cat([hf[p + f"mlp.{x}_proj.weight"] for x in ("gate", "up")]),
            mlp + "mixer.down_proj.weight": hf[p + "mlp.down_proj.weight"],
        })
    return tensors


# ---------------------------------------------------------------------------------------------- directories
def export_hf(model_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """A samba-lm saved model (save_pretrained's directory) -> a transformers directory at `out_dir`,
    loadable with AutoModelForCausalLM.from_pretrained; a tokenizer.json beside the model comes along."""
    hf = to_hf(load_pretrained(model_dir))
    out_dir = Path(out_dir)
    hf.save_pretrained(out_dir)
    _copy_tokenizer(Path(model_dir), out_dir)
    return out_dir


def import_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """A local transformers Llama, Mistral or Mamba directory -> a samba-lm saved model at `out_dir`
    (load it with samba_lm.load_pretrained); a tokenizer.json beside the weights comes along."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"{hf_dir} is not a directory (transformers' save_pretrained writes one)")
    # Check the architecture before loading any weights; never look anything up on the hub.
    samba_config(transformers.AutoConfig.from_pretrained(hf_dir, local_files_only=True))
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype="auto", local_files_only=True)
    out_dir = save_pretrained(from_hf(hf), out_dir)
    _copy_tokenizer(hf_dir, out_dir)
    return out_dir


def _copy_tokenizer(src: Path, dst: Path):
    if (src / TOKENIZER_FILE).is_file():
        shutil.copyfile(src / TOKENIZER_FILE, dst / TOKENIZER_FILE)
