"""Phi-4-mini-flash (SambaY) from its Hugging Face layout: a small random checkpoint written with
their tensor names (../shared/SAMBAY.md) loads through `load_pretrained`, and its float64 forward,
written here from SAMBAY.md's equations on their tensors (not from our layers), equals our model's.
Every tensor is accounted for: unknown, missing and misshapen ones are errors that name them."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import samba_lm
from samba_lm import cli

from conftest import assert_stream_invariants

BLOCKS, D, H, HKV, DH, INTER, VOCAB, WINDOW, N_STATE, K_CONV = 8, 32, 4, 2, 8, 48, 97, 6, 4, 4
E, R = 2 * D, math.ceil(D / 16)
CONFIG = {"architectures": ["Phi4FlashForCausalLM"], "model_type": "phi4flash", "hidden_size": D,
          "intermediate_size": INTER, "num_hidden_layers": BLOCKS, "num_attention_heads": H,
          "num_key_value_heads": HKV, "sliding_window": WINDOW, "layer_norm_eps": 1e-5, "mb_per_layer": 2,
          "mamba_d_state": N_STATE, "mamba_d_conv": K_CONV, "mamba_expand": 2, "tie_word_embeddings": True,
          "vocab_size": VOCAB, "hidden_act": "silu", "mlp_bias": False, "lm_head_bias": False}


def kind(block: int) -> str:
    """SAMBAY.md's schedule: Mamba and SWA below L/2, the memory Mamba at L/2, the global layer at
    L/2 + 1, then GMU and cross layers."""
    half = BLOCKS // 2
    if block < half:
        return "mamba" if block % 2 == 0 else "swa"
    return {half: "memory", half + 1: "global"}.get(block, "gmu" if block % 2 == 0 else "cross")


def hf_tensors(seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, scale=0.3: (torch.randn(*shape, generator=g) * scale)  # noqa: E731
    t = {"model.embed_tokens.weight": r(VOCAB, D, scale=1.0), "model.final_layernorm.weight": 1 + r(D),
         "model.final_layernorm.bias": r(D)}
    for n in range(BLOCKS):
        p = f"model.layers.{n}."
        for ln in ("input_layernorm", "post_attention_layernorm"):
            t[p + ln + ".weight"], t[p + ln + ".bias"] = 1 + r(D), r(D)
        t[p + "mlp.fc1.weight"], t[p + "mlp.fc2.weight"] = r(2 * INTER, D), r(D, INTER)
        k = kind(n)
        if k in ("mamba", "memory"):
            t.update({p + "attn.in_proj.weight": r(2 * E, D), p + "attn.conv1d.weight": r(E, 1, K_CONV),
                      p + "attn.conv1d.bias": r(E), p + "attn.x_proj.weight": r(R + 2 * N_STATE, E),
                      p + "attn.dt_proj.weight": r(E, R), p + "attn.dt_proj.bias": r(E) - 2,
                      p + "attn.A_log": torch.log(torch.arange(1, N_STATE + 1.0)).repeat(E, 1) + r(E, N_STATE),
                      p + "attn.D": 1 + r(E), p + "attn.out_proj.weight": r(D, E)})
        elif k == "gmu":
            t.update({p + "attn.in_proj.weight": r(E, D), p + "attn.out_proj.weight": r(D, E)})
        else:
            width = H * DH if k == "cross" else (H + 2 * HKV) * DH
            t.update({p + "attn.Wqkv.weight": r(width, D), p + "attn.Wqkv.bias": r(width),
                      p + "attn.out_proj.weight": r(D, H * DH), p + "attn.out_proj.bias": r(D),
                      p + "attn.inner_cross_attn.subln.weight": 1 + r(2 * DH)})
            for lam in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                t[p + "attn.inner_cross_attn." + lam] = r(DH)
    return t


def write_checkpoint(path, tensors, config=CONFIG):
    """Two shards and their index, as the released checkpoint comes."""
    path.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: tensors[n].contiguous() for n in part}, str(path / file))
    weight_map = {n: f for f, part in shards.items() for n in part}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config))
    return path


# ------------------------------------------------------------------ SAMBAY.md's forward, in float64
def layer_norm(x, w, b):
    return F.layer_norm(x, x.shape[-1:], w, b, 1e-5)


def mamba(t, p, x):
    """Mamba-1: returns (the gated output projected, the pre-gate y = C.h + D x)."""
    xz = x @ t[p + "in_proj.weight"].T
    u, z = xz.chunk(2, -1)
    T = u.shape[1]
    padded = F.pad(u.transpose(1, 2), (K_CONV - 1, 0))
    u = F.silu(F.conv1d(padded, t[p + "conv1d.weight"], t[p + "conv1d.bias"], groups=E).transpose(1, 2))
    dt, B, C = (u @ t[p + "x_proj.weight"].T).split([R, N_STATE, N_STATE], -1)
    dt = F.softplus(dt @ t[p + "dt_proj.weight"].T + t[p + "dt_proj.bias"])
    A = -torch.exp(t[p + "A_log"])
    h, ys = torch.zeros(u.shape[0], E, N_STATE, dtype=u.dtype), []
    for s in range(T):
        h = torch.exp(dt[:, s, :, None] * A) * h + dt[:, s, :, None] * B[:, s, None, :] * u[:, s, :, None]
        ys.append((h * C[:, s, None, :]).sum(-1) + t[p + "D"] * u[:, s])
    y = torch.stack(ys, 1)
    return (y * F.silu(z)) @ t[p + "out_proj.weight"].T, y


def softmax_attention(q, k, v, window):
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    dist = torch.arange(q.shape[1])[:, None] - torch.arange(q.shape[1])[None]
    visible = (dist >= 0) & ((dist < window) if window else True)
    return torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(~visible, float("-inf")).softmax(-1), v)


def differential(t, p, q, k, v, window, block):
    q1, q2, k1, k2, v1, v2 = q[:, :, 0::2], q[:, :, 1::2], k[:, :, 0::2], k[:, :, 1::2], v[:, :, 0::2], v[:, :, 1::2]
    a1 = torch.cat([softmax_attention(q1, k1, v1, window), softmax_attention(q1, k1, v2, window)], -1)
    a2 = torch.cat([softmax_attention(q2, k2, v1, window), softmax_attention(q2, k2, v2, window)], -1)
    c = p + "inner_cross_attn."
    init = 0.8 - 0.6 * math.exp(-0.3 * block)
    lam = torch.exp((t[c + "lambda_q1"] * t[c + "lambda_k1"]).sum()) - torch.exp(
        (t[c + "lambda_q2"] * t[c + "lambda_k2"]).sum()) + init
    d = a1 - lam * a2
    out = d / torch.sqrt(d.pow(2).mean(-1, keepdim=True) + 1e-5) * t[c + "subln.weight"] * (1 - init)
    return out.reshape(*q.shape[:2], H * DH) @ t[p + "out_proj.weight"].T + t[p + "out_proj.bias"]


def reference_logits(t, ids):
    heads = lambda x: x.unflatten(-1, (-1, DH))  # noqa: E731
    h = t["model.embed_tokens.weight"][ids]
    memory = kv = None
    for n in range(BLOCKS):
        p, k = f"model.layers.{n}.", kind(n)
        x = layer_norm(h, t[p + "input_layernorm.weight"], t[p + "input_layernorm.bias"])
        a = p + "attn."
        if k in ("mamba", "memory"):
            out, y = mamba(t, a, x)
            memory = y if k == "memory" else memory
        elif k == "gmu":
            out = (memory * F.silu(x @ t[a + "in_proj.weight"].T)) @ t[a + "out_proj.weight"].T
        elif k == "cross":
            out = differential(t, a, heads(x @ t[a + "Wqkv.weight"].T + t[a + "Wqkv.bias"]), *kv, 0, n)
        else:
            qkv = x @ t[a + "Wqkv.weight"].T + t[a + "Wqkv.bias"]
            q, kk, v = (heads(z) for z in qkv.split([H * DH, HKV * DH, HKV * DH], -1))
            kv = (kk, v) if k == "global" else kv
            out = differential(t, a, q, kk, v, WINDOW if k == "swa" else 0, n)
        h = h + out
        x = layer_norm(h, t[p + "post_attention_layernorm.weight"], t[p + "post_attention_layernorm.bias"])
        gate, up = (x @ t[p + "mlp.fc1.weight"].T).chunk(2, -1)
        h = h + (up * F.silu(gate)) @ t[p + "mlp.fc2.weight"].T
    h = layer_norm(h, t["model.final_layernorm.weight"], t["model.final_layernorm.bias"])
    return h @ t["model.embed_tokens.weight"].T


# ------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tensors = {n: v.double() for n, v in hf_tensors().items()}
    return write_checkpoint(tmp_path_factory.mktemp("phi4flash"), tensors), tensors


def test_the_loaded_model_is_the_equations(checkpoint):
    path, tensors = checkpoint
    model = samba_lm.load_pretrained(path).eval()
    assert model.config.layers == samba_lm.SambaConfig.from_preset("sambay-tiny").layers
    ids = torch.randint(0, VOCAB, (2, 14))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference_logits(tensors, ids), rtol=1e-9, atol=1e-9)
    assert_stream_invariants(model, ids, ([0, 5, 14], range(15)))


def test_the_release_config_is_the_preset():
    release = {**CONFIG, "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 32,
               "num_attention_heads": 40, "num_key_value_heads": 20, "sliding_window": 512, "vocab_size": 200064}
    del release["mamba_d_state"], release["mamba_d_conv"]
    from samba_lm.convert.phi4flash import phi4flash_config

    ours, preset = phi4flash_config(release).to_dict(), samba_lm.SambaConfig.from_preset("phi4-mini-flash").to_dict()
    assert {k: v for k, v in ours.items() if k != "name"} == {k: v for k, v in preset.items() if k != "name"}


@pytest.mark.parametrize("change, message", [
    (lambda t: t.update({"model.layers.3.attn.extra.weight": torch.zeros(2)}),
     "tensor model.layers.3.attn.extra.weight maps to layers.6.mixer.extra.weight, which this config does not have"),
    (lambda t: t.update({"model.rotary_emb.inv_freq": torch.zeros(2)}), "tensor model.rotary_emb.inv_freq"),
    (lambda t: t.pop("model.layers.5.attn.inner_cross_attn.lambda_q2"), "no tensor for our layers.10.mixer.lambda_q2"),
    (lambda t: t.update({"model.layers.0.attn.D": torch.zeros(3)}), "tensor model.layers.0.attn.D has shape \\(3,\\)"),
    (lambda t: t.update({"lm_head.weight": torch.zeros(VOCAB, D)}), "lm_head.weight differs"),
])
def test_every_tensor_is_accounted_for(tmp_path, change, message):
    tensors = hf_tensors()
    change(tensors)
    with pytest.raises(ValueError, match=message):
        samba_lm.load_pretrained(write_checkpoint(tmp_path, tensors))


def test_a_config_we_cannot_express_is_refused(tmp_path):
    with pytest.raises(ValueError, match="mamba_proj_bias=True"):
        samba_lm.load_pretrained(write_checkpoint(tmp_path, hf_tensors(), {**CONFIG, "mamba_proj_bias": True}))


def test_convert_from_phi4flash(checkpoint, tmp_path):
    path, _ = checkpoint
    assert cli.main(["convert", "--from", "phi4flash", str(path), "--out", str(tmp_path / "ours")]) in (0, None)
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        a, b = samba_lm.load_pretrained(path)(ids).logits, samba_lm.load_pretrained(tmp_path / "ours")(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _with_tokenizer_files(path, eos_ids):
    """A word-level tokenizer.json within the vocabulary, a chat template and generation_config.json's
    end-of-turn ids beside the checkpoint, as the release ships them."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<|endoftext|>", "<|end|>"] + [f"w{i}" for i in range(VOCAB - 2)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}"}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_ids}))
    return tokenizer


def test_generate_on_the_checkpoint_directory_stops_at_its_end_of_turn(checkpoint, tmp_path, capsys):
    """`samba-lm generate` on the downloaded directory, and on its conversion (which takes the tokenizer
    files along): greedy text that stops at generation_config.json's end-of-turn token."""
    source, tensors = checkpoint
    path = write_checkpoint(tmp_path / "hf", tensors)
    prompt = [5, 9, 11]
    new = samba_lm.generate(samba_lm.load_pretrained(path), [prompt], max_new_tokens=12)[0][3:].tolist()
    stop_at = next(i for i, t in enumerate(new) if t not in new[:i] and i >= 2)  # a first occurrence
    tokenizer = _with_tokenizer_files(path, [0, new[stop_at]])
    assert cli.main(["convert", "--from", "phi4flash", str(path), "--out", str(tmp_path / "ours")]) in (0, None)
    capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "ours").iterdir() if "token" in p.name or "generation" in p.name) == [
        "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    text = tokenizer.decode(prompt)
    for model in (path, tmp_path / "ours"):
        cli.main(["generate", "--model", str(model), "--prompt", text, "--max-new-tokens", "12", "--device", "cpu"])
        assert capsys.readouterr().out == text + tokenizer.decode(new[:stop_at + 1]) + "\n"
