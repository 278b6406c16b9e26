"""The decode engine: the step it captures, its reads of the device, its reuse, the prefill and the
positions it owns. The CUDA-graph tests run on GPUs only; on CPUs the engine runs its step eagerly."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import samba_lm
from samba_lm import DecodeEngine, generate, generate_stream, prefill
from samba_lm.config import sambay_layers

from conftest import small_config, small_model

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")


class NoHostReads(TorchDispatchMode):
    """Fails on every op that makes the host wait for a tensor's value (.item(), bool(), nonzero, ...)."""

    READS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal", "allclose", "unique",
             "_unique2", "masked_select", "repeat_interleave"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.READS:
            raise AssertionError(f"the decode step reads the device: {func}")
        return func(*args, **(kwargs or {}))


def test_the_step_never_reads_the_device(monkeypatch):
    """Every layer kind, sampling with top-k and top-p and stop tokens: no op waits for a value. On a
    CPU the model checks token ids on the host; the GPU's check is a device-side assertion, used here."""
    monkeypatch.setattr("samba_lm.model.check_token_ids", lambda ids, vocab: torch._assert_async(
        ((ids >= 0) & (ids < vocab)).all(), "token ids"))
    model = small_model(torch.float64)
    engine = DecodeEngine(model, 3, capacity=40)
    stream = engine.generate_stream([[1, 2, 3], [4], [5, 6]], max_new_tokens=20, temperature=0.9, top_k=5,
                                    top_p=0.9, seed=1, stop_tokens=[7])
    next(stream)  # prefill and the first token
    with NoHostReads():
        for _ in range(4):
            engine._step()


def test_sync_every_does_not_change_the_tokens():
    model = small_model(torch.float64)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    greedy = generate(model, prompts, max_new_tokens=15)
    stop = int(greedy[0][7])
    runs = [generate(model, prompts, max_new_tokens=15, temperature=0.8, seed=3, stop_tokens=[stop], sync_every=n)
            for n in (1, 4, 16)]
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))
    assert any(int(t) == stop for t in runs[0][0][5:])  # the stop token came inside a block


def test_a_sampled_row_is_its_prompt_alone_with_its_seed():
    """Batch invariance for sampling too: the draws depend on each row's seed and positions only."""
    model = small_model(torch.float64)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (4, 11, 1)]
    seeds = [5, 17, 99]
    batched = generate(model, prompts, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=seeds)
    for prompt, seed, row in zip(prompts, seeds, batched):
        alone = generate(model, [prompt], max_new_tokens=10, temperature=1.0, top_p=0.9, seed=[seed])[0]
        assert torch.equal(row, alone)
    again = generate(model, prompts, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=seeds)
    assert all(torch.equal(a, b) for a, b in zip(batched, again))


def test_an_engine_generates_many_times_from_a_fresh_state():
    model = small_model(torch.float64)
    engine = DecodeEngine(model, 2, capacity=64)
    first = [torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, 20))]
    for prompt in first + first[:1]:
        out = torch.stack(list(engine.generate_stream(prompt, max_new_tokens=12, temperature=0.7, seed=2)), 1)
        assert torch.equal(out, generate(model, prompt, max_new_tokens=12, temperature=0.7, seed=2)[:, -12:])


def test_full_attention_gets_its_capacity_up_front():
    model = small_model(torch.float64)
    engine = DecodeEngine(model, 1, capacity=20)
    addresses = [t.data_ptr() for t in engine.state.tensors()]
    list(engine.generate_stream(torch.randint(0, 97, (1, 8)), max_new_tokens=12))
    assert [t.data_ptr() for t in engine.state.tensors()] == addresses  # nothing grew or moved
    with pytest.raises(ValueError, match="capacity"):
        list(engine.generate_stream(torch.randint(0, 97, (1, 9)), max_new_tokens=12))
    with pytest.raises(ValueError, match="rows"):
        engine.generate_stream(torch.randint(0, 97, (2, 3)), max_new_tokens=2)


@pytest.mark.parametrize("chunk", [1, 4, 7, None])
def test_prefill_equals_the_full_forward(chunk):
    model = small_model(torch.float64)
    ids = torch.randint(0, 97, (2, 19))
    with torch.no_grad():
        full = model(ids).logits[:, -1]
    state = model.init_state(2)
    torch.testing.assert_close(prefill(model, ids, state, chunk), full, rtol=1e-10, atol=1e-10)
    assert state.pos.tolist() == [19, 19]


def test_start_positions_and_reset():
    model = small_model(torch.float64)
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        alone = model(ids[1:, 3:]).logits
        state = model.init_state(2, start=[0, -3])  # row 1: three tokens of left padding
        padded = model(ids, state=state).logits
        torch.testing.assert_close(padded[1:, 3:], alone, rtol=1e-10, atol=1e-10)
        assert state.pos.tolist() == [12, 9]
        state.reset(start=[0, 0])
        torch.testing.assert_close(model(ids, state=state).logits, model(ids).logits, rtol=1e-10, atol=1e-10)
    for bad in ([0], [0.5, 1.0], torch.zeros(2, 1)):
        with pytest.raises(ValueError, match="start"):
            model.init_state(2, start=bad)
    with pytest.raises(ValueError, match="capacity"):
        model.init_state(2, capacity=0)


def test_engine_arguments():
    model = small_model()
    with pytest.raises(ValueError, match="sync_every"):
        DecodeEngine(model, 1, sync_every=0)
    with pytest.raises(ValueError, match="batch_size"):
        DecodeEngine(model, 0)
    with pytest.raises(ValueError, match="stop_tokens"):
        DecodeEngine(model, 1, capacity=80).generate_stream([[1]], stop_tokens=[1000])
    with pytest.raises(ValueError, match="seed"):
        generate(model, [[1], [2]], seed=[1])
    if not CUDA:
        with pytest.raises(ValueError, match="cuda_graph"):
            DecodeEngine(model, 1, cuda_graph=True)


def test_the_cli_generates_through_the_engine(tmp_path, monkeypatch, capsys):
    from samba_lm import cli
    from samba_lm.data.tokenizer import train_tokenizer

    from conftest import save_small_model

    save_small_model(train_tokenizer(["abc def ghi " * 20], 280), tmp_path)
    calls = []
    real = DecodeEngine.decode
    monkeypatch.setattr(DecodeEngine, "decode", lambda self, *a: calls.append(self.sync_every) or real(self, *a))
    cli.main(["generate", "--model", str(tmp_path), "--prompt", "abc", "--max-new-tokens", "5",
                       "--device", "cpu", "--sync-every", "2"])
    assert calls == [2] and capsys.readouterr().out.startswith("abc")


# ------------------------------------------------------------------ CUDA graphs (GPU only)
SAMBA_LAYERS = ("mamba", "mlp", "swa", "mlp", "attn", "mlp")
SAMBAY = dict(layers=sambay_layers(8), norm="layer", attention_bias=True, rope=False)  # every SambaY kind


def _gpu_model(layers, **variant):
    torch.manual_seed(0)
    cfg = small_config(layers=layers, head_dim=16, d_model=64, n_heads=4, n_kv_heads=2, window=16, **variant)
    return samba_lm.SambaLM(cfg).cuda().to(torch.bfloat16).eval()


@gpu
@pytest.mark.parametrize("variant", [dict(layers=SAMBA_LAYERS), SAMBAY], ids=["samba", "sambay"])
@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.8, seed=4), dict(temperature=1.0, top_k=20,
                                                                                   top_p=0.9, seed=[1, 2, 3])])
def test_the_graph_gives_the_eager_tokens(sampling, variant):
    model = _gpu_model(**variant)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (5, 40, 17)]
    graph = generate(model, prompts, max_new_tokens=50, cuda_graph=True, **sampling)
    eager = generate(model, prompts, max_new_tokens=50, cuda_graph=False, **sampling)
    assert all(torch.equal(a, b) for a, b in zip(graph, eager))


@gpu
@pytest.mark.parametrize("variant", [dict(layers=SAMBA_LAYERS), SAMBAY], ids=["samba", "sambay"])
def test_replays_allocate_nothing_and_never_wait(variant):
    model = _gpu_model(**variant)
    engine = DecodeEngine(model, 4, capacity=128)
    stream = engine.generate_stream(torch.randint(0, 97, (4, 10), device="cuda"), max_new_tokens=100, temperature=0.5,
                                    seed=0)
    for _ in range(20):  # past the capture
        next(stream)
    assert engine._graphs
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():
            for _ in range(10):
                engine._advance()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
