"""What the Triton modules share: whether kernels run in Triton's interpreter, the GPU's SM count, and
the views the kernels take. Plain PyTorch: importable without Triton."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """TRITON_INTERPRET=1: kernels run on CPU tensors through Triton's interpreter (the CPU tests).
    There is no PTX then, and the interpreter's tl.dot mishandles 16-bit operands."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def multiprocessors(device: torch.device) -> int:
    """The GPU's SMs, which grid sizes aim to fill; 4 on a CPU (the interpreter), enough programs to
    take every split and segment path in the tests."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def row_stride(x: torch.Tensor) -> torch.Tensor:
    """The kernels take every stride but the last, which must be 1."""
    return x if x.stride(-1) == 1 else x.contiguous()


def output_rows(out: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """An output [B, T, E] for a kernel that addresses row (b, t) at (b T + t) times one row stride:
    `out` if given (a half of a wider [B, T, 2E] gradient, say), else a new tensor like `like`."""
    if out is None:
        return torch.empty(like.shape, device=like.device, dtype=like.dtype)
    if out.shape != like.shape or out.stride(2) != 1 or out.stride(0) != out.shape[1] * out.stride(1):
        raise ValueError(f"an output of shape {tuple(like.shape)} needs rows of one stride and unit channel "
                         f"stride, got shape {tuple(out.shape)} strides {out.stride()}")
    return out
