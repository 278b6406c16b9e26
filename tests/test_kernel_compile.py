"""The conv's walking kernels compiled for sm_90 on any machine (ptxas ships in the triton wheel): the
interpreter runs code the compiler rejects (a loop-carried tuple that changes length, say), so the CPU
tests alone would not see it. The compiler needs the kernels as `triton.jit` makes them without
TRITON_INTERPRET, so the compiling runs in a process of its own (this file as a script)."""

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton", reason="Triton kernels need the `triton` package (pip install triton)")

FWD = {"x_ptr": "*bf16", "w_ptr": "*fp32", "bias_ptr": "*fp32", "s_ptr": "*bf16", "r_ptr": "*u8", "y_ptr": "*bf16",
       "f_ptr": "*bf16", "T": "i32", "E": "i32", "s_xb": "i32", "s_xt": "i32"}
BWD = {"x_ptr": "*bf16", "w_ptr": "*fp32", "bias_ptr": "*fp32", "s_ptr": "*bf16", "r_ptr": "*u8", "dy_ptr": "*bf16",
       "dfinal_ptr": "*fp32", "dx_ptr": "*bf16", "ds_ptr": "*fp32", "dw_ptr": "*fp32", "db_ptr": "*fp32", "T": "i32",
       "E": "i32", "s_xb": "i32", "s_xt": "i32", "s_yb": "i32", "s_yt": "i32", "s_dxt": "i32"}


def compile_for_hopper(fn, signature: dict, constexprs: dict, num_warps: int):
    """As the launcher would on an H100/H200, pointers and sizes divisible by 16."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(signature))}
    source = ASTSource(fn=fn, signature={**signature, **{name: "constexpr" for name in constexprs}},
                       constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))


def compile_conv_kernels(flags: bool):
    """The forward and the fused backward at the shipped tiles, every HAS_* flag set to `flags`."""
    from samba_lm.ops import triton_conv

    tuning = triton_conv.ConvTuning()
    (fwd_t, fwd_e, fwd_w), (bwd_t, bwd_e, bwd_w) = tuning.fwd_tile, tuning.fused_tile
    compile_for_hopper(triton_conv._conv_fwd_kernel, FWD, dict(K=4, HAS_BIAS=flags, HAS_STATE=flags, HAS_RESET=flags,
                                                               BLOCK_T=fwd_t, BLOCK_E=fwd_e, TILES=4), fwd_w)
    compile_for_hopper(triton_conv._conv_bwd_fused_kernel, BWD,
                       dict(K=4, HAS_BIAS=flags, HAS_STATE=flags, HAS_DFINAL=flags, HAS_RESET=flags,
                            BLOCK_T=bwd_t, BLOCK_E=bwd_e, TILES=4), bwd_w)


@pytest.mark.parametrize("flags", [False, True], ids=["plain", "bias-state-dfinal-reset"])
def test_conv_kernels_compile_for_hopper(flags):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    done = subprocess.run([sys.executable, __file__, str(flags)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


if __name__ == "__main__":
    compile_conv_kernels(sys.argv[1] == "True")
