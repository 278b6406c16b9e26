"""Serving: the continuous-batching scheduler under `samba-lm serve` (the HTTP layer lives beside it)."""

from .scheduler import GenerationRequest, QueueFull, RequestHandle, Scheduler, SchedulerClosed, SchedulerStats

__all__ = ["GenerationRequest", "QueueFull", "RequestHandle", "Scheduler", "SchedulerClosed", "SchedulerStats"]
