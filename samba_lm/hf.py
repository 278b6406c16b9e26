"""Hugging Face transformers classes: `import samba_lm.hf`, then the Auto classes know Samba.

    import samba_lm.hf
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path)     # a directory written by save_pretrained below
    ids = model.generate(input_ids, attention_mask=mask, max_new_tokens=32)

What is notable:
- One model definition. `SambaForCausalLM` wraps a `samba_lm.SambaLM` (its attribute `model`, so the
  weights are SambaLM's names under `model.`); `SambaHFConfig` carries SambaConfig's fields and builds
  the SambaConfig. `from_samba_lm(model)` and `to_samba_lm()` SHARE the module: no copy, an edit to one
  is an edit to the other.
- Registration: importing this module registers model_type "samba_lm" with AutoConfig and
  AutoModelForCausalLM, so no trust_remote_code is needed (nor possible: config.json names no code).
- Tied embeddings: a tied SambaLM has no head tensor at all (the head is `embedding.weight`), so the
  state dict holds every tensor once and safetensors saving needs no tying; `tie_word_embeddings`
  mirrors `tie_embeddings` for readers of config.json.
- Generation: `SambaCache` (a transformers `Cache`) holds a `SambaState`, constant in size; generate()
  feeds it only the new tokens, and beam search reorders its rows (`SambaState.select`). The model is
  `_is_stateful`: a recurrent state cannot be cropped, so assisted decoding is refused.
- attention_mask: left padding only. A row's n leading 0s become positions -n..-1, which every layer
  treats as absent (as in samba_lm.generate), so a padded row computes exactly what it would alone.
  Right padding or holes raise a ValueError: a position-carrying state cannot skip tokens midway.
- labels == input_ids, shifted inside as in transformers; the loss runs through SambaLM's `labels=`
  path (`ops.linear_cross_entropy`), which never holds [B, T, vocab]: the output's logits are None then.
- transformers renamed the cache argument and output field from past_key_values to cache during 5.x:
  forward accepts both and answers under the installed version's name.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

try:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, Cache, GenerationMixin, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as e:  # the rest of samba_lm does not need transformers
    raise ImportError("samba_lm.hf needs transformers >= 5: pip install 'samba-lm[hf]'") from e
if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(f"samba_lm.hf needs transformers >= 5 (its Cache API), found {transformers.__version__}")

from .config import SambaConfig
from .model import SambaLM
from .state import SambaState

MODEL_TYPE = "samba_lm"
SAMBA_FIELDS = tuple(f.name for f in dataclasses.fields(SambaConfig))
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class SambaHFConfig(PretrainedConfig):
    """SambaConfig's fields (validated by SambaConfig) plus transformers' own (use_cache, token ids, ...)."""

    model_type = MODEL_TYPE
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads"}

    def __init__(self, use_cache: bool = True, **kwargs):
        samba = SambaConfig(**{name: kwargs.pop(name) for name in SAMBA_FIELDS if name in kwargs})
        tied = kwargs.pop("tie_word_embeddings", None)
        if tied is not None and tied != samba.tie_embeddings:
            raise ValueError(f"tie_word_embeddings={tied} contradicts tie_embeddings={samba.tie_embeddings}: "
                             f"set tie_embeddings (tie_word_embeddings follows it)")
        for name, value in samba.to_dict().items():
            setattr(self, name, value)
        self.tie_word_embeddings = samba.tie_embeddings
        self.use_cache = use_cache
        super().__init__(**kwargs)

    @classmethod
    def from_samba_config(cls, config: SambaConfig, **kwargs) -> SambaHFConfig:
        return cls(**config.to_dict(), **kwargs)

    @property
    def samba_config(self) -> SambaConfig:
        return SambaConfig.from_dict({name: getattr(self, name) for name in SAMBA_FIELDS})


class SambaCache(Cache):
    """transformers' handle on a SambaState, which holds `seen` input columns (padding included).
    Cache.layers stays empty: Samba's per-layer records (Mamba conv + ssm, SWA ring, growing
    full-attention KV) live in the SambaState."""

    is_compileable = False  # generate() must not compile around it (CUDA graphs are samba_lm.generate's)
    is_croppable = False  # a recurrent state holds no history to roll back

    def __init__(self, state: SambaState):
        super().__init__(layers=[])
        self.state = state
        self.seen = 0

    def restart(self, pad: torch.Tensor):
        """Empty the state for a new stream whose rows begin with `pad` [B] tokens of left padding."""
        self.state.reset(start=-pad)
        self.seen = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # no limit

    get_max_cache_shape = get_max_length  # the older name

    @property
    def batch_size(self) -> int:
        return self.state.batch_size

    @property
    def is_linear(self) -> list[bool]:
        # Not all "linear": generate() then slices a prompt that continues this cache by get_seq_length().
        return [False]

    def __len__(self) -> int:
        return len(self.state.layers)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        self.state = self.state.select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor):
        self.state = self.state.select(indices)

    def batch_repeat_interleave(self, repeats: int):
        self.state = self.state.select(torch.arange(self.batch_size).repeat_interleave(repeats))

    def crop(self, *args, **kwargs):
        # What assisted decoding and prompt lookup call to roll rejected tokens back (is_croppable says no).
        raise ValueError("SambaCache cannot be cropped: a recurrent state keeps no history to roll back to, "
                         "so assisted decoding is not supported")

    def reset(self):
        self.restart(torch.zeros(self.batch_size, dtype=torch.long))

    def nbytes(self) -> int:
        return self.state.nbytes()

    def __repr__(self):
        return f"SambaCache(batch_size={self.batch_size}, seen={self.seen}, nbytes={self.nbytes()})"


def check_mask(attention_mask, batch: int, width: int):
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (batch, width):
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must have shape [{batch}, {width}] (cached plus new tokens), got {got}")


def left_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's count of leading 0s ([B], CPU) in a 0/1 attention_mask that holds only left padding."""
    mask = attention_mask.cpu()
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    if (mask[:, 1:] < mask[:, :-1]).any():
        raise ValueError("attention_mask may only mark left padding (each row's 0s before all its 1s): right "
                         "padding and holes are not supported; pad prompts on the left")
    return (mask == 0).sum(1).long()


class SambaForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = SambaHFConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _is_stateful = True

    def __init__(self, config: SambaHFConfig):
        super().__init__(config)
        self.model = SambaLM(config.samba_config)
        if not self.model.embedding.weight.is_meta:
            # SambaLM initialised itself by its own rules; post_init must leave that. (On meta, in
            # from_pretrained, no flag: transformers finds the tensors a checkpoint lacks by it.)
            for tensor in self.model.state_dict(keep_vars=True).values():
                tensor._is_hf_initialized = True
        self.post_init()

    # ------------------------------------------------------------------------ conversion
    @classmethod
    def from_samba_lm(cls, model: SambaLM, **config_kwargs) -> SambaForCausalLM:
        """Wrap `model` itself (weights shared, not copied). config_kwargs: transformers' config fields,
        e.g. eos_token_id."""
        config = SambaHFConfig.from_samba_config(model.config, **config_kwargs)
        with torch.device("meta"):  # the placeholder SambaLM costs nothing and is replaced at once
            wrapper = cls(config)
        wrapper.model = model
        return wrapper.train(model.training)

    def to_samba_lm(self) -> SambaLM:
        """The wrapped SambaLM itself (weights shared, not copied)."""
        return self.model

    @torch.no_grad()
    def initialize_weights(self):
        """transformers calls this after __init__ and, in from_pretrained, after loading: fill only the
        tensors the checkpoint lacked, from a fresh SambaLM.init_weights (the loaded ones are put back;
        its rules include in-place scaling that transformers' init guards would not stop)."""
        tensors = self.model.state_dict(keep_vars=True)
        loaded = {n: t.detach().clone() for n, t in tensors.items() if getattr(t, "_is_hf_initialized", False)}
        if len(loaded) < len(tensors):
            self.model.init_weights()
            for name, value in loaded.items():
                tensors[name].detach().copy_(value)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embedding

    def set_input_embeddings(self, value: nn.Embedding):
        self.model.embedding = value

    def get_output_embeddings(self):
        return self.model.lm_head  # None when tied: the head is the embedding

    def _set_gradient_checkpointing(self, enable: bool = True, *args, **kwargs):
        self.model.checkpoint_layers = enable  # SambaLM's own: recompute each sub-layer in the backward

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not build a DynamicCache: forward makes a SambaCache

    # ------------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                past_key_values: SambaCache | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0, return_dict: bool | None = None,
                cache: SambaCache | None = None, inputs_embeds=None, num_items_in_batch=None, **kwargs):
        """input_ids [B, T] -> CausalLMOutputWithPast. With a cache (past_key_values or cache) continues its
        stream; with use_cache (default: config.use_cache outside training) and none given, starts one.
        attention_mask [B, cached + T]: left padding only. labels [B, T]: the next-token loss of
        labels[:, 1:] (-100 ignored), logits None. Other keywords that transformers passes are ignored."""
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("SambaForCausalLM takes input_ids (inputs_embeds is not supported)")
        for name in ("output_attentions", "output_hidden_states"):
            if kwargs.get(name):
                raise ValueError(f"SambaForCausalLM does not return {name.removeprefix('output_')}")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, SambaCache):
            raise ValueError(f"the cache must be a SambaCache (from this model's forward), got {type(cache).__name__}")
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        batch, T = input_ids.shape
        cache, state = self._stream(cache, attention_mask, batch, T, use_cache)

        shifted = None
        if labels is not None:  # transformers' convention: labels == input_ids, shifted here
            shifted = torch.cat([labels[:, 1:], labels.new_full((batch, 1), -100)], dim=1)
        keep = logits_to_keep if isinstance(logits_to_keep, int) else 0
        out = self.model(input_ids, state=state, logits_to_keep=keep, labels=shifted)
        if cache is not None:
            cache.seen += T
        logits, loss = out.logits, out.loss
        if isinstance(logits_to_keep, torch.Tensor):  # positions to keep, as transformers allows
            logits = logits[:, logits_to_keep]
        if loss is not None and num_items_in_batch is not None:  # the sum over the whole accumulated batch
            loss = loss * (shifted != -100).sum() / num_items_in_batch
        output = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()

    def _stream(self, cache, attention_mask, batch, T, use_cache) -> tuple[SambaCache | None, SambaState | None]:
        """(the cache to return, the state this call streams through); (None, None): a plain forward."""
        seen = cache.seen if cache is not None else 0
        if attention_mask is not None:
            check_mask(attention_mask, batch, seen + T)
        if cache is not None and cache.batch_size != batch:
            raise ValueError(f"the cache holds {cache.batch_size} rows, input_ids has {batch}")
        if seen:  # the padding went in with the first call; only the new columns are read (one sync)
            if attention_mask is not None and not bool(attention_mask[:, seen:].all()):
                raise ValueError("attention_mask: the tokens that continue a cache must all be 1 (a row's padding "
                                 "comes before its first token)")
            return cache, cache.state
        pad = left_padding(attention_mask) if attention_mask is not None else torch.zeros(batch, dtype=torch.long)
        if cache is None and use_cache:
            cache = SambaCache(self.model.init_state(batch, start=-pad))
        elif cache is not None:  # a fresh (or reset) cache starts this stream
            cache.restart(pad)
        if cache is not None:
            return cache, cache.state
        if pad.any():  # left padding needs positions below 0, which only a state carries
            return None, self.model.init_state(batch, start=-pad, capacity=T)
        return None, None


AutoConfig.register(MODEL_TYPE, SambaHFConfig, exist_ok=True)
AutoModelForCausalLM.register(SambaHFConfig, SambaForCausalLM, exist_ok=True)
