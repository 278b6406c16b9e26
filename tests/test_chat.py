"""Chat templates rendered as transformers renders them, and /v1/chat/completions through the openai
client against /v1/completions on the rendered prompt."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from samba_lm.loading import stop_token_ids  # noqa: E402
from samba_lm.serving.chat import ChatTemplate, ChatTemplateError  # noqa: E402
from samba_lm.serving.scheduler import Scheduler  # noqa: E402
from samba_lm.serving.server import build_app  # noqa: E402
from test_server import MAX_CONTEXT, model, reference, serving, sse, tokenizer  # noqa: E402, F401

# Phi-4-mini-flash-reasoning's template (its tokenizer_config.json), and one that uses what
# transformers adds to Jinja: loop controls, namespace, tojson, {% generation %}, raise_exception.
PHI4_FLASH = ("{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
              "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + "
              "message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + "
              "message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
              "{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")
EXTENDED = """{{ bos_token }}{% set ns = namespace(turns=0) %}
{% for m in messages %}
  {% if m.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + m.role) }}{% endif %}
  {% if m.content == 'skip' %}{% continue %}{% endif %}
  {% set ns.turns = ns.turns + 1 %}
  {% if m.role == 'assistant' %}{% generation %}[{{ m.role }}] {{ m.content }}{% endgeneration %}
  {% else %}[{{ m.role }}] {{ m.content | tojson }}
  {% endif %}
{% endfor %}
{% if add_generation_prompt %}[assistant after {{ ns.turns }}]{% endif %}"""
CONVERSATIONS = [
    [{"role": "user", "content": "hello"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo \"wörld\" <b>"},
     {"role": "assistant", "content": "hi"}, {"role": "user", "content": "skip"}, {"role": "user", "content": "again"}],
]


@pytest.mark.parametrize("source", [PHI4_FLASH, EXTENDED], ids=["phi4-flash", "extended"])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_templates_render_as_transformers_renders_them(tokenizer, source, generation_prompt):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, chat_template=source, bos_token="<s>",
                                                  eos_token="<|endoftext|>")
    ours = ChatTemplate(source, {"bos_token": "<s>", "eos_token": "<|endoftext|>"})
    for messages in CONVERSATIONS:
        expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        assert ours.render(messages, add_generation_prompt=generation_prompt) == expected


def test_a_template_that_refuses_says_why():
    with pytest.raises(ChatTemplateError, match="unknown role tool"):
        ChatTemplate(EXTENDED).render([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="does not parse"):
        ChatTemplate("{% for m in messages %}")


def test_templates_and_stops_come_from_the_tokenizer_files(tmp_path):
    assert ChatTemplate.from_directory(tmp_path) is None and stop_token_ids(tmp_path) == ()
    config = {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ bos_token }}D"}],
              "bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert ChatTemplate.from_directory(tmp_path).render([]) == "<s>D"
    (tmp_path / "chat_template.jinja").write_text("J{{ eos_token }}")  # the file wins, as in transformers
    assert ChatTemplate.from_directory(tmp_path).render([]) == "J</s>"
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 3]}))
    assert stop_token_ids(tmp_path) == (7, 3)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(ValueError, match="eos_token_id"):
        stop_token_ids(tmp_path)


CHAT = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


def start_server(model, tokenizer, chat_template: ChatTemplate | None):
    scheduler = Scheduler(model, max_batch=4, max_queue=64, max_context=MAX_CONTEXT).start()
    app = build_app(scheduler, tokenizer, "tiny", MAX_CONTEXT, vocab_size=model.config.vocab_size,
                    chat_template=chat_template)
    return serving(app)


@pytest.fixture(scope="module")
def chat_server(model, tokenizer):
    with start_server(model, tokenizer, ChatTemplate(CHAT)) as url:
        yield url


@pytest.fixture(scope="module")
def plain_server(model, tokenizer):
    with start_server(model, tokenizer, None) as url:
        yield url


def test_chat_completions_equal_completions_of_the_rendered_prompt(chat_server, model, tokenizer):
    """Through the openai client, streaming and not, greedy and seeded: the reply is generate()'s for the
    template's text encoded without special tokens, and the stream opens with the assistant's role."""
    client = openai.OpenAI(base_url=f"{chat_server}/v1", api_key="x", max_retries=0)
    messages = [{"role": "system", "content": "alpha beta"}, {"role": "user", "content": "gamma delta"}]
    ids = tokenizer.encode(ChatTemplate(CHAT).render(messages), add_special_tokens=False).ids
    for sampling in (dict(temperature=0.0), dict(temperature=0.9, seed=5)):
        text, used, reason = reference(model, tokenizer, ids, 9, **sampling)
        reply = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=9, **sampling)
        assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
        assert (reply.choices[0].message.role, reply.choices[0].message.content) == ("assistant", text)
        assert (reply.choices[0].finish_reason, reply.usage.completion_tokens, reply.usage.prompt_tokens) == (
            reason, used, len(ids))
        chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=9, stream=True,
                                                     stream_options={"include_usage": True}, **sampling))
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens == used
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason


def test_chat_errors_name_the_field(chat_server, plain_server):
    url = plain_server  # built without a template
    ask = dict(messages=[{"role": "user", "content": "alpha"}])
    reply = httpx.post(f"{url}/v1/chat/completions", json=ask)
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "no_chat_template"
    for body, param in ((dict(messages=[]), "messages"), (dict(messages=[{"role": "bot", "content": "x"}]), "messages[0].role"),
                        (dict(ask, logprobs=True), "logprobs"), (dict(ask, tools=[{"type": "function"}]), "tools"),
                        (dict(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), "messages[0].content"),
                        (dict(ask, max_tokens=3, max_completion_tokens=4), None)):
        reply = httpx.post(f"{chat_server}/v1/chat/completions", json=body)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param, body
    with httpx.stream("POST", f"{chat_server}/v1/chat/completions", json=dict(ask, stream=True, max_tokens=2)) as r:
        assert sse(r)[-1] == "[DONE]"
