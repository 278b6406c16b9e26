"""Serving: the continuous-batching scheduler under `samba-lm serve`, in a thread or in an engine process
of its own (`EngineProcess`, the same interface); the HTTP layer lives beside it."""

from .engine_process import EngineError, EngineProcess
from .scheduler import GenerationRequest, QueueFull, RequestHandle, Scheduler, SchedulerClosed, SchedulerStats

__all__ = ["EngineError", "EngineProcess", "GenerationRequest", "QueueFull", "RequestHandle", "Scheduler",
           "SchedulerClosed", "SchedulerStats"]
