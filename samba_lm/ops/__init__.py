"""Hot functions, each a dispatching public op plus a plain-PyTorch reference with the same signature.

Triton implementations register themselves when Triton is importable; the dispatcher uses them on
CUDA (see dispatch.py).
"""

import os

import torch

from . import dispatch
from .attention import attention, attention_reference
from .conv import causal_conv1d, causal_conv1d_reference
from .dispatch import use_kernels
from .rope import qkv_rope, qkv_rope_reference
from .scan import selective_scan, selective_scan_reference

__all__ = ["attention", "attention_reference", "causal_conv1d", "causal_conv1d_reference",
           "qkv_rope", "qkv_rope_reference", "selective_scan", "selective_scan_reference", "use_kernels"]


def _triton_supports(device: torch.device, dtype: torch.dtype) -> bool:
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    return dtype in (torch.float16, torch.bfloat16, torch.float32) and (device.type == "cuda" or interpreting)


try:
    import triton  # noqa: F401
except ImportError:  # CPU-only installs: the references serve every op
    pass
else:
    from .triton_attention import attention_triton
    from .triton_conv import causal_conv1d_triton
    from .triton_rope import qkv_rope_triton
    from .triton_scan import selective_scan_triton

    dispatch.register("selective_scan", "triton", selective_scan_triton, _triton_supports)
    dispatch.register("attention", "triton", attention_triton, _triton_supports)
    dispatch.register("causal_conv1d", "triton", causal_conv1d_triton, _triton_supports)
    dispatch.register("qkv_rope", "triton", qkv_rope_triton, _triton_supports)
