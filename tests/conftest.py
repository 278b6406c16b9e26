import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run (slowly) on the CPU through Triton's interpreter; it must be chosen before
    # the kernels are defined, i.e. before samba_lm is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import samba_lm  # noqa: E402


def small_config(**overrides) -> samba_lm.SambaConfig:
    """Every sub-layer kind, GQA, a window of 8: small enough for float64 token-by-token checks."""
    base = dict(d_model=32, vocab_size=97, layers=("mamba", "mlp", "swa", "mlp", "attn", "mlp"),
                n_heads=4, n_kv_heads=2, head_dim=8, window=8, mlp_hidden=48, d_state=4)
    base.update(overrides)
    return samba_lm.SambaConfig(**base)


def save_small_model(tokenizer, path):
    """A tiny random model for `tokenizer`, saved with it, as `samba-lm train` leaves one."""
    torch.manual_seed(0)
    samba_lm.save_pretrained(samba_lm.SambaLM(small_config(vocab_size=tokenizer.get_vocab_size())), path)
    tokenizer.save(str(path / "tokenizer.json"))
    return path


def small_model(dtype=torch.float64, seed=0, **overrides) -> samba_lm.SambaLM:
    torch.manual_seed(seed)
    model = samba_lm.SambaLM(small_config(**overrides)).to(dtype)
    # Random norms and D so that every parameter matters in the comparisons.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight") or name.endswith(".D"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def assert_stream_invariants(model, ids, chunkings, rtol=1e-9):
    """The state invariant and batch invariance: the full forward of `ids` equals each chunking's
    stream (a list of cut points; range(T + 1) is token by token), and each row equals itself alone."""
    with torch.no_grad():
        full = model(ids).logits
        for cuts in chunkings:
            state = model.init_state(ids.shape[0])
            chunked = torch.cat([model(ids[:, a:b], state=state).logits for a, b in zip(cuts, cuts[1:])], 1)
            torch.testing.assert_close(chunked, full, rtol=rtol, atol=rtol)
        for row in range(ids.shape[0]):
            torch.testing.assert_close(model(ids[row:row + 1]).logits, full[row:row + 1], rtol=rtol, atol=rtol)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
