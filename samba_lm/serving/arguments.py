"""`samba-lm serve`'s flags, importable without FastAPI (the CLI builds every parser at start)."""

from __future__ import annotations

import argparse

from ..options import DEVICE_HELP


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--model", required=True, metavar="PATH",
                        help="a saved model, a training checkpoint or a run directory (with its tokenizer.json)")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, metavar="N", help="the TCP port to listen on")
    parser.add_argument("--max-batch", type=int, default=16, metavar="N",
                        help="requests decoded together at most (batch slots)")
    parser.add_argument("--max-queue", type=int, default=64, metavar="N",
                        help="requests waiting for a slot at most; beyond it a request gets 429 with Retry-After")
    parser.add_argument("--max-context", type=int, metavar="N",
                        help="the most prompt + max_tokens tokens a request may ask for; required for a model with "
                             "full-attention layers, whose caches get that many slots (default: no limit)")
    parser.add_argument("--prefill-chunk", type=int, default=512, metavar="N",
                        help="prompt tokens per prefill call: smaller chunks interleave prefills with the running "
                             "decodes more finely")
    parser.add_argument("--prefill-rows", type=int, default=8, metavar="N",
                        help="short prompts (up to 512 tokens and --prefill-chunk) prefilled together in one "
                             "forward at most")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="the weights' dtype (auto: as the model was saved)")
    parser.add_argument("--model-name", metavar="NAME", help="the model's id in the API (/v1/models; a request "
                                                             "naming another gets 404) (default: the --model "
                                                             "directory's name)")
    parser.add_argument("--grace", type=float, default=10.0, metavar="S",
                        help="seconds that in-flight requests get to finish on SIGTERM before they are cancelled")
    parser.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                        help="run the model (the scheduler, its CUDA graphs) in a process of its own, which sends "
                             "the HTTP process each step's tokens in one message, so that the model's Python work "
                             "and the HTTP streaming do not share one interpreter lock; a request is then refused "
                             "(429) once --max-batch + --max-queue are unfinished (default: on for a CUDA device, "
                             "where the host's Python work a step can outlast the decode step; off on the CPU, "
                             "where the model's own work bounds a step and the process would cost a second torch "
                             "import and a copy of every token)")
    parser.add_argument("--api-processes", type=int, default=1, metavar="N",
                        help="HTTP processes (FastAPI + uvicorn) serving --host:--port in front of the one engine "
                             "process, for when a single one's Python work (detokenizing, JSON, server-sent "
                             "events) cannot keep up with the engine's steps; the kernel spreads connections over "
                             "them, and each admits its share of --max-batch + --max-queue. N > 1 needs "
                             "--engine-process")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                        help="uvicorn's log level")
