"""Generation: teacher forcing, ragged batches, sampling, stop tokens, streaming."""

import pytest
import torch

import samba_lm
from samba_lm import generate, generate_stream, sample_next

from conftest import small_model


def test_greedy_equals_teacher_forced_argmax():
    model = small_model(torch.float64)
    prompt = torch.randint(0, 97, (2, 13))
    out = generate(model, prompt, max_new_tokens=20)
    assert out.shape == (2, 33) and torch.equal(out[:, :13], prompt)
    with torch.no_grad():
        logits = model(out).logits
    assert torch.equal(logits[:, 12:-1].argmax(-1), out[:, 13:])


def test_prefill_chunk_size_does_not_matter():
    model = small_model(torch.float64)
    prompt = torch.randint(0, 97, (2, 30))
    a = generate(model, prompt, max_new_tokens=10, prefill_chunk=1024)
    b = generate(model, prompt, max_new_tokens=10, prefill_chunk=3)
    assert torch.equal(a, b)


def test_ragged_batch_equals_each_prompt_alone():
    """Left padding never leaks into the Mamba, ring-buffer or growing-cache state."""
    model = small_model(torch.float64)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (3, 17, 9, 1)]
    batched = generate(model, prompts, max_new_tokens=12, prefill_chunk=5)
    for prompt, row in zip(prompts, batched):
        alone = generate(model, torch.tensor([prompt]), max_new_tokens=12)[0]
        assert torch.equal(row, alone)


def test_ragged_batch_logits_match_alone():
    model = small_model(torch.float64)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (2, 11)]
    batched = list(generate_stream(model, prompts, max_new_tokens=4, temperature=0.0))
    for i, prompt in enumerate(prompts):
        alone = list(generate_stream(model, [prompt], max_new_tokens=4))
        assert [int(t[i]) for t in batched] == [int(t[0]) for t in alone]


def test_sampling_is_seeded():
    model = small_model(torch.float64)
    prompt = torch.randint(0, 97, (3, 5))
    a = generate(model, prompt, max_new_tokens=15, temperature=1.0, seed=7)
    b = generate(model, prompt, max_new_tokens=15, temperature=1.0, seed=7)
    c = generate(model, prompt, max_new_tokens=15, temperature=1.0, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = generate(model, prompt, max_new_tokens=15)
    assert torch.equal(generate(model, prompt, max_new_tokens=15, temperature=0.7, top_k=1, seed=1), greedy)
    assert torch.equal(generate(model, prompt, max_new_tokens=15, temperature=0.7, top_p=1e-6, seed=1), greedy)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)
    top_k = sample_next(logits, 1.0, top_k=2, seed=0)  # 4000 rows, each its own draws
    assert set(top_k.tolist()) == {0, 1}
    top_p = sample_next(logits, 1.0, top_p=0.7, seed=1)  # 0.5 + 0.3 reaches 0.7
    assert set(top_p.tolist()) == {0, 1}
    assert abs((top_p == 0).float().mean().item() - 0.5 / 0.8) < 0.03
    free = sample_next(logits, 1.0, seed=2)
    assert abs((free == 3).float().mean().item() - 0.05) < 0.015
    assert abs((free == 0).float().mean().item() - 0.5) < 0.03


def test_stop_tokens():
    model = small_model(torch.float64)
    prompt = torch.randint(0, 97, (1, 6))
    greedy = generate(model, prompt, max_new_tokens=12)[0, 6:].tolist()
    stop = greedy[4]
    first = greedy.index(stop)
    out = generate(model, prompt, max_new_tokens=12, stop_tokens=[stop])
    assert out.shape[1] == 6 + first + 1 and out[0, -1] == stop
    listed = generate(model, [prompt[0].tolist()], max_new_tokens=12, stop_tokens=[stop])[0]
    assert listed.tolist() == prompt[0].tolist() + greedy[:first + 1]


def test_stop_tokens_in_a_batch_repeat_until_all_stop():
    model = small_model(torch.float64)
    prompt = torch.randint(0, 97, (2, 6))
    greedy = generate(model, prompt, max_new_tokens=10)
    stop = int(greedy[0, 7])  # row 0 stops at its second new token
    out = generate(model, prompt, max_new_tokens=10, stop_tokens=[stop])
    row0 = out[0, 6:].tolist()
    k = row0.index(stop)
    assert all(t == stop for t in row0[k:])


def test_stream_yields_what_generate_returns():
    model = small_model(torch.float64)
    prompt = torch.randint(0, 97, (2, 4))
    steps = list(generate_stream(model, prompt, max_new_tokens=6))
    assert len(steps) == 6 and all(s.shape == (2,) for s in steps)
    assert torch.equal(torch.stack(steps, 1), generate(model, prompt, max_new_tokens=6)[:, 4:])


def test_zero_new_tokens_returns_the_prompt():
    model = small_model(torch.float64)
    prompt = torch.randint(0, 97, (2, 4))
    assert torch.equal(generate(model, prompt, max_new_tokens=0), prompt)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(temperature=-0.1), "temperature"),
    (dict(top_k=0), "top_k"), (dict(top_p=1.5), "top_p"), (dict(prefill_chunk=0), "prefill_chunk"),
])
def test_bad_generation_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(small_model(), torch.zeros(1, 3, dtype=torch.long), **kwargs)


def test_bad_prompts():
    model = small_model()
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []])
    with pytest.raises(ValueError, match="vocab_size"):
        generate(model, [[1, 200]])
