"""Model configuration: one frozen dataclass, the paper's presets and its baselines.

`layers` is the full tuple of residual sub-layer kinds, in order: "mamba" (Mamba-1 mixer), "swa"
(sliding-window attention), "attn" (full causal attention), "mlp" (SwiGLU), and SambaY's:
"dswa" / "dattn" (differential attention, sliding-window / full; `layers.DifferentialAttention`),
"mamba_mem" (a Mamba layer that also hands its pre-gate scan output on as the memory), "gmu" (a
gated memory unit reading the memory of the latest "mamba_mem" before it) and "dcross" (cross
differential attention over the keys and values of the latest "dattn" before it). The paper counts
sub-layers (Samba-421M has N = 24); the official code counts blocks of (mixer + MLP).

The paper's model is the default everywhere: RMSNorm, attention without biases, RoPE. `norm`,
`attention_bias` and `rope` give the variants that other checkpoints of the family use (SambaY's
LayerNorm with bias, biased attention projections and no positions at all).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

LAYER_KINDS = ("mamba", "swa", "attn", "mlp", "dswa", "dattn", "mamba_mem", "gmu", "dcross")
MAMBA_KINDS = ("mamba", "mamba_mem")
ATTENTION_KINDS = ("swa", "attn", "dswa", "dattn", "dcross")
WINDOWED_KINDS = ("swa", "dswa")
GROWING_KINDS = ("attn", "dattn")  # full attention: a cache that grows with the stream
DIFFERENTIAL_KINDS = ("dswa", "dattn", "dcross")
NORMS = ("rms", "layer")


@dataclass(frozen=True)
class SambaConfig:
    d_model: int = 256
    vocab_size: int = 4096
    layers: tuple[str, ...] = ("mamba", "mlp", "swa", "mlp") * 2
    # attention
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None  # None: d_model // n_heads
    window: int = 128  # query i sees keys i - window + 1 .. i
    rope_base: float = 10000.0
    rope: bool = True  # False: no positional encoding (NoPE)
    attention_bias: bool = False  # biases on the QKV and output projections
    # SwiGLU
    mlp_hidden: int = 768
    # Mamba-1
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None  # None: ceil(d_model / 16)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    # everything else
    norm: str = "rms"  # "rms": RMSNorm (weight); "layer": LayerNorm (weight and bias)
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    name: str = field(default="custom", compare=False)

    def __new__(cls, *args, **kwargs):
        # The dataclass would refuse an unknown keyword with a TypeError that lists nothing.
        check_field_names(cls, kwargs)
        return super().__new__(cls)

    def __post_init__(self):
        # Resolve derived defaults in place (the dataclass is frozen, hence object.__setattr__).
        object.__setattr__(self, "layers", tuple(self.layers))
        if self.head_dim is None and _is_pos_int(self.n_heads) and _is_pos_int(self.d_model):
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if self.dt_rank is None and _is_pos_int(self.d_model):
            object.__setattr__(self, "dt_rank", math.ceil(self.d_model / 16))
        self._validate()

    # ----------------------------------------------------------------- derived values
    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def count(self, kind: str) -> int:
        return sum(k == kind for k in self.layers)

    @property
    def grows(self) -> bool:
        """Whether some layer (full attention) keeps a cache that grows with the stream."""
        return any(k in GROWING_KINDS for k in self.layers)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_preset(cls, name: str, **overrides) -> SambaConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_dict(cls, values: dict) -> SambaConfig:
        return cls(**values)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        return d

    # ----------------------------------------------------------------- validation
    def _validate(self):
        def need(ok: bool, fieldname: str, rule: str):
            if not ok:
                raise ValueError(f"SambaConfig.{fieldname}={getattr(self, fieldname)!r}: {rule}")

        for name in FLOAT_FIELDS:  # before the rules below compare them with numbers
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and not isinstance(value, bool), name, "must be a number")
        need(_is_pos_int(self.d_model), "d_model", "must be a positive integer")
        need(_is_pos_int(self.vocab_size), "vocab_size", "must be a positive integer")
        need(len(self.layers) > 0, "layers", "must name at least one sub-layer")
        bad = [k for k in self.layers if k not in LAYER_KINDS]
        need(not bad, "layers", f"unknown kinds {bad}; each must be one of {LAYER_KINDS}")
        if any(k in ATTENTION_KINDS for k in self.layers):
            need(_is_pos_int(self.n_heads), "n_heads", "must be a positive integer")
            need(_is_pos_int(self.n_kv_heads), "n_kv_heads", "must be a positive integer")
            need(self.n_heads % self.n_kv_heads == 0, "n_kv_heads", f"must divide n_heads={self.n_heads}")
            need(isinstance(self.rope, bool), "rope", "must be a bool")
            need(isinstance(self.attention_bias, bool), "attention_bias", "must be a bool")
            need(_is_pos_int(self.head_dim) and (self.head_dim % 2 == 0 or not self.rope), "head_dim",
                 "must be a positive integer, and even with RoPE (it rotates pairs)")
            need(self.rope_base > 0, "rope_base", "must be positive")
        if any(k in DIFFERENTIAL_KINDS for k in self.layers):  # heads split into two halves
            need(self.n_kv_heads % 2 == 0, "n_kv_heads", "must be even for differential attention (dswa, dattn)")
        if any(k in WINDOWED_KINDS for k in self.layers):
            need(_is_pos_int(self.window) and self.window >= 2, "window", "must be an integer >= 2")
        if "mlp" in self.layers:
            need(_is_pos_int(self.mlp_hidden), "mlp_hidden", "must be a positive integer")
        for reader, source, what in (("gmu", "mamba_mem", "the memory"), ("dcross", "dattn", "the keys and values")):
            if reader in self.layers:
                first = self.layers.index(reader)
                need(source in self.layers[:first], "layers",
                     f"a '{reader}' (sub-layer {first}) reads {what} of a '{source}' before it, and none comes first")
        if "dcross" in self.layers:
            need(self.rope is False, "rope", "must be False with 'dcross' layers (SambaY has no positions)")
        if any(k in MAMBA_KINDS for k in self.layers) or "gmu" in self.layers:
            need(_is_pos_int(self.d_state), "d_state", "must be a positive integer")
            need(_is_pos_int(self.d_conv) and self.d_conv >= 2, "d_conv", "must be an integer >= 2")
            need(_is_pos_int(self.expand), "expand", "must be a positive integer")
            need(_is_pos_int(self.dt_rank), "dt_rank", "must be a positive integer (or None for auto)")
            need(0 < self.dt_min <= self.dt_max, "dt_min", f"must satisfy 0 < dt_min <= dt_max={self.dt_max}")
            need(self.dt_init_floor > 0, "dt_init_floor", "must be positive")
        need(self.norm in NORMS, "norm", f"must be one of {NORMS}")
        need(self.norm_eps > 0, "norm_eps", "must be positive")
        need(self.init_std > 0, "init_std", "must be positive")
        need(isinstance(self.tie_embeddings, bool), "tie_embeddings", "must be a bool")


FLOAT_FIELDS = ("rope_base", "dt_min", "dt_max", "dt_init_floor", "norm_eps", "init_std")


def check_field_names(cls, names) -> None:
    """Refuse names that are not fields of the dataclass `cls`, listing the valid ones."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; valid fields: {', '.join(known)}")


def _is_pos_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


SAMBA = ("mamba", "mlp", "swa", "mlp")


def _preset(name: str, pattern: tuple[str, ...], repeats: int, **kw) -> SambaConfig:
    return SambaConfig(name=name, layers=pattern * repeats, **kw)


def sambay_layers(blocks: int) -> tuple[str, ...]:
    """SambaY's schedule of `blocks` blocks (each a mixer and an MLP): the first half alternates Mamba and
    windowed differential attention; then a memory Mamba and the full differential layer; the rest
    alternates gated memory units and cross layers (../shared/SAMBAY.md, Phi-4-mini-flash's 32)."""
    half = blocks // 2
    mixers = [("mamba", "dswa")[i % 2] for i in range(half)] + ["mamba_mem", "dattn"]
    mixers += [("gmu", "dcross")[i % 2] for i in range(blocks - half - 2)]
    return tuple(k for m in mixers for k in (m, "mlp"))


_SAMBAY = dict(norm="layer", attention_bias=True, rope=False)


# Paper Tables 10-12. Baselines share the size of the model they are compared with.
_S421 = dict(d_model=1536, n_heads=12, n_kv_heads=12, head_dim=128, mlp_hidden=4096, vocab_size=32000,
             window=2048)
_S17 = dict(d_model=2048, n_heads=32, n_kv_heads=4, head_dim=64, mlp_hidden=8192, vocab_size=50304,
            window=2048)
PRESETS: dict[str, SambaConfig] = {
    p.name: p
    for p in [
        _preset("tiny", SAMBA, 2, d_model=256, n_heads=4, n_kv_heads=2, head_dim=64, mlp_hidden=768,
                vocab_size=4096, window=128),
        _preset("samba-421m", SAMBA, 6, **_S421),
        _preset("samba-1.3b", SAMBA, 9, d_model=2304, n_heads=18, n_kv_heads=18, head_dim=128,
                mlp_hidden=6144, vocab_size=32000, window=2048),
        _preset("samba-1.7b", SAMBA, 12, **_S17),
        _preset("samba-3.8b", SAMBA, 16, d_model=2816, n_heads=11, n_kv_heads=1, head_dim=256,
                mlp_hidden=9984, vocab_size=32064, window=2048),
        _preset("llama2-438m", ("attn", "mlp"), 12, tie_embeddings=False, **_S421),
        _preset("llama2-swa-438m", ("swa", "mlp"), 12, tie_embeddings=False, **_S421),
        _preset("mamba-432m", ("mamba",), 60, d_model=1024, vocab_size=32000),
        _preset("llama3-1.6b", ("attn", "mlp"), 24, **_S17),
        _preset("mistral-1.6b", ("swa", "mlp"), 24, **_S17),
        _preset("mamba-1.8b", ("mamba",), 64, d_model=2048, vocab_size=50304),
        _preset("mamba-mlp-1.9b", ("mamba", "mlp"), 24, **_S17),
        _preset("mamba-swa-mlp-1.6b", ("mamba", "swa", "mlp"), 18, **_S17),
        # SambaY: Phi-4-mini-flash-reasoning's released shapes, and a small one for tests.
        SambaConfig(name="phi4-mini-flash", layers=sambay_layers(32), d_model=2560, n_heads=40, n_kv_heads=20,
                    head_dim=64, window=512, mlp_hidden=10240, vocab_size=200064, **_SAMBAY),
        SambaConfig(name="sambay-tiny", layers=sambay_layers(8), d_model=256, n_heads=4, n_kv_heads=2, head_dim=64,
                    window=128, mlp_hidden=768, vocab_size=4096, **_SAMBAY),
    ]
}
