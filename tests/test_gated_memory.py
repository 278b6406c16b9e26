"""SambaY's memory path: a "mamba_mem" layer hands its pre-gate scan output y = C.h + D x to the gated
memory units above it, out_proj(y * silu(in_proj(x))). Checked in float64: the memory layer against
the plain Mamba layer and the reference scan, the GMU against its formula, and a model with both
against its own invariants (full == chunked == token by token, each row alone, activation
checkpointing)."""

import pytest
import torch
import torch.nn.functional as F

import samba_lm
from samba_lm.ops import causal_conv1d_reference, selective_scan_reference

from conftest import assert_stream_invariants, small_model

LAYERS = ("mamba", "mlp", "dswa", "mlp", "mamba_mem", "mlp", "dattn", "mlp", "gmu", "mlp", "gmu", "mlp")


def test_the_memory_layer_is_mamba_and_its_memory_is_the_ungated_scan():
    model = small_model(torch.float64, layers=LAYERS)
    mem, plain = model.layers[4].mixer, samba_lm.layers.Mamba(32, 64, 4, 4, 2).double()
    plain.load_state_dict(mem.state_dict())
    x = torch.randn(2, 15, 32, dtype=torch.float64)
    positions = torch.arange(15).expand(2, 15)
    with torch.no_grad():
        out, memory = mem(x, positions)
        torch.testing.assert_close(out, plain(x, positions), rtol=1e-12, atol=1e-12)
        u, z = F.linear(x, mem.in_proj.weight).chunk(2, -1)
        u, _ = causal_conv1d_reference(u, mem.conv1d.weight[:, 0], mem.conv1d.bias)
        dt, B, C = F.linear(u, mem.x_proj.weight).split([2, 4, 4], -1)
        y, _ = selective_scan_reference(u, F.linear(dt, mem.dt_proj.weight), -torch.exp(mem.A_log), B, C, mem.D,
                                        None, mem.dt_proj.bias)
    torch.testing.assert_close(memory, y, rtol=1e-12, atol=1e-12)


def test_the_gmu_is_its_formula():
    gmu = samba_lm.layers.GMU(32, 64).double()
    x, memory = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 5, 64, dtype=torch.float64)
    with torch.no_grad():
        want = (memory * F.silu(x @ gmu.in_proj.weight.T)) @ gmu.out_proj.weight.T
        torch.testing.assert_close(gmu(x, memory=memory), want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="needs the memory"):
        gmu(x)


def test_full_equals_chunked_equals_stepwise_and_each_row_alone():
    model = small_model(torch.float64, layers=LAYERS, norm="layer", attention_bias=True, rope=False)
    assert_stream_invariants(model, torch.randint(0, 97, (2, 17)), ([0, 6, 7, 17], range(18)))


def test_activation_checkpointing_gives_the_same_gradients():
    model = small_model(torch.float64, layers=LAYERS).train()
    ids = torch.randint(0, 97, (2, 9))
    grads = []
    for checkpointed in (False, True):
        model.zero_grad()
        model.checkpoint_layers = checkpointed
        model(ids).logits.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0]["layers.8.mixer.in_proj.weight"].abs().sum() > 0  # the GMU learns
    assert grads[0]["layers.4.mixer.x_proj.weight"].abs().sum() > 0  # through the memory too
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-10, atol=1e-12, msg=name)


def test_a_gmu_without_a_memory_layer_below_is_refused():
    with pytest.raises(ValueError, match="a 'gmu' \\(sub-layer 0\\) reads the memory of a 'mamba_mem' before it"):
        small_model(torch.float64, layers=("gmu", "mlp", "mamba_mem"))
