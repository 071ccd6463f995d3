"""Problems -> prompt token ids (plain, chat, or fill-in-the-middle), and generated ids -> completion text.

* Completion tasks: the prompt text, after the tokenizer's BOS (unless `add_bos=False`).
* With `chat=ChatTemplate(...)`: the prompt goes into `CHAT_INSTRUCTION` as one user turn of the
  chat template, and the code is taken from the reply's first fenced block (the whole reply when
  it has none); a reply that defines the entry point runs on its own (`Problem.program(standalone=True)`).
* Infilling tasks: the prefix and the suffix are tokenized on their own and laid out with the
  tokenizer's FIM sentinels in PSM or SPM exactly as in training (`ling_jax.data.fim.layout`
  with an empty middle), after BOS.

A prompt longer than `budget` tokens (the model's `max_position_embeddings` minus the new tokens)
is truncated, and the number of tokens dropped is returned so that it is counted: a plain or chat
prompt loses its oldest tokens (BOS stays); an infilling prompt loses prefix tokens from the left
and suffix tokens from the right, half from each while both last, so the text nearest the hole stays.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from ling_jax.config import ConfigError
from ling_jax.data.chat import ChatTemplate, Message, Role
from ling_jax.data.chat_template import JinjaChatTemplate
from ling_jax.data.fim import FimFormat, FimSentinels, layout
from ling_jax.data.tokenizer import Tokenizer
from ling_jax.evaluation.problems import Problem, PromptMode, TaskError

CHAT_INSTRUCTION = ("Complete the following Python function. Reply with the complete function, including its "
                    "signature, in one ```python code block.\n\n```python\n{prompt}```")
_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.S)


def code_from_reply(reply: str) -> str:
    """The code of a chat reply: its first fenced block (an unclosed one runs to the end), else the reply."""
    match = _FENCE.search(reply)
    return match.group(1) if match else reply


def defines(code: str, entry_point: str | None) -> bool:
    """Whether `code` defines the function `entry_point` (always true without an entry point)."""
    return entry_point is None or re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.M) is not None


def cut_at_stop(ids: list[int], stops: Sequence[int], *, keep: bool) -> list[int]:
    """`ids` up to the first of `stops` (with it when `keep`); all of `ids` when none occurs."""
    at = next((i for i, t in enumerate(ids) if t in stops), None)
    return ids if at is None else ids[: at + 1 if keep else at]


def _keep_tail(ids: list[int], drop: int, bos: list[int]) -> list[int]:
    body = ids[len(bos):]
    return bos + body[drop:]


@dataclasses.dataclass(frozen=True)
class PromptBuilder:
    """Builds prompts of one tokenizer.

    Attributes:
      tokenizer: the model's tokenizer.
      fim_format: PSM or SPM for infilling tasks.
      chat: the chat template (None: base-model prompts).
      add_bos: prepend the tokenizer's BOS token (when it has one).
      extra_stop_ids: more ids that end a reply, e.g. the `eos_token_id` list of the checkpoint's
        `generation_config.json` (Ling 2.0 lists `<|role_end|>` beside EOS).
    """

    tokenizer: Tokenizer
    fim_format: FimFormat = FimFormat.PSM
    chat: ChatTemplate | JinjaChatTemplate | None = None
    add_bos: bool = True
    extra_stop_ids: tuple[int, ...] = ()

    @property
    def bos(self) -> list[int]:
        """The BOS prefix ([] without one)."""
        return [self.tokenizer.bos_id] if self.add_bos and self.tokenizer.bos_id is not None else []

    def sentinels(self) -> FimSentinels:
        """The FIM sentinel ids of the tokenizer.

        Raises:
          TaskError: the tokenizer lacks a sentinel (infilling tasks need them).
        """
        try:
            return FimSentinels.from_tokenizer(self.tokenizer)
        except ConfigError as e:
            raise TaskError(f"the infilling tasks need the tokenizer's FIM sentinels, as in training: {e}; "
                            "drop the humaneval_infill_* tasks for a model trained without FIM") from None

    def stop_id(self) -> int | None:
        """The token that ends a reply: the chat template's end of text with --chat, else EOS."""
        return self.chat.check_tokenizer(self.tokenizer) if self.chat is not None else self.tokenizer.eos_id

    def stop_ids(self) -> tuple[int, ...]:
        """Every id that ends a reply: `stop_id()` first, then `extra_stop_ids` (no repeats)."""
        first = self.stop_id()
        return tuple(dict.fromkeys(([] if first is None else [first]) + list(self.extra_stop_ids)))

    def check(self, problems: list[Problem]) -> None:
        """Refuses, before any work, what these problems need and the tokenizer or settings lack.

        Raises:
          TaskError: infilling without sentinels, or infilling with --chat.
          ChatFormatError: with --chat, a tokenizer without the template's end-of-text token.
        """
        infill = any(p.mode is PromptMode.INFILL for p in problems)
        if infill and self.chat is not None:
            raise TaskError("--chat renders completion prompts; the infilling tasks use the FIM format: "
                            "run humaneval_infill_* without --chat")
        if infill:
            self.sentinels()
        if self.chat is not None:
            self.chat.check_tokenizer(self.tokenizer)

    def ids(self, problem: Problem, budget: int) -> tuple[list[int], int]:
        """The prompt ids of `problem`, at most `budget` of them, and how many were dropped to fit."""
        if problem.mode is PromptMode.INFILL:
            return self._infill_ids(problem, budget)
        if self.chat is not None:
            message = Message(Role.USER, CHAT_INSTRUCTION.format(prompt=problem.prompt))
            ids = self.chat.prompt_ids(self.tokenizer, [message], add_bos=bool(self.bos))
        else:
            ids = self.bos + self.tokenizer.encode(problem.prompt)
        drop = max(0, len(ids) - budget)
        return (_keep_tail(ids, drop, self.bos) if drop else ids), drop

    def _infill_ids(self, problem: Problem, budget: int) -> tuple[list[int], int]:
        encode = self.tokenizer.encode
        prefix = encode(problem.prompt) if problem.prompt else []
        suffix = encode(problem.suffix) if problem.suffix else []
        excess = len(self.bos) + 3 + len(prefix) + len(suffix) - budget
        drop = max(0, excess)
        if drop:
            from_prefix = min(len(prefix), max((drop + 1) // 2, drop - len(suffix)))
            prefix, suffix = prefix[from_prefix:], suffix[: len(suffix) - (drop - from_prefix)]
        return self.bos + layout(prefix, [], suffix, self.fim_format, self.sentinels()), drop

    def decode(self, new_ids: list[int]) -> str:
        """Text of generated ids up to the first stop id; ids past the tokenizer's vocabulary are skipped."""
        new_ids = cut_at_stop(new_ids, self.stop_ids(), keep=False)
        return self.tokenizer.decode([t for t in new_ids if 0 <= t < self.tokenizer.vocab_size])

    def completion(self, problem: Problem, text: str) -> tuple[str, bool]:
        """(completion, standalone) from the decoded text of one sample (see `Problem.program`)."""
        if self.chat is None:
            return problem.cut_text(text), False
        code = code_from_reply(text)
        if defines(code, problem.entry_point):
            return code, True
        return problem.cut_text(code), False
