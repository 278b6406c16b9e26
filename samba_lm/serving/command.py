"""`samba-lm serve`: an OpenAI-compatible HTTP server with streaming and continuous batching.

The command loads the model, starts its scheduler (in an engine process, or a thread of this process)
and serves it (server.py), or with --api-processes N runs N HTTP processes over one engine process
(api_processes.py). It sits above both, so that neither imports the other.

    python -m samba_lm.serving.command --model runs/x/model    # samba-lm serve without the CLI
"""

from __future__ import annotations

import argparse

from .api_processes import serve_api_processes
from .arguments import add_arguments
from .engine_process import EngineProcess, load_model
from .scheduler import Scheduler
from .server import app_for, front_end, serve


def main(args: argparse.Namespace):
    """`samba-lm serve`: load the model, start the scheduler (in an engine process or a thread), serve
    until SIGTERM; with --api-processes N, in N HTTP processes over one engine process."""
    import functools

    import torch

    from ..loading import resolve_device

    for flag in ("max_batch", "max_queue", "prefill_chunk", "prefill_rows", "max_context", "api_processes"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive int, got {value}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must lie in 0..65535, got {args.port}")
    if not args.grace >= 0:
        raise ValueError(f"--grace must be >= 0 seconds, got {args.grace}")
    device = resolve_device(args.device)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    in_a_process = device.type == "cuda" if args.engine_process is None else args.engine_process
    if args.api_processes > 1 and not in_a_process:
        raise ValueError(f"--api-processes {args.api_processes} needs --engine-process: the HTTP processes share "
                         f"one engine process (off by default on the {device.type.upper()})")
    front = front_end(args)  # the tokenizer first: a missing one fails before the weights are read
    load = functools.partial(load_model, args.model, device, dtype, args.max_context)
    options = dict(max_batch=args.max_batch, max_queue=args.max_queue, prefill_chunk=args.prefill_chunk,
                   prefill_rows=args.prefill_rows, max_context=args.max_context)
    if args.api_processes > 1:
        return serve_api_processes(args, load)
    if in_a_process:
        scheduler = EngineProcess(load, **options).start()  # its load error is raised here
        vocab_size = scheduler.vocab_size
    else:
        model = load()
        scheduler, vocab_size = Scheduler(model, **options).start(), model.config.vocab_size
    serve(app_for(args, scheduler, vocab_size, front), args.host, args.port, args.log_level)


if __name__ == "__main__":  # python -m samba_lm.serving.command: samba-lm serve without the CLI
    from ..options import HelpFormatter

    _parser = argparse.ArgumentParser(prog="samba-lm serve", description=__doc__.split("\n\n")[0],
                                      formatter_class=HelpFormatter)
    add_arguments(_parser)
    try:
        main(_parser.parse_args())
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"samba-lm serve: error: {e}") from None
    except KeyboardInterrupt:  # Ctrl-C: drained like SIGTERM, then uvicorn re-raises it
        raise SystemExit(130) from None
