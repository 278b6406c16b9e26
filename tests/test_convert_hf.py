"""Conversion to and from transformers' Llama, Mistral and Mamba: logits agree in float64, weights
round-trip bit-exactly, directories convert both ways, and what fits none of them is refused clearly."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import samba_lm  # noqa: E402
from samba_lm.convert.hf_formats import (  # noqa: E402
    export_hf, from_hf, hf_config, import_hf, samba_config, to_hf)

VOCAB, T = 97, 13
# Only fields the transformers configs carry, set away from their defaults, so that a round trip
# must reproduce every one of them.
ATTENTION = dict(d_model=32, vocab_size=VOCAB, n_heads=4, n_kv_heads=2, head_dim=8, mlp_hidden=48,
                 rope_base=500.0, norm_eps=1e-6, init_std=0.03)
CASES = {
    "llama": dict(ATTENTION, layers=("attn", "mlp") * 3),
    "mistral": dict(ATTENTION, layers=("swa", "mlp") * 3, window=5),  # shorter than T
    "mamba": dict(d_model=32, vocab_size=VOCAB, layers=("mamba",) * 3, d_state=4, d_conv=3, dt_rank=3,
                  norm_eps=1e-6, init_std=0.03, dt_min=0.002, dt_max=0.2, dt_init_floor=2e-4),
}
HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mamba": "MambaForCausalLM"}


def randomize(model, seed):
    """Every parameter random (norms and D too, whose inits are constants), so that each one matters."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


def our_model(arch, tie, seed=0):
    cfg = samba_lm.SambaConfig(**CASES[arch], tie_embeddings=tie)
    return randomize(samba_lm.SambaLM(cfg).double(), seed)


def random_hf_model(arch, tie, seed=1):
    cfg = hf_config(samba_lm.SambaConfig(**CASES[arch], tie_embeddings=tie))
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float64, attn_implementation="eager")
    return randomize(hf, seed)


@contextlib.contextmanager
def float64_everywhere():
    """transformers casts to float32 in places (RMSNorm, RoPE angles, eager softmax, the Mamba scan's A,
    B and D, residual_in_fp32, Mamba's logits): upcasts for a half-precision model, downcasts for a
    float64 one, which would limit any comparison to ~1e-7. Inside this context they keep float64."""
    orig_float, orig_to, orig_softmax = torch.Tensor.float, torch.Tensor.to, F.softmax

    def keep(t, dtype):
        return torch.float64 if t.dtype == torch.float64 and dtype == torch.float32 else dtype

    def to(self, *args, **kwargs):
        args = [keep(self, a) if isinstance(a, torch.dtype) else a for a in args]
        if "dtype" in kwargs:
            kwargs["dtype"] = keep(self, kwargs["dtype"])
        return orig_to(self, *args, **kwargs)

    def softmax(x, *args, dtype=None, **kwargs):
        return orig_softmax(x, *args, dtype=dtype and keep(x, dtype), **kwargs)

    torch.Tensor.float = lambda self, *a, **k: self if self.dtype == torch.float64 else orig_float(self, *a, **k)
    torch.Tensor.to, F.softmax = to, softmax
    try:
        yield
    finally:
        torch.Tensor.float, torch.Tensor.to, F.softmax = orig_float, orig_to, orig_softmax


@torch.no_grad()
def hf_logits(hf, ids):
    """transformers' own forward, eager attention, every module's output checked to be float64."""
    hf.set_attn_implementation("eager")
    for m in hf.modules():
        if hasattr(m, "inv_freq"):  # made in float32 at construction: redo it in float64
            d, theta = hf.config.head_dim, hf.config.rope_parameters["rope_theta"]
            m.inv_freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    dtypes = set()
    hooks = [m.register_forward_hook(lambda m, i, out: dtypes.update(
        t.dtype for t in (out if isinstance(out, tuple) else (out,)) if torch.is_tensor(t) and t.is_floating_point()))
        for m in hf.modules()]
    try:
        with float64_everywhere():
            logits = hf(ids, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    assert dtypes == {torch.float64}
    return logits


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def ids(batch=2, seed=3):
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("arch", list(CASES))
def test_to_hf_computes_the_same_logits_and_round_trips(arch, tie):
    model = our_model(arch, tie)
    hf = to_hf(model)
    assert type(hf).__name__ == HF_CLASSES[arch] and hf.config.tie_word_embeddings == tie
    x = ids()
    torch.testing.assert_close(hf_logits(hf, x), model(x).logits, rtol=0, atol=1e-10)
    back = from_hf(hf)
    assert back.config == model.config
    assert_same_tensors(back.state_dict(), model.state_dict())


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("arch", list(CASES))
def test_from_hf_computes_the_same_logits_and_round_trips(arch, tie):
    hf = random_hf_model(arch, tie)
    model = from_hf(hf)
    x = ids()
    torch.testing.assert_close(model(x).logits, hf_logits(hf, x), rtol=0, atol=1e-10)
    again = to_hf(model)
    assert_same_tensors(again.state_dict(), hf.state_dict())
    for key in ("num_hidden_layers", "hidden_size", "vocab_size", "tie_word_embeddings", "initializer_range"):
        assert getattr(again.config, key) == getattr(hf.config, key), key


@pytest.mark.parametrize("arch", list(CASES))
def test_float32_models_agree_to_float32_precision(arch):
    """Without float64_everywhere, in the dtype a user converts in: only rounding differs."""
    model = our_model(arch, tie=False).float()
    hf = to_hf(model)
    assert hf.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(hf(ids(), use_cache=False).logits, model(ids()).logits, rtol=0, atol=1e-4)


def test_a_mamba_without_conv_bias_imports_with_a_zero_one():
    cfg = hf_config(samba_lm.SambaConfig(**CASES["mamba"]))
    cfg.use_conv_bias = False
    hf = randomize(transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float64), seed=2)
    model = from_hf(hf)
    assert not model.layers[0].mixer.conv1d.bias.any()
    torch.testing.assert_close(model(ids()).logits, hf_logits(hf, ids()), rtol=0, atol=1e-10)


def test_a_model_without_its_head_is_refused():
    hf = random_hf_model("llama", tie=False).model  # the LlamaModel inside
    with pytest.raises(ValueError, match="ForCausalLM"):
        from_hf(hf)


def test_the_window_is_the_same_attention_set():
    """A window one key wider or narrower in transformers changes the logits: the test above would see
    an off-by-one between the two window conventions."""
    model = our_model("mistral", tie=True)
    ours = model(ids()).logits
    for window in (4, 6):
        hf = to_hf(model)
        hf.config.sliding_window = window
        assert (hf_logits(hf, ids()) - ours).abs().max() > 1e-3


@pytest.mark.parametrize("arch", list(CASES))
def test_directories_convert_both_ways(arch, tmp_path):
    model = our_model(arch, tie=arch != "llama")
    samba_lm.save_pretrained(model, tmp_path / "ours")
    (tmp_path / "ours" / "tokenizer.json").write_text("{}")
    export_hf(tmp_path / "ours", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype="auto", local_files_only=True)
    assert type(hf).__name__ == HF_CLASSES[arch] and hf.dtype == torch.float64
    torch.testing.assert_close(hf_logits(hf, ids()), model(ids()).logits, rtol=0, atol=1e-10)
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == "{}"
    import_hf(tmp_path / "hf", tmp_path / "back")
    back = samba_lm.load_pretrained(tmp_path / "back")
    assert back.config == model.config
    assert_same_tensors(back.state_dict(), model.state_dict())
    assert (tmp_path / "back" / "tokenizer.json").is_file()


def test_baseline_presets_map_to_their_architectures():
    expect = {"llama2-438m": ("llama", 12, None), "llama3-1.6b": ("llama", 24, None),
              "llama2-swa-438m": ("mistral", 12, 2048), "mistral-1.6b": ("mistral", 24, 2048),
              "mamba-432m": ("mamba", 60, None), "mamba-1.8b": ("mamba", 64, None)}
    for name, (arch, n, window) in expect.items():
        preset = samba_lm.PRESETS[name]
        cfg = hf_config(preset)
        assert (cfg.model_type, cfg.num_hidden_layers, getattr(cfg, "sliding_window", None)) == (arch, n, window)
        assert cfg.tie_word_embeddings == preset.tie_embeddings
        assert hf_config(samba_config(cfg)).to_dict() == cfg.to_dict()
        assert arch != "mamba" or cfg.residual_in_fp32  # ours keeps the residual in float32


@pytest.mark.parametrize("preset", ["samba-421m", "mamba-swa-mlp-1.6b"])
def test_other_layer_patterns_are_refused_naming_them(preset):
    with torch.device("meta"):
        model = samba_lm.SambaLM(samba_lm.SambaConfig.from_preset(preset))
    unit = {"samba-421m": "('mamba', 'mlp', 'swa', 'mlp') * 6", "mamba-swa-mlp-1.6b": "('mamba', 'swa', 'mlp') * 18"}
    with pytest.raises(ValueError, match=r"match no transformers architecture") as err:
        to_hf(model)
    assert unit[preset] in str(err.value)


@pytest.mark.parametrize("field, value", [("norm", "layer"), ("rope", False), ("attention_bias", True)])
def test_variants_without_a_transformers_twin_are_refused(field, value):
    cfg = samba_lm.SambaConfig.from_preset("llama2-438m", **{field: value})
    with pytest.raises(ValueError, match=f"SambaConfig.{field}={value!r}: transformers' llama models"):
        hf_config(cfg)


@pytest.mark.parametrize("config, field", [
    (transformers.LlamaConfig(attention_bias=True), "attention_bias"),
    (transformers.LlamaConfig(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
     "rope_parameters"),
    (transformers.MistralConfig(hidden_act="gelu"), "hidden_act"),
    (transformers.MambaConfig(use_bias=True), "use_bias"),
    (transformers.GPT2Config(), "gpt2"),
])
def test_what_we_cannot_express_is_refused(config, field):
    with pytest.raises(ValueError, match=field):
        samba_config(config)


def test_import_refuses_other_architectures_before_loading(tmp_path):
    transformers.GPT2Config(n_layer=1).save_pretrained(tmp_path)  # a config and no weights
    with pytest.raises(ValueError, match="gpt2"):
        import_hf(tmp_path, tmp_path / "out")
