"""Chat templates: a conversation rendered to prompt text as Hugging Face transformers renders it.

The template is the Jinja source a Hugging Face tokenizer carries: `chat_template.jinja` beside
tokenizer.json, else the `chat_template` field of tokenizer_config.json (a string, or a list of named
templates of which "default" is taken). It renders in the environment transformers builds for
`apply_chat_template`: a sandbox, trim_blocks and lstrip_blocks, the loop controls, the {% generation %}
tag, and the globals raise_exception, strftime_now, dict and namespace, with transformers' tojson (no
HTML escaping). It sees `messages`, `add_generation_prompt`, tools and documents (None here) and the
tokenizer's special tokens by name (bos_token, eos_token, ...). Jinja2 comes with PyTorch.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"
# transformers' special-token attributes, which a template sees as variables.
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """The template refused the conversation (its raise_exception), or failed to render it."""


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        self.source, self.special_tokens = source, dict(special_tokens or {})
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"the chat template does not parse: {e.message} (line {e.lineno})") from None

    @classmethod
    def from_directory(cls, directory: str | Path) -> ChatTemplate | None:
        """The template of the tokenizer files in `directory`, or None if they carry none."""
        directory = Path(directory)
        config = _read_json(directory / CONFIG_FILE)
        specials = {name: _token_text(config[name]) for name in SPECIAL_TOKENS if config.get(name) is not None}
        if (directory / TEMPLATE_FILE).is_file():
            return cls((directory / TEMPLATE_FILE).read_text(encoding="utf-8"), specials)
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: transformers' default is the one named "default"
            source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"),
                          None)
        if source is None:
            return None
        if not isinstance(source, str):
            raise ValueError(f"{directory / CONFIG_FILE}: chat_template must be a string or a list of "
                             f"{{name, template}}, got {type(source).__name__}")
        return cls(source, specials)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text of `messages` ([{role, content, ...}]), ending with the assistant's turn opened
        when add_generation_prompt (as apply_chat_template(..., tokenize=False) returns it)."""
        try:
            return self._template.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template refused the messages: {e.message or e}") from None


def _environment():
    """The Jinja environment of transformers' apply_chat_template (chat_template_utils in transformers 5)."""
    class Generation(jinja2.ext.Extension):
        """{% generation %}...{% endgeneration %}: transformers marks the assistant's tokens with it;
        rendering passes its body through."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """namespace() that refuses underscore names, as transformers' does (no reach into internals)."""

        def __init__(*args, **kwargs):
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template cannot store {name!r} on a namespace")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=_Dict(), namespace=Namespace)
    return env


class _Dict:
    """dict() and dict.fromkeys() only, as transformers gives templates (no reach into the type)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _token_text(token) -> str:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken's {content, ...}."""
    return token["content"] if isinstance(token, dict) else str(token)
