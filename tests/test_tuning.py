"""Kernel tuning (`ops.tuned`, `ops.tuning.current`): overrides for a block only, nested, restored on
exceptions, checked names, frozen records; a backward under its forward's tuning."""

import dataclasses
import threading

import pytest
import torch

from samba_lm import ops

triton = pytest.importorskip("triton", reason="the kernel families register with their Triton modules")
from samba_lm.ops import triton_scan, tuning  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FAMILIES = ["attention", "attention_decode", "conv", "linear", "mamba_step", "rope", "sample", "scan"]


def test_an_override_applies_inside_its_block_only():
    default = tuning.current("scan")
    with ops.tuned(scan=dict(sequential_backward=False)):
        assert tuning.current("scan") == dataclasses.replace(default, sequential_backward=False)
        assert tuning.current("linear") is tuning._defaults["linear"]  # the other families: their defaults
    assert tuning.current("scan") is default


def test_an_exception_leaves_the_block_restored():
    default = tuning.current("scan")
    with pytest.raises(KeyError):
        with ops.tuned(scan=dict(sequential_steps=1)):
            raise KeyError("inside")
    assert tuning.current("scan") is default


def test_nested_overrides_apply_on_top_of_the_enclosing_ones():
    default = tuning.current("scan")
    with ops.tuned(scan=dict(sequential_steps=1)):
        with ops.tuned(scan=dict(sequential_backward=False), rope=dict(block_t=4)):
            assert (tuning.current("scan").sequential_steps, tuning.current("scan").sequential_backward) == (1, False)
            assert tuning.current("rope").block_t == 4
            with ops.tuned(scan=triton_scan.ScanTuning(block_t=32)):  # a whole record replaces
                assert tuning.current("scan") == triton_scan.ScanTuning(block_t=32)
        assert tuning.current("scan") == dataclasses.replace(default, sequential_steps=1)
        assert tuning.current("rope").block_t == 16
    assert tuning.current("scan") is default


def test_unknown_names_raise_and_list_the_valid_ones():
    default = tuning.current("scan")
    with pytest.raises(ValueError, match=r"tuned: unknown kernel family 'scna'; the families: \['attention'"):
        with ops.tuned(scna=dict(block_t=8)):
            pass
    with pytest.raises(ValueError, match=r"tuned\(scan=...\): unknown fields \['sequential_bakward'\]; "
                                         r"ScanTuning has \['block_t', .*'sequential_backward'"):
        with ops.tuned(scan=dict(sequential_bakward=False)):
            pass
    with pytest.raises(ValueError, match="tuning.current: unknown kernel family 'nope'"):
        tuning.current("nope")
    with pytest.raises(TypeError, match=r"tuned\(rope=...\): takes a RopeTuning or a dict of its fields"):
        with ops.tuned(rope=triton_scan.ScanTuning()):
            pass
    assert tuning.current("scan") is default
    assert sorted(tuning._defaults) == FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_records_are_frozen(family):
    record = tuning.current(family)
    field = dataclasses.fields(record)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(record, field, getattr(record, field))


def test_tables_are_read_only_copies():
    with pytest.raises(TypeError):
        tuning.current("attention").fwd_tiles[512] = (16, 16, 4, 1)
    table = {64: (16, 16, 4, 1)}
    with ops.tuned(attention=dict(fwd_tiles=table)):
        table[128] = (16, 16, 4, 1)  # the caller's dict, not the record's
        assert dict(tuning.current("attention").fwd_tiles) == {64: (16, 16, 4, 1)}
        with pytest.raises(TypeError):
            tuning.current("attention").fwd_tiles[128] = (16, 16, 4, 1)


def test_registering_wants_a_frozen_record():
    @dataclasses.dataclass
    class Loose(tuning.Tuning):
        block: int = 1

    with pytest.raises(TypeError, match="must be a frozen dataclass"):
        tuning.register("loose")(Loose)
    assert "loose" not in tuning._defaults


def test_other_threads_see_the_defaults():
    seen = []
    with ops.tuned(scan=dict(sequential_steps=1)):
        thread = threading.Thread(target=lambda: seen.append(tuning.current("scan").sequential_steps))
        thread.start()
        thread.join()
    assert seen == [2]


def test_torch_compile_traces_a_tuning_read():
    """Launchers that torch.compile traces read tuning (attention's `supported`, `linear_triton`)."""
    compiled = torch.compile(lambda x: x * tuning.current("rope").block_t, fullgraph=True, backend="eager")
    assert compiled(torch.ones(2)).tolist() == [16.0, 16.0]


def scan_inputs(grad=False):
    g = torch.Generator().manual_seed(0)
    batch, T, E, N = 2, 21, 40, 4
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE).requires_grad_(grad)  # noqa: E731
    A = (-torch.rand(E, N, generator=g)).to(DEVICE).requires_grad_(grad)
    return dict(u=r(batch, T, E), delta=r(batch, T, E), A=A, B=r(batch, T, N), C=r(batch, T, N))


# Step at a time: states saved every 8 steps, where the default (chunked at this size on the
# interpreter's 4 SMs) saves one every 16.
STEP_AT_A_TIME = dict(sequential_min_programs_per_sm=0)


def test_a_backward_outside_the_block_keeps_its_forward_tuning():
    def grads(backward_inside: bool):
        leaves = scan_inputs(grad=True)
        with ops.use_kernels("triton"):
            with ops.tuned(scan=STEP_AT_A_TIME):
                y, h = ops.selective_scan(**leaves)
                loss = y.sum() + h.sum()
                if backward_inside:
                    loss.backward()
            if not backward_inside:
                loss.backward()
        return [v.grad for v in leaves.values()]

    assert all(torch.equal(a, b) for a, b in zip(grads(True), grads(False)))


def test_the_scan_backward_refuses_states_saved_under_other_tuning():
    x = scan_inputs()
    with ops.tuned(scan=STEP_AT_A_TIME):
        y, _, carries = triton_scan.scan_forward(*x.values(), None, None, None, None, save_carries=True)
    with pytest.raises(RuntimeError, match="saved 3 states for 21 steps.*one every 16: run it under its forward's"):
        triton_scan.scan_backward(torch.ones_like(y), None, *x.values(), None, None, None, carries)


@pytest.mark.parametrize("batch, E, segments", [(1, 4096, 33), (4, 4096, 9), (8, 3072, 11)])
def test_the_backward_segments_aim_higher_with_many_rows(monkeypatch, batch, E, segments):
    """Below `backward_segment_programs_per_sm_above`'s 4 programs per SM (rows x 32-channel blocks)
    the backward's time segments aim at 32 programs per SM, from it at 64 (an H200's 132 SMs)."""
    monkeypatch.setattr(triton_scan, "multiprocessors", lambda device: 132)
    t = tuning.current("scan")
    assert triton_scan._segments(t, batch, E, 4096, torch.device("cpu"), training=True, backward=True) == segments
    with ops.tuned(scan=dict(backward_segment_programs_per_sm_above=(float("inf"), 0))):  # one target for all
        assert triton_scan._segments(tuning.current("scan"), 8, 3072, 4096, torch.device("cpu"), training=True,
                                     backward=True) == 6


@pytest.mark.parametrize("batch, E, segments", [(1, 4096, 33), (2, 4096, 17), (8, 3072, 2)])
def test_the_training_forward_splits_time_less_with_many_rows(monkeypatch, batch, E, segments):
    """Below `forward_segment_programs_per_sm_above`'s 4 programs per SM a training forward's segments
    aim at the inference forward's 32 programs per SM, from it at 8 (an H200's 132 SMs)."""
    monkeypatch.setattr(triton_scan, "multiprocessors", lambda device: 132)
    t = tuning.current("scan")
    assert triton_scan._segments(t, batch, E, 4096, torch.device("cpu"), training=True) == segments
    with ops.tuned(scan=dict(forward_segment_programs_per_sm_above=(float("inf"), 0))):  # one target for all
        assert triton_scan._segments(tuning.current("scan"), 8, 3072, 4096, torch.device("cpu"), training=True) == 6
