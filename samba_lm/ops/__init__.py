"""Hot functions, each a dispatching public op plus a plain-PyTorch reference with the same signature.

Triton implementations register themselves when Triton is importable; the dispatcher uses them on
CUDA (see dispatch.py). Their tiles and path choices change only inside `with tuned(...)` (tuning.py).
"""

import contextlib

import torch
import torch.utils.checkpoint

from . import dispatch, tuning
from .attention import attention, attention_reference, attention_with_cache, attention_with_cache_reference
from .conv import causal_conv1d, causal_conv1d_reference
from .differential import differential_mix, differential_mix_reference
from .dispatch import use_kernels
from .linear import autocast_dtype, linear, linear_reference
from .linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from .mamba import mamba_inner, mamba_inner_reference, mamba_inner_ungated
from .norm import add_layernorm, add_layernorm_reference, add_rmsnorm, add_rmsnorm_reference
from .rope import qkv_rope, qkv_rope_reference
from .sample import choose_tokens, choose_tokens_reference
from .scan import selective_scan, selective_scan_reference
from .swiglu import swiglu, swiglu_reference
from .triton_common import interpreting
from .tuning import tuned

__all__ = ["add_layernorm", "add_layernorm_reference", "add_rmsnorm", "add_rmsnorm_reference", "attention",
           "attention_reference", "attention_with_cache",
           "attention_with_cache_reference", "autocast_dtype", "causal_conv1d", "causal_conv1d_reference", "choose_tokens",
           "choose_tokens_reference", "differential_mix", "differential_mix_reference", "linear", "linear_reference",
           "linear_cross_entropy", "linear_cross_entropy_reference", "mamba_inner", "mamba_inner_reference",
           "mamba_inner_ungated", "qkv_rope", "qkv_rope_reference", "selective_scan", "selective_scan_reference",
           "recomputed", "swiglu", "swiglu_reference", "tuned", "use_kernels"]


def recomputed(fn, *args):
    """`fn(*args)` under torch.utils.checkpoint (non-reentrant): only the inputs are kept, and the
    backward runs `fn` again under the kernel backend and tuning in force now (their blocks have
    exited by then), so that it repeats this computation exactly. Under torch.compile the compiled
    graph recomputes what it traced."""
    if torch.compiler.is_compiling():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    backend, records = dispatch.forced_by_context(), tuning.overrides()

    @contextlib.contextmanager
    def again():
        with use_kernels(backend) if backend else contextlib.nullcontext(), tuned(**records):
            yield
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False,
                                             context_fn=lambda: (contextlib.nullcontext(), again()))


def _triton_supports(device: torch.device, dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16, torch.float32) and (device.type == "cuda" or interpreting())


try:
    import triton  # noqa: F401
except ImportError:  # CPU-only installs: the references serve every op
    pass
else:
    from .triton_attention import attention_triton, attention_with_cache_triton
    from .triton_conv import causal_conv1d_triton
    from .triton_cross_entropy import linear_cross_entropy_triton
    from .triton_differential import differential_mix_triton
    from .triton_linear import linear_triton
    from .triton_mamba import mamba_inner_triton
    from .triton_norm import add_layernorm_triton, add_rmsnorm_triton
    from .triton_rope import qkv_rope_triton
    from .triton_sample import choose_tokens_triton
    from .triton_scan import selective_scan_triton
    from .triton_swiglu import swiglu_triton

    dispatch.register("selective_scan", "triton", selective_scan_triton, _triton_supports)
    dispatch.register("attention", "triton", attention_triton, _triton_supports)
    dispatch.register("attention_with_cache", "triton", attention_with_cache_triton, _triton_supports)
    dispatch.register("causal_conv1d", "triton", causal_conv1d_triton, _triton_supports)
    dispatch.register("mamba_inner", "triton", mamba_inner_triton, _triton_supports)
    dispatch.register("linear", "triton", linear_triton, _triton_supports)
    dispatch.register("qkv_rope", "triton", qkv_rope_triton, _triton_supports)
    dispatch.register("choose_tokens", "triton", choose_tokens_triton, _triton_supports)
    # add_rmsnorm resolves with the widest of its inputs' dtypes: float64 anywhere means the reference.
    dispatch.register("add_rmsnorm", "triton", add_rmsnorm_triton, _triton_supports)
    dispatch.register("add_layernorm", "triton", add_layernorm_triton, _triton_supports)
    dispatch.register("swiglu", "triton", swiglu_triton, _triton_supports)
    dispatch.register("linear_cross_entropy", "triton", linear_cross_entropy_triton, _triton_supports)
    dispatch.register("differential_mix", "triton", differential_mix_triton, _triton_supports)
