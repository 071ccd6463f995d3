"""The checkpoint's own chat template: Jinja2, rendered the way `transformers` renders it.

A tokenizer directory carries its chat template in `chat_template.jinja`, in
`chat_template.json` (`{"chat_template": ...}`) or as `chat_template` in
`tokenizer_config.json` (a string, or a list of named templates: `default`, and
`tool_use` when tools are given), first found wins. `JinjaChatTemplate` renders
it in Jinja2's immutable sandbox with the environment `transformers`'
`apply_chat_template` builds (`trim_blocks`, `lstrip_blocks`, loop controls,
`tojson`, `raise_exception`, `strftime_now`, the `{% generation %}` tag) and
the same variables (`messages`, `add_generation_prompt`, `tools`, the special
tokens `bos_token`, `eos_token`, ... and the template's own switches such as
`enable_thinking`, from `template_kwargs`).

The loss mask covers exactly the assistant replies and their end-of-turn token.
Their character spans come from the template's `{% generation %}` blocks when it
has them, else from rendering prefixes of the conversation: a reply is what the
conversation up to it adds to the conversation before it with a generation
prompt, trailing whitespace trimmed. Spans map to tokens through one `encode`
with offsets (`ling_jax.data.chat.encode_spans`). The end-of-turn string is what
a reply's span ends with after its text (e.g. `<|role_end|>`, `<|im_end|>`);
replies stop at its token.

`chat_template_for` picks the checkpoint's template when the tokenizer directory
has one, else the Ling template of `ling_jax.data.chat` (the fallback).
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import ml_collections
import numpy as np

from ling_jax.data.chat import ChatFormatError, ChatTemplate, Message, Role, check_turns, encode_spans
from ling_jax.data.tokenizer import Tokenizer

_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")  # where a template is, first wins
_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
_PROBE = [Message(Role.USER, "Hi"), Message(Role.ASSISTANT, "Hello")]  # a reply whose end-of-turn is looked for


class GenerationTracker(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: records the character spans its blocks render (as transformers)."""

    tags: ClassVar[set[str]] = {"generation"}

    def __init__(self, environment: jinja2.Environment):
        super().__init__(environment)
        self.rendered: list[str] | None = None  # the output so far, while tracking
        self.spans: list[tuple[int, int]] | None = None

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_track"), [], [], body).set_lineno(lineno)

    def _track(self, caller: Any) -> str:
        text = caller()
        if self.rendered is not None and self.spans is not None:
            start = sum(map(len, self.rendered))
            self.spans.append((start, start + len(text)))
        return text


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTracker, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


def find_template(directory: str | os.PathLike) -> tuple[pathlib.Path, str | list[dict[str, str]]] | None:
    """`(file, template)` of the chat template a tokenizer directory carries, or None."""
    directory = pathlib.Path(directory)
    for name in _FILES:
        path = directory / name
        if not path.is_file():
            continue
        if name.endswith(".jinja"):
            return path, path.read_text(encoding="utf-8")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ChatFormatError(f"could not parse {path}: {e}") from None
        template = data.get("chat_template") if isinstance(data, dict) else None
        if template:
            return path, template
    return None


def _special_tokens(directory: pathlib.Path) -> dict[str, str]:
    """The special token strings templates read (`bos_token`, ...), from special_tokens_map / tokenizer_config."""
    out: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        try:
            data = json.loads((directory / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # the tokenizer loader reports a damaged file by name
        for key in _SPECIAL:
            value = data.get(key) if isinstance(data, dict) else None
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                out[key] = value
    return out


class JinjaChatTemplate:
    """A checkpoint's Jinja chat template, with the interface of `ChatTemplate` (render, encode, prompt_ids).

    Args:
      source: the template text, or a list of named templates (`{"name", "template"}`).
      file: the file it came from (messages name it).
      special_tokens: `bos_token`, `eos_token`, ... as the template reads them.
      template_kwargs: the template's own switches (`enable_thinking`, ...), passed through.
      tools: tool definitions (JSON schemas) rendered into every conversation, or None.
    """

    def __init__(self, source: str | list[dict[str, str]], file: str | os.PathLike,
                 special_tokens: Mapping[str, str] | None = None, template_kwargs: Mapping[str, Any] | None = None,
                 tools: Sequence[Mapping[str, Any]] | None = None):
        self.file = str(file)
        self.special_tokens = dict(special_tokens or {})
        self.template_kwargs = dict(template_kwargs or {})
        self.tools = list(tools) if tools else None
        self.source = self._pick(source)
        self._env = _environment()
        try:
            self._template = self._env.from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatFormatError(f"the chat template in {self.file} does not parse, line {e.lineno} "
                                  f"({self._line(e.lineno)!r}): {e.message}; fix the template") from None
        self.has_generation_blocks = any(n.name == "_track" for n in
                                         self._env.parse(self.source).find_all(jinja2.nodes.ExtensionAttribute))
        self.end_of_turn = self._find_end_of_turn()

    def _pick(self, source: str | list[dict[str, str]]) -> str:
        if isinstance(source, str):
            return source
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        chosen = named.get("tool_use") if self.tools and "tool_use" in named else named.get("default")
        if not isinstance(chosen, str):
            raise ChatFormatError(f"{self.file}: chat_template is a list of named templates without a 'default' "
                                  f"(names: {sorted(map(str, named))}); name one 'default'")
        return chosen

    def _line(self, lineno: int | None) -> str:
        lines = self.source.splitlines()
        return lines[lineno - 1].strip() if lineno and 0 < lineno <= len(lines) else ""

    def _blocks(self, messages: Sequence[Message], generation_prompt: bool) -> Iterator[str]:
        variables = {**self.special_tokens, **self.template_kwargs, "messages": [m.as_dict() for m in messages],
                     "tools": self.tools, "add_generation_prompt": generation_prompt}
        try:
            yield from self._template.generate(**variables)
        except jinja2.TemplateError as e:
            raise ChatFormatError(f"the chat template in {self.file} failed to render{self._where()}: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise ChatFormatError(f"the chat template in {self.file} failed to render{self._where()}: "
                                  f"{type(e).__name__}: {e}") from None

    def _where(self) -> str:
        """`, line N ('...')` of the template frame the exception being handled passed through."""
        tb, lineno = sys.exc_info()[2], None
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == "<template>":
                lineno = tb.tb_lineno
            tb = tb.tb_next
        return f" at line {lineno} ({self._line(lineno)!r})" if lineno else ""

    def render(self, messages: Sequence[Message], *, generation_prompt: bool = False) -> str:
        """The rendered text of a conversation (with the assistant prefix when `generation_prompt`)."""
        return "".join(self._blocks(messages, generation_prompt))

    def _tracked(self, messages: Sequence[Message]) -> tuple[str, list[tuple[int, int]]]:
        tracker = next(e for e in self._env.extensions.values() if isinstance(e, GenerationTracker))
        tracker.rendered, tracker.spans = [], []
        try:
            for block in self._blocks(messages, False):
                tracker.rendered.append(block)
            return "".join(tracker.rendered), tracker.spans
        finally:
            tracker.rendered, tracker.spans = None, None

    def render_spans(self, messages: Sequence[Message], *, loss_from: int = 0) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the spans `[start, end)` of the assistant replies at index `loss_from` or later.

        Raises:
          ChatFormatError: the template does not render, or a reply cannot be found in the text.
        """
        replies = [i for i, m in enumerate(messages) if m.role is Role.ASSISTANT]
        if self.has_generation_blocks:
            text, spans = self._tracked(messages)
            if len(spans) != len(replies):
                raise ChatFormatError(f"the chat template in {self.file} marked {len(spans)} {{% generation %}} "
                                      f"blocks for {len(replies)} assistant messages, so the loss mask cannot be "
                                      "found: wrap each assistant reply in one generation block")
            return text, [(lo, lo + len(text[lo:hi].rstrip())) for (lo, hi), i in zip(spans, replies, strict=True)
                          if i >= loss_from]
        text = self.render(messages)
        spans = []
        for i in replies:
            if i < loss_from:
                continue
            start = len(self._prefix_of(text, messages[:i], True, i))
            end = len(self._prefix_of(text, messages[: i + 1], False, i).rstrip())
            if end <= start or messages[i].content not in text[start:end]:
                raise self._not_found(i)
            spans.append((start, end))
        return text, spans

    def _prefix_of(self, text: str, messages: Sequence[Message], generation_prompt: bool, i: int) -> str:
        prefix = self.render(messages, generation_prompt=generation_prompt)
        if not text.startswith(prefix):
            raise self._not_found(i)
        return prefix

    def _not_found(self, i: int) -> ChatFormatError:
        return ChatFormatError(
            f"the chat template in {self.file} renders the conversation up to assistant message {i} differently "
            "from the whole conversation, so the loss mask cannot find that reply: add {% generation %} ... "
            "{% endgeneration %} around the assistant replies in the template, or train with "
            "data.chat.checkpoint_template=False (the Ling template)")

    def _find_end_of_turn(self) -> str:
        """What a reply's span ends with after its text (`<|role_end|>`): "" when the template writes nothing."""
        text, spans = self.render_spans(_PROBE)
        reply = text[spans[-1][0]:spans[-1][1]] if spans else ""
        at = reply.rfind(_PROBE[-1].content)
        return reply[at + len(_PROBE[-1].content):].strip() if at >= 0 else ""

    def check_tokenizer(self, tokenizer: Tokenizer) -> int | None:
        """The id of the token that ends a reply: the end-of-turn token, else the tokenizer's EOS.

        Raises:
          ChatFormatError: the template's end-of-turn string is not one token of `tokenizer`.
        """
        if not self.end_of_turn:
            return tokenizer.eos_id
        token_id = tokenizer.token_to_id(self.end_of_turn)
        if token_id is None:
            raise ChatFormatError(f"the chat template in {self.file} ends replies with {self.end_of_turn!r}, which "
                                  f"is not a token of the tokenizer {tokenizer.path}: use the checkpoint's own "
                                  "tokenizer")
        return token_id

    def encode(self, tokenizer: Tokenizer, messages: Sequence[Message], *, loss_from: int = 0,
               add_bos: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of a rendered conversation and its loss mask (see `ChatTemplate.encode`)."""
        eot = self.check_tokenizer(tokenizer) if self.end_of_turn else None
        text, spans = self.render_spans(messages, loss_from=loss_from)
        add_bos = add_bos and not self._starts_with_bos(text)
        return encode_spans(tokenizer, text, spans, self.end_of_turn, eot, add_bos=add_bos, where=f" ({self.file})")

    def _starts_with_bos(self, text: str) -> bool:
        bos = self.special_tokens.get("bos_token")
        return bool(bos) and text.startswith(bos)

    def prompt_ids(self, tokenizer: Tokenizer, messages: Sequence[Message], *, add_bos: bool = False) -> list[int]:
        """Token ids of a generation prompt: the conversation (ending with a user turn) and the assistant prefix.

        The BOS token is added only when the rendered text does not start with it already.
        """
        check_turns(messages, "prompt", ends_with=Role.USER)
        text = self.render(messages, generation_prompt=True)
        add_bos = add_bos and not self._starts_with_bos(text) and tokenizer.bos_id is not None
        return ([tokenizer.bos_id] if add_bos else []) + tokenizer.encode(text)


def load_chat_template(directory: str | os.PathLike, *, template_kwargs: Mapping[str, Any] | None = None,
                       tools: Sequence[Mapping[str, Any]] | None = None) -> JinjaChatTemplate | None:
    """The chat template a tokenizer directory carries, or None when it has none."""
    found = find_template(directory)
    if found is None:
        return None
    file, source = found
    return JinjaChatTemplate(source, file, _special_tokens(pathlib.Path(directory)), template_kwargs, tools)


def parse_template_kwargs(text: str, where: str = "data.chat.template_kwargs") -> dict[str, Any]:
    """The template switches of a JSON object string (`'{"enable_thinking": false}'`; "" = none).

    Raises:
      ChatFormatError: not a JSON object.
    """
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ChatFormatError(f"{where}={text!r} is not JSON ({e}): give an object, e.g. "
                              "'{\"enable_thinking\": false}'") from None
    if not isinstance(value, dict):
        raise ChatFormatError(f"{where}={text!r} must be a JSON object, e.g. '{{\"enable_thinking\": false}}'")
    return value


def chat_template_for(tokenizer: Tokenizer, cfg: ml_collections.ConfigDict | Mapping[str, Any] | None = None,
                      ) -> JinjaChatTemplate | ChatTemplate:
    """The chat template for `tokenizer`: its directory's own (unless `checkpoint_template` is off), else Ling's.

    Args:
      tokenizer: the tokenizer; its file's directory is where the checkpoint's template is looked for.
      cfg: a `data.chat` config section (`ling_jax.data.chat.default_chat_config`): the fallback's strings,
        `checkpoint_template` and `template_kwargs` (a JSON object string).
    """
    cfg = cfg if cfg is not None else {}
    get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: d)
    if get("checkpoint_template", True):
        found = load_chat_template(tokenizer.path.parent,
                                   template_kwargs=parse_template_kwargs(str(get("template_kwargs", "") or "")))
        if found is not None:
            return found
    return ChatTemplate.from_config(cfg)
