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
max_batch + max_queue of them (its share, with several) unfinished, submit raises QueueFull (429). The engine's own queue
bound is set above that, so it never refuses what was admitted (what it counts as unfinished, the
HTTP process does too).

Several HTTP processes (`samba-lm serve --api-processes N`, api_processes.py): the engine is spawned
with a pipe for each (`spawn_engine`), each holds an `EngineClient` over its own, and the engine keys
requests by (pipe, id) and sends each pipe only its own requests' tokens, one message a step with the
stats. A shutdown from any of them drains every request; an HTTP process that goes away has its
requests cancelled, and the engine exits once all have gone.

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
import time
from typing import Callable

from ..loading import load_model_and_tokenizer_path
from ..model import SambaLM
from .request import GenerationRequest, RequestHandle, checked
from .scheduler import QueueFull, Scheduler, SchedulerClosed, SchedulerStats

__all__ = ["EngineClient", "EngineError", "EngineProcess", "load_model", "scheduler_options", "spawn_engine"]

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
def scheduler_options(max_batch: int, max_queue: int, prefill_chunk: int, prefill_rows: int,
                      max_context: int | None, clients: int = 1) -> dict:
    """The engine's Scheduler options for `clients` HTTP processes that admit max_batch + max_queue
    unfinished requests between them: its queue bound lies above all they can admit (each rounds its
    share up), so it never refuses what was admitted."""
    return dict(max_batch=max_batch, max_queue=max_batch + max_queue + clients - 1, prefill_chunk=prefill_chunk,
                prefill_rows=prefill_rows, max_context=max_context)


def spawn_engine(load: Callable[[], SambaLM], options: dict, clients: int = 1, timeout: float | None = None):
    """Spawn the engine process with one pipe per HTTP process and wait until it is ready (model
    loaded, graphs captured): (the process, the HTTP processes' ends of the pipes, what it said when
    ready). The error that stopped it is raised here, as it was raised there (TimeoutError after
    `timeout` seconds)."""
    context = multiprocessing.get_context("spawn")  # CUDA cannot run in a forked child
    pipes = [context.Pipe() for _ in range(clients)]
    process = context.Process(target=_engine_main, args=([theirs for _, theirs in pipes], load, options),
                              name="samba-lm-engine", daemon=True)
    process.start()
    ours = [mine for mine, _ in pipes]
    for _, theirs in pipes:
        theirs.close()  # so that the engine's death closes the pipes here
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        ready = [_wait_ready(process, conn, timeout, deadline) for conn in ours]
    except BaseException:
        if process.is_alive():
            process.kill()
        process.join()
        for conn in ours:
            conn.close()
        raise
    return process, ours, ready[0]


def _wait_ready(process, conn, timeout: float | None, deadline: float | None) -> dict:
    left = None if deadline is None else max(0.0, deadline - time.monotonic())
    if not multiprocessing.connection.wait([conn], left):
        raise TimeoutError(f"the engine process was not ready within {timeout} s")
    try:
        kind, value = conn.recv()
    except (EOFError, OSError):
        process.join(5)
        raise EngineError(f"the engine process exited (exit code {process.exitcode}) before it was "
                          "ready; its output above says why") from None
    if kind == "failed":
        raise value
    return value


class EngineClient:
    """The Scheduler's interface over one pipe to an engine process: see the module docstring.

    EngineProcess (below) starts an engine of its own and is its one client; with --api-processes N
    each HTTP process holds a client (`connect`) of the engine that the parent process spawned, and
    admits its share, max_batch + max_queue over api_processes rounded up, of unfinished requests."""

    def __init__(self, *, max_batch: int = 16, max_queue: int = 64, max_context: int | None = None,
                 api_processes: int = 1):
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("api_processes", api_processes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.max_batch, self.max_queue, self.max_context = max_batch, max_queue, max_context
        self.admit = -(-(max_batch + max_queue) // api_processes)
        self._bound = f"max_batch={max_batch} + max_queue={max_queue}" + (
            f", shared by {api_processes} HTTP processes" if api_processes > 1 else "")
        self.vocab_size: int | None = None  # the engine reports it when ready
        self._lock = threading.Lock()  # the handles, the flags and the pipe's sending end
        self._handles: dict[int, RequestHandle] = {}  # unfinished, by id
        self._ids = itertools.count()
        self._stats = SchedulerStats(0, 0, max_batch, 0, 0, 0)
        self._closing = False
        self._failed: EngineError | None = None
        self._said_goodbye = threading.Event()  # the engine's last message (or its death) was handled
        self._loop = None
        self._conn = self._reader = None

    # -- lifecycle
    def connect(self, conn, ready: dict) -> EngineClient:
        """Serve over `conn`, the pipe to an engine that has said `ready` (spawn_engine's)."""
        if self._conn is not None:
            raise RuntimeError("this client is already connected to an engine process")
        self._conn = conn
        self.vocab_size, self._stats = ready["vocab_size"], SchedulerStats(*ready["stats"])
        self._reader = threading.Thread(target=self._read, name="samba-lm-engine-reader", daemon=True)
        self._reader.start()
        return self

    def attach(self, loop) -> None:
        """Deliver tokens on `loop`'s thread from now on, a message at a time (build_app calls this
        at startup); before, and after the loop has closed, the reader thread delivers them."""
        self._loop = loop

    def shutdown(self, grace_s: float = 10.0) -> None:
        """Refuse new requests; the engine lets the running and queued ones finish for up to grace_s
        seconds, cancels the rest, and says goodbye. Returns once it has (or is gone)."""
        with self._lock:
            first, self._closing = not self._closing, True
            if first and self._conn is not None and self._failed is None:
                self._send(("shutdown", grace_s))
        if self._reader is None:  # never connected, or it failed to start
            return
        self._wait_engine(grace_s)
        self._reader.join(10)
        self._said_goodbye.wait(10)  # the loop hands out what the engine said last
        self._end_all("cancelled", None)  # anything a lost message left unfinished

    def _wait_engine(self, grace_s: float):
        """Until the engine has drained or is gone (the process that spawned it kills a hung one)."""
        self._said_goodbye.wait(grace_s + EXIT_MARGIN_S)

    @property
    def failed(self) -> EngineError | None:
        """Why the engine process is gone, if it died; None while it serves or after a shutdown."""
        return self._failed

    # -- requests (any thread)
    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request (checked here: ValueError naming the field); QueueFull, SchedulerClosed."""
        if self.vocab_size is None:
            raise RuntimeError("start() the engine process (or connect() a client) before submitting requests")
        request = checked(request, self.vocab_size, self.max_context)
        with self._lock:
            if self._failed is not None:
                raise SchedulerClosed(f"the engine process has failed: {self._failed}")
            if self._closing:
                raise SchedulerClosed("the engine is shutting down and accepts no requests")
            if len(self._handles) >= self.admit:
                raise QueueFull(f"{len(self._handles)} requests are running or waiting ({self._bound})")
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
            error = self._death()
            with self._lock:
                self._failed = error
            unfinished = self._end_all("error", error)
            logger.error("%s; %d unfinished requests end with 'error'", error, unfinished)
            self._stats = dataclasses.replace(self._stats, queued=0, running=0)
            self._said_goodbye.set()

    def _death(self) -> EngineError:
        return EngineError("the engine process died (its pipe closed without a goodbye)")

    def _end_all(self, reason: str, error: EngineError | None) -> int:
        with self._lock:
            handles, self._handles = list(self._handles.values()), {}
        for handle in handles:
            handle._finish(reason, error)
        return len(handles)


class EngineProcess(EngineClient):
    """An EngineClient that spawns its engine process and is its only client.

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
        super().__init__(max_batch=max_batch, max_queue=max_queue, max_context=max_context)
        # Scheduler's own checks of these run in the engine and come back as start()'s error.
        self._load = load
        self._options = scheduler_options(max_batch, max_queue, prefill_chunk, prefill_rows, max_context)
        self._process = None

    def start(self, timeout: float | None = None) -> EngineProcess:
        """Spawn the engine and wait until it is ready (model loaded, graphs captured): the error that
        stopped it is raised here, as it was raised there (TimeoutError after `timeout` seconds)."""
        if self._process is not None:
            raise RuntimeError("the engine process is already started")
        self._process, (conn,), ready = spawn_engine(self._load, self._options, 1, timeout)
        atexit.register(self._at_exit)
        return self.connect(conn, ready)

    def shutdown(self, grace_s: float = 10.0) -> None:
        """EngineClient's shutdown, then the engine process has exited (killed if it hangs)."""
        super().shutdown(grace_s)
        atexit.unregister(self._at_exit)

    def _wait_engine(self, grace_s: float):
        self._process.join(grace_s + EXIT_MARGIN_S)
        if self._process.is_alive():
            logger.error("engine process %d did not exit within %.0f s of its shutdown: killing it",
                         self._process.pid, grace_s + EXIT_MARGIN_S)
            self._process.kill()
            self._process.join()

    def __enter__(self) -> EngineProcess:
        return self.start()

    def __exit__(self, *exc):
        self.shutdown()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def _death(self) -> EngineError:
        self._process.join(1)  # it is exiting: its exit code says how
        return EngineError(f"the engine process (pid {self._process.pid}) died (exit code {self._process.exitcode})")

    def _at_exit(self):
        """At interpreter exit (multiprocessing then joins its children): never leave the engine running."""
        if self._process.is_alive():
            self.shutdown(0)


# ----------------------------------------------------------------------------- the engine process
def _engine_main(conns: list, load: Callable[[], SambaLM], options: dict):
    """The engine process: load, start the scheduler, say ready (or why not), serve the pipes."""
    # Ctrl-C and systemd signal the whole group; the HTTP process tells the engine when to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=exit_with_parent, name="samba-lm-parent-watch", daemon=True).start()
    engine = _Engine(conns)
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


def exit_with_parent():
    """Exit when the parent process has gone (the HTTP process, or the one that started several),
    even if something still holds the pipe open."""
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
    """The engine process's end of the pipes, one per HTTP process: the requests it runs, by (pipe,
    the HTTP process's id), so that two HTTP processes' ids never collide, and what it has told each
    HTTP process about its own."""

    def __init__(self, conns: list):
        self.conns = list(conns)  # None once that HTTP process has gone
        self.scheduler: Scheduler | None = None
        self.lock = threading.Lock()  # the live requests and the pipes' sending ends
        self.live: dict[tuple[int, int], list] = {}  # (pipe, id) -> [handle, tokens sent]
        self.sent_stats: tuple | None = None
        self.ready = False  # nothing but "ready" or "failed" goes out first
        self.broken = [False] * len(conns)

    def serve(self) -> int:
        """Take requests until a shutdown (from any HTTP process) has drained, or every HTTP process
        has gone; then say goodbye to each; the exit code."""
        drain = None
        while drain is None or drain.is_alive():
            if self.scheduler.failed is not None:  # its loop died: the HTTP processes see their pipes close
                return 1
            # A timeout, to see the two conditions above.
            ready = multiprocessing.connection.wait([c for c in self.conns if c is not None], 0.05 if drain else 0.5)
            for conn in ready:
                k = self.conns.index(conn)
                try:
                    kind, *args = conn.recv()
                except (EOFError, OSError):
                    if self.hang_up(k):  # the last HTTP process has gone: nobody to stream to
                        self.scheduler.shutdown(0)
                        return 0
                    continue
                if kind == "submit":
                    self.submit(k, *args)
                elif kind == "cancel":
                    with self.lock:
                        entry = self.live.get((k, args[0]))
                    if entry is not None:
                        entry[0].cancel(args[1])
                elif kind == "shutdown" and drain is None:  # the parent stops every HTTP process together
                    drain = threading.Thread(target=self.scheduler.shutdown, args=(args[0],), name="samba-lm-drain")
                    drain.start()
        self.flush()
        self.send(("closed", dataclasses.astuple(self.scheduler.stats())))
        for conn in self.conns:
            if conn is not None:
                conn.close()
        return 0

    def hang_up(self, k: int) -> bool:
        """HTTP process k has gone: cancel its requests; whether it was the last one."""
        with self.lock:
            self.broken[k], self.conns[k] = True, None
            orphans = [entry[0] for (owner, _), entry in self.live.items() if owner == k]
        for handle in orphans:
            handle.cancel("cancelled")
        return all(c is None for c in self.conns)

    def say_ready(self, vocab_size: int):
        with self.lock:
            self.sent_stats = dataclasses.astuple(self.scheduler.stats())
            for k in range(len(self.conns)):
                self._send(k, ("ready", {"vocab_size": vocab_size, "stats": self.sent_stats}))
            self.ready = True

    def submit(self, k: int, id_: int, request: GenerationRequest):
        with self.lock:  # registered before a turn can finish it, so that flush() reports the finish
            try:
                self.live[k, id_] = [self.scheduler.submit(request), 0]
                return
            except (QueueFull, SchedulerClosed, ValueError) as error:  # the HTTP process's checks make these rare
                refused = (id_, [], [], "error", f"{type(error).__name__}: {error}")
            self._send(k, ("events", ([refused], dataclasses.astuple(self.scheduler.stats()))))

    def flush(self):
        """Scheduler.on_delivered, on its thread: to each HTTP process, one message with every token
        and finish of its requests since the last, and the stats (so that each one's are current)."""
        stats = dataclasses.astuple(self.scheduler.stats())
        with self.lock:
            if not self.ready or stats == self.sent_stats:  # no token delivered, no request ended, no row freed
                return
            events = [[] for _ in self.conns]
            for key, entry in list(self.live.items()):
                tokens, times, reason, error = entry[0]._since(entry[1])
                if tokens or reason is not None:
                    entry[1] += len(tokens)
                    events[key[0]].append((key[1], tokens, times, reason,
                                           None if error is None else f"{type(error).__name__}: {error}"))
                    if reason is not None:
                        del self.live[key]
            for k, mine in enumerate(events):
                self._send(k, ("events", (mine, stats)))
            self.sent_stats = stats

    def send(self, message):
        """`message` to every HTTP process."""
        with self.lock:
            for k in range(len(self.conns)):
                self._send(k, message)

    def _send(self, k: int, message):
        if self.broken[k]:
            return
        try:
            self.conns[k].send(message)
        except (OSError, ValueError):  # HTTP process k has gone; serve() sees its pipe close
            self.broken[k] = True
