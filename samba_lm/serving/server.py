"""`samba-lm serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching
Scheduler.

POST /v1/completions and, for a tokenizer with a chat template, POST /v1/chat/completions (each
streaming or not); GET /v1/models, GET /health, GET /metrics (Prometheus).
Every request is one scheduler handle: the event loop only validates, submits and relays tokens, so
HTTP work never waits on the model and the model never waits on HTTP. A client that goes away
cancels its handle, which frees its batch slot at the scheduler's next step.

Where the scheduler runs (--engine-process, on by default on CUDA): in a process of its own
(engine_process.py: the model, its CUDA graphs, prefill, sampling, stop tokens), which sends this
process every token of a step in one message, or in a thread of this process. The first keeps the
scheduler's and the event loop's Python work from sharing one interpreter lock; `build_app` serves
either, through the same interface. If the engine process dies, its requests end with "error",
/health answers 503 and so does every new request. With --api-processes N (api_processes.py), N
processes like this one serve the port in front of one engine process, each labelling its own
request metrics api_process="k".

Shutdown (SIGTERM or Ctrl-C): uvicorn stops accepting connections, the app answers 503 to whatever
still arrives, and the scheduler drains at once: in-flight requests finish within --grace seconds or
are cancelled (their streams end with finish_reason "cancelled"); then the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import signal
import socket
import threading
import time
from pathlib import Path
from typing import AsyncIterator

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException
except ImportError as e:  # an optional extra
    raise ImportError(f"samba-lm serve needs FastAPI and uvicorn ({e.name} is missing): "
                      "pip install samba-lm[serve]") from None

from .metrics import Metrics
from .chat import ChatTemplate, ChatTemplateError
from .engine_process import EngineClient
from .protocol import (ApiError, ChatCompletionRequest, CompletionRequest, TextStream, chat_chunk, chat_completion,
                       chat_completion_id, completion, completion_id, model_card, model_list, parse_completion_request,
                       usage, validation_error)
from .scheduler import GenerationRequest, QueueFull, SchedulerClosed

EOS_TOKENS = ("<|endoftext|>", "</s>")  # the end-of-text token of this package's tokenizers, and Llama's
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
GENERATION_FAILED = ApiError(500, "generation failed on the server", None, "generation_failed", "server_error")


class Service:
    """What the endpoints share: the scheduler, the tokenizer, the limits, the metrics, the shutdown."""

    def __init__(self, scheduler, tokenizer, model_name: str, max_context: int | None, vocab_size: int,
                 grace_s: float, retry_after_s: int, chat_template: ChatTemplate | None, eos: tuple[int, ...],
                 api_process: int | None = None):
        self.scheduler, self.tokenizer, self.model_name = scheduler, tokenizer, model_name
        self.max_context, self.vocab_size = max_context, vocab_size
        self.grace_s, self.retry_after_s = grace_s, retry_after_s
        self.chat_template = chat_template
        self.eos = tuple(dict.fromkeys([*(i for i in map(tokenizer.token_to_id, EOS_TOKENS) if i is not None), *eos]))
        self.metrics, self.created = Metrics(api_process), int(time.time())
        self.draining = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._drain: threading.Thread | None = None

    # -- requests
    def generation_request(self, body: CompletionRequest | ChatCompletionRequest) -> GenerationRequest:
        """The scheduler's request for a validated body, or the ApiError that names what is wrong."""
        if body.model is not None and body.model != self.model_name:
            raise self.no_such_model(body.model)
        if isinstance(body, ChatCompletionRequest):
            ids = self.tokenizer.encode(self.chat_prompt(body), add_special_tokens=False).ids  # as transformers does
        else:
            ids = self.tokenizer.encode(body.prompt).ids if isinstance(body.prompt, str) else body.prompt
        self.check_ids(ids, "prompt")
        self.check_ids(body.stop_token_ids, "stop_token_ids")
        if not ids:  # a prompt of nothing but characters the tokenizer drops
            raise ApiError(400, "the prompt encodes to no tokens", "prompt", "empty_prompt")
        if self.max_context is not None and len(ids) + body.max_tokens > self.max_context:
            param = "prompt" if len(ids) >= self.max_context else "max_tokens"
            raise ApiError(400, f"this server's maximum context is {self.max_context} tokens; the prompt has "
                                f"{len(ids)} and max_tokens is {body.max_tokens} ({len(ids) + body.max_tokens} in "
                                "all): shorten the prompt or lower max_tokens", param, "context_length_exceeded")
        stops = dict.fromkeys([*body.stop_token_ids, *(() if body.ignore_eos else self.eos)])
        return GenerationRequest(prompt_ids=tuple(ids), max_tokens=body.max_tokens, temperature=body.temperature,
                                 top_k=body.top_k, top_p=None if body.top_p == 1 else body.top_p, seed=body.seed,
                                 stop_tokens=tuple(stops))

    def chat_prompt(self, body: ChatCompletionRequest) -> str:
        """The conversation rendered by the tokenizer's chat template, the assistant's turn opened."""
        if self.chat_template is None:
            raise ApiError(400, "this model's tokenizer has no chat template (tokenizer_config.json's chat_template "
                                "or chat_template.jinja beside tokenizer.json): use /v1/completions", "messages",
                           "no_chat_template")
        try:
            return self.chat_template.render([m.for_template() for m in body.messages])
        except ChatTemplateError as e:
            raise ApiError(400, str(e), "messages", "chat_template_error") from None

    def check_ids(self, ids, param: str):
        bad = next((i for i, t in enumerate(ids) if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"token id {ids[bad]} (at {param}[{bad}]) is out of range: this model's vocabulary "
                                f"has ids 0 to {self.vocab_size - 1}", f"{param}[{bad}]", "token_out_of_range")

    def submit(self, request: GenerationRequest):
        if self.draining:
            raise self.unavailable()
        try:
            return self.scheduler.submit(request)
        except QueueFull as e:
            raise ApiError(429, f"the server is at capacity ({e or 'its request queue is full'}): retry later",
                           None, "queue_full", "rate_limit_error", {"Retry-After": str(self.retry_after_s)}) from None
        except SchedulerClosed:
            raise self.unavailable() if self.scheduler.failed is None else self.engine_failed() from None
        except ValueError as e:  # what the scheduler refuses that this side did not check
            raise ApiError(400, str(e), None, "invalid_value") from None

    def no_such_model(self, name: str) -> ApiError:
        return ApiError(404, f"the model {name!r} does not exist: this server serves {self.model_name!r}", "model",
                        "model_not_found")

    def unavailable(self) -> ApiError:
        return ApiError(503, "the server is shutting down: retry on another server or later", None,
                        "shutting_down", "service_unavailable", {"Retry-After": str(math.ceil(self.grace_s) + 1)})

    def engine_failed(self) -> ApiError:
        return ApiError(503, f"the server's model engine has failed ({self.scheduler.failed}): retry on another "
                             "server", None, "engine_failed", "service_unavailable")

    # -- shutdown
    def begin_shutdown(self):
        """Refuse new requests and let the scheduler drain (at most grace_s), in the background."""
        if self._drain is None:
            self.draining = True
            self._drain = threading.Thread(target=self.scheduler.shutdown, args=(self.grace_s,), name="samba-lm-drain",
                                           daemon=True)
            self._drain.start()

    def wait_drained(self):
        self._drain.join()

    def on_signal(self):
        """From a signal handler: begin the shutdown on the event loop's thread."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.begin_shutdown)


def build_app(scheduler, tokenizer, model_name: str, max_context: int | None = None, *,
              vocab_size: int | None = None, grace_s: float = 10.0, retry_after_s: int = 1,
              chat_template: ChatTemplate | None = None, eos_token_ids: tuple[int, ...] = (),
              api_process: int | None = None) -> FastAPI:
    """The app over a started `scheduler`, which it owns: the app's shutdown shuts the scheduler down.

    tokenizer: a `tokenizers.Tokenizer` (its <|endoftext|> or </s>, if any, stops generation unless a
    request says ignore_eos). max_context: the most prompt + max_tokens a request may ask for (None:
    the scheduler's max_context, if it has one). vocab_size: the model's, for checking token ids
    (default: the tokenizer's). grace_s: how long shutdown lets requests finish. retry_after_s: the
    Retry-After of a 429. chat_template: serves /v1/chat/completions (None: that endpoint answers 400).
    eos_token_ids: more tokens that end a generation (generation_config.json's eos_token_id).
    api_process: this process's index among several serving one engine (labels its own metrics)."""
    if tokenizer is None:
        raise ValueError("the server needs a tokenizer (a tokenizer.json beside the model) to encode prompts "
                         "and decode completions")
    if max_context is None:  # the scheduler may know its own (it sizes full-attention caches by it)
        max_context = getattr(scheduler, "max_context", None)
    service = Service(scheduler, tokenizer, model_name, max_context, vocab_size or tokenizer.get_vocab_size(),
                      grace_s, retry_after_s, chat_template, tuple(eos_token_ids), api_process)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.loop = asyncio.get_running_loop()
        if isinstance(scheduler, EngineClient):  # its messages are handed out on this loop's thread
            scheduler.attach(service.loop)
        yield
        service.begin_shutdown()  # on this thread, as on_signal's is
        await asyncio.to_thread(service.wait_drained)

    app = FastAPI(title="samba-lm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        if request.url.path in GENERATION_PATHS:
            service.metrics.response(error.status)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        return await api_error(request, validation_error(error.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):  # unknown paths, wrong methods
        message = f"{request.method} {request.url.path}: {error.detail}"
        return await api_error(request, ApiError(error.status_code, message, None, None, headers=error.headers))

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):  # a bug: logged by uvicorn, answered as OpenAI's
        return await api_error(request, ApiError(500, f"internal error: {type(error).__name__}: {error}", None,
                                                 "internal_error", "server_error"))

    @app.get("/health")
    async def health():
        if service.draining:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        if scheduler.failed is not None:  # nothing is served: a process manager should replace this server
            return JSONResponse({"status": "failed", "error": str(scheduler.failed)}, status_code=503)
        stats = scheduler.stats()
        ok = {"status": "ok", "model": model_name, "queued": stats.queued, "running": stats.running}
        return ok if api_process is None else ok | {"api_process": api_process}  # which HTTP process answered

    @app.get("/v1/models")
    async def models():
        return model_list(model_name, service.created, max_context)

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != model_name:
            raise service.no_such_model(name)
        return model_card(model_name, service.created, max_context)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(service.metrics.render(scheduler.stats()),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    async def generate(request: Request, kind: type):
        body = parse_completion_request(await request.body(), kind)
        generation = service.generation_request(body)
        handle = service.submit(generation)
        reply = Reply(handle, TextStream(tokenizer, body.stop), service.metrics, model_name,
                      chat=kind is ChatCompletionRequest)
        if body.stream:
            service.metrics.response(200)  # the status goes out now; a failure later is an error event
            return EventStream(reply, body.include_usage)
        watcher = asyncio.create_task(_cancel_on_disconnect(request, handle))
        try:
            text = "".join([delta async for delta in reply.deltas()])
        finally:
            watcher.cancel()
        if reply.finish_reason == "error":
            raise GENERATION_FAILED
        service.metrics.response(200)
        return reply.whole(text)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, CompletionRequest)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, ChatCompletionRequest)

    return app


class Reply:
    """One request's handle relayed as text: deltas as they become ready, then its finish reason."""

    def __init__(self, handle, text: TextStream, metrics: Metrics, model_name: str, chat: bool = False):
        self.handle, self.text, self.metrics, self.model_name, self.chat = handle, text, metrics, model_name, chat
        self.id, self.created = chat_completion_id() if chat else completion_id(), int(time.time())
        self.tokens, self.finish_reason = 0, None

    def whole(self, text: str) -> dict:
        """The reply to a request that does not stream."""
        made = chat_completion if self.chat else completion
        return made(self.id, self.model_name, text, self.finish_reason, self.created, self.usage())

    def chunk(self, text: str | None, finish_reason: str | None, extra: dict) -> dict:
        """A stream chunk of text (None: the chat's first chunk, which names the role)."""
        if not self.chat:
            return completion(self.id, self.model_name, text, finish_reason, self.created) | extra
        delta = {"role": "assistant", "content": ""} if text is None else {"content": text} if text else {}
        return chat_chunk(self.id, self.model_name, delta, finish_reason, self.created) | extra

    def usage(self) -> dict:
        return usage(len(self.handle.request.prompt_ids), self.tokens)

    async def deltas(self) -> AsyncIterator[str]:
        """The text as it becomes ready; finish_reason is set once it has all come. A reader that
        falls behind gets the text of every token already generated in one piece, so a busy server
        sends fewer, larger chunks instead of falling further behind."""
        pending = ""
        try:
            async with contextlib.aclosing(self.handle.stream()) as tokens:
                async for token in tokens:
                    self.tokens += 1
                    pending += self.text.push(token)
                    if self.text.stopped:  # a stop string: the scheduler sees only tokens, so end it here
                        self.handle.cancel("stop")
                        break
                    if pending and len(self.handle.token_times) <= self.tokens:  # caught up
                        yield pending
                        pending = ""
            reason = "stop" if self.text.stopped else self.handle.finish_reason or "stop"
            pending += self.text.finish()
            if pending and reason != "error":
                yield pending
            self._end(reason)
        except Exception:
            self._end("error")
            raise
        finally:
            self.close()

    def close(self):
        """However the reply ends: a handle still running has lost its client, so cancel it."""
        if self.finish_reason is None:
            self.handle.cancel("cancelled")
            self._end("cancelled")

    def _end(self, reason: str):
        if self.finish_reason is None:
            self.finish_reason = reason
            self.metrics.request_done(reason, len(self.handle.request.prompt_ids), self.handle.submitted_at,
                                      self.handle.token_times[:self.tokens])

    async def events(self, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events as OpenAI streams them: text deltas, a chunk with the finish reason, a
        usage chunk if asked for, then [DONE]. A failed generation ends with an error event."""
        extra = {"usage": None} if include_usage else {}  # OpenAI: null in every chunk but the usage one
        if self.chat:
            yield _sse(self.chunk(None, None, extra))
        async with contextlib.aclosing(self.deltas()) as deltas:
            async for delta in deltas:
                yield _sse(self.chunk(delta, None, extra))
        if self.finish_reason == "error":
            yield _sse(GENERATION_FAILED.body())
        else:
            yield _sse(self.chunk("", self.finish_reason, extra))
            if include_usage:
                yield _sse({"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                            "created": self.created, "model": self.model_name, "choices": [], "usage": self.usage()})
        yield "data: [DONE]\n\n"


class EventStream(StreamingResponse):
    """A reply's server-sent events. A client that leaves before the first chunk never starts the
    events' generator (whose cleanup cancels the handle), so the response cleans up itself too."""

    def __init__(self, reply: Reply, include_usage: bool):
        super().__init__(reply.events(include_usage), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.reply = reply

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.reply.close()


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _cancel_on_disconnect(request: Request, handle):
    """Cancel `handle` if the client goes away while a (non-streaming) reply is being generated."""
    while not handle.done:
        if await request.is_disconnected():
            handle.cancel("cancelled")
            return
        await asyncio.sleep(0.1)


# ----------------------------------------------------------------------------- running it
class _Server(uvicorn.Server):
    """uvicorn's server, which also starts draining the scheduler as soon as a signal comes: uvicorn
    itself would first wait for every connection to close, which open streams would hold off."""

    def __init__(self, config: uvicorn.Config, on_signal, ignore_sigint: bool = False):
        super().__init__(config)
        self.on_signal, self.ignore_sigint = on_signal, ignore_sigint

    def handle_exit(self, sig, frame):
        if sig == signal.SIGINT and self.ignore_sigint:  # one of several HTTP processes: the parent turns
            return  # Ctrl-C, which reaches the whole group, into a SIGTERM to each
        self.on_signal()
        super().handle_exit(sig, frame)


def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                ignore_sigint: bool = False) -> uvicorn.Server:
    """A uvicorn server for `app` (run it with .run(), or .run(sockets=[...]) in a thread, as tests do)."""
    service = app.state.service
    # A backstop: the drain ends every stream within grace_s, so uvicorn's own wait should not need this.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=int(service.grace_s) + 5)
    return _Server(config, service.on_signal, ignore_sigint)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          sock: socket.socket | None = None):
    """Serve `app` until SIGTERM or Ctrl-C, then drain; a SIGTERM ends the process normally (status 0).
    sock: a listening socket to serve instead of host:port, which then ignores Ctrl-C (an HTTP process
    of --api-processes N, whose parent bound it and signals it)."""
    server = make_server(app, host, port, log_level, ignore_sigint=sock is not None)
    sockets = None if sock is None else [sock]
    if threading.current_thread() is not threading.main_thread():
        return server.run(sockets)
    # uvicorn re-raises the signal it caught once it has shut down, under the handler found before it
    # started; land SIGTERM in a no-op here so that a graceful stop exits 0 rather than 143.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets)
    finally:
        signal.signal(signal.SIGTERM, previous)


def front_end(args: argparse.Namespace) -> tuple:
    """What the HTTP side of `samba-lm serve` reads beside the model: (tokenizer, chat template, stop ids)."""
    from ..loading import load_tokenizer_for_generation, stop_token_ids

    tokenizer, where = load_tokenizer_for_generation(args.model)
    # A Hugging Face checkpoint's chat template and end-of-turn tokens sit beside its tokenizer.json.
    return tokenizer, ChatTemplate.from_directory(where), stop_token_ids(where)


def app_for(args: argparse.Namespace, scheduler, vocab_size: int, front: tuple, api_process: int | None = None):
    """The app of `samba-lm serve` over a started scheduler, as the flags say."""
    tokenizer, chat_template, eos = front
    name = args.model_name or Path(args.model).resolve().name
    return build_app(scheduler, tokenizer, name, args.max_context, vocab_size=vocab_size, grace_s=args.grace,
                     chat_template=chat_template, eos_token_ids=eos, api_process=api_process)
