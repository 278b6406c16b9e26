"""`samba-lm serve --api-processes N`: N HTTP processes in front of one engine process (vLLM's API
server scale-out).

With the model in an engine process, one HTTP process's Python work (an SSE chunk a token:
detokenizing, JSON, the socket write) becomes the bound at many streams. So the parent process,
which serves nothing itself:

- binds N listening sockets on host:port with SO_REUSEPORT, one for each HTTP process, so that the
  kernel spreads connections evenly over them (`_listen` says why not one shared socket). Binding
  them here, before anything starts, makes a busy port one error and lets port 0 work;
- spawns the engine process with one pipe per HTTP process and waits until it is ready (a load error
  is raised here, as with one process); each HTTP process gets its pipe and serves over an
  EngineClient. The engine keys requests by (pipe, id), so ids never collide, and sends each HTTP
  process one message a step with its own requests' tokens and the engine's stats;
- watches: on SIGTERM or Ctrl-C it sends SIGTERM to every HTTP process, which drains as one process
  does (each asks the engine to drain: the first ask starts it, for every request); once they and
  the engine have exited it exits 0. An HTTP process that exits on its own stops the whole server
  (status 1): its clients are gone and the engine has cancelled its requests. If the engine dies,
  every HTTP process fails its requests and answers 503, as one does. The engine and every HTTP
  process exit at once when the parent is killed.

Admission: each HTTP process admits max_batch + max_queue over N (rounded up) unfinished requests,
so a share is refused with 429 while another process has room. /metrics: the gauges, the steps and
the engine's totals come from the engine's stats (the same from any process); the counters and
histograms of requests are the answering process's own, labelled api_process="k".
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import multiprocessing.connection
import signal
import socket
import threading
from typing import Callable

from ..model import SambaLM
from .engine_process import EXIT_MARGIN_S, EngineClient, exit_with_parent, scheduler_options, spawn_engine
from .server import app_for, front_end, serve

__all__ = ["serve_api_processes"]

logger = logging.getLogger(__name__)


def serve_api_processes(args: argparse.Namespace, load: Callable[[], SambaLM]):
    """The parent of `samba-lm serve --api-processes N`: bind, start the engine and the HTTP
    processes, wait for a signal, stop them all. Raises KeyboardInterrupt after a drained Ctrl-C."""
    n = args.api_processes
    socks = _listen(args.host, args.port, n)
    options = scheduler_options(args.max_batch, args.max_queue, args.prefill_chunk, args.prefill_rows,
                                args.max_context, clients=n)
    port, engine, workers = socks[0].getsockname()[1], None, []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        engine, conns, ready = spawn_engine(load, options, n)  # its load error is raised here
        context = multiprocessing.get_context("spawn")
        for k, (conn, sock) in enumerate(zip(conns, socks)):
            worker = context.Process(target=_api_main, args=(args, k, conn, ready, sock), name=f"samba-lm-api-{k}",
                                     daemon=True)
            worker.start()
            workers.append(worker)
            # The worker's now: its death closes the pipe at the engine, and its socket, which the kernel
            # then stops handing connections to (a copy held here would keep taking them).
            conn.close()
            sock.close()
        logger.info("samba-lm serve: %d HTTP processes on %s:%d, engine process %d", n, args.host, port, engine.pid)
        stopped_by = _supervise(workers)
        for worker in workers:
            worker.join(args.grace + EXIT_MARGIN_S)
        engine.join(EXIT_MARGIN_S)  # it exits after its goodbye, which each HTTP process waited for
    finally:
        for process in [*workers, *([engine] if engine is not None else [])]:
            if process.is_alive():
                logger.error("%s (pid %d) did not exit: killing it", process.name, process.pid)
                process.kill()
                process.join()
        for sock in socks:
            sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped_by is None:
        raise SystemExit(1)
    if stopped_by == signal.SIGINT:
        raise KeyboardInterrupt


def _listen(host: str, port: int, n: int) -> list[socket.socket]:
    """n listening sockets on host:port with SO_REUSEPORT, so that the kernel spreads connections
    evenly over the n HTTP processes by a hash of each connection's addresses. One socket shared by
    all (uvicorn's --workers) is simpler, but then whichever process wakes first accepts every
    connection waiting: a burst of 64 went about 2:1 to one of two processes on loopback."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn tells them apart
    socks = []
    try:
        for _ in range(n):
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]  # port 0: the rest bind the port the first got
            sock.listen(2048)
    except OSError as e:
        for sock in socks:
            sock.close()
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({e})") from None
    return socks


def _supervise(workers: list) -> int | None:
    """Wait for SIGTERM or SIGINT (its number) or an HTTP process's exit (None); then SIGTERM them all.
    Its handlers stay until the caller restores them: a second signal must not kill this process mid-drain."""
    caught = []
    stop = threading.Event()

    def on_signal(sig, frame):
        caught.append(sig)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    sentinels = [w.sentinel for w in workers]
    while not stop.is_set():
        if multiprocessing.connection.wait(sentinels, 0.2):  # a timeout, to see a signal
            gone = next(w for w in workers if not w.is_alive())
            logger.error("%s exited (exit code %s): stopping the server", gone.name, gone.exitcode)
            break
    for worker in workers:
        if worker.is_alive():
            worker.terminate()  # SIGTERM: it drains
    return caught[0] if caught else None


def _api_main(args: argparse.Namespace, index: int, conn, ready: dict, sock: socket.socket):
    """HTTP process `index`: serve `sock` over a client of the engine at the end of `conn`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent sends SIGTERM
    threading.Thread(target=exit_with_parent, name="samba-lm-parent-watch", daemon=True).start()
    client = EngineClient(max_batch=args.max_batch, max_queue=args.max_queue, max_context=args.max_context,
                          api_processes=args.api_processes).connect(conn, ready)
    try:
        serve(app_for(args, client, ready["vocab_size"], front_end(args), api_process=index),
              log_level=args.log_level, sock=sock)
    finally:
        client.shutdown(args.grace)  # the app's shutdown did this, unless it never started
