"""Process-group setup and parallelisation, applied to a finished model from outside.

One entry point serves one process and `torchrun --nproc_per_node N`: the torchrun environment
(RANK, WORLD_SIZE, LOCAL_RANK) selects the process group, NCCL on GPUs and gloo on CPUs. The model
is wrapped in DDP, or sharded with FSDP2 (`fully_shard` on every residual sub-layer, then the root).
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..layers import Mamba
from ..loading import resolve_device

PARALLEL_MODES = ("ddp", "fsdp")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistEnv:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", store=_store(rank, world), rank=rank,
                                world_size=world, device_id=dev if dev.type == "cuda" else None)
    return DistEnv(rank, world, local, dev)


def _store(rank: int, world: int) -> dist.Store:
    """The launcher's key-value store (torchrun's agent hosts it; else rank 0), its keys under this
    attempt's prefix: after an elastic restart (torchrun --max-restarts) the new group must not read
    the addresses that the dead attempt's workers published, which gloo then fails to connect to."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500")),
                          world, is_master=rank == 0 and not agent, multi_tenant=not agent)
    return dist.PrefixStore(f"samba-lm/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def teardown():
    if dist.is_initialized():
        # Free what still holds the group (DDP's reducer, in a reference cycle) while the group lives: a
        # collection at exit destroyed it under the GIL while a gloo thread, releasing a finished work's
        # tensors, waited for the GIL (a hung rank 0 after a 4-process run: py-spy, 2026-12-02).
        gc.collect()
        dist.destroy_process_group()


def parallelize(model: nn.Module, mode: str, env: DistEnv, compile: bool = False, checkpoint: bool = False,
                recompute_mamba: bool = False) -> nn.Module:
    """In this order: activation checkpointing per sub-layer or of the Mamba mixers (optional),
    compile each sub-layer (optional), then wrap for data parallelism (a single process: unwrapped)."""
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel={mode!r}: must be one of {PARALLEL_MODES}")
    model.checkpoint_layers = checkpoint
    for layer in model.layers:
        if isinstance(layer.mixer, Mamba):
            layer.mixer.recompute = recompute_mamba
    if compile:
        for layer in model.layers:
            layer.compile()
    if not env.distributed:
        return model
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model, device_ids=[env.device] if env.device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    for layer in model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if enabled:
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)  # SUM: gloo has no AVG
        value /= dist.get_world_size()
    return value


def max_across_ranks(value: int, device: torch.device) -> int:
    if not dist.is_initialized():
        return value
    tensor = torch.tensor(value, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def barrier():
    if dist.is_initialized():
        dist.barrier()
