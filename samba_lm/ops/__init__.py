"""Hot functions, each a dispatching public op plus a plain-PyTorch reference with the same signature."""

from .attention import attention, attention_reference
from .conv import causal_conv1d, causal_conv1d_reference
from .dispatch import use_kernels
from .scan import selective_scan, selective_scan_reference

__all__ = ["attention", "attention_reference", "causal_conv1d", "causal_conv1d_reference",
           "selective_scan", "selective_scan_reference", "use_kernels"]
