"""The Ling chat template: conversations -> text -> token ids with an assistant-only loss mask.

A conversation is a list of messages with roles `system` (optional, first), then `user` and `assistant`
turns alternating, starting with `user`. It renders as

    <role>SYSTEM</role>{system}<role>HUMAN</role>{user}<role>ASSISTANT</role>{assistant}<|endoftext|>...

(the system block only when there is a system message or a `default_system`). Every assistant turn is
followed by the end-of-text string. All four strings are fields of `ChatTemplate`. A generation prompt
ends with the assistant prefix, so the model writes the reply and then the end-of-text token.

Tokens come from one `encode` of the whole rendered text (as at inference), and the loss mask is mapped
from character spans: a token is an assistant token when it starts inside an assistant turn's content or
its end-of-text string. Role prefixes, system and user text are never in the mask. The end-of-text string
must be a single token of the tokenizer (a special / user-defined token), checked with a clear error.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from ling_jax.config import UserError
from ling_jax.data.tokenizer import Tokenizer


class ChatFormatError(UserError):
    """A conversation or record that does not fit the chat format; the message says what to fix."""


class Role(enum.Enum):
    """The roles a message may have."""

    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"  # a tool's result, after an assistant turn that called it (checkpoint templates only)


@dataclasses.dataclass(frozen=True)
class Message:
    """One turn of a conversation; `extra` holds its other keys (`tool_calls`, `reasoning_content`, `name`, ...),
    which a checkpoint's own template may render (`ling_jax.data.chat_template`)."""

    role: Role
    content: str
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The message as the JSON object a Jinja chat template reads (`role`, `content` and the extra keys)."""
        return {"role": self.role.value, "content": self.content, **self.extra}


def default_chat_config() -> ml_collections.ConfigDict:
    """The `data.chat` section of a run config: the template's strings (Ling's by default)."""
    cfg = ml_collections.ConfigDict()
    cfg.system_prefix = "<role>SYSTEM</role>"  # written before the system message
    cfg.user_prefix = "<role>HUMAN</role>"  # written before each user turn
    cfg.assistant_prefix = "<role>ASSISTANT</role>"  # written before each assistant turn (and ends a prompt)
    cfg.end_of_text = "<|endoftext|>"  # written after each assistant turn; must be one token of the tokenizer
    cfg.default_system = ""  # system message used when a conversation has none ("" = no system block)
    # The tokenizer directory's own Jinja template (tokenizer_config.json's chat_template, chat_template.jinja)
    # when it has one, instead of the strings above (`ling_jax.data.chat_template`).
    cfg.checkpoint_template = True
    cfg.template_kwargs = ""  # the checkpoint template's switches, a JSON object: '{"enable_thinking": false}'
    return cfg


def parse_messages(value: Any, where: str) -> list[Message]:
    """Messages from a JSON list of `{"role": ..., "content": ...}` objects.

    Raises:
      ChatFormatError: not a list, a message that is not an object, an unknown role or non-string content.
    """
    if not isinstance(value, list) or not value:
        raise ChatFormatError(f"{where}: expected a non-empty list of messages, got {_short(value)}")
    out = []
    roles = [r.value for r in Role]
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ChatFormatError(f"{where}: message {i} must be an object with 'role' and 'content', "
                                  f"got {_short(m)}")
        if m["role"] not in roles:
            raise ChatFormatError(f"{where}: message {i} has unknown role {m['role']!r}; expected one of {roles}")
        if not isinstance(m["content"], str):
            raise ChatFormatError(f"{where}: message {i} ({m['role']}) content must be a string, "
                                  f"got {_short(m['content'])}")
        out.append(Message(Role(m["role"]), m["content"], {k: v for k, v in m.items() if k not in ("role", "content")}))
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_turns(messages: Sequence[Message], where: str, *, ends_with: Role) -> None:
    """Checks the turn structure: an optional first system message, then user / assistant alternating.

    Args:
      messages: The conversation.
      where: The record, for error messages.
      ends_with: `Role.ASSISTANT` for training conversations (at least one reply, none missing),
        `Role.USER` for prompts that the model is to answer.

    Tool results (`Role.TOOL`) may follow an assistant turn; they and the assistant turns after them count as
    that one assistant turn.

    Raises:
      ChatFormatError: a misplaced system message, two turns of the same role in a row, a conversation
        that does not start with a user turn or does not end with `ends_with`, a tool result after no
        assistant turn or ending the conversation.
    """
    turns = list(messages[1:] if messages and messages[0].role is Role.SYSTEM else messages)
    if not turns:
        raise ChatFormatError(f"{where}: the conversation has no user turn")
    for i, m in enumerate(turns):
        if m.role is Role.TOOL and (i == 0 or turns[i - 1].role not in (Role.ASSISTANT, Role.TOOL)):
            raise ChatFormatError(f"{where}: a tool result (turn {i}) must follow the assistant turn that called "
                                  "the tool")
    if turns[-1].role is Role.TOOL:
        raise ChatFormatError(f"{where}: the conversation ends with a tool result; the assistant's answer to it "
                              "must follow")
    turns = [m for i, m in enumerate(turns)  # assistant, tool..., assistant: one assistant turn
             if m.role is not Role.TOOL and not (m.role is Role.ASSISTANT and i and turns[i - 1].role is Role.TOOL)]
    for i, m in enumerate(turns):
        expected = Role.USER if i % 2 == 0 else Role.ASSISTANT
        if m.role is Role.SYSTEM:
            raise ChatFormatError(f"{where}: a system message may only come first (found one at turn {i})")
        if m.role is not expected:
            raise ChatFormatError(f"{where}: turn {i} is {m.role.value} but {expected.value} was expected: "
                                  "turns alternate user, assistant, user, ... starting with user")
    if turns[-1].role is not ends_with:
        if ends_with is Role.ASSISTANT and len(turns) == 1:
            raise ChatFormatError(f"{where}: the conversation has no assistant turn, so nothing to learn; "
                                  "add the assistant's reply")
        what = "a user turn with no assistant reply" if ends_with is Role.ASSISTANT else "an assistant turn"
        raise ChatFormatError(f"{where}: the conversation ends with {what}; it must end with a "
                              f"{ends_with.value} turn")


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """The chat template's strings (defaults: Ling's). See the module docstring."""

    system_prefix: str = "<role>SYSTEM</role>"
    user_prefix: str = "<role>HUMAN</role>"
    assistant_prefix: str = "<role>ASSISTANT</role>"
    end_of_text: str = "<|endoftext|>"
    default_system: str = ""

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict | Mapping[str, Any]) -> ChatTemplate:
        """The template of a `data.chat` config section (`default_chat_config`)."""
        return cls(**{f.name: str(cfg[f.name]) for f in dataclasses.fields(cls) if f.name in cfg})

    def _prefix(self, role: Role) -> str:
        return {Role.SYSTEM: self.system_prefix, Role.USER: self.user_prefix,
                Role.ASSISTANT: self.assistant_prefix}[role]

    def render_spans(self, messages: Sequence[Message], *, loss_from: int = 0,
                     generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans `[start, end)` of the assistant turns that count.

        Args:
          messages: The conversation (structure not checked here; see `check_turns`).
          loss_from: Only assistant messages at this index or later get a span (e.g. the response of
            a DPO pair after its prompt).
          generation_prompt: End with the assistant prefix (the model writes the next reply).

        Returns:
          `(text, spans)`; a span covers an assistant message's content and the end-of-text string after it.
        """
        parts: list[str] = []
        spans: list[tuple[int, int]] = []
        length = 0

        def add(text: str) -> None:
            nonlocal length
            parts.append(text)
            length += len(text)

        if self.default_system and not (messages and messages[0].role is Role.SYSTEM):
            add(self.system_prefix + self.default_system)
        for i, m in enumerate(messages):
            if m.role is Role.TOOL:
                raise ChatFormatError("a tool result needs the checkpoint's own chat template (a chat_template in "
                                      "tokenizer_config.json or chat_template.jinja); the Ling fallback has no "
                                      "tool role")
            add(self._prefix(m.role))
            start = length
            add(m.content)
            if m.role is Role.ASSISTANT:
                add(self.end_of_text)
                if i >= loss_from:
                    spans.append((start, length))
        if generation_prompt:
            add(self.assistant_prefix)
        return "".join(parts), spans

    def render(self, messages: Sequence[Message], *, generation_prompt: bool = False) -> str:
        """The rendered text of a conversation."""
        return self.render_spans(messages, generation_prompt=generation_prompt)[0]

    def check_tokenizer(self, tokenizer: Tokenizer) -> int:
        """The id of the end-of-text token.

        Raises:
          ChatFormatError: the end-of-text string is not a single token of `tokenizer`.
        """
        token_id = tokenizer.token_to_id(self.end_of_text)
        if token_id is None:
            raise ChatFormatError(
                f"the chat template's end-of-text string {self.end_of_text!r} is not a token of the tokenizer "
                f"{tokenizer.path}; set data.chat.end_of_text to the tokenizer's end-of-text token, or add it "
                "to the tokenizer as a special (user-defined) token")
        return token_id

    def encode(self, tokenizer: Tokenizer, messages: Sequence[Message], *, loss_from: int = 0,
               add_bos: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of a rendered conversation and its loss mask.

        Args:
          tokenizer: The tokenizer (its end-of-text token must be `end_of_text`).
          messages: The conversation.
          loss_from: See `render_spans`.
          add_bos: Prepend the tokenizer's BOS token (never in the mask).

        Returns:
          `(ids, mask)`: int32 `[n]` and bool `[n]`, the mask true on the tokens of the counted assistant
          turns (content and end-of-text).

        Raises:
          ChatFormatError: the end-of-text string does not encode as its single token after a reply (it
            merged with neighbouring text or is not a token).
        """
        eot = self.check_tokenizer(tokenizer)
        text, spans = self.render_spans(messages, loss_from=loss_from)
        return encode_spans(tokenizer, text, spans, self.end_of_text, eot, add_bos=add_bos)

    def prompt_ids(self, tokenizer: Tokenizer, messages: Sequence[Message], *, add_bos: bool = False) -> list[int]:
        """Token ids of a generation prompt: the conversation (ending with a user turn) and the assistant prefix.

        Raises:
          ChatFormatError: a malformed conversation (see `check_turns`).
        """
        check_turns(messages, "prompt", ends_with=Role.USER)
        ids = tokenizer.encode(self.render(messages, generation_prompt=True))
        return ([tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []) + ids


def encode_spans(tokenizer: Tokenizer, text: str, spans: Sequence[tuple[int, int]], end_of_turn: str,
                 eot: int | None, *, add_bos: bool = False, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Token ids of rendered `text` (one `encode`, as at inference) and the loss mask of its character `spans`.

    A token is in the mask when it starts inside a span. Each span must end with `end_of_turn`, encoded
    as its token `eot` (skipped when `eot` is None: a template without an end-of-turn token).

    Args:
      tokenizer: The tokenizer.
      text: The rendered conversation.
      spans: `[start, end)` character spans of the assistant replies, each with its end-of-turn string.
      end_of_turn: The string that ends a reply.
      eot: Its token id, or None.
      add_bos: Prepend the tokenizer's BOS token (never in the mask).
      where: What rendered `text` (a template file), for messages.

    Raises:
      ChatFormatError: the end-of-turn string did not encode as its token after a reply; add_bos without a BOS.
    """
    ids, starts = tokenizer.encode_with_offsets(text)
    ids_arr = np.asarray(ids, np.int32)
    starts_arr = np.asarray(starts, np.int64)
    mask = np.zeros(len(ids), bool)
    for lo, hi in spans:
        mask |= (starts_arr >= lo) & (starts_arr < hi)
        if eot is None:
            continue
        at = np.flatnonzero(starts_arr == hi - len(end_of_turn))
        if not len(at) or ids_arr[at[-1]] != eot:
            raise ChatFormatError(
                f"{end_of_turn!r} after an assistant turn{where} did not encode as its token {eot} with "
                f"{tokenizer.path}; make it a special token of the tokenizer")
    if add_bos:
        bos = tokenizer.bos_id
        if bos is None:
            raise ChatFormatError(f"data.add_bos is set but {tokenizer.path} has no BOS token; "
                                  "set data.add_bos=False")
        ids_arr, mask = np.concatenate([[bos], ids_arr]).astype(np.int32), np.concatenate([[False], mask])
    return ids_arr, mask


def conversation_from_record(record: Any, where: str) -> list[Message]:
    """The conversation of an SFT record: `{"messages": [...]}` or `{"prompt", "response"[, "system"]}`.

    Raises:
      ChatFormatError: neither form, bad messages, or a conversation without a final assistant turn.
    """
    if not isinstance(record, Mapping):
        raise ChatFormatError(f"{where}: expected a JSON object, got {_short(record)}")
    if "messages" in record:
        messages = parse_messages(record["messages"], where)
    elif "prompt" in record and "response" in record:
        fields = {k: record[k] for k in ("system", "prompt", "response") if k in record}
        bad = [k for k, v in fields.items() if not isinstance(v, str)]
        if bad:
            raise ChatFormatError(f"{where}: {', '.join(bad)} must be string(s)")
        messages = ([Message(Role.SYSTEM, fields["system"])] if "system" in fields else []) + [
            Message(Role.USER, fields["prompt"]), Message(Role.ASSISTANT, fields["response"])]
    else:
        raise ChatFormatError(f"{where}: a record needs 'messages' (a list of role/content objects) or "
                              f"'prompt' and 'response' strings; found keys {sorted(record)}")
    check_turns(messages, where, ends_with=Role.ASSISTANT)
    return messages


def preference_from_record(record: Any, where: str) -> tuple[list[Message], list[Message], list[Message]]:
    """`(prompt, chosen, rejected)` messages of a DPO record `{"prompt", "chosen", "rejected"}`.

    `prompt` is a string (one user turn) or a list of messages ending with a user turn; `chosen` and
    `rejected` are strings (one assistant turn) or lists of messages continuing the conversation with an
    assistant turn.

    Raises:
      ChatFormatError: a missing field, an empty response, bad messages or turn structure.
    """
    if not isinstance(record, Mapping):
        raise ChatFormatError(f"{where}: expected a JSON object, got {_short(record)}")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
    if missing:
        raise ChatFormatError(f"{where}: a preference record needs 'prompt', 'chosen' and 'rejected'; "
                              f"missing {missing}")

    def part(key: str, role: Role) -> list[Message]:
        value = record[key]
        if isinstance(value, str):
            return [Message(role, value)]
        return parse_messages(value, f"{where} ({key})")

    prompt = part("prompt", Role.USER)
    check_turns(prompt, f"{where} (prompt)", ends_with=Role.USER)
    out = [prompt]
    for key in ("chosen", "rejected"):
        response = part(key, Role.ASSISTANT)
        if all(not m.content.strip() for m in response if m.role is Role.ASSISTANT):
            raise ChatFormatError(f"{where}: '{key}' is empty; both responses of a pair need text")
        check_turns(prompt + response, f"{where} (prompt + {key})", ends_with=Role.ASSISTANT)
        out.append(response)
    return out[0], out[1], out[2]
