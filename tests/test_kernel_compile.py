"""The conv's walking kernels and the scan's step-at-a-time kernels compiled for sm_90 on any machine (ptxas ships in the triton wheel): the
interpreter runs code the compiler rejects (a loop-carried tuple that changes length, say), so the CPU
tests alone would not see it. The compiler needs the kernels as `triton.jit` makes them without
TRITON_INTERPRET, so the compiling runs in a process of its own (this file as a script). The scan's L2
prefetches and warp sums are PTX, which the interpreter skips: here they are compiled, as shipped."""

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


SCAN_INPUTS = ("u_ptr", "dl_ptr", "z_ptr", "dy_ptr", "du_ptr", "ddl_ptr", "dz_ptr", "y_ptr")  # bf16 in training


def compile_scan_kernels(flags: bool):
    """The step-at-a-time forward (both passes), the backward's PASS 1 and the backward, at the
    shipped tiles and prefetch distance, with the PTX warp sums; every HAS_* flag set to `flags`."""
    from samba_lm.ops import triton_scan

    tuning = triton_scan.ScanTuning()
    block_e, warps = tuning.sequential_forward
    common = dict(N=16, BLOCK_N=16, BLOCK_E=block_e, HAS_D=flags, HAS_Z=flags, HAS_BIAS=flags, HAS_RESET=flags,
                  HAS_H0=flags, HAS_DHT=flags, SAVE_CARRIES=True, CARRY_T=tuning.sequential_carry_t,
                  STEPS=tuning.sequential_steps, WARP_SUMS=True)
    kernels = [(triton_scan._scan_fwd_seq_kernel, dict(PASS=1, PREFETCH=tuning.prefetch_steps)),
               (triton_scan._scan_fwd_seq_kernel, dict(PASS=2, PREFETCH=tuning.prefetch_steps)),
               (triton_scan._scan_bwd_seq_q_kernel, dict(PREFETCH=tuning.prefetch_steps)),
               (triton_scan._scan_bwd_seq_kernel, dict(PREFETCH=1))]
    for fn, extra in kernels:
        constexprs = {k: v for k, v in {**common, **extra}.items() if k in fn.arg_names}
        signature = {a: ("*bf16" if a in SCAN_INPUTS else "*u8" if a == "r_ptr" else "*fp32") if a.endswith("_ptr")
                     else "i32" for a in fn.arg_names if a not in constexprs}
        compile_for_hopper(fn, signature, constexprs, warps)


@pytest.mark.parametrize("kernels", ["conv", "scan"])
@pytest.mark.parametrize("flags", [False, True], ids=["plain", "every-flag"])
def test_kernels_compile_for_hopper(kernels, flags):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    done = subprocess.run([sys.executable, __file__, kernels, str(flags)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


if __name__ == "__main__":
    {"conv": compile_conv_kernels, "scan": compile_scan_kernels}[sys.argv[1]](sys.argv[2] == "True")
