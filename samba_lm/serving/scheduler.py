"""Continuous batching: requests join and leave a running decode batch between its steps.

One background thread does all the model work, under torch.inference_mode. Each turn of its loop:
1. end what was cancelled (or outlived shutdown's grace) and free the rows of finished requests,
   moving the last active row into each freed one (`SlotBatch.remove`), so the active rows stay a
   prefix and the smallest bucket covering them runs;
2. launch one decode step of the running batch, then deliver each row's token of the step before
   (one read of the device), while this one runs: the host's work per step (streaming the tokens,
   the server's event loop) overlaps the device's. A request that the previous step ended ran in
   this step too; its extra token is dropped, and its row is freed before the next step;
3. while rows are free, prefill the oldest waiting requests, `prefill_chunk` prompt tokens in all:
   - short prompts (up to 512 tokens and `prefill_chunk`) at the head of the queue together, up to
     `prefill_rows` of them in one forward, left-padded to a common length (`PrefillBatch`: a CUDA
     graph per rows and length bucket on CUDA, where an eager short prefill is all launch overhead);
   - a longer one alone, in chunks, in a batch-1 state (it may take several turns);
   after a request's prefill its first token is chosen from the prefill logits with its own seed at
   its position, as generate() does, and its state is copied into a free row, which joins at the
   next step.
So a long prompt delays each token of the running streams by one chunk's work, not by its whole
prefill. On CUDA, start() captures every bucket's decode step and prefill first, so no request waits
on a capture.

Each request generates what `samba_lm.generate(model, [prompt], ..., seed=s)` gives for it alone: a
row's draws depend on its seed and positions only (`sampling.row_seeds`; for one row an int seed
and a list of one seed draw alike), left padding is never needed (every request prefills alone),
and stop tokens are checked per request on the host. Exact in float64 on a CPU (the tests); in low
precision on a GPU, matrix products at a different batch size may round differently.

Models with full-attention layers need `max_context`: their caches get that many slots up front,
since a captured step cannot grow them.

`on_delivered`, if given, is called on the scheduler thread whenever tokens may have been delivered
or requests ended: after each step's tokens, after a turn's prefills, before the loop waits for
work and when it exits. The engine process (engine_process.py) passes on everything since the last
call in one message, so the HTTP process hears from it once a step rather than once a token.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..model import SambaLM
from ..sampling import Sampling, row_seeds
from .batch import HostRead, SlotBatch, host_list
from .prefill import PrefillBatch
from .request import GenerationRequest, RequestHandle, checked

__all__ = ["GenerationRequest", "QueueFull", "RequestHandle", "Scheduler", "SchedulerClosed", "SchedulerStats"]

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """submit() found max_queue requests waiting."""


class SchedulerClosed(Exception):
    """submit() after shutdown() began."""


@dataclass(frozen=True)
class SchedulerStats:
    queued: int  # waiting for a slot
    running: int  # holding a slot: decoding, or prefilling
    max_batch: int
    requests_finished: int  # for any reason
    tokens_generated: int
    steps: int  # decode steps of the running batch


@dataclass
class _Running:
    handle: RequestHandle
    stops: frozenset
    generated: int = 0


@dataclass
class _Step:
    """A launched decode step: its tokens on their way to the host, and who held each row then."""
    tokens: HostRead
    rows: list[_Running]


@dataclass
class _Prefill:
    handle: RequestHandle
    ids: torch.Tensor  # [1, T] on the model's device
    offset: int = 0  # tokens already in the prefill state


def _truncates(request: GenerationRequest) -> bool:
    return request.top_k is not None or (request.top_p is not None and request.top_p < 1)


class Scheduler:
    """Serve GenerationRequests from any thread with one model: see the module docstring."""

    def __init__(self, model: SambaLM, max_batch: int = 16, max_queue: int = 64, prefill_chunk: int = 512,
                 max_context: int | None = None, cuda_graph: bool | None = None, prefill_rows: int = 8,
                 on_delivered: Callable[[], None] | None = None):
        if not isinstance(model, SambaLM):
            raise ValueError(f"model must be a SambaLM, got {type(model).__name__}")
        for name, value, least in (("max_batch", max_batch, 1), ("max_queue", max_queue, 1),
                                   ("prefill_chunk", prefill_chunk, 1), ("prefill_rows", prefill_rows, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        if max_context is not None and (not isinstance(max_context, int) or max_context < 2):
            raise ValueError(f"max_context must be an int >= 2 (prompt + max_tokens) or None, got {max_context!r}")
        if model.config.grows and max_context is None:
            raise ValueError("max_context is required for a model with full-attention layers: their caches get "
                             "max_context slots up front (a captured decode step cannot grow them)")
        self.device = model.embedding.weight.device
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a model on a CUDA device, not {self.device}")
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        self.prefill_chunk, self.max_context = prefill_chunk, max_context
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        self._on_delivered = on_delivered or (lambda: None)
        capacity = max_context if model.config.grows else None
        self._batch = SlotBatch(model, max_batch, capacity, self.cuda_graph)
        self._prefill_state = model.init_state(1, capacity=capacity)
        # Short prompts: up to 512 tokens, one turn's budget, and (padded) the caches' capacity.
        longest = min(512, prefill_chunk, max_context or prefill_chunk)
        self._short = PrefillBatch(model, min(prefill_rows, max_batch), longest, capacity, self.cuda_graph)
        rows = self._short.rows
        self._first = Sampling.empty(rows, self.device)  # the first tokens' settings, from the prefill logits
        self._first_token = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
        self._first_finished = torch.zeros(rows, dtype=torch.bool, device=self.device)

        # The lock guards the queue, the flags, the counters and every change of who holds a slot;
        # the model runs outside it, so submit() and stats() never wait for a step.
        self._cond = threading.Condition()
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._prefill: _Prefill | None = None
        self._group: list[RequestHandle] = []  # short prompts prefilling together, this turn
        self._running: list[_Running] = []  # aligned with the batch's active rows
        self._launched: _Step | None = None  # the last decode step, its tokens not yet delivered
        self._ids = itertools.count()
        self._finished = self._tokens = self._steps = 0
        self._closing, self._deadline = False, float("inf")
        self._thread: threading.Thread | None = None
        self._failed: BaseException | None = None

    # ------------------------------------------------------------------ the client side (any thread)
    def start(self) -> Scheduler:
        with self._cond:
            if self._closing:
                raise SchedulerClosed("the scheduler was shut down")
            if self._thread is not None:
                raise RuntimeError("the scheduler is already started")
            self._thread = threading.Thread(target=self._run, name="samba-lm-scheduler", daemon=True)
        logger.info("scheduler: max_batch=%d (buckets %s), max_queue=%d, prefill_chunk=%d, max_context=%s, "
                    "cuda_graph=%s", self.max_batch, self._batch.buckets, self.max_queue, self.prefill_chunk,
                    self.max_context, self.cuda_graph)
        if self.cuda_graph:
            started = time.perf_counter()
            with torch.inference_mode():
                self._batch.capture()
                self._short.capture()
            logger.info("scheduler: captured %d decode steps and %d prefills in %.1f s", 2 * len(self._batch.buckets),
                        len(self._short.lengths) * len(self._short.row_buckets), time.perf_counter() - started)
        self._thread.start()
        return self

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request (checked: ValueError naming the field); QueueFull, SchedulerClosed."""
        request = checked(request, self.model.config.vocab_size, self.max_context)
        with self._cond:
            if self._closing:
                raise SchedulerClosed("the scheduler is shutting down and accepts no requests")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (max_queue={self.max_queue})")
            handle = RequestHandle(next(self._ids), request, self._wake)
            self._waiting.append(handle)
            self._cond.notify_all()
        return handle

    def stats(self) -> SchedulerStats:
        with self._cond:
            return SchedulerStats(len(self._waiting), len(self._running) + (self._prefill is not None),
                                  self.max_batch, self._finished, self._tokens, self._steps)

    @property
    def failed(self) -> BaseException | None:
        """What killed the loop (every request then ended with "error" and submit raises
        SchedulerClosed), or None while it runs or after a plain shutdown."""
        return self._failed

    def shutdown(self, grace_s: float = 10.0) -> None:
        """Stop accepting requests; let the running and queued ones finish for up to grace_s seconds,
        then cancel the rest ("cancelled"); join the thread."""
        with self._cond:
            self._closing = True
            self._deadline = min(self._deadline, time.perf_counter() + grace_s)
            thread = self._thread
            if thread is None:  # never started: nothing will run
                while self._waiting:
                    self._end(self._waiting.popleft(), "cancelled")
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def __enter__(self) -> Scheduler:
        return self.start()

    def __exit__(self, *exc):
        self.shutdown()

    def _wake(self):
        with self._cond:
            self._cond.notify_all()

    # ------------------------------------------------------------------ the loop (the scheduler thread)
    def _run(self):
        try:
            with torch.inference_mode():
                while True:
                    try:
                        if not self._turn():
                            return
                    except Exception as error:  # outside the model (`_guarded` takes those): start afresh
                        logger.exception("scheduler: a turn of the loop failed; ending the requests in slots")
                        self._reset(error)
        except BaseException as error:  # the loop cannot go on: fail everyone rather than hang them
            logger.exception("scheduler: the loop died; failing every request")
            with self._cond:
                self._closing, self._failed = True, error
                for handle in self._holders() + list(self._waiting):
                    self._end(handle, "error", error)
                self._waiting.clear()
        finally:
            self._on_delivered()

    def _turn(self) -> bool:
        """One turn of the loop (module docstring); False once shut down with nothing left."""
        with self._cond:
            self._end_cancelled()
            self._retire()
            idle = not self._busy()
            if idle and self._closing:
                return False
        if idle:
            self._on_delivered()  # the ends above, before the wait
            with self._cond:
                if not (self._busy() or self._closing):  # nothing came in meanwhile
                    self._cond.wait()
            return True
        before, self._launched = self._launched, None
        if self._running:
            self._guarded("decode step", self._launch, [r.handle for r in self._running])
        if before is not None:
            self._guarded("decode step", lambda: self._deliver(before), [r.handle for r in before.rows])
            with self._cond:
                self._retire()  # rows the delivered tokens ended are free for this turn's prefills
            self._on_delivered()  # the step's tokens go out before the prefills' work
        budget = self.prefill_chunk  # prompt tokens per turn, over as many waiting requests as it takes
        while budget > 0:
            group = self._take_short(budget)
            if group:
                self._guarded("prefill", self._prefill_short, group)
                with self._cond:
                    self._group = []
                budget -= sum(len(h.request.prompt_ids) for h in group)
                continue
            if not self._admit():
                break
            p = self._prefill
            done_before = p.offset
            self._guarded("prefill", lambda: self._prefill_chunk(budget), [p.handle])
            if p.offset == done_before:  # it failed: leave the rest for the next turn
                break
            budget -= p.offset - done_before
        self._on_delivered()  # the prefills' first tokens (a no-op for the engine when nothing changed)
        return True

    def _busy(self) -> bool:
        return bool(self._running or self._prefill or self._waiting or self._launched)

    def _guarded(self, what: str, work, handles: list[RequestHandle]):
        """Run `work`; if it raises, log it and fail the requests it served, so none hangs."""
        try:
            work()
        except Exception as error:
            logger.exception("scheduler: %s failed; ending requests %s with 'error'", what, [h.id for h in handles])
            with self._cond:
                for handle in handles:
                    self._end(handle, "error", error)
                if self._prefill is not None and self._prefill.handle.done:
                    self._prefill = None
                # The rows of the running requests are freed by the next turn's _retire.

    def _admit(self) -> bool:
        """Whether a request is prefilling: the current one, else the oldest waiting one if a row is free."""
        with self._cond:
            if self._prefill is None and self._waiting and len(self._running) < self.max_batch:
                handle = self._waiting.popleft()
                ids = torch.tensor([handle.request.prompt_ids], dtype=torch.long, device=self.device)
                self._prefill = _Prefill(handle, ids)
            return self._prefill is not None

    def _take_short(self, budget: int) -> list[RequestHandle]:
        """The short prompts at the head of the queue that prefill together now: as many as rows are
        free, `prefill_rows` allow and `budget` tokens cover (the first always). None while a long
        prompt is prefilling or heads the queue."""
        with self._cond:
            free = self.max_batch - len(self._running)
            while (self._prefill is None and self._waiting and len(self._group) < min(free, self._short.rows)
                   and len(self._waiting[0].request.prompt_ids) <= self._short.longest
                   and (not self._group or len(self._waiting[0].request.prompt_ids) <= budget)):
                handle = self._waiting.popleft()
                self._group.append(handle)
                budget -= len(handle.request.prompt_ids)
            return list(self._group)

    def _prefill_short(self):
        """Prefill the group together, then each one's first token and row."""
        group = self._group
        state, logits = self._short.run([h.request.prompt_ids for h in group])
        k = len(group)
        requests = [h.request for h in group]
        seeds = [row_seeds([r.seed], 1)[0] for r in requests]  # row 0 of a lone call, as generate draws it
        first = self._first.rows(k).set([r.temperature for r in requests], [r.top_k for r in requests],
                                        [r.top_p for r in requests], seeds)
        self._first_finished[:k].zero_()
        first.next_tokens(logits, state.pos[:k], self._first_token[:k], self._first_finished[:k], self._batch.stops)
        tokens = host_list(self._first_token[:k, 0])
        for i, (handle, request, token) in enumerate(zip(group, requests, tokens)):
            running = _Running(handle, frozenset(request.stop_tokens))
            self._emit(running, token)
            with self._cond:
                if not handle.done:
                    self._batch.add(state, self._first_token, request.temperature, request.top_k, request.top_p,
                                    seeds[i], source_row=i)
                    self._running.append(running)

    def _prefill_chunk(self, chunk: int):
        """One chunk (at most `chunk` tokens) of the prefilling request; after the last one, its first
        token and its row."""
        p = self._prefill
        if p.offset == 0:
            self._prefill_state.reset()
        ids = p.ids[:, p.offset:p.offset + chunk]
        logits = self.model(ids, state=self._prefill_state, logits_to_keep=1).logits[:, -1]
        p.offset += ids.shape[1]
        if p.offset < p.ids.shape[1]:
            return
        r = p.handle.request
        seed = row_seeds([r.seed], 1)  # row 0 of a lone call with seed r.seed, as generate draws it
        first = self._first.rows(1).set(r.temperature, r.top_k, r.top_p, seed)
        self._first_finished[:1].zero_()
        first.next_tokens(logits, self._prefill_state.pos, self._first_token[:1], self._first_finished[:1],
                          self._batch.stops)
        running = _Running(p.handle, frozenset(r.stop_tokens))
        self._emit(running, host_list(self._first_token[:1, 0])[0])
        with self._cond:
            self._prefill = None
            if not p.handle.done:  # a cancel() during the last chunk ends it at the next turn
                self._batch.add(self._prefill_state, self._first_token, r.temperature, r.top_k, r.top_p, seed[0])
                self._running.append(running)

    def _launch(self):
        tokens = self._batch.step(any(_truncates(r.handle.request) for r in self._running))
        self._launched = _Step(tokens, list(self._running))
        with self._cond:
            self._steps += 1

    def _deliver(self, step: _Step):
        """A step's tokens to the requests that held its rows; one that ended since gets none."""
        for running, token in zip(step.rows, step.tokens.values()):
            if not running.handle.done:
                self._emit(running, token)

    def _emit(self, running: _Running, token: int):
        """Deliver a token; end the request after a stop token or its max_tokens-th token."""
        running.handle._deliver(token)
        running.generated += 1
        with self._cond:
            self._tokens += 1
            if token in running.stops:
                self._end(running.handle, "stop")
            elif running.generated == running.handle.request.max_tokens:
                self._end(running.handle, "length")

    # ------------------------------------------------------------------ bookkeeping (under the lock)
    def _reset(self, error: BaseException):
        """End every request holding a slot and empty the batch: the rows' bookkeeping may be torn."""
        with self._cond:
            for handle in self._holders():
                self._end(handle, "error", error)
            self._running, self._prefill, self._group, self._launched = [], None, [], None
            self._batch.clear()

    def _holders(self) -> list[RequestHandle]:
        return ([r.handle for r in self._running] + ([self._prefill.handle] if self._prefill else [])
                + self._group)

    def _end(self, handle: RequestHandle, reason: str, error: BaseException | None = None):
        if handle._finish(reason, error):
            self._finished += 1

    def _end_cancelled(self):
        """End the requests whose cancel() came, and all of them once shutdown's grace is over."""
        expired = self._closing and time.perf_counter() >= self._deadline
        for handle in list(self._waiting) + self._holders():
            if expired or handle._cancel_reason is not None:
                self._end(handle, handle._cancel_reason or "cancelled")
        self._waiting = collections.deque(h for h in self._waiting if not h.done)
        if self._prefill is not None and self._prefill.handle.done:
            self._prefill = None

    def _retire(self):
        """Free the rows of ended requests; descending, since each takes the last active row in."""
        for row in reversed(range(len(self._running))):
            if self._running[row].handle.done:
                self._batch.remove(row)
                last = self._running.pop()
                if row < len(self._running):
                    self._running[row] = last
