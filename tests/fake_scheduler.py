"""A scripted stand-in for samba_lm.serving.scheduler.Scheduler (same interface), for server tests
that need exact control: each request gets the tokens `script(request)` returns and then finishes
with `finish` ("length", "error", ...), or, with finish=None, hangs until cancelled. A token counts as
generated when it is read, so the reader is never behind (one chunk per token), unless `ahead`: then
all are generated at submit, and the reader starts behind them all."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time

from samba_lm.serving.scheduler import QueueFull, SchedulerClosed, SchedulerStats


class FakeHandle:
    def __init__(self, id_, request, tokens, finish, ahead=False):
        self.id, self.request = id_, request
        self.submitted_at = time.perf_counter()
        self.token_times: list[float] = [self.submitted_at] * len(tokens) if ahead else []
        self.finish_reason = None
        self._finish = finish
        self._tokens = list(tokens)
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._lock = threading.Lock()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def _generate(self, i):
        if len(self.token_times) <= i:
            self.token_times.append(time.perf_counter())
        if i == len(self._tokens) - 1 and self.finish_reason is None:
            self.finish_reason = self._finish
        return self._tokens[i]

    def tokens(self, timeout=None):
        for i in range(len(self._tokens)):
            yield self._generate(i)
        while not self.done:
            time.sleep(0.01)

    async def stream(self):
        for i in range(len(self._tokens)):
            if self.done:
                return
            yield self._generate(i)
        if not self._tokens and self.finish_reason is None:
            self.finish_reason = self._finish
        event = asyncio.Event()
        with self._lock:
            self._waiters.append((asyncio.get_running_loop(), event))
        if not self.done:
            await event.wait()

    def cancel(self, reason: str = "cancelled") -> None:
        with self._lock:
            if self.finish_reason is None:
                self.finish_reason = reason
            for loop, event in self._waiters:
                loop.call_soon_threadsafe(event.set)


class FakeScheduler:
    def __init__(self, script=lambda request: [1, 2, 3], finish: str | None = "length", ahead: bool = False,
                 max_batch: int = 4, max_queue: int = 64):
        self.script, self.finish, self.ahead = script, finish, ahead
        self.max_batch, self.max_queue = max_batch, max_queue
        self.handles: list[FakeHandle] = []
        self.closed = False
        self.failed = None  # the Scheduler's: what killed its loop
        self._ids = itertools.count()

    def start(self):
        return self

    def submit(self, request) -> FakeHandle:
        if self.closed:
            raise SchedulerClosed("shut down")
        if sum(not h.done for h in self.handles) >= self.max_batch + self.max_queue:
            raise QueueFull("full")
        handle = FakeHandle(next(self._ids), request, self.script(request), self.finish, self.ahead)
        self.handles.append(handle)
        return handle

    def stats(self) -> SchedulerStats:
        live = sum(not h.done for h in self.handles)
        running = min(live, self.max_batch)
        return SchedulerStats(live - running, running, self.max_batch, len(self.handles) - live,
                              sum(len(h.token_times) for h in self.handles), 0)

    def shutdown(self, grace_s: float = 10.0) -> None:
        self.closed = True
        for handle in self.handles:
            handle.cancel("cancelled")
