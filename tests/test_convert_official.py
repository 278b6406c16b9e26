"""Conversion to and from the official Samba code's checkpoints (microsoft/Samba, lit_gpt).

Their code needs CUDA extensions (flash-attn, causal-conv1d, mamba_ssm, xformers) and cannot be
imported here, so this file describes it from reading it (microsoft/Samba at ed3ed54): the module tree
of `lit_gpt.model.GPT` as a function of its Config fields (`official_tree`), and its forward in
float64 (`official_forward`). File:line references point into that repository.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import samba_lm
from samba_lm.convert import OFFICIAL_CONFIGS, from_official, to_official
from samba_lm.convert.official import official_config, official_fields, official_state_dict, samba_config

from conftest import small_model

F64 = torch.float64

# lit_gpt Config defaults read below (lit_gpt/config.py:19-74).
DEFAULTS = dict(padding_multiple=512, mlp=True, full_per_layer=1000000, mb_per_layer=-1, local_window=-1,
                mamba=False, mamba_init=False, mamba_swa_mlp=False, attn_layer_pos=None, n_query_groups=None,
                rotary_percentage=0.25)


def resolve(c):
    c = {**DEFAULTS, **c}
    if c["n_query_groups"] is None and "n_head" in c:
        c["n_query_groups"] = c["n_head"]  # config.py:83-86
    k = c["padding_multiple"]
    c["padded_vocab_size"] = -(-c["vocab_size"] // k) * k  # config.py:80-81, utils.py:26
    return c


# Reduced copies of their configs, same structure (the config.py line of the original in the comment).
LIT = dict(vocab_size=100, padding_multiple=64, n_embd=64, n_head=4, intermediate_size=96, norm_eps=1e-5,
           rotary_percentage=1.0, parallel_residual=False, bias=False, _norm_class="FusedRMSNorm",
           _mlp_class="LLaMAMLP")
TINY = {
    "Samba_421M": dict(LIT, n_layer=4, mb_per_layer=2, local_window=8, mamba_init=True),  # config.py:404
    "Samba_1.3B": dict(LIT, n_layer=4, n_embd=96, n_head=6, intermediate_size=128, mb_per_layer=2,
                       local_window=8, mamba_init=True),  # config.py:726
    "LLaMA_438M": dict(LIT, n_layer=3),  # config.py:125
    "LLaMA_438M_SWA": dict(LIT, n_layer=3, local_window=8),  # config.py:162
    "Mamba_430M": dict(mamba=True, n_layer=3, n_embd=48, vocab_size=100, padding_multiple=64, norm_eps=1e-5,
                       rms_norm=True),  # config.py:977
    "Samba_421M_gqa2": dict(LIT, n_layer=4, mb_per_layer=2, local_window=8, mamba_init=True,
                            n_query_groups=2),  # config.py:604
    "Samba_421M_mqa": dict(LIT, n_layer=4, mb_per_layer=2, local_window=8, mamba_init=True,
                           n_query_groups=1),  # config.py:562
    "Mamba_SWA_MLP_400M": dict(LIT, n_layer=3, mamba_swa_mlp=True, local_window=8, mamba_init=True),  # :445
    "LLaMA_438M_SWA_full": dict(LIT, n_layer=4, local_window=8, full_per_layer=2),  # config.py:180
    "LLaMA_443M_full_mamba_1,5": dict(LIT, n_layer=6, mamba_init=True, attn_layer_pos="[1,5]"),  # :543
}
TINY = {name: dict(c, name=name + "_tiny") for name, c in TINY.items()}


def test_tiny_configs_keep_the_structure_of_the_originals():
    for name, tiny in TINY.items():
        a, b = resolve(OFFICIAL_CONFIGS[name]), resolve(tiny)
        for key in ("mamba", "mb_per_layer", "mamba_swa_mlp", "full_per_layer", "attn_layer_pos", "mamba_init",
                    "mlp", "rotary_percentage", "_norm_class", "_mlp_class"):
            assert a.get(key) == b.get(key), (name, key)
        assert (a["local_window"] > -1) == (b["local_window"] > -1), name
        if not a["mamba"]:  # MHA, MQA or GQA alike
            kind = [(x["n_query_groups"] == x["n_head"], x["n_query_groups"] == 1) for x in (a, b)]
            assert kind[0] == kind[1], name


# ----------------------------------------------------------------------------- their module tree
def block_mixer(c, i):
    """What block i's `attn` is (model.py:318-339): "mamba", "swa" or "attn"."""
    if c["attn_layer_pos"] is not None:
        mamba = i not in eval(c["attn_layer_pos"])  # model.py:320-321
    else:
        mamba = c["mb_per_layer"] > 0 and i % c["mb_per_layer"] == 0  # model.py:323
    return "mamba" if mamba else attention_kind(c, i)


def attention_kind(c, i):
    local = i % c["full_per_layer"] < c["full_per_layer"] - 1  # model.py:452
    return "swa" if local and c["local_window"] > -1 else "attn"  # model.py:585-589


def mamba_tree(p, d):
    """mamba_simple.py:26-110 with its defaults: d_state 16, d_conv 4, expand 2, dt_rank ceil(d/16)."""
    E, N, K, R = 2 * d, 16, 4, math.ceil(d / 16)
    return {p + "in_proj.weight": (2 * E, d), p + "conv1d.weight": (E, 1, K), p + "conv1d.bias": (E,),
            p + "x_proj.weight": (R + 2 * N, E), p + "dt_proj.weight": (E, R), p + "dt_proj.bias": (E,),
            p + "A_log": (E, N), p + "D": (E,), p + "out_proj.weight": (d, E)}


def attention_tree(p, c):
    """CausalSelfAttention (model.py:449-465): attn packs (n_head + 2 groups) heads; bias=False."""
    d, H, G = c["n_embd"], c["n_head"], c["n_query_groups"]
    return {p + "attn.weight": ((H + 2 * G) * (d // H), d), p + "proj.weight": (d, d)}


def mlp_tree(p, c):
    """LLaMAMLP = xformers SwiGLU(n_embd, intermediate_size, bias=False, _pack_weights=False) (model.py:602-608)."""
    d, h = c["n_embd"], c["intermediate_size"]
    return {p + "swiglu.w1.weight": (h, d), p + "swiglu.w2.weight": (h, d), p + "swiglu.w3.weight": (d, h)}


def official_tree(c) -> dict:
    """GPT(config).state_dict() shapes (model.py:70-112)."""
    c = resolve(c)
    d, V = c["n_embd"], c["padded_vocab_size"]
    tree = {"lm_head.weight": (V, d), "transformer.wte.weight": (V, d), "transformer.ln_f.weight": (d,)}
    for i in range(c["n_layer"]):
        p = f"transformer.h.{i}."
        if c["mamba"]:  # MBlock: mixer + norm (model.py:409-410), create_block (model.py:42-68)
            tree.update({p + "norm.weight": (d,), **mamba_tree(p + "mixer.", d)})
            continue
        if c["mamba_swa_mlp"]:  # model.py:310-314
            tree.update({p + "norm_m.weight": (d,), p + "norm_attn.weight": (d,), **mamba_tree(p + "mb.", d),
                         **attention_tree(p + "attn.", c)})
        else:  # model.py:318-339: the Mamba mixer, too, is called `attn`
            tree[p + "norm_1.weight"] = (d,)
            mixer = block_mixer(c, i)
            tree.update(mamba_tree(p + "attn.", d) if mixer == "mamba" else attention_tree(p + "attn.", c))
        if c["mlp"]:  # model.py:342-345
            tree.update({p + "norm_2.weight": (d,), **mlp_tree(p + "mlp.", c)})
    return tree


def tied(c):
    c = resolve(c)
    return c["mamba"] or c["mamba_init"]  # model.py:118-120


def random_official_state(c, dtype=torch.float32, seed=0):
    """Random weights in their layout, at scales where every tensor matters; tied configs share wte."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in official_tree(c).items():
        u = torch.rand(shape, generator=g, dtype=F64)
        if name.endswith("norm.weight") or "norm_" in name or name.endswith("ln_f.weight") or name.endswith(".D"):
            t = u + 0.5
        elif name.endswith("A_log"):
            t = torch.log(torch.arange(1, shape[1] + 1, dtype=F64)) + 0.2 * u
        elif name.endswith("dt_proj.bias"):  # softplus^-1 of dt, dt log-uniform in [0.001, 0.1]
            dt = torch.exp(u * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
            t = dt + torch.log(-torch.expm1(-dt))
        else:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=g, dtype=F64) / math.sqrt(fan_in)
        state[name] = t.to(dtype).contiguous()
    if tied(c):
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


# ----------------------------------------------------------------------------- their forward, float64
def rms(x, w, eps):
    """FusedRMSNorm (rmsnorm.py:806-822) and mamba_ssm's RMSNorm: x / sqrt(mean(x^2) + eps) * w."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def official_mamba(x, s, p):
    """Mamba.forward (mamba_simple.py:112-199) with a sequential selective scan."""
    T = x.shape[1]
    xs, z = (x @ s[p + "in_proj.weight"].T).chunk(2, dim=-1)  # :128-134, 155
    w = s[p + "conv1d.weight"]
    E, K = w.shape[0], w.shape[-1]
    xs = F.silu(F.conv1d(xs.transpose(1, 2), w, s[p + "conv1d.bias"], padding=K - 1, groups=E)[..., :T]).transpose(1, 2)
    N, R = s[p + "A_log"].shape[1], s[p + "dt_proj.weight"].shape[1]
    dt, Bm, Cm = (xs @ s[p + "x_proj.weight"].T).split([R, N, N], dim=-1)  # :175-176
    delta = F.softplus(dt @ s[p + "dt_proj.weight"].T + s[p + "dt_proj.bias"])  # :177, 190-191
    A = -torch.exp(s[p + "A_log"])  # :136
    h, ys = torch.zeros(x.shape[0], E, N, dtype=x.dtype), []
    for t in range(T):
        h = torch.exp(delta[:, t, :, None] * A) * h + delta[:, t, :, None] * Bm[:, t, None, :] * xs[:, t, :, None]
        ys.append((h * Cm[:, t, None, :]).sum(-1) + s[p + "D"] * xs[:, t])
    return (torch.stack(ys, 1) * F.silu(z)) @ s[p + "out_proj.weight"].T  # z gating, then out_proj :198


def official_attention(x, s, p, c, i):
    """CausalSelfAttention.forward (model.py:497-599) on the flash-attn path that training takes."""
    B, T, d = x.shape
    H, G = c["n_head"], c["n_query_groups"]
    Dh, per = d // H, H // G
    qkv = (x @ s[p + "attn.weight"].T).view(B, T, G, per + 2, Dh)  # model.py:508-512
    q, k, v = qkv.split((per, 1, 1), dim=-2)  # model.py:516
    q, k, v = q.reshape(B, T, H, Dh), k.reshape(B, T, G, Dh), v.reshape(B, T, G, Dh)
    # build_rope_cache (model.py:610-636): base 10000 over rotary_percentage * Dh dims; applied
    # GPT-NeoX style (interleaved=False, fused_rotary_embedding.py:30-50; flash-attn's rotary kernel:
    # o1 = x1 cos - x2 sin, o2 = x1 sin + x2 cos). Their tables are rounded to bf16 (model.py:269, 631):
    # the equation, not that rounding, is the reference here.
    n = int(c["rotary_percentage"] * Dh)
    angles = torch.arange(T, dtype=F64)[:, None] / (10000 ** (torch.arange(0, n, 2, dtype=F64) / n))
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]

    def rotate(t):
        t1, t2 = t[..., : n // 2], t[..., n // 2: n]
        return torch.cat([t1 * cos - t2 * sin, t1 * sin + t2 * cos, t[..., n:]], dim=-1)

    q, k = rotate(q), rotate(k)
    k, v = k.repeat_interleave(per, dim=2), v.repeat_interleave(per, dim=2)  # model.py:593-595
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(Dh)  # model.py:576
    qi, kj = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = kj <= qi
    if attention_kind(c, i) == "swa":  # flash_attn_func window_size=(local_window - 1, 0), model.py:586
        allowed &= qi - kj <= c["local_window"] - 1
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(B, T, d) @ s[p + "proj.weight"].T  # :567-570


def official_mlp(x, s, p):
    """xformers swiglu: w3(silu(w1 x) * w2 x) (xformers/ops/swiglu_op.py, _eager_functional_swiglu)."""
    return (F.silu(x @ s[p + "swiglu.w1.weight"].T) * (x @ s[p + "swiglu.w2.weight"].T)) @ s[p + "swiglu.w3.weight"].T


def official_forward(s, c, ids):
    """GPT.forward (model.py:173-258): pre-norm residual blocks, ln_f, lm_head."""
    c = resolve(c)
    eps = c["norm_eps"]
    x = s["transformer.wte.weight"][ids]
    for i in range(c["n_layer"]):
        p = f"transformer.h.{i}."
        if c["mamba"]:  # MBlock (model.py:417-443): residual + mixer(norm(residual)), unfused
            x = x + official_mamba(rms(x, s[p + "norm.weight"], eps), s, p + "mixer.")
            continue
        if c["mamba_swa_mlp"]:  # model.py:357-361
            x = x + official_mamba(rms(x, s[p + "norm_m.weight"], eps), s, p + "mb.")
            x = x + official_attention(rms(x, s[p + "norm_attn.weight"], eps), s, p + "attn.", c, i)
        else:  # model.py:368-380
            h = rms(x, s[p + "norm_1.weight"], eps)
            mamba = block_mixer(c, i) == "mamba"
            x = x + (official_mamba(h, s, p + "attn.") if mamba else official_attention(h, s, p + "attn.", c, i))
        if c["mlp"]:  # model.py:382-386
            x = x + official_mlp(rms(x, s[p + "norm_2.weight"], eps), s, p + "mlp.")
    return rms(x, s["transformer.ln_f.weight"], eps) @ s["lm_head.weight"].T  # model.py:256-257


# ----------------------------------------------------------------------------- tests
def write_official(path, state, c=None):
    """As their pretrain.py saves (pretrain.py:165, 290), less the optimizer."""
    torch.save({"model": state, "hparams": {"model_name": (c or {}).get("name", "?")}, "iter_num": 0,
                "step_count": 0}, path)
    return path


@pytest.mark.parametrize("name", TINY)
def test_written_checkpoint_has_their_module_tree(tmp_path, name):
    c = TINY[name]
    torch.manual_seed(0)
    model = samba_lm.SambaLM(samba_config(c))
    ckpt = torch.load(to_official(model, tmp_path / "x.pth", c), weights_only=True)
    state = ckpt["model"]
    assert {k: tuple(t.shape) for k, t in state.items()} == official_tree(c)
    assert ckpt["hparams"]["model_name"] == c["name"]
    if tied(c):  # one tensor under both names, as GPT.state_dict() gives it
        assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()


@pytest.mark.parametrize("name", TINY)
def test_logits_equal_their_forward_float64(tmp_path, name):
    c = TINY[name]
    state = random_official_state(c, F64)
    model = from_official(write_official(tmp_path / "x.pth", state, c), c).eval()
    assert model.config.vocab_size == resolve(c)["padded_vocab_size"] == 128
    ids = torch.randint(0, 128, (2, 21))  # longer than the window (8), not a multiple of anything
    with torch.no_grad():
        ours = model(ids).logits
    theirs = official_forward(state, c, ids)
    assert ours.dtype == F64
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", TINY)
def test_round_trip_official_samba_official_is_exact(tmp_path, name):
    c = TINY[name]
    state = random_official_state(c, torch.float32)
    model = from_official(write_official(tmp_path / "a.pth", state, c), c)
    back = torch.load(to_official(model, tmp_path / "b.pth", c), weights_only=True)["model"]
    assert back.keys() == state.keys()
    for k in state:
        assert back[k].dtype == state[k].dtype and torch.equal(back[k], state[k]), k


@pytest.mark.parametrize("name", TINY)
def test_round_trip_samba_official_samba_is_exact(tmp_path, name):
    cfg = samba_config(TINY[name])
    model = small_model(torch.float32, **{k: getattr(cfg, k) for k in (
        "d_model", "vocab_size", "layers", "n_heads", "n_kv_heads", "head_dim", "window", "mlp_hidden", "d_state",
        "d_conv", "expand", "dt_rank", "norm_eps", "tie_embeddings")})
    path = to_official(model, tmp_path / "x.pth")  # the config is found from the model's
    loaded = from_official(path, out_dir=tmp_path / "converted")  # ... and read back from the file
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = samba_lm.load_pretrained(tmp_path / "converted")
    assert all(torch.equal(t, again.state_dict()[k]) for k, t in b.items())


PAIRS = {"Samba_421M": "samba-421m", "Samba_1.3B": "samba-1.3b", "LLaMA_438M": "llama2-438m",
         "LLaMA_438M_SWA": "llama2-swa-438m", "Mamba_430M": "mamba-432m"}
PARAMS = {"Samba_421M": 421_793_280, "Samba_1.3B": 1_330_207_488, "LLaMA_438M": 438_081_024,
          "LLaMA_438M_SWA": 438_081_024, "Mamba_430M": 432_804_864}  # PAPER.md (tied counted once)


@pytest.mark.parametrize("name", PAIRS)
def test_their_configs_are_our_presets(name):
    preset = samba_lm.SambaConfig.from_preset(PAIRS[name])
    assert samba_config(name) == preset and samba_config(name).name == PAIRS[name]
    assert official_config(preset)["name"] == name
    tree = official_tree(OFFICIAL_CONFIGS[name])
    count = sum(math.prod(s) for k, s in tree.items() if not (k == "lm_head.weight" and tied(OFFICIAL_CONFIGS[name])))
    with torch.device("meta"):
        model = samba_lm.SambaLM(preset)
    assert count == sum(p.numel() for p in model.parameters()) == PARAMS[name]
    written = official_state_dict(model.state_dict(), official_fields(name))
    assert {k: tuple(t.shape) for k, t in written.items()} == tree


def test_wrapped_keys_bare_state_dict_and_hparams_name(tmp_path, monkeypatch):
    c = TINY["Samba_421M_gqa2"]
    state = random_official_state(c)
    expected = from_official(write_official(tmp_path / "a.pth", state, c), c).state_dict()
    # a bare state dict of a compiled, Fabric-wrapped module, FSDP-wrapped blocks
    wrapped = {"_forward_module._orig_mod." + k.replace("h.0.", "h.0._fsdp_wrapped_module."): t
               for k, t in state.items()}
    torch.save(wrapped, tmp_path / "b.pth")
    got = from_official(tmp_path / "b.pth", c).state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    with pytest.raises(ValueError, match="does not say which config"):
        from_official(tmp_path / "b.pth")
    # their pretrain.py's hparams name the config
    monkeypatch.setitem(OFFICIAL_CONFIGS, c["name"], c)
    got = from_official(tmp_path / "a.pth").state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_errors(tmp_path):
    c = TINY["Samba_421M"]
    state = random_official_state(c)
    with pytest.raises(ValueError, match="unknown official config"):
        from_official(write_official(tmp_path / "a.pth", state), "Samba_9B")
    broken = dict(state)
    broken.pop("transformer.h.1.attn.proj.weight")
    with pytest.raises(ValueError, match=r"missing \['transformer.h.1.attn.proj.weight'\]"):
        from_official(write_official(tmp_path / "b.pth", broken), c)
    with pytest.raises(ValueError, match="wrong shape"):  # a 1.3B-style checkpoint read as 421M
        from_official(write_official(tmp_path / "c.pth", random_official_state(TINY["Samba_1.3B"])), c)
    untied = dict(state, **{"lm_head.weight": state["transformer.wte.weight"] + 1})
    with pytest.raises(ValueError, match="ties them"):
        from_official(write_official(tmp_path / "d.pth", untied), c)
    with pytest.raises(ValueError, match="nope"):
        from_official(tmp_path / "a.pth", dict(c, nope=True))
    with pytest.raises(ValueError, match="unknown lit_gpt Config fields"):
        from_official(tmp_path / "a.pth", dict(c, n_embed=64))
    model = small_model(torch.float32)  # the conftest model: its layers hold a full-attention block
    with pytest.raises(ValueError, match="does not match official config"):
        to_official(model, tmp_path / "e.pth", c)
    with pytest.raises(ValueError, match="rope_base"):
        to_official(small_model(torch.float32, rope_base=5e5), tmp_path / "f.pth")
    for field, value in (("norm", "layer"), ("rope", False), ("attention_bias", True)):
        with pytest.raises(ValueError, match=f"'{field}'"):
            to_official(small_model(torch.float32, layers=("mamba", "mlp", "swa", "mlp"), **{field: value}),
                        tmp_path / "h.pth")
    with pytest.raises(ValueError, match="cannot build layers"):
        to_official(small_model(torch.float32, layers=("mlp", "mamba")), tmp_path / "g.pth")
