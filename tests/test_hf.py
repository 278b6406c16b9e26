"""samba_lm.hf (transformers classes): logits and loss against SambaLM, generate() against samba_lm.generate
(greedy, left-padded batches, sampling, beam search with its cache reordered), save/load in transformers'
layout (sharded too), conversion both ways, and lm-eval's `hf` backend against our `samba-lm` one."""

import json
import os

# Nothing may reach the Hugging Face hub: set before transformers / datasets read them.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from conftest import small_model  # noqa: E402

import samba_lm  # noqa: E402

transformers = pytest.importorskip("transformers", minversion="5", reason="samba_lm.hf needs transformers >= 5")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from samba_lm.hf import SambaCache, SambaForCausalLM, SambaHFConfig  # noqa: E402

VOCAB = 97  # small_config's


def wrapped(dtype=torch.float64, **overrides) -> SambaForCausalLM:
    """A tiny model with every layer kind (mamba, swa with window 8, attn, mlp), wrapped."""
    return SambaForCausalLM.from_samba_lm(small_model(dtype, **overrides))


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in lengths]


def left_padded(rows):
    """transformers' form of a batch of prompts: ids [B, T_max] left-padded with 0, and its attention_mask."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    return ids, mask


# ---------------------------------------------------------------------------------- forward
@torch.no_grad()
def test_logits_equal_sambalm_with_and_without_cache():
    """fp32: one call, a cached continuation in chunks (beyond the window), logits_to_keep, tuples."""
    hf = wrapped(torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, 30))
    expected = hf.to_samba_lm()(ids).logits
    for use_cache in (False, True):
        out = hf(ids, use_cache=use_cache)
        torch.testing.assert_close(out.logits, expected, rtol=0, atol=1e-6)
        assert isinstance(out.get("cache", out.get("past_key_values")), SambaCache) == use_cache
    cache, chunks = None, []
    for t0, t1 in [(0, 5), (5, 6), (6, 19), (19, 30)]:
        out = hf(ids[:, t0:t1], past_key_values=cache, use_cache=True)
        cache = out[1]
        chunks.append(out.logits)
    torch.testing.assert_close(torch.cat(chunks, 1), expected, rtol=0, atol=1e-6)
    assert cache.get_seq_length() == 30 and len(cache) == 6
    torch.testing.assert_close(hf(ids, logits_to_keep=3).logits, expected[:, -3:], rtol=0, atol=1e-6)
    torch.testing.assert_close(hf(ids, logits_to_keep=torch.tensor([0, 7])).logits, expected[:, [0, 7]],
                               rtol=0, atol=1e-6)
    logits, returned = hf(ids, return_dict=False)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    assert isinstance(returned, SambaCache)
    assert not returned.is_croppable
    with pytest.raises(ValueError, match="cannot be cropped"):  # what assisted decoding would call
        returned.crop(10)


@torch.no_grad()
@pytest.mark.parametrize("use_cache", [False, True])
def test_left_padding_leaves_each_row_as_it_is_alone(use_cache):
    hf = wrapped().eval()
    rows = prompts([13, 4, 9])
    ids, mask = left_padded(rows)
    logits = hf(ids, attention_mask=mask, use_cache=use_cache).logits
    for i, r in enumerate(rows):
        alone = hf.to_samba_lm()(r[None]).logits[0]
        torch.testing.assert_close(logits[i, ids.shape[1] - len(r):], alone, rtol=1e-10, atol=1e-10)


def test_attention_mask_other_than_left_padding_is_refused():
    hf = wrapped().eval()
    ids = torch.randint(0, VOCAB, (2, 6))
    for mask, match in [([[1, 1, 1, 1, 0, 0], [1] * 6], "only mark left padding"),  # right padding
                        ([[0, 1, 1, 0, 1, 1], [1] * 6], "only mark left padding"),  # a hole
                        ([[1] * 5, [1] * 5], r"attention_mask must have shape \[2, 6\]"),
                        ([[2] * 6, [1] * 6], "attention_mask must hold only 0")]:
        with pytest.raises(ValueError, match=match):
            hf(ids, attention_mask=torch.tensor(mask))
    cache = hf(ids[:, :4], use_cache=True)[1]
    with pytest.raises(ValueError, match="attention_mask: the tokens that continue a cache must all be 1"):
        hf(ids[:, 4:], past_key_values=cache, attention_mask=torch.tensor([[1] * 6, [1] * 5 + [0]]))
    with pytest.raises(ValueError, match="inputs_embeds is not supported"):
        hf(inputs_embeds=torch.zeros(1, 2, 32))


def test_labels_give_sambalm_loss_shifted():
    """labels == input_ids (transformers shifts them): the mean NLL of tokens 1..T-1 from one forward; -100
    ignored; num_items_in_batch turns it into a sum over that many; the gradient flows."""
    hf = wrapped()
    ids = torch.randint(0, VOCAB, (3, 12))
    labels = ids.clone()
    labels[0, 5:8] = -100
    out = hf(ids, labels=labels)
    logits = hf.to_samba_lm()(ids).logits[:, :-1]
    expected = F.cross_entropy(logits.reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected, rtol=1e-10, atol=0)
    assert out.logits is None
    summed = hf(ids, labels=labels, num_items_in_batch=100).loss
    torch.testing.assert_close(summed, expected * (labels[:, 1:] != -100).sum() / 100, rtol=1e-10, atol=0)
    out.loss.backward()
    grad = hf.model.embedding.weight.grad.clone()
    assert grad.abs().sum() > 0
    hf.zero_grad()
    hf.train()
    # What Trainer(gradient_checkpointing=True) calls (renamed activation_checkpointing_enable in 5.x).
    (getattr(hf, "activation_checkpointing_enable", None) or hf.gradient_checkpointing_enable)()
    assert hf.model.checkpoint_layers
    hf(ids, labels=labels).loss.backward()
    torch.testing.assert_close(hf.model.embedding.weight.grad, grad, rtol=1e-10, atol=1e-12)


def test_a_left_padded_training_batch_equals_its_rows_alone():
    """Loss and gradient through the state that carries the padding (labels -100 where nothing is predicted)."""
    hf = wrapped().train()
    rows = prompts([7, 10])
    ids, mask = left_padded(rows)
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 3] = -100  # row 0's first token: the position before it is padding
    loss = hf(ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    grad = hf.model.embedding.weight.grad.clone()
    hf.zero_grad()
    expected = sum(hf(r[None], labels=r[None]).loss * (len(r) - 1) for r in rows) / (6 + 9)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(hf.model.embedding.weight.grad, grad, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------- generation
def test_greedy_generate_equals_samba_lm_generate():
    """A batch, then a left-padded batch of prompts of lengths 1..20 (beyond the window); after the prompt
    each forward gets one new token."""
    hf = wrapped().eval()
    ids = torch.randint(1, VOCAB, (2, 7))
    ref = samba_lm.generate(hf.model, ids, max_new_tokens=12, temperature=0.0)
    assert torch.equal(hf.generate(ids, max_new_tokens=12, do_sample=False), ref)

    rows = prompts([20, 1, 9, 13])
    ids, mask = left_padded(rows)
    widths = []
    hook = hf.model.register_forward_hook(lambda module, args, out: widths.append(args[0].shape[1]))
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    hook.remove()
    assert widths == [20] + [1] * 9
    for row, expected in zip(out, samba_lm.generate(hf.model, rows, max_new_tokens=10, temperature=0.0)):
        assert row[-10:].tolist() == expected[-10:].tolist()


def test_sampling_runs_and_follows_the_seed():
    hf = wrapped().eval()
    ids, mask = left_padded(prompts([5, 8]))
    draws = []
    for _ in range(2):
        torch.manual_seed(7)
        draws.append(hf.generate(ids, attention_mask=mask, max_new_tokens=15, do_sample=True, top_k=20,
                                 temperature=1.5, pad_token_id=0))
    assert draws[0].shape == (2, 8 + 15) and torch.equal(draws[0], draws[1])
    new = draws[0][:, 8:]
    assert ((new >= 0) & (new < VOCAB)).all()
    assert not torch.equal(new, hf.generate(ids, attention_mask=mask, max_new_tokens=15, do_sample=False,
                                            pad_token_id=0)[:, 8:])


def test_beam_search_reorders_the_cache():
    """Beam search through the cache equals beam search that recomputes every step without one
    (use_cache=False); it does reorder rows, and without the reordering it would not match."""
    hf = wrapped().eval()
    ids, mask = left_padded(prompts([6, 11]))
    kwargs = dict(attention_mask=mask, max_new_tokens=8, num_beams=3, num_return_sequences=3, do_sample=False,
                  pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    reference = hf.generate(ids, use_cache=False, **kwargs)
    orders = []
    real = SambaCache.reorder_cache

    def recording(cache, beam_idx):
        orders.append(beam_idx.clone())
        real(cache, beam_idx)

    SambaCache.reorder_cache = recording
    try:
        cached = hf.generate(ids, **kwargs)
        SambaCache.reorder_cache = lambda cache, beam_idx: None
        unordered = hf.generate(ids, **kwargs).sequences
    finally:
        SambaCache.reorder_cache = real
    assert torch.equal(cached.sequences, reference.sequences)
    torch.testing.assert_close(cached.sequences_scores, reference.sequences_scores)
    assert any(not torch.equal(o, torch.arange(6)) for o in orders)
    assert not torch.equal(unordered, reference.sequences)


# ---------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("tie", [True, False])
def test_save_pretrained_round_trip(tmp_path, tie):
    hf = wrapped(tie_embeddings=tie).eval()
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "samba_lm" and config["tie_word_embeddings"] == tie
    assert config["layers"] == ["mamba", "mlp", "swa", "mlp", "attn", "mlp"]
    stored = load_file(tmp_path / "model.safetensors")
    assert set(stored) == set(hf.state_dict()) and ("model.lm_head.weight" in stored) == (not tie)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), SambaHFConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is SambaForCausalLM and loaded.to_samba_lm().config == hf.to_samba_lm().config
    for name, tensor in hf.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor) and loaded.state_dict()[name].dtype == tensor.dtype
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, hf(ids).logits)


def test_sharded_save_round_trip(tmp_path):
    hf = wrapped().eval()
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / s).is_file() for s in shards)
    assert not (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, tensor in hf.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)


def test_conversion_shares_weights_and_round_trips_through_samba_lm_checkpoints(tmp_path):
    model = small_model(torch.float32)
    hf = SambaForCausalLM.from_samba_lm(model)
    assert hf.to_samba_lm() is model
    assert hf.get_input_embeddings().weight.data_ptr() == model.embedding.weight.data_ptr()
    samba_lm.save_pretrained(model, tmp_path / "samba")  # samba-lm's own layout
    SambaForCausalLM.from_samba_lm(samba_lm.load_pretrained(tmp_path / "samba")).save_pretrained(tmp_path / "hf")
    back = SambaForCausalLM.from_pretrained(tmp_path / "hf").to_samba_lm()
    assert back.config == model.config
    assert all(torch.equal(back.state_dict()[n], t) for n, t in model.state_dict().items())


def test_a_tensor_missing_from_the_checkpoint_gets_sambalm_init(tmp_path):
    """The loaded tensors stay bit-exact; the missing one follows SambaLM.init_weights (A_log = log(1..N))."""
    hf = wrapped(torch.float32)
    hf.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.0.mixer.A_log"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = SambaForCausalLM.from_pretrained(tmp_path)
    A_log = loaded.model.layers[0].mixer.A_log
    torch.testing.assert_close(A_log, torch.log(torch.arange(1.0, 5.0)).expand_as(A_log))
    assert all(torch.equal(loaded.state_dict()[n], t) for n, t in tensors.items())


def test_config_is_checked_by_samba_config():
    with pytest.raises(ValueError, match="SambaConfig.window=1"):
        SambaHFConfig(window=1)
    with pytest.raises(ValueError, match="tie_word_embeddings=False contradicts tie_embeddings=True"):
        SambaHFConfig(tie_word_embeddings=False)
    config = SambaHFConfig.from_samba_config(samba_lm.SambaConfig.from_preset("tiny"), eos_token_id=0)
    assert config.samba_config == samba_lm.SambaConfig.from_preset("tiny") and config.hidden_size == 256
    assert config.eos_token_id == 0


# ---------------------------------------------------------------------------------- lm-eval
def test_lm_eval_hf_backend_agrees_with_the_samba_lm_backend(tmp_path, monkeypatch):
    """The bundled local tasks through lm-eval's `hf` backend (AutoModelForCausalLM + AutoTokenizer from
    the saved directory) and through ours on the same weights: the same per-request log-likelihoods and
    metrics (float32), and the same greedy generate_until texts."""
    lm_eval = pytest.importorskip("lm_eval", reason="needs lm-eval: pip install 'samba-lm[eval]'")
    pytest.importorskip("accelerate", reason="lm-eval's hf backend needs accelerate: pip install 'lm-eval[hf]'")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import PreTrainedTokenizerFast

    from samba_lm.data import EOS, train_tokenizer
    from samba_lm.eval.harness import TASKS_DIR, SambaHarnessLM

    monkeypatch.chdir(tmp_path)  # lm-eval asks git for a hash of the working directory
    text = " ".join(f"line {i} of a long story about the number {i * 7 % 13}." for i in range(300))
    tokenizer = train_tokenizer([text], 300)
    wrapped(torch.float32, vocab_size=tokenizer.get_vocab_size()).save_pretrained(tmp_path / "model")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS).save_pretrained(tmp_path / "model")

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    run = dict(tasks=["samba_tiny_mc", "samba_tiny_ppl"], task_manager=manager, limit=6, log_samples=True)
    # By name, as a user would: samba_lm.eval.harness (imported above) must leave lm-eval's own backends found.
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'model'},backend=causal,"
                                     "dtype=float32", device="cpu", batch_size=4, **run)
    assert theirs["config"]["model"] == "hf"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model").to_samba_lm()
    ours_lm = SambaHarnessLM(model=model, tokenizer=str(tmp_path / "model/tokenizer.json"), device="cpu", batch_size=4)
    ours = lm_eval.simple_evaluate(model=ours_lm, **run)
    for task in run["tasks"]:
        a, b = theirs["samples"][task], ours["samples"][task]
        assert len(a) == len(b) == (6 if task == "samba_tiny_mc" else 5)
        for x, y in zip(sorted(a, key=lambda s: s["doc_id"]), sorted(b, key=lambda s: s["doc_id"])):
            got, expected = torch.tensor(x["filtered_resps"], dtype=torch.float64), torch.tensor(
                y["filtered_resps"], dtype=torch.float64)
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        for metric, value in ours["results"][task].items():
            if isinstance(value, float):
                assert theirs["results"][task][metric] == pytest.approx(value, rel=1e-6), metric
    # generate_until: lm-eval left-pads the batch for model.generate
    requests = [Instance("generate_until", {}, (p, {"until": ["story"], "max_gen_toks": 12, "do_sample": False}), i)
                for i, p in enumerate(["line 3 of a", "the number 7 is"])]
    hf_lm = HFLM(pretrained=str(tmp_path / "model"), backend="causal", device="cpu", dtype="float32", batch_size=4)
    assert type(hf_lm.model) is SambaForCausalLM
    assert hf_lm.generate_until(requests, disable_tqdm=True) == ours_lm.generate_until(requests, disable_tqdm=True)
