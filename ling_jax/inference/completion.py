"""Fill-in-the-middle code completion (the IDE use): text before and after the cursor in, the middle out.

The prompt is the training layout of `ling_jax.data.fim.layout` with an empty
middle, in the tokenizer's own sentinels:

- PSM: ``<fim_prefix> prefix <fim_suffix> suffix <fim_middle>``
- SPM: ``<fim_prefix> <fim_suffix> suffix <fim_middle> prefix``

and the model decodes the middle until the end-of-middle token (the EOS that
closed every FIM document in training, `data.add_eos`) or `max_new_tokens`.
Requests are checked before any compute: a tokenizer without the sentinels and
a prefix plus suffix that does not leave room for the middle in the model's
context are `GenerationError`s naming the fix.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ling_jax.config import ConfigError
from ling_jax.data.fim import LING_FIM_TOKENS, FimFormat, FimSentinels, layout
from ling_jax.data.tokenizer import Tokenizer
from ling_jax.inference.decoding import GenerationError, generate
from ling_jax.model.transformer import LingForCausalLM


def fim_sentinels(tokenizer: Tokenizer, sentinel_tokens: tuple[str, str, str] = LING_FIM_TOKENS) -> FimSentinels:
    """The tokenizer's FIM sentinel ids; `GenerationError` when it has none."""
    try:
        return FimSentinels.from_tokenizer(tokenizer, *sentinel_tokens)
    except ConfigError as e:
        raise GenerationError(f"FIM completion needs the tokenizer's FIM sentinels {list(sentinel_tokens)}: {e}; "
                              "use the tokenizer the model was trained with (FIM needs a model trained with "
                              "data.fim_rate > 0)") from None


def fim_prompt(tokenizer: Tokenizer, prefix: str, suffix: str, *, fim_format: FimFormat | str = FimFormat.PSM,
               sentinel_tokens: tuple[str, str, str] = LING_FIM_TOKENS, add_bos: bool = False) -> list[int]:
    """Token ids of the FIM prompt for the text around the cursor (module docstring)."""
    sentinels = fim_sentinels(tokenizer, sentinel_tokens)
    pieces = [tokenizer.encode(t) if t else [] for t in (prefix, suffix)]
    bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    return bos + layout(pieces[0], [], pieces[1], FimFormat(fim_format), sentinels)


def check_fim_length(prompt_len: int, max_new_tokens: int, max_positions: int) -> None:
    """`GenerationError` when the FIM prompt leaves no room for `max_new_tokens` in the context."""
    if prompt_len + max_new_tokens > max_positions:
        raise GenerationError(f"prefix plus suffix is {prompt_len} tokens with the sentinels; with max_new_tokens "
                              f"{max_new_tokens} that exceeds the model's max_position_embeddings {max_positions}; "
                              "shorten the prefix or suffix (keep the lines nearest the cursor) or lower "
                              "max_new_tokens")


def complete(model: LingForCausalLM, params: Any, tokenizer: Tokenizer, prefix: str, suffix: str, *,
             max_new_tokens: int = 64, fim_format: FimFormat | str = FimFormat.PSM,
             sentinel_tokens: tuple[str, str, str] = LING_FIM_TOKENS, add_bos: bool = False,
             end_of_middle: int | None = None, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, rng: jax.Array | None = None) -> str:
    """The middle between `prefix` and `suffix`, decoded by the model (greedy by default).

    Args:
      model: the model (trained with FIM).
      params: its parameters.
      tokenizer: the tokenizer it was trained with (it must have the FIM sentinels).
      prefix: the text before the cursor.
      suffix: the text after the cursor.
      max_new_tokens: the longest middle, in tokens.
      fim_format: PSM or SPM (`ling_jax.data.fim.FimFormat` or its value).
      sentinel_tokens: the (prefix, middle, suffix) sentinel strings.
      add_bos: start the prompt with the tokenizer's BOS (as training did with `data.add_bos`).
      end_of_middle: the token that ends the middle (default: the tokenizer's EOS, else the config's).
      temperature, top_k, top_p, rng: sampling, as in `ling_jax.generate`.

    Returns:
      The middle text (without the end-of-middle token).

    Raises:
      GenerationError: no FIM sentinels in the tokenizer, or prefix + suffix + max_new_tokens longer than
        the model's context.
    """
    ids = fim_prompt(tokenizer, prefix, suffix, fim_format=fim_format, sentinel_tokens=sentinel_tokens,
                     add_bos=add_bos)
    check_fim_length(len(ids), max_new_tokens, model.config.max_position_embeddings)
    stop = end_of_middle if end_of_middle is not None else (
        tokenizer.eos_id if tokenizer.eos_id is not None else model.config.eos_token_id)
    out = generate(model, params, jnp.asarray([ids], jnp.int32), max_new_tokens=max_new_tokens,
                   eos_token_id=-1 if stop is None else stop, temperature=temperature, top_k=top_k, top_p=top_p,
                   rng=rng)
    new = [int(t) for t in np.asarray(out)[0, len(ids):]]
    if stop is not None and stop in new:
        new = new[: new.index(stop)]
    return tokenizer.decode_generated(new)
