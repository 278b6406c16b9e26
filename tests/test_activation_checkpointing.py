"""Activation checkpointing per sub-layer (`SambaLM.checkpoint_layers`, `--activation-checkpointing`)
and of the Mamba mixers alone (`Mamba.recompute`, `--recompute-mamba`): the same loss and gradients,
fewer tensors kept for the backward, still traceable by torch.compile."""

import pytest
import torch
import torch.nn.functional as F

from samba_lm import ops
from samba_lm.cli import build_parser
from samba_lm.cli import main as cli
from samba_lm.layers import Mamba
from samba_lm.train.config import config_from_args

from conftest import small_model


def loss_grads_and_saved(checkpoint: bool, compile_backend: str | None = None):
    """(loss, {name: grad}, bytes of the distinct storages saved for the backward) of one training step."""
    model = small_model().train()  # float64, every sub-layer kind
    model.checkpoint_layers = checkpoint
    forward = torch.compile(model, backend=compile_backend) if compile_backend else model
    ids = torch.randint(0, model.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(1))
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = forward(ids[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, sum(saved.values())


def test_checkpointing_gives_the_same_loss_and_gradients():
    loss, grads, _ = loss_grads_and_saved(False)
    loss_ac, grads_ac, _ = loss_grads_and_saved(True)
    assert torch.equal(loss_ac, loss)  # the recompute is the same computation, deterministic on a CPU
    assert grads_ac.keys() == grads.keys() and all(g is not None for g in grads_ac.values())
    for name in grads:
        assert torch.equal(grads_ac[name], grads[name]), name


def test_checkpointing_saves_less_for_the_backward():
    """Each sub-layer keeps its inputs (h, delta, positions) instead of its activations; the embedding,
    the final norm, the head and the loss keep theirs either way."""
    _, _, plain = loss_grads_and_saved(False)
    _, _, checkpointed = loss_grads_and_saved(True)
    assert checkpointed < plain / 3, (checkpointed, plain)


@pytest.mark.filterwarnings("error:Dynamo detected a call to a `functools.lru_cache`")  # rope traces its inv_freq
def test_checkpointing_under_torch_compile():
    """The model still traces (the checkpoint becomes a region that the compiled graph recomputes)."""
    loss, grads, _ = loss_grads_and_saved(False)
    loss_c, grads_c, _ = loss_grads_and_saved(True, compile_backend="aot_eager")
    torch.testing.assert_close(loss_c, loss, rtol=1e-12, atol=1e-12)
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-12, atol=1e-12, msg=name)


def test_checkpointing_leaves_inference_and_streaming_alone():
    """Off in eval, without grad and with a state (the state is updated in place by every call)."""
    model = small_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 13))
    expected, streamed = model(ids).logits, model(ids, state=model.init_state(2)).logits
    model.checkpoint_layers = True
    assert torch.equal(model(ids).logits, expected)  # eval
    model.train()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)
    state = model.init_state(2)
    out = model(ids, state=state)  # training, grad on, but streaming
    assert torch.equal(out.logits, streamed) and out.state is state and int(state.pos[0]) == 13


def test_the_flag_shows_in_train_help_and_sets_the_field(capsys):
    with pytest.raises(SystemExit) as done:
        cli(["train", "--help"])
    assert done.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "--activation-checkpointing, --no-activation-checkpointing" in shown
    assert "one more forward per sub-layer (default: --no-" in shown  # the help wraps at the hyphen
    parse = build_parser().parse_args
    assert config_from_args(parse(["train", "--activation-checkpointing"])).activation_checkpointing is True
    assert config_from_args(parse(["train"])).activation_checkpointing is False


def mixer_step(model, recompute: bool):
    """(loss, {name: grad}, bytes saved for the backward inside the Mamba mixers) of one step."""
    model.train()
    mixers = [layer.mixer for layer in model.layers if isinstance(layer.mixer, Mamba)]
    for mixer in mixers:
        mixer.recompute = recompute
    saved, inside = {}, []

    def pack(t):
        if inside:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    hooks = [h for mixer in mixers for h in (mixer.register_forward_pre_hook(lambda *_: inside.append(1)),
                                             mixer.register_forward_hook(lambda *_: inside.clear()))]
    # 16 steps: one chunk of the chunked scan, which the interpreter runs slowly
    ids = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
    loss.backward()
    for h in hooks:
        h.remove()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, sum(
        n for ptr, n in saved.items() if ptr not in params)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_recomputing_the_mamba_mixer_gives_the_same_step_and_saves_less(backend):
    """The mixer keeps its input and xz alone (its conv output, delta, x_proj's output and the scan's
    saved states go), on the reference path in float64 and through the Triton kernels."""
    dtype = torch.float64 if backend == "reference" else torch.float32
    model = small_model(dtype=dtype, layers=("mamba", "mlp"))
    with ops.use_kernels(backend):
        loss, grads, plain = mixer_step(model, False)
        model.zero_grad()
        loss_r, grads_r, recomputed = mixer_step(model, True)
    assert torch.equal(loss_r, loss)
    for name in grads:
        assert torch.equal(grads_r[name], grads[name]), name
    # Left: in_proj's input [B, T, d], the mixer's input xz [B, T, 2E] and out_proj's input y [B, T, E].
    cfg, tokens = model.config, 2 * 16  # rows x steps (one Mamba layer)
    assert recomputed == (cfg.d_model + 3 * cfg.d_inner) * tokens * torch.finfo(dtype).bits // 8
    assert plain > 1.5 * recomputed, (plain, recomputed)


def test_the_recompute_flag_sets_the_field_and_parallelize_sets_the_mixers():
    from samba_lm.train import distributed as D

    parse = build_parser().parse_args
    assert config_from_args(parse(["train", "--recompute-mamba"])).recompute_mamba is True
    assert config_from_args(parse(["train"])).recompute_mamba is False
    model = D.parallelize(small_model(), "ddp", D.setup("cpu"), recompute_mamba=True)
    assert [layer.mixer.recompute for layer in model.layers if isinstance(layer.mixer, Mamba)] == [True]


def test_the_recompute_runs_under_the_forward_kernels_and_tuning():
    """The backward (outside the forward's `use_kernels` and `tuned` blocks) recomputes with the
    forward's backend and tuning: the same gradients as a backward inside the blocks, no CheckpointError."""
    model = small_model(dtype=torch.float32, layers=("mamba", "mlp")).train()
    model.layers[0].mixer.recompute = True
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))

    def grads(backward_inside: bool):
        model.zero_grad()
        with ops.use_kernels("triton"), ops.tuned(scan=dict(sequential_min_programs_per_sm=0)):
            loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(grads(True), grads(False)))
