"""The OpenAI completions and chat completions wire formats: requests checked field by field, replies,
stream chunks and error bodies as OpenAI writes them, and the text of generated tokens released
incrementally.

Requests are strict: unknown fields are refused (a misspelt `max_token` must not silently mean 16),
types are not coerced ("16" is not 16, true is not 1), and a JSON null means "the default". Fields
that OpenAI defines but this server does not implement (n > 1, echo, logprobs, penalties, logit_bias,
suffix; for chat also tools, tool_choice and response_format) are accepted only at their no-op values,
with a message that says so. Extensions (as vLLM names them): `top_k`, `stop_token_ids`, `ignore_eos`.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, ClassVar, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_MAX_TOKENS = 16
# OpenAI fields this server does not implement, accepted at their no-op values only.
NO_OP_FIELDS = {"n": (1,), "best_of": (None, 1), "echo": (False,), "logprobs": (None,), "suffix": (None,),
                "logit_bias": (None, {}), "frequency_penalty": (0.0,), "presence_penalty": (0.0,)}
CHAT_NO_OP_FIELDS = {"logprobs": (False,), "top_logprobs": (None,), "tools": (None, []), "tool_choice": (None, "none"),
                     "response_format": (None, {"type": "text"})}


class ApiError(Exception):
    """An error reply: its HTTP status and OpenAI's body {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(errors: Sequence[dict]) -> ApiError:
    """The 400 for pydantic's (or FastAPI's) list of errors: the first one, naming its field."""
    error = errors[0]
    loc = [part for part in error.get("loc", ()) if part != "body"]
    if not loc and error.get("type") == "value_error":  # a rule across fields (its message names them)
        return ApiError(400, str(error.get("msg")).removeprefix("Value error, "), None, "invalid_value")
    if not loc:
        return ApiError(400, f"the request body must be a JSON object ({error.get('msg', 'invalid')})", None,
                        error.get("type"))
    param = str(loc[0]) + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:])
    if error.get("type") == "extra_forbidden":
        return ApiError(400, f"unknown field {param!r} (this server takes OpenAI's fields for this endpoint and "
                             "the extensions top_k, stop_token_ids, ignore_eos)", param, "extra_forbidden")
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    if error.get("type") != "missing" and "input" in error:
        got = repr(error["input"])
        message = f"{message} (got {got if len(got) <= 80 else got[:77] + '...'})"
    return ApiError(400, f"invalid {param!r}: {message}", param, error.get("type"))


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """The fields the completion and chat requests share."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str | None = None
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1)
    temperature: float = Field(1.0, ge=0)  # OpenAI's default; 0 is greedy
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False  # the tokenizer's end-of-text token does not stop generation
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as an identifier only
    # OpenAI's fields this server does not implement: refused unless at their no-op value.
    n: int = 1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        value = [value] if isinstance(value, str) else value
        if isinstance(value, list) and any(s == "" for s in value):
            raise ValueError("a stop string must not be empty")
        return value

    no_op_fields: ClassVar[dict] = {}  # each endpoint's fields accepted at their no-op values only

    @field_validator(*NO_OP_FIELDS, *CHAT_NO_OP_FIELDS, check_fields=False)
    @classmethod
    def _no_op_only(cls, value, info):
        allowed = cls.no_op_fields[info.field_name]
        if value not in allowed:  # the request model is strict: no bool arrives as an int
            raise ValueError(f"{info.field_name} is not supported by this server (only "
                             f"{' or '.join(json.dumps(ok) for ok in allowed)})")
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions. `prompt` becomes a str or a list of token ids (a list holding one of either
    is unwrapped); `stop` becomes a list of strings."""

    no_op_fields: ClassVar[dict] = NO_OP_FIELDS
    prompt: str | list[int]
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        is_ids = isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
        if isinstance(value, list) and value and not is_ids:  # a batch of prompts: one is fine
            if len(value) > 1 and all(isinstance(p, (str, list)) for p in value):
                raise ValueError(f"{len(value)} prompts given; this server takes one prompt per request "
                                 "(send the others as separate, concurrent requests)")
            value = value[0]
            is_ids = isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
        if not (isinstance(value, str) or is_ids):
            raise ValueError("must be a string, a list of token ids, or a list holding one of either")
        if len(value) == 0:
            raise ValueError("the prompt is empty")
        return value


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """A message as the template sees it: its role, its text (a list of text parts is joined with
    newlines, as vLLM does for templates that take strings) and an optional name."""

    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart]
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if isinstance(value, list):
            other = next((p for p in value if not (isinstance(p, dict) and p.get("type") == "text")), None)
            if other is not None:
                kind = other.get("type") if isinstance(other, dict) else type(other).__name__
                raise ValueError(f"only text content parts are supported (got a part of type {kind!r})")
        return value

    def for_template(self) -> dict:
        content = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        return {"role": self.role, "content": content} | ({"name": self.name} if self.name is not None else {})


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions. `max_completion_tokens` is OpenAI's newer name for max_tokens."""

    no_op_fields: ClassVar[dict] = {**NO_OP_FIELDS, **CHAT_NO_OP_FIELDS}
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: str | None = None
    response_format: dict | None = None

    @model_validator(mode="after")
    def _one_limit(self):
        if self.max_completion_tokens is not None:
            if "max_tokens" in self.model_fields_set and self.max_tokens != self.max_completion_tokens:
                raise ValueError("max_tokens and max_completion_tokens disagree: give one of them")
            self.max_tokens = self.max_completion_tokens
        return self


def parse_completion_request(body: bytes, kind: type[_GenerationRequest] = None) -> _GenerationRequest:
    """The request in `body` (a CompletionRequest, or `kind`), read as JSON whatever the Content-Type
    says (curl -d sends a form's), or the ApiError (400) that names what is wrong."""
    try:
        data = json.loads(body)
    except ValueError as e:  # JSONDecodeError, or bytes that are not text
        where = f" at position {e.pos}" if isinstance(e, json.JSONDecodeError) else ""
        reason = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8 text"
        raise ApiError(400, f"the request body is not valid JSON: {reason}{where}", None, "json_invalid") from None
    try:
        return (kind or CompletionRequest).model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors()) from None



# ----------------------------------------------------------------------------- replies
def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(id_: str, model: str, text: str, finish_reason: str | None, created: int | None = None,
               usage_: dict | None = None) -> dict:
    """A completion object (the reply), or one stream chunk of it (usage_ None: no usage field)."""
    reply = {"id": id_, "object": "text_completion", "created": created or int(time.time()), "model": model,
             "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}
    if usage_ is not None:
        reply["usage"] = usage_
    return reply


def chat_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def chat_completion(id_: str, model: str, text: str, finish_reason: str | None, created: int,
                    usage_: dict) -> dict:
    """A chat completion object: the assistant's message."""
    return {"id": id_, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}], "usage": usage_}


def chat_chunk(id_: str, model: str, delta: dict, finish_reason: str | None, created: int) -> dict:
    """One stream chunk of a chat completion: `delta` holds the role (first chunk) or content."""
    return {"id": id_, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def model_list(name: str, created: int, max_context: int | None) -> dict:
    return {"object": "list", "data": [model_card(name, created, max_context)]}


def model_card(name: str, created: int, max_context: int | None) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "samba-lm", "max_model_len": max_context}


# ----------------------------------------------------------------------------- text out
class TextStream:
    """Generated token ids in, text out, ready to send: never part of a character, never any of a stop
    string, and stopped at the first one.

    Decoding follows Hugging Face TGI's incremental detokenizer: decode a window of recent tokens
    with and without the newest and send the difference once it does not end in U+FFFD (a multi-byte
    character still arriving). The window restarts at the last such boundary, so each token costs a
    decode of a few tokens, and a decoder that drops a leading space decodes the same text as it
    would for the whole sequence. Stop strings are matched on the text; its tail that could still
    begin one is held back until it cannot."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.longest = max(map(len, self.stop), default=0)
        self.ids: list[int] = []
        self.start = self.read = 0  # token offsets: the window's start, and where its decoded text ends
        self.text = ""  # every whole character decoded so far (cut at a stop string, once found)
        self.sent = 0  # characters of text already released
        self.stopped = False  # a stop string was found: generation should end

    def push(self, token: int) -> str:
        """Take one generated token; return the text that can be sent now (maybe "")."""
        if self.stopped:
            return ""
        self.ids.append(token)
        window = self._decode_window()
        if window and not window.endswith("\ufffd"):
            self.text += window
            self.start, self.read = self.read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """Generation ended: return the rest, held-back text and any incomplete character included."""
        if not self.stopped:
            self.text += self._decode_window()
            self.start = self.read = len(self.ids)
        return self._release(final=True)

    def _decode_window(self) -> str:
        before = self.tokenizer.decode(self.ids[self.start:self.read])
        return self.tokenizer.decode(self.ids[self.start:])[len(before):]

    def _release(self, final: bool) -> str:
        # A stop string found cuts the text before it; it can only begin in text not yet sent.
        found = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if found:
            self.text, self.stopped, final = self.text[:min(found)], True, True
        end = len(self.text) if final else len(self.text) - self._could_begin_stop()
        delta, self.sent = self.text[self.sent:end], max(self.sent, end)
        return delta

    def _could_begin_stop(self) -> int:
        """Length of the longest unsent tail of the text that is the start of a stop string."""
        for n in range(min(self.longest - 1, len(self.text) - self.sent), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0
