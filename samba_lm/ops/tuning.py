"""Kernel tuning: tiles and path choices, one frozen record per kernel family, changed only for the
duration of a `with tuned(...)` block:

    with samba_lm.ops.tuned(scan=dict(sequential_backward=False), attention_decode=dict(max_splits=64)):
        ...

Each Triton module declares its knobs as a frozen dataclass with the measured values as defaults
(`ScanTuning` in triton_scan.py, `AttentionTuning`, ...) and registers it under a family name;
launchers, and fake implementations whose shapes depend on tuning, read `current(family)` at call time.

The active records live in a ContextVar: an override is seen by the thread (or asyncio task) that made
it and nothing else. Other threads see the defaults, autograd's CUDA threads included, so the ops with a
backward keep their forward's record for it. Read once and kept: by a CUDA graph when it is captured,
and by torch.compile when it traces (a constant of the graph, not guarded). A compiled backward reads
it when it runs, on CUDA in autograd's thread: the defaults (the scan's backward refuses states saved
at another spacing rather than misread them).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from types import MappingProxyType
from typing import Any, Iterator, Mapping

import torch


class Tuning:
    """Base of the records (frozen dataclasses): tables given as dicts or lists are kept as read-only
    copies, so that a record cannot change once made."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, dict):
                object.__setattr__(self, f.name, MappingProxyType(dict(value)))
            elif isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))


def table(entries: dict) -> Any:
    """A field defaulting to a read-only copy of `entries` (dataclasses refuse mutable defaults)."""
    return dataclasses.field(default_factory=lambda: MappingProxyType(dict(entries)))


_defaults: dict[str, Tuning] = {}  # family -> its default record: a registry, written as the modules load
_active: contextvars.ContextVar[Mapping[str, Tuning]] = contextvars.ContextVar(
    "samba_lm_tuning", default=MappingProxyType({}))  # family -> the record of the innermost override


def register(family: str):
    """Class decorator: the class (a frozen dataclass derived from Tuning) is `family`'s record, and
    its defaults are the family's."""
    def register_type(record_type: type) -> type:
        if not (issubclass(record_type, Tuning) and dataclasses.is_dataclass(record_type)
                and record_type.__dataclass_params__.frozen):
            raise TypeError(f"tuning.register({family!r}): {record_type.__name__} must be a frozen dataclass "
                            f"derived from tuning.Tuning")
        _defaults[family] = record_type()
        return record_type
    return register_type


def _in_force(family: str, caller: str) -> Tuning:
    if family not in _defaults:
        raise ValueError(f"{caller}: unknown kernel family {family!r}; the families: {sorted(_defaults)}")
    return _active.get().get(family, _defaults[family])


# torch.compile cannot trace ContextVar.get: it calls this at trace time and keeps the result.
@torch.compiler.assume_constant_result
def current(family: str) -> Tuning:
    """The record in force for a kernel family: the innermost `tuned` override, else the defaults."""
    return _in_force(family, "tuning.current")


def overrides() -> dict[str, Tuning]:
    """The records of the overrides in force ({} outside any `tuned` block): `tuned(**overrides())`
    later re-enters them (activation checkpointing's recompute in the backward does)."""
    return dict(_active.get())


@contextlib.contextmanager
def tuned(**families: Tuning | Mapping[str, Any]) -> Iterator[None]:
    """Override kernel tuning inside the block: per family, a dict of the fields to change in the record
    in force (so nested blocks apply on top of the enclosing ones) or a whole record. Leaving the block,
    by an exception too, restores what was in force before.

        with samba_lm.ops.tuned(scan=dict(sequential_backward=False)):
    """
    active = dict(_active.get())
    for family, change in families.items():
        record = _in_force(family, "tuned")
        if isinstance(change, type(record)):
            active[family] = change
            continue
        if not isinstance(change, Mapping):
            raise TypeError(f"tuned({family}=...): takes a {type(record).__name__} or a dict of its fields, "
                            f"got {type(change).__name__}")
        fields = [f.name for f in dataclasses.fields(record)]
        unknown = [name for name in change if name not in fields]
        if unknown:
            raise ValueError(f"tuned({family}=...): unknown fields {unknown}; {type(record).__name__} has {fields}")
        active[family] = dataclasses.replace(record, **change)
    token = _active.set(MappingProxyType(active))
    try:
        yield
    finally:
        _active.reset(token)
