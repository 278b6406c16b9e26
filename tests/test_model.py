"""The model: exact parameter counts, initialisation, the streaming invariant, errors."""

import math

import pytest
import torch

import samba_lm
from samba_lm.config import SambaConfig

from conftest import assert_stream_invariants, small_config, small_model

PAPER_PARAMS = {  # shared/PAPER.md, with tied embeddings unless noted
    "samba-421m": 421_793_280, "samba-1.3b": 1_330_207_488, "samba-1.7b": 1_741_604_864,
    "samba-3.8b": 3_864_275_712, "llama2-438m": 438_081_024, "mamba-432m": 432_804_864,
    "llama3-1.6b": 1_537_574_912, "mamba-1.8b": 1_795_295_232, "mamba-swa-mlp-1.6b": 1_654_888_448,
    "mamba-mlp-1.9b": 1_945_634_816,
    # same shapes as their full-attention twins: SWA changes the mask, not the weights
    "llama2-swa-438m": 438_081_024, "mistral-1.6b": 1_537_574_912,
}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_paper_parameter_counts(name):
    with torch.device("meta"):
        model = samba_lm.SambaLM(SambaConfig.from_preset(name))
    assert sum(p.numel() for p in model.parameters()) == PAPER_PARAMS[name]


def sambay_tensor_count(d, vocab, inter, H, Hkv, Dh, blocks, d_state=16, d_conv=4, expand=2):
    """The parameters of SAMBAY.md's tensor list, counted from it (tied embeddings)."""
    E, R = expand * d, math.ceil(d / 16)
    ln, mlp = 2 * d, 2 * inter * d + d * inter
    mamba = 2 * E * d + E * d_conv + E + (R + 2 * d_state) * E + E * R + E + E * d_state + E + d * E
    lambdas = 4 * Dh + 2 * Dh  # lambda_q1, _k1, _q2, _k2 and subln
    self_attn = (H + 2 * Hkv) * Dh * (d + 1) + d * H * Dh + d + lambdas
    cross = H * Dh * (d + 1) + d * H * Dh + d + lambdas
    gmu = E * d + d * E
    half = blocks // 2
    mixers = half // 2 * (mamba + self_attn) + mamba + self_attn + (blocks - half - 2) // 2 * (gmu + cross)
    return vocab * d + ln + blocks * (2 * ln + mlp) + mixers


def test_the_phi4_mini_flash_preset_has_the_released_shapes():
    cfg = SambaConfig.from_preset("phi4-mini-flash")
    with torch.device("meta"):
        model = samba_lm.SambaLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == sambay_tensor_count(2560, 200064, 10240, 40, 20, 64, 32) == 3_852_562_944
    kinds = [k for k in cfg.layers if k != "mlp"]
    assert kinds[:16] == ["mamba", "dswa"] * 8 and kinds[16:18] == ["mamba_mem", "dattn"]
    assert kinds[18:] == ["gmu", "dcross"] * 7 and cfg.window == 512 and cfg.dt_rank == 160
    assert (cfg.norm, cfg.attention_bias, cfg.rope, cfg.tie_embeddings) == ("layer", True, False, True)


def test_the_small_sambay_preset_runs_its_invariants():
    cfg = SambaConfig.from_preset("sambay-tiny", d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, window=8,
                                  mlp_hidden=48, d_state=4, vocab_size=97)
    torch.manual_seed(0)
    model = samba_lm.SambaLM(cfg).double().eval()
    assert_stream_invariants(model, torch.randint(0, 97, (2, 13)), ([0, 9, 13], range(14)))


def test_tiny_preset_is_a_few_million_parameters():
    model = samba_lm.SambaLM(SambaConfig.from_preset("tiny"))
    assert 1e6 < sum(p.numel() for p in model.parameters()) < 1e7


# ------------------------------------------------------------------ the state invariant
def run_chunks(model, ids, cuts):
    state = model.init_state(ids.shape[0])
    logits = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        out = model(ids[:, a:b], state=state)
        assert out.state is state
        logits.append(out.logits)
    return torch.cat(logits, 1), state


def random_cuts(T, gen):
    inner = sorted(set(torch.randint(1, T, (min(T - 1, 4),), generator=gen).tolist())) if T > 1 else []
    return [0, *inner, T]


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
@pytest.mark.parametrize("T", [1, 7, 8, 9, 31])  # 1, window-1, window, window+1, 3*window+7
def test_full_equals_chunked_equals_stepwise(dtype, rtol, T):
    model = small_model(dtype)
    gen = torch.Generator().manual_seed(T)
    ids = torch.randint(0, 97, (3, T), generator=gen)
    with torch.no_grad():
        full = model(ids).logits
        scale = full.abs().max()
        for _ in range(3):
            chunked, _ = run_chunks(model, ids, random_cuts(T, gen))
            torch.testing.assert_close(chunked, full, rtol=rtol, atol=rtol * scale)
        stepwise, state = run_chunks(model, ids, list(range(T + 1)))
        torch.testing.assert_close(stepwise, full, rtol=rtol, atol=rtol * scale)
    assert state.pos.tolist() == [T] * 3


def test_long_stream_after_many_steps_float64():
    """Hundreds of decode steps past a prefill still equal the single full forward."""
    model = small_model(torch.float64, layers=("mamba", "swa", "mlp"))
    ids = torch.randint(0, 97, (2, 260))
    with torch.no_grad():
        full = model(ids).logits
        streamed, _ = run_chunks(model, ids, [0, 37, 38, 100] + list(range(101, 261)))
    torch.testing.assert_close(streamed, full, rtol=1e-9, atol=1e-9 * full.abs().max())


def test_growing_cache_of_full_attention(monkeypatch):
    monkeypatch.setattr("samba_lm.layers.attention.GROWING_INITIAL_CAPACITY", 2)
    model = small_model(torch.float64, layers=("attn", "mlp"))
    ids = torch.randint(0, 97, (2, 21))
    with torch.no_grad():
        full = model(ids).logits
        streamed, state = run_chunks(model, ids, [0, 1, 2, 3, 9, 10, 21])
    torch.testing.assert_close(streamed, full, rtol=1e-9, atol=1e-9)
    assert state.layers[0].length == 21 and state.layers[0].k.shape[1] >= 21


def test_state_size_is_constant_over_20000_tokens():
    model = samba_lm.SambaLM(SambaConfig.from_preset("tiny", vocab_size=512)).eval()
    state = model.init_state(1)
    size, addresses = state.nbytes(), [t.data_ptr() for t in state.tensors()]
    with torch.no_grad():
        for _ in range(20):
            model(torch.randint(0, 512, (1, 1000)), state=state)
    assert state.pos.item() == 20_000
    assert state.nbytes() == size
    assert [t.data_ptr() for t in state.tensors()] == addresses  # allocated once, updated in place


def test_state_size_formula():
    cfg = small_config(layers=("mamba", "swa", "mlp"))
    state = samba_lm.SambaLM(cfg).init_state(3)
    E, per_row = cfg.d_inner, 0
    per_row += E * (cfg.d_conv - 1) * 4 + E * cfg.d_state * 4  # conv (fp32 model) + ssm
    per_row += 2 * (cfg.window - 1) * cfg.n_kv_heads * cfg.head_dim * 4 + (cfg.window - 1) * 8
    assert state.nbytes() == 3 * (per_row + 3 * 8)  # + pos, and the document id and start (int64 each)


def test_select_reorders_rows():
    model = small_model(torch.float64)
    ids = torch.randint(0, 97, (3, 12))
    with torch.no_grad():
        full = model(ids).logits
        state = model.init_state(3)
        model(ids[:, :5], state=state)
        picked = state.select([2, 0])
        rest = model(ids[[2, 0], 5:], state=picked).logits
    torch.testing.assert_close(rest, full[[2, 0], 5:], rtol=1e-9, atol=1e-9)


def test_logits_to_keep_is_the_tail():
    model = small_model(torch.float64)
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, logits_to_keep=3).logits, model(ids).logits[:, -3:])


def test_training_with_a_state_across_segments_backpropagates():
    """Truncated BPTT: the state carries values, gradients stay inside each call."""
    model = small_model(torch.float64).train()
    state = model.init_state(2)
    for _ in range(2):
        loss = model(torch.randint(0, 97, (2, 9)), state=state).logits.logsumexp(-1).mean()
        loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ------------------------------------------------------------------ initialisation and dtypes
def test_initialisation_rules():
    cfg = SambaConfig.from_preset("tiny")
    model = samba_lm.SambaLM(cfg)
    mamba = model.layers[0].mixer
    assert torch.equal(mamba.A_log, torch.log(torch.arange(1.0, 17)).expand(cfg.d_inner, -1))
    assert torch.equal(mamba.D, torch.ones(cfg.d_inner))
    dt = torch.nn.functional.softplus(mamba.dt_proj.bias)
    assert dt.min() >= cfg.dt_min * 0.999 and dt.max() <= cfg.dt_max * 1.001
    assert mamba.dt_proj.weight.abs().max() <= cfg.dt_rank**-0.5
    assert abs(model.embedding.weight.std().item() - 0.02) < 0.001
    # residual output projections: the default bound 1/sqrt(fan_in), divided by sqrt(#sub-layers)
    bound = 1 / math.sqrt(cfg.d_inner) / math.sqrt(cfg.n_layers)
    assert mamba.out_proj.weight.abs().max() <= bound and mamba.out_proj.weight.abs().max() > 0.9 * bound
    down = model.layers[1].mixer.down_proj.weight
    assert down.abs().max() <= 1 / math.sqrt(cfg.mlp_hidden) / math.sqrt(cfg.n_layers)


def test_meta_build_then_init_weights():
    with torch.device("meta"):
        model = samba_lm.SambaLM(small_config())
    model.to_empty(device="cpu")
    model.init_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(model(torch.randint(0, 97, (1, 5))).logits).all()


def test_residual_stream_is_fp32_under_bf16():
    model = samba_lm.SambaLM(small_config())
    seen = []
    model.layers[2].register_forward_hook(lambda m, args, out: seen.append(out[0].dtype))  # (h, output)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 97, (1, 6)))
    model.to(torch.bfloat16)(torch.randint(0, 97, (1, 6)))
    assert seen == [torch.float32, torch.float32]


def test_any_sequence_of_kinds_is_a_model():
    for layers in [("mlp",), ("mamba",), ("attn",), ("swa", "swa"), ("attn", "mamba", "swa", "mlp")]:
        model = small_model(torch.float64, layers=layers)
        ids = torch.randint(0, 97, (1, 11))
        with torch.no_grad():
            chunked, _ = run_chunks(model, ids, [0, 4, 11])
            torch.testing.assert_close(chunked, model(ids).logits, rtol=1e-9, atol=1e-9)


def variant_model(**overrides):
    """LayerNorm with bias, biased attention projections and no RoPE (SambaY's choices), every
    parameter random."""
    model = small_model(torch.float64, norm="layer", attention_bias=True, rope=False, **overrides)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") and ("norm" in name or "_proj" in name):
                p.uniform_(-0.5, 0.5)
    return model


def test_variants_full_equals_chunked_equals_stepwise_and_each_row_alone():
    model = variant_model()
    assert isinstance(model.norm_f, samba_lm.layers.LayerNorm) and model.layers[2].mixer.qkv_proj.bias is not None
    assert_stream_invariants(model, torch.randint(0, 97, (2, 19)), ([0, 5, 6, 19], range(20)))


def test_layer_norm_is_the_float64_formula():
    norm = samba_lm.layers.LayerNorm(6, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    h, delta = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    s, y = norm(h, delta)
    x = h + delta
    want = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(s, x, rtol=0, atol=0)
    torch.testing.assert_close(y, want * norm.weight + norm.bias, rtol=1e-12, atol=1e-12)


def test_without_rope_attention_sees_a_set_of_earlier_tokens():
    """One attention layer and no positions: the last token's logits ignore the order of the tokens
    before it. With RoPE they do not."""
    ids = torch.randint(0, 97, (1, 12))
    shuffled = torch.cat([ids[:, :-1][:, torch.randperm(11)], ids[:, -1:]], 1)
    for rope, same in ((False, True), (True, False)):
        model = small_model(torch.float64, layers=("attn", "mlp"), rope=rope)
        with torch.no_grad():
            a, b = model(ids).logits[0, -1], model(shuffled).logits[0, -1]
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10) == same


def test_zero_attention_biases_are_no_biases():
    plain, biased = small_model(torch.float64), small_model(torch.float64, attention_bias=True)
    state = {k: v for k, v in biased.state_dict().items() if not k.endswith(("qkv_proj.bias", "out_proj.bias"))}
    assert set(biased.state_dict()) - set(state) and plain.load_state_dict(state) is not None
    with torch.no_grad():
        for name, p in biased.named_parameters():
            if name.endswith(("qkv_proj.bias", "out_proj.bias")):
                p.zero_()
        ids = torch.randint(0, 97, (2, 9))
        torch.testing.assert_close(biased(ids).logits, plain(ids).logits, rtol=0, atol=0)


# ------------------------------------------------------------------ configuration and errors
@pytest.mark.parametrize("field, value", [
    ("d_model", 0), ("vocab_size", -1), ("layers", ()), ("layers", ("mamba", "lstm")), ("n_kv_heads", 3),
    ("head_dim", 7), ("window", 1), ("mlp_hidden", 0), ("d_state", 0), ("d_conv", 1), ("expand", 0),
    ("dt_rank", 0), ("dt_min", 0.5), ("norm_eps", 0.0), ("rope_base", -1.0), ("tie_embeddings", "yes"),
    ("norm", "batch"), ("rope", "no"), ("attention_bias", 1),
])
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"SambaConfig.{field}"):
        small_config(**{field: value})


def test_presets_and_overrides():
    cfg = SambaConfig.from_preset("tiny", vocab_size=512)
    assert cfg.vocab_size == 512 and cfg.layers == ("mamba", "mlp", "swa", "mlp") * 2
    assert SambaConfig.from_preset("samba-421m").dt_rank == 96
    with pytest.raises(ValueError, match="valid presets: tiny, samba-421m"):
        SambaConfig.from_preset("samba-9b")
    with pytest.raises(ValueError, match="unknown SambaConfig fields \\['n_layer'\\]"):
        SambaConfig.from_dict({"n_layer": 12})
    assert SambaConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("bad, match", [
    (torch.rand(2, 5), "int64 or int32"),
    (torch.zeros(5, dtype=torch.long), "shape \\[batch, time\\]"),
    (torch.zeros(2, 0, dtype=torch.long), "shape \\[batch, time\\]"),
    (torch.tensor([[1, 97]]), "vocab_size=97"),
    (torch.tensor([[-1, 3]]), "vocab_size=97"),
    ([[1, 2]], "torch.Tensor"),
])
def test_bad_input_ids(bad, match):
    with pytest.raises(ValueError, match=match):
        small_model()(bad)


def test_state_for_another_batch_or_model():
    model = small_model()
    with pytest.raises(ValueError, match="batch size 3"):
        model(torch.zeros(2, 4, dtype=torch.long), state=model.init_state(3))
    other = samba_lm.SambaLM(small_config(d_model=16))
    with pytest.raises(ValueError, match="different model config"):
        model(torch.zeros(2, 4, dtype=torch.long), state=other.init_state(2))
    with pytest.raises(ValueError, match="batch_size"):
        model.init_state(0)
