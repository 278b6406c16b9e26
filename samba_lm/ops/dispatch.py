"""Call-time choice between an op's reference and its fast implementations.

Each op registers named backends that share one signature. `resolve(op, device, dtype)` picks one
per call: `SAMBA_LM_KERNELS` (read now, not at import) or the innermost `use_kernels(...)` context
forces a backend (an op that has no such backend runs its reference; one that has it but cannot run
on the device or dtype is an error); otherwise a fast backend on CUDA when it supports the dtype, else
the reference.
(Triton kernels also run on CPU tensors under TRITON_INTERPRET=1, but only when forced: that is for
tests.)
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable

import torch

BACKEND_NAMES = ("reference", "triton")
Supports = Callable[[torch.device, torch.dtype], bool]
_registry: dict[str, dict[str, tuple[Callable, Supports]]] = {}
_forced: list[str] = []


def register(op: str, backend: str, fn: Callable, supports: Supports = lambda device, dtype: True):
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend {backend!r} is not one of {BACKEND_NAMES}")
    _registry.setdefault(op, {})[backend] = (fn, supports)


def backends(op: str) -> dict[str, Callable]:
    return {name: fn for name, (fn, _) in _registry[op].items()}


def _requested() -> str | None:
    if _forced:
        return _forced[-1]
    env = os.environ.get("SAMBA_LM_KERNELS", "").strip().lower()
    if env and env not in BACKEND_NAMES:
        raise ValueError(f"SAMBA_LM_KERNELS={env!r}: must be one of {BACKEND_NAMES}")
    return env or None


def forced() -> str | None:
    """The backend forced now (`use_kernels` or SAMBA_LM_KERNELS), if any: a backend that cannot run
    an input raises then, instead of handing it to the reference."""
    return _requested()


def forced_by_context() -> str | None:
    """The backend of the innermost `use_kernels` block, if any (SAMBA_LM_KERNELS aside)."""
    return _forced[-1] if _forced else None


def resolve(op: str, device: torch.device, dtype: torch.dtype) -> Callable:
    table = _registry[op]
    want = _requested()
    if want is not None:
        if want not in table:  # an op without that backend (yet) runs its reference
            return table["reference"][0]
        fn, supports = table[want]
        if not supports(device, dtype):
            raise RuntimeError(f"kernel backend {want!r} for op {op!r} does not run on {device} with {dtype}")
        return fn
    for name in BACKEND_NAMES[1:]:
        if device.type == "cuda" and name in table and table[name][1](device, dtype):
            return table[name][0]
    return table["reference"][0]


@contextlib.contextmanager
def use_kernels(backend: str):
    """Force one backend for every op inside the block (tests, benchmarks)."""
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend {backend!r} is not one of {BACKEND_NAMES}")
    _forced.append(backend)
    try:
        yield
    finally:
        _forced.pop()
