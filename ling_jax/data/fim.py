"""Fill-in-the-middle (FIM) transformation of training documents, as in StarCoder / Ling-Coder.

With probability `fim_rate` a document's text is cut at two character positions
drawn uniformly from `[0, len(text)]` (sorted) into prefix / middle / suffix,
each piece is tokenized on its own, and the token ids are laid out with the
three sentinel tokens in one of two formats (the convention of the bigcode
Megatron-LM `permute` function used for SantaCoder and StarCoder, from Bavarian
et al. 2022, "Efficient Training of Language Models to Fill in the Middle"):

- PSM (prefix-suffix-middle):
  ``<fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle``
- SPM (suffix-prefix-middle, the "joint" variant where prefix and middle stay
  adjacent so the model continues straight from the prefix):
  ``<fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle``

A fraction `spm_rate` of the FIM documents use SPM, the rest PSM. The random
draws, in order, are: one uniform for "FIM or not", two integers for the cut
points, one uniform for "SPM or PSM"; a document that is not transformed is
just `encode(text)`. BOS / EOS, when wanted, go around the whole result.
`apply_fim` is a pure function of the text and the `numpy.random.Generator`
passed in; `DocumentEncoder`, what the data pipeline calls, seeds a generator
per (seed, epoch, document index), so a resumed run is exactly reproducible.

`reassemble` inverts the layout: it returns the token ids of the document in
its original order (prefix, middle, suffix), so that decoding them gives the
original text back for a lossless tokenizer.
"""

from __future__ import annotations

import dataclasses
import enum
import warnings
from collections.abc import Callable, Sequence

import numpy as np

from ling_jax.config import ConfigError
from ling_jax.data.tokenizer import Tokenizer

LING_FIM_TOKENS = ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>")
_FIM_SALT = 0x46494D  # Keeps FIM draws apart from any other use of the same seed.


class FimFormat(enum.Enum):
    """How the three pieces of a FIM document are laid out."""

    PSM = "psm"  # <pre> prefix <suf> suffix <mid> middle
    SPM = "spm"  # <pre> <suf> suffix <mid> prefix middle


@dataclasses.dataclass(frozen=True)
class FimSentinels:
    """The ids of the three FIM sentinel tokens.

    Attributes:
      prefix_id: Id of the token that opens the prefix (`<|fim_prefix|>` in Ling).
      middle_id: Id of the token that opens the middle (`<|fim_middle|>`).
      suffix_id: Id of the token that opens the suffix (`<|fim_suffix|>`).
    """

    prefix_id: int
    middle_id: int
    suffix_id: int

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: Tokenizer,
        prefix_token: str = LING_FIM_TOKENS[0],
        middle_token: str = LING_FIM_TOKENS[1],
        suffix_token: str = LING_FIM_TOKENS[2],
    ) -> FimSentinels:
        """Looks the sentinel strings up in a tokenizer's vocabulary.

        Args:
          tokenizer: The tokenizer whose vocabulary holds the sentinels.
          prefix_token: Token string of the prefix sentinel.
          middle_token: Token string of the middle sentinel.
          suffix_token: Token string of the suffix sentinel.

        Raises:
          ConfigError: A sentinel is not a single token of the vocabulary, or two are the same.
        """
        ids = []
        for field, token in (("prefix", prefix_token), ("middle", middle_token), ("suffix", suffix_token)):
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                msg = (
                    f"FIM {field} sentinel {token!r} is not a token of {tokenizer.path}; set data.fim_{field}_token "
                    "to the tokenizer's sentinel string, or data.fim_rate=0 to train without FIM"
                )
                raise ConfigError(msg)
            ids.append(token_id)
        if len(set(ids)) != 3:
            raise ConfigError(f"FIM sentinels {prefix_token!r}, {middle_token!r}, {suffix_token!r} must be distinct; "
                              "set data.fim_prefix_token, data.fim_middle_token, data.fim_suffix_token to 3 tokens")
        return cls(*ids)


class DocumentEncoder:
    """Text -> training token ids: FIM with probability `fim_rate`, then BOS / EOS if asked.

    The FIM draws of a document come from a generator seeded with (seed, epoch, document index), so the same
    document gets the same split on a resumed run and a different one in each epoch.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        seed: int,
        fim_rate: float = 0.0,
        spm_rate: float = 0.5,
        sentinel_tokens: tuple[str, str, str] = LING_FIM_TOKENS,
        add_bos: bool = False,
        add_eos: bool = False,
    ):
        """Checks the rates and looks the sentinels up (only when `fim_rate > 0`).

        Args:
          tokenizer: The tokenizer.
          seed: Seed of the FIM draws.
          fim_rate: Probability in [0, 1] that a document is transformed.
          spm_rate: Probability in [0, 1] that a transformed document uses SPM rather than PSM.
          sentinel_tokens: The (prefix, middle, suffix) sentinel token strings.
          add_bos: Prepend the tokenizer's BOS.
          add_eos: Append the tokenizer's EOS.

        Raises:
          ConfigError: A rate outside [0, 1], a sentinel not in the vocabulary, no BOS / EOS when asked for.
        """
        if not (0.0 <= fim_rate <= 1.0 and 0.0 <= spm_rate <= 1.0):
            raise ConfigError(f"data.fim_rate={fim_rate} and data.fim_spm_rate={spm_rate} must be in [0, 1]")
        self.tokenizer, self.seed, self.fim_rate, self.spm_rate = tokenizer, seed, fim_rate, spm_rate
        self.sentinels = FimSentinels.from_tokenizer(tokenizer, *sentinel_tokens) if fim_rate > 0 else None
        if self.sentinels is not None and not splits_losslessly(tokenizer):
            warnings.warn(f"{tokenizer.path} does not encode text losslessly piece by piece (decode(encode('a') + "
                          "encode('b')) != 'ab', e.g. a SentencePiece dummy-prefix space): every FIM middle and "
                          "suffix will start with text the document does not have; use a tokenizer trained "
                          "without a dummy prefix (ling_jax.train_sentencepiece) for FIM", stacklevel=2)
        for role, wanted, token_id in (("bos", add_bos, tokenizer.bos_id), ("eos", add_eos, tokenizer.eos_id)):
            if wanted and token_id is None:
                raise ConfigError(f"data.add_{role}=True but {tokenizer.path} has no {role.upper()} token")
        self.bos, self.eos = [tokenizer.bos_id] * add_bos, [tokenizer.eos_id] * add_eos

    def __call__(self, text: str, *, epoch: int, index: int) -> list[int]:
        """Token ids of document `index` in `epoch`."""
        if self.sentinels is None:
            ids = self.tokenizer.encode(text)
        else:
            rng = np.random.default_rng([self.seed, epoch, index, _FIM_SALT])
            ids, _ = apply_fim(text, rng, encode=self.tokenizer.encode, sentinels=self.sentinels,
                               fim_rate=self.fim_rate, spm_rate=self.spm_rate)
        return self.bos + ids + self.eos


def splits_losslessly(tokenizer: Tokenizer) -> bool:
    """Whether ids of pieces encoded separately decode to the pieces' concatenation (what FIM needs)."""
    return tokenizer.decode(tokenizer.encode("a") + tokenizer.encode("b")) == "ab"


def split_text(text: str, rng: np.random.Generator) -> tuple[str, str, str]:
    """Cuts `text` at two uniform character positions into (prefix, middle, suffix).

    Args:
      text: The document.
      rng: Source of the two cut points, drawn from `[0, len(text)]` and sorted.

    Returns:
      Three strings whose concatenation is `text`; any of them may be empty.
    """
    lo, hi = sorted(int(i) for i in rng.integers(0, len(text) + 1, size=2))
    return text[:lo], text[lo:hi], text[hi:]


def layout(
    prefix: Sequence[int], middle: Sequence[int], suffix: Sequence[int], fmt: FimFormat, sentinels: FimSentinels
) -> list[int]:
    """Token ids of a FIM document from the ids of its three pieces.

    Args:
      prefix: Ids of the text before the middle.
      middle: Ids of the text the model learns to fill in.
      suffix: Ids of the text after the middle.
      fmt: PSM or SPM (see the module docstring for both layouts).
      sentinels: The sentinel token ids.
    """
    pre, mid, suf = [sentinels.prefix_id], [sentinels.middle_id], [sentinels.suffix_id]
    if fmt is FimFormat.PSM:
        return pre + list(prefix) + suf + list(suffix) + mid + list(middle)
    return pre + suf + list(suffix) + mid + list(prefix) + list(middle)


def apply_fim(
    text: str,
    rng: np.random.Generator,
    *,
    encode: Callable[[str], list[int]],
    sentinels: FimSentinels,
    fim_rate: float,
    spm_rate: float,
) -> tuple[list[int], FimFormat | None]:
    """Token ids of one document, FIM-transformed with probability `fim_rate`.

    Args:
      text: The document text.
      rng: The document's own generator (seeded per seed / epoch / document index by the caller).
      encode: Text -> token ids, adding no BOS / EOS.
      sentinels: The sentinel token ids.
      fim_rate: Probability in [0, 1] that the document is transformed.
      spm_rate: Probability in [0, 1] that a transformed document uses SPM rather than PSM.

    Returns:
      The token ids and the format used (None when the document was left as it is).
    """
    if not rng.random() < fim_rate:
        return encode(text), None
    prefix, middle, suffix = split_text(text, rng)
    fmt = FimFormat.SPM if rng.random() < spm_rate else FimFormat.PSM
    pieces = [encode(piece) if piece else [] for piece in (prefix, middle, suffix)]
    return layout(*pieces, fmt, sentinels), fmt


def reassemble(ids: Sequence[int], sentinels: FimSentinels) -> list[int]:
    """Inverts `layout`: the ids of the document in its original order.

    A sequence that does not start with the prefix sentinel is returned as it is
    (the document was not transformed). A leading BOS or trailing EOS must be
    removed first. For PSM the result is `prefix + middle + suffix`; for SPM,
    where prefix and middle are adjacent, `(prefix + middle) + suffix`. A PSM
    document with an empty prefix and an SPM one lay out the same ids, and both
    readings give the same document.

    Args:
      ids: Token ids as returned by `apply_fim` / `layout`.
      sentinels: The sentinel token ids.

    Raises:
      ValueError: `ids` start with the prefix sentinel but do not follow either layout.
    """
    ids = [int(i) for i in ids]
    if not ids or ids[0] != sentinels.prefix_id:
        return ids
    body = ids[1:]
    try:
        suf_at = body.index(sentinels.suffix_id)
        mid_at = body.index(sentinels.middle_id, suf_at + 1)
    except ValueError:
        msg = f"ids start with the FIM prefix sentinel but miss the suffix / middle one: {ids[:20]}"
        raise ValueError(msg) from None
    prefix, suffix, middle = body[:suf_at], body[suf_at + 1 : mid_at], body[mid_at + 1 :]
    return prefix + middle + suffix


def format_of(ids: Sequence[int], sentinels: FimSentinels) -> FimFormat | None:
    """The layout of FIM ids: SPM when the suffix sentinel directly follows the prefix one, else PSM.

    None for ids that do not start with the prefix sentinel. A PSM document with an
    empty prefix reads as SPM (the two are the same ids).
    """
    if len(ids) < 2 or int(ids[0]) != sentinels.prefix_id:
        return None
    return FimFormat.SPM if int(ids[1]) == sentinels.suffix_id else FimFormat.PSM
