"""A request and its handle: what a client asks for, and the tokens it gets back from any thread or loop.

One thread is the writer of a handle: it appends each token and finally sets the finish reason
(the scheduler thread; in the HTTP process of an engine process, the event loop's thread, a
message's tokens at a time). Readers wait on a condition (`tokens()`, for threads) or on an
asyncio.Event (`stream()`) that a writer on another thread sets through the waiting loop's
`call_soon_threadsafe`, and a writer on the loop's own thread sets directly (no wake-up of the loop
per token), so an event loop is never blocked. Every token stays in the handle, so a reader that
starts late still sees them all.
"""

from __future__ import annotations

import asyncio
import numbers
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterator

import torch


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]  # non-empty token ids in [0, vocab)
    max_tokens: int  # >= 1
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # None: a random seed drawn at submit
    stop_tokens: tuple[int, ...] = ()  # generation ends after emitting one of these (emitted, as generate does)


def checked(request: GenerationRequest, vocab_size: int, max_context: int | None) -> GenerationRequest:
    """The request with tuples of ints and a seed (drawn when None), or a ValueError naming the field."""
    if not isinstance(request, GenerationRequest):
        raise ValueError(f"request must be a GenerationRequest, got {type(request).__name__}")

    def token_ids(name, ids, allow_empty):
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise ValueError(f"{name} must be a sequence of token ids, got {type(ids).__name__}")
        ids = tuple(ids)
        if not (allow_empty or ids):
            raise ValueError(f"{name} must hold at least one token id")
        if not all(_is_int(t) and 0 <= t < vocab_size for t in ids):
            raise ValueError(f"{name} must hold ints in [0, vocab_size={vocab_size}), got {list(ids)[:16]}")
        return tuple(int(t) for t in ids)

    prompt = token_ids("prompt_ids", request.prompt_ids, allow_empty=False)
    stops = token_ids("stop_tokens", request.stop_tokens, allow_empty=True)
    if not _is_int(request.max_tokens) or request.max_tokens < 1:
        raise ValueError(f"max_tokens must be an int >= 1, got {request.max_tokens!r}")
    if not _is_real(request.temperature) or not 0 <= request.temperature < float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {request.temperature!r}")
    if request.top_k is not None and (not _is_int(request.top_k) or request.top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {request.top_k!r}")
    if request.top_p is not None and (not _is_real(request.top_p) or not 0 < request.top_p <= 1):
        raise ValueError(f"top_p must lie in (0, 1] or be None, got {request.top_p!r}")
    if request.seed is not None and not _is_int(request.seed):
        raise ValueError(f"seed must be an int or None, got {request.seed!r}")
    if max_context is not None and len(prompt) + request.max_tokens > max_context:
        raise ValueError(f"prompt_ids ({len(prompt)} tokens) + max_tokens ({request.max_tokens}) exceeds "
                         f"max_context ({max_context})")
    # Drawn as generate() draws one for seed=None; kept in handle.request, which then reproduces it.
    seed = int(torch.randint(0, 2**62, ()).item()) if request.seed is None else int(request.seed)
    return GenerationRequest(prompt, int(request.max_tokens), float(request.temperature),
                             None if request.top_k is None else int(request.top_k),
                             None if request.top_p is None else float(request.top_p), seed, stops)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


class RequestHandle:
    """A submitted request: its tokens as they come (`tokens()`, `stream()`), timings and finish reason.

    finish_reason is None while it runs, then "stop" (it emitted a stop token), "length" (max_tokens),
    "cancelled" (or the reason given to `cancel`; also at shutdown) or "error" (`error` holds the
    exception, which the scheduler also logged)."""

    def __init__(self, id: int, request: GenerationRequest, wake: Callable[[], None]):
        self.id, self.request = id, request
        self.submitted_at = time.perf_counter()
        self.token_times: list[float] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self._out: list[int] = []
        self._cond = threading.Condition()
        self._events: list[tuple[asyncio.AbstractEventLoop, asyncio.Event, int]] = []  # and the loop's thread
        self._wake = wake  # tells the scheduler thread to look at its handles
        self._cancel_reason: str | None = None  # asked for; the scheduler thread ends the request

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def output(self) -> list[int]:
        """The tokens delivered so far (a copy)."""
        with self._cond:
            return list(self._out)

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the scheduler to end this request (thread-safe, idempotent): its slot is freed at the
        scheduler's next step and it finishes with `reason`, unless it finished first."""
        with self._cond:
            if self.finish_reason is not None or self._cancel_reason is not None:
                return
            self._cancel_reason = reason
        self._wake()

    # ------------------------------------------------------------------ reading
    def tokens(self, timeout: float | None = None) -> Iterator[int]:
        """Yield every token of the request, blocking until each arrives; ends when it finishes.
        timeout: the longest wait for one token, in seconds (TimeoutError after it)."""
        i = 0
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: len(self._out) > i or self.finish_reason is not None, timeout):
                    raise TimeoutError(f"request {self.id}: no token within {timeout} s")
                new, finished = self._out[i:], self.finish_reason is not None
            yield from new
            i += len(new)
            if finished:  # read with the tokens: none come after it
                return

    async def stream(self) -> AsyncIterator[int]:
        """Yield every token of the request in an asyncio task; awaiting never blocks the loop."""
        event = asyncio.Event()
        waiter = (asyncio.get_running_loop(), event, threading.get_ident())
        with self._cond:
            self._events.append(waiter)
        try:
            i = 0
            while True:
                event.clear()  # before reading: a token that comes after the read sets it again
                with self._cond:
                    new, finished = self._out[i:], self.finish_reason is not None
                for token in new:
                    yield token
                i += len(new)
                if finished:
                    return
                if not new:
                    await event.wait()
        finally:
            with self._cond:
                self._events.remove(waiter)

    # ------------------------------------------------------------------ writing (the scheduler thread)
    def _deliver(self, token: int):
        with self._cond:
            self._out.append(token)
            self.token_times.append(time.perf_counter())
            self._cond.notify_all()
            events = list(self._events)
        _set(events)

    def _extend(self, tokens: list[int], times: list[float]):
        """Deliver several tokens at once, generated at `times` (perf_counter, which on Linux is one
        clock for every process): an engine process's tokens arriving in the HTTP process."""
        with self._cond:
            self._out += tokens
            self.token_times += times
            self._cond.notify_all()
            events = list(self._events)
        _set(events)

    def _since(self, start: int) -> tuple[list[int], list[float], str | None, BaseException | None]:
        """(tokens, their times) from the start-th on, the finish reason and the error, read together."""
        with self._cond:
            return self._out[start:], self.token_times[start:], self.finish_reason, self.error

    def _finish(self, reason: str, error: BaseException | None = None) -> bool:
        """End the request (once; False if it had ended)."""
        with self._cond:
            if self.finish_reason is not None:
                return False
            self.error, self.finish_reason = error, reason
            self._cond.notify_all()
            events = list(self._events)
        _set(events)
        return True

    def __repr__(self) -> str:
        return (f"RequestHandle(id={self.id}, tokens={len(self._out)}, finish_reason={self.finish_reason!r})")


def _set(events):
    for loop, event, thread in events:
        if thread == threading.get_ident():  # the writer runs on the reader's loop
            event.set()
            continue
        try:
            loop.call_soon_threadsafe(event.set)
        except RuntimeError:  # the loop has closed: its reader is gone
            pass
