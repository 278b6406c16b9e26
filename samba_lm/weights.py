"""Reading a safetensors file into tensors a model may own (`load_state_dict(..., assign=True)`).

safetensors' load_file returns CPU tensors that view the file's mapping at the header's offsets, which
need not be 64-byte aligned, and CPU kernels take other code paths (another order of the same sums)
for unaligned operands: assigned as they come, the same weights read from two files could give other
float64 logits. Each such tensor is copied into storage of its own.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file


def read_safetensors(file: str | os.PathLike, device=None) -> dict[str, torch.Tensor]:
    """The file's tensors on `device` (CPU by default), each CPU one 64-byte aligned."""
    tensors = load_file(str(file), device=str(device or "cpu"))
    return {n: t.clone() if t.device.type == "cpu" and t.data_ptr() % 64 else t for n, t in tensors.items()}
