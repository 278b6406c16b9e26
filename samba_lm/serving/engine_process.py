"""The model in a process of its own: the engine process runs the Scheduler, the HTTP process the rest.

Why: in one process the scheduler thread (the model's steps, handing each token to its handle) and
the event loop (an SSE chunk a token: detokenizing, JSON, the socket write) share one GIL, and at 64
streams on an H200 their Python work per step outlasts the 2.48 ms decode step (a step took 4.6 to
5.6 ms of wall time). With the model in another process, as vLLM's engine core, the two run in
parallel and one message a step crosses between them.

The engine process (spawned: CUDA starts clean in it) loads the model itself through `load`, a
picklable callable (`load_model(path, device, dtype, max_context)` for `samba-lm serve`), builds and
starts the Scheduler (capturing its CUDA graphs), and reports that it is ready, or the error that
stopped it. Then it serves the pipe: submit, cancel, shutdown. Each time the scheduler has delivered
tokens (its `on_delivered` hook: after a step's tokens, after a turn's prefills) it sends ONE message
holding every new token with its time and every finish, for all requests, and its stats.

The HTTP process holds an `EngineProcess`, which has the Scheduler's interface (submit -> a
RequestHandle, stats(), shutdown(grace_s), failed, max_batch, max_queue, max_context), so `build_app`
serves either. It checks each request itself (`request.checked`, with the vocabulary size that the
engine reported and max_context), so a bad one is a ValueError naming the field before anything is
sent. A reader thread receives the engine's messages and hands each one whole to the event loop
(`attach`, which build_app calls): one wake-up of the loop a step, whose thread then delivers the
step's tokens to their handles without a wake-up a token.

Admission is counted in the HTTP process, which knows every request it has not seen finish: with
max_batch + max_queue of them unfinished, submit raises QueueFull (429). The engine's own queue
bound is set above that, so it never refuses what was admitted (what it counts as unfinished, the
HTTP process does too).

Failure: the pipe closing without the engine's goodbye means the engine died. Every unfinished
request then ends with "error", `failed` says why (/health answers 503) and submit raises
SchedulerClosed (503). The engine never outlives the HTTP process: it shuts down when its pipe
closes and exits at once when its parent's sentinel fires (a parent killed with SIGKILL). It ignores
SIGINT and SIGTERM, which Ctrl-C in a terminal and systemd send to the whole process group: the HTTP
process drives the drain, as it does in one process.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import threading
from typing import Callable

from ..loading import load_model_and_tokenizer_path
from ..model import SambaLM
from .request import GenerationRequest, RequestHandle, checked
from .scheduler import QueueFull, Scheduler, SchedulerClosed, SchedulerStats

__all__ = ["EngineError", "EngineProcess", "load_model"]

logger = logging.getLogger(__name__)
EXIT_MARGIN_S = 60.0  # past shutdown's grace: a turn to finish in, then a hung engine is killed


class EngineError(RuntimeError):
    """A failure in the engine process (its message), or the engine process's death."""


def load_model(path, device=None, dtype=None, max_context: int | None = None) -> SambaLM:
    """The model that `samba-lm serve --model path` serves, in eval mode; a ValueError if it has
    full-attention layers and no max_context (their caches get that many slots up front)."""
    model, _ = load_model_and_tokenizer_path(path, device, dtype)
    if model.config.grows and max_context is None:
        raise ValueError("--max-context is required for this model: its full-attention layers' caches get that "
                         "many slots up front")
    return model.eval()


# ----------------------------------------------------------------------------- the HTTP process's side
class EngineProcess:
    """The Scheduler's interface over a Scheduler in a spawned process: see the module docstring.

    load: a picklable callable returning the model (it runs in the engine process). The other
    arguments are the Scheduler's; max_queue bounds the requests waiting beyond max_batch."""

    def __init__(self, load: Callable[[], SambaLM], *, max_batch: int = 16, max_queue: int = 64,
                 prefill_chunk: int = 512, prefill_rows: int = 8, max_context: int | None = None):
        if not callable(load):
            raise ValueError(f"load must be a callable that returns the model, got {type(load).__name__}")
        try:  # it travels to the engine process
            pickle.dumps(load)
        except Exception as e:
            raise ValueError(f"load must be picklable, e.g. a module-level function or a functools.partial of one "
                             f"({type(e).__name__}: {e})") from None
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.max_batch, self.max_queue, self.max_context = max_batch, max_queue, max_context
        self.vocab_size: int | None = None  # the engine reports it when ready
        # Scheduler's own checks of these run in the engine and come back as start()'s error.
        self._load = load
        self._options = dict(max_batch=max_batch, max_queue=max_batch + max_queue, prefill_chunk=prefill_chunk,
                             prefill_rows=prefill_rows, max_context=max_context)
        self._lock = threading.Lock()  # the handles, the flags and the pipe's sending end
        self._handles: dict[int, RequestHandle] = {}  # unfinished, by id
        self._ids = itertools.count()
        self._stats = SchedulerStats(0, 0, max_batch, 0, 0, 0)
        self._closing = False
        self._failed: EngineError | None = None
        self._said_goodbye = threading.Event()  # the engine's last message (or its death) was handled
        self._loop = None
        self._process = self._conn = self._reader = None

    # -- lifecycle
    def start(self, timeout: float | None = None) -> EngineProcess:
        """Spawn the engine and wait until it is ready (model loaded, graphs captured): the error that
        stopped it is raised here, as it was raised there (TimeoutError after `timeout` seconds)."""
        if self._process is not None:
            raise RuntimeError("the engine process is already started")
        context = multiprocessing.get_context("spawn")  # CUDA cannot run in a forked child
        self._conn, theirs = context.Pipe()
        self._process = context.Process(target=_engine_main, args=(theirs, self._load, self._options),
                                        name="samba-lm-engine", daemon=True)
        self._process.start()
        theirs.close()  # so that the engine's death closes the pipe here
        try:
            ready = self._wait_ready(timeout)
        except BaseException:
            self._kill()
            raise
        self.vocab_size, self._stats = ready["vocab_size"], SchedulerStats(*ready["stats"])
        atexit.register(self._at_exit)
        self._reader = threading.Thread(target=self._read, name="samba-lm-engine-reader", daemon=True)
        self._reader.start()
        return self

    def _wait_ready(self, timeout: float | None) -> dict:
        if not multiprocessing.connection.wait([self._conn], timeout):
            raise TimeoutError(f"the engine process was not ready within {timeout} s")
        try:
            kind, value = self._conn.recv()
        except (EOFError, OSError):
            self._process.join(5)
            raise EngineError(f"the engine process exited (exit code {self._process.exitcode}) before it was "
                              "ready; its output above says why") from None
        if kind == "failed":
            raise value
        return value

    def attach(self, loop) -> None:
        """Deliver tokens on `loop`'s thread from now on, a message at a time (build_app calls this
        at startup); before, and after the loop has closed, the reader thread delivers them."""
        self._loop = loop

    def shutdown(self, grace_s: float = 10.0) -> None:
        """Refuse new requests; the engine lets the running and queued ones finish for up to grace_s
        seconds, cancels the rest, and exits. Returns once it has (killing it if it hangs)."""
        with self._lock:
            first, self._closing = not self._closing, True
            if first and self._process is not None and self._failed is None:
                self._send(("shutdown", grace_s))
        if self._reader is None:  # never started, or it failed to
            return
        self._process.join(grace_s + EXIT_MARGIN_S)
        if self._process.is_alive():
            logger.error("engine process %d did not exit within %.0f s of its shutdown: killing it",
                         self._process.pid, grace_s + EXIT_MARGIN_S)
            self._kill()
        self._reader.join(10)
        self._said_goodbye.wait(10)  # the loop hands out what the engine said last
        self._end_all("cancelled", None)  # anything a lost message left unfinished
        atexit.unregister(self._at_exit)

    def __enter__(self) -> EngineProcess:
        return self.start()

    def __exit__(self, *exc):
        self.shutdown()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def failed(self) -> EngineError | None:
        """Why the engine process is gone, if it died; None while it serves or after a shutdown."""
        return self._failed

    # -- requests (any thread)
    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request (checked here: ValueError naming the field); QueueFull, SchedulerClosed."""
        if self.vocab_size is None:
            raise RuntimeError("start() the engine process before submitting requests")
        request = checked(request, self.vocab_size, self.max_context)
        with self._lock:
            if self._failed is not None:
                raise SchedulerClosed(f"the engine process has failed: {self._failed}")
            if self._closing:
                raise SchedulerClosed("the engine is shutting down and accepts no requests")
            if len(self._handles) >= self.max_batch + self.max_queue:
                raise QueueFull(f"{len(self._handles)} requests are running or waiting (max_batch={self.max_batch} "
                                f"+ max_queue={self.max_queue})")
            id_ = next(self._ids)
            handle = RequestHandle(id_, request, functools.partial(self._cancel, id_))
            if not self._send(("submit", id_, request)):
                raise SchedulerClosed("the engine process is gone")
            self._handles[id_] = handle
        return handle

    def stats(self) -> SchedulerStats:
        """The engine's stats as of its last message (it sends one whenever they change)."""
        return self._stats

    def _cancel(self, id_: int):
        """A handle's cancel(): the engine ends the request at its next step."""
        with self._lock:
            handle = self._handles.get(id_)
            if handle is not None and self._failed is None:
                self._send(("cancel", id_, handle._cancel_reason))

    def _send(self, message) -> bool:
        """Send under the lock; False if the pipe is broken (the reader then sees the engine's end)."""
        try:
            self._conn.send(message)
            return True
        except (OSError, ValueError):
            return False

    # -- the engine's messages
    def _read(self):
        """The reader thread: each message, whole, to the loop's thread (or handled here without one)."""
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                message = ("died", None)
            loop = self._loop
            try:
                if loop is None:
                    raise RuntimeError("no loop attached")
                loop.call_soon_threadsafe(self._handle, message)
            except RuntimeError:  # none attached, or it has closed
                self._handle(message)
            if message[0] != "events":
                return

    def _handle(self, message):
        kind, value = message
        if kind == "events":
            events, stats = value
            for id_, tokens, times, reason, error in events:
                handle = self._handles.get(id_)
                if handle is None:
                    continue
                if tokens:
                    handle._extend(tokens, times)
                if reason is not None:
                    with self._lock:
                        del self._handles[id_]
                    handle._finish(reason, None if error is None else EngineError(error))
            self._stats = SchedulerStats(*stats)
        elif kind == "closed":
            self._stats = SchedulerStats(*value)
            self._end_all("cancelled", None)
            self._said_goodbye.set()
        else:  # the pipe closed without a goodbye
            self._process.join(1)  # it is exiting: its exit code says how
            error = EngineError(f"the engine process (pid {self._process.pid}) died (exit code "
                                f"{self._process.exitcode})")
            with self._lock:
                self._failed = error
            unfinished = self._end_all("error", error)
            logger.error("%s; %d unfinished requests end with 'error'", error, unfinished)
            self._stats = dataclasses.replace(self._stats, queued=0, running=0)
            self._said_goodbye.set()

    def _end_all(self, reason: str, error: EngineError | None) -> int:
        with self._lock:
            handles, self._handles = list(self._handles.values()), {}
        for handle in handles:
            handle._finish(reason, error)
        return len(handles)

    def _kill(self):
        if self._process.is_alive():
            self._process.kill()
        self._process.join()

    def _at_exit(self):
        """At interpreter exit (multiprocessing then joins its children): never leave the engine running."""
        if self._process.is_alive():
            self.shutdown(0)


# ----------------------------------------------------------------------------- the engine process
def _engine_main(conn, load: Callable[[], SambaLM], options: dict):
    """The engine process: load, start the scheduler, say ready (or why not), serve the pipe."""
    # Ctrl-C and systemd signal the whole group; the HTTP process tells the engine when to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, name="samba-lm-parent-watch", daemon=True).start()
    engine = _Engine(conn)
    try:
        model = load()
        engine.scheduler = Scheduler(model, on_delivered=engine.flush, **options)
        engine.scheduler.start()
    except Exception as error:
        if not isinstance(error, (ValueError, OSError)):  # a user's mistake needs no traceback
            logger.exception("engine process: loading the model failed")
        engine.send(("failed", _picklable(error)))
        _exit(1)
    engine.say_ready(model.config.vocab_size)
    _exit(engine.serve())


def _exit(code: int):
    """Exit without the interpreter's teardown (about a second with torch loaded), which the HTTP
    process would wait for and nothing needs."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_with_parent():
    """Exit when the HTTP process has gone, even if something still holds the pipe open."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)


def _picklable(error: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return EngineError(f"{type(error).__name__}: {error}")


class _Engine:
    """The engine process's end of the pipe: the requests it runs (by the HTTP process's ids) and
    what it has told the HTTP process about them."""

    def __init__(self, conn):
        self.conn = conn
        self.scheduler: Scheduler | None = None
        self.lock = threading.Lock()  # the live requests and the pipe's sending end
        self.live: dict[int, list] = {}  # id -> [handle, tokens sent]
        self.sent_stats: tuple | None = None
        self.ready = self.broken = False  # nothing but "ready" or "failed" goes out first

    def serve(self) -> int:
        """Take requests until a shutdown has drained (or the HTTP process has gone), then say goodbye;
        the exit code."""
        drain = None
        while drain is None or drain.is_alive():
            if self.scheduler.failed is not None:  # its loop died: the HTTP process sees the pipe close
                return 1
            if not self.conn.poll(0.05 if drain else 0.5):  # a timeout, to see the two conditions above
                continue
            try:
                kind, *args = self.conn.recv()
            except (EOFError, OSError):  # the HTTP process has gone: nobody to stream to
                self.scheduler.shutdown(0)
                return 0
            if kind == "submit":
                self.submit(*args)
            elif kind == "cancel":
                with self.lock:
                    entry = self.live.get(args[0])
                if entry is not None:
                    entry[0].cancel(args[1])
            elif kind == "shutdown" and drain is None:
                drain = threading.Thread(target=self.scheduler.shutdown, args=(args[0],), name="samba-lm-drain")
                drain.start()
        self.flush()
        self.send(("closed", dataclasses.astuple(self.scheduler.stats())))
        self.conn.close()
        return 0

    def say_ready(self, vocab_size: int):
        with self.lock:
            self.sent_stats = dataclasses.astuple(self.scheduler.stats())
            self._send(("ready", {"vocab_size": vocab_size, "stats": self.sent_stats}))
            self.ready = True

    def submit(self, id_: int, request: GenerationRequest):
        with self.lock:  # registered before a turn can finish it, so that flush() reports the finish
            try:
                self.live[id_] = [self.scheduler.submit(request), 0]
                return
            except (QueueFull, SchedulerClosed, ValueError) as error:  # the HTTP process's checks make these rare
                refused = (id_, [], [], "error", f"{type(error).__name__}: {error}")
            self._send(("events", ([refused], dataclasses.astuple(self.scheduler.stats()))))

    def flush(self):
        """Scheduler.on_delivered, on its thread: one message with every token and finish since the last."""
        stats = dataclasses.astuple(self.scheduler.stats())
        with self.lock:
            if not self.ready or stats == self.sent_stats:  # no token delivered, no request ended, no row freed
                return
            events = []
            for id_, entry in list(self.live.items()):
                tokens, times, reason, error = entry[0]._since(entry[1])
                if tokens or reason is not None:
                    entry[1] += len(tokens)
                    events.append((id_, tokens, times, reason,
                                   None if error is None else f"{type(error).__name__}: {error}"))
                    if reason is not None:
                        del self.live[id_]
            self._send(("events", (events, stats)))
            self.sent_stats = stats

    def send(self, message):
        with self.lock:
            self._send(message)

    def _send(self, message):
        if self.broken:
            return
        try:
            self.conn.send(message)
        except (OSError, ValueError):  # the HTTP process has gone; serve() sees the pipe close
            self.broken = True
