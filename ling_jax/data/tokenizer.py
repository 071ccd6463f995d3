"""One tokenizer interface over SentencePiece `.model` files and Hugging Face `tokenizer.json`.

`load_tokenizer` accepts a SentencePiece model, a `tokenizer.json` (read with
the `tokenizers` package, not `transformers`), or a checkpoint directory that
holds one of them. In a directory the BOS / EOS / PAD tokens and the extra
special tokens are taken from, lowest precedence first: the tokenizer file
itself, `generation_config.json`, `config.json` (`*_token_id`),
`special_tokens_map.json` and `tokenizer_config.json` (`*_token`, given as a
string or as an AddedToken dict with `"content"`), then the keyword overrides.
An explicit `null` in a file clears a token. A BOS / EOS / PAD token that is
not in the vocabulary is an error (unless overridden); an unknown extra
special token is skipped with a warning. `encode` adds no special token unless
asked (a `tokenizer.json` post-processor, padding and truncation are off).
"""

from __future__ import annotations

import abc
import enum
import json
import os
import pathlib
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import sentencepiece as spm
import tokenizers

from ling_jax.config import UserError

EXPECTED = "expected a SentencePiece .model, a tokenizer.json, or a directory containing one"
_ROLES = ("bos", "eos", "pad")


class TokenizerError(UserError):
    """A tokenizer file or config that cannot be used; the message names the file."""


class TokenizerKind(enum.Enum):
    """Which library reads the tokenizer file."""

    SENTENCEPIECE = "sentencepiece"  # A SentencePiece `.model` protobuf.
    HF = "hf"  # A Hugging Face `tokenizers` `tokenizer.json`.


class Tokenizer(abc.ABC):
    """Text <-> token ids, with the BOS / EOS / PAD ids and special tokens of one checkpoint.

    Attributes:
      path: The tokenizer file that was loaded.
      kind: Which backend reads it.
    """

    kind: TokenizerKind

    def __init__(
        self, path: str | os.PathLike[str], roles: dict[str, int | None], special: list[str]
    ) -> None:
        self.path = pathlib.Path(path)
        self._roles: dict[str, int | None] = dict.fromkeys(_ROLES)
        self._special: dict[str, int] = {}
        self.declare(f"tokenizer file {self.path}", roles, special)

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """The id of a token string (a vocabulary entry, not text), or None if absent."""

    @abc.abstractmethod
    def id_to_token(self, token_id: int) -> str | None:
        """The token string of an id, or None if the id is outside the vocabulary."""

    @abc.abstractmethod
    def _encode_raw(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text, with no special tokens added."""

    @abc.abstractmethod
    def _decode_raw(self, ids: list[int], skip_special_tokens: bool) -> str:
        """Text of in-range ids (special ids already removed when skipping)."""

    @abc.abstractmethod
    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """Ids of `text` (no special token added) and the character offset in `text` where each token starts.

        A token that covers no character of its own (SentencePiece's leading "▁", the first bytes of a
        byte-fallback character) starts where the next character does. Used to map character spans of
        rendered text (e.g. the assistant turns of a chat template) to tokens of one `encode` call.
        """

    def token_bytes(self) -> np.ndarray:
        """`[vocab_size]` int64: the UTF-8 bytes of text each token stands for (special tokens 0), so that a loss in
        nats per token becomes bits per byte, comparable across tokenizers."""
        special = set(self._special.values())
        return np.asarray([0 if i in special else len(self._piece_text(i).encode("utf-8"))
                           for i in range(self.vocab_size)], np.int64)

    def _piece_text(self, token_id: int) -> str:
        """The text of one token on its own (for `token_bytes`)."""
        return self.decode([token_id], skip_special_tokens=False)

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id, or None if the checkpoint declares none."""
        return self._roles["bos"]

    @property
    def eos_id(self) -> int | None:
        """End-of-sequence id, or None if the checkpoint declares none."""
        return self._roles["eos"]

    @property
    def pad_id(self) -> int | None:
        """Padding id, or None if the checkpoint declares none."""
        return self._roles["pad"]

    @property
    def padding_id(self) -> int:
        """The id the data pipelines write on padding: `pad_id`, else `eos_id`, else 0 (padding has no target)."""
        return next((i for i in (self.pad_id, self.eos_id) if i is not None), 0)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Every special token string -> id (BOS / EOS / PAD included), sorted by id."""
        return dict(sorted(self._special.items(), key=lambda kv: kv[1]))

    def declare(
        self, source: str, roles: dict[str, int | str | None], extra: Iterable[str] = ()
    ) -> None:
        """Sets roles and adds special tokens; later declarations win.

        Args:
          source: What declares them, for error messages (a file name, "keyword arguments").
          roles: Some of "bos", "eos", "pad" -> an id, a token string, or None (no such token).
          extra: Further special token strings; those not in the vocabulary are skipped.

        Raises:
          TokenizerError: A role token not in the vocabulary or an id outside `[0, vocab_size)`.
        """
        for role, value in roles.items():
            token_id = self._resolve(source, f"{role} token", value)
            self._roles[role] = token_id
            if token_id is not None:
                self._special[self.id_to_token(token_id) or str(token_id)] = token_id
        for token in extra:
            if (token_id := self.token_to_id(token)) is not None:
                self._special[token] = token_id
            else:
                warnings.warn(f"{source}: special token {token!r} not in {self.path}", stacklevel=2)

    def _resolve(self, source: str, what: str, value: int | str | None) -> int | None:
        if value is None:
            return None
        if isinstance(value, str):
            token_id = self.token_to_id(value)
            if token_id is None:
                raise TokenizerError(f"{source} names {what} {value!r}, not in {self.path}")
            return token_id
        if not 0 <= value < self.vocab_size:
            msg = f"{source} gives {what} id {value}, outside [0, {self.vocab_size}) of {self.path}"
            raise TokenizerError(msg)
        return value

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`; no special token is added unless asked for.

        Args:
          text: The text to encode.
          add_bos: Prepend `bos_id`.
          add_eos: Append `eos_id`.

        Raises:
          ValueError: `add_bos` / `add_eos` but the tokenizer has no such token.
        """
        return self.encode_batch([text], add_bos=add_bos, add_eos=add_eos)[0]

    def encode_batch(
        self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False
    ) -> list[list[int]]:
        """`encode` of each text; rows keep their own lengths (no padding)."""
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a sequence of strings; use encode for one string")
        prefix = [self._require("bos")] if add_bos else []
        suffix = [self._require("eos")] if add_eos else []
        return [prefix + ids + suffix for ids in self._encode_raw(list(texts))]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """Text of token ids.

        Args:
          ids: Token ids (ints, or a 1-D numpy / JAX array).
          skip_special_tokens: Drop the ids in `special_tokens` instead of writing them out.

        Raises:
          ValueError: An id outside `[0, vocab_size)`.
        """
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            msg = f"token ids {bad[:10]} are outside [0, {self.vocab_size}) of {self.path}"
            raise ValueError(msg)
        if skip_special_tokens:
            special = set(self._special.values())
            ids = [i for i in ids if i not in special]
        return self._decode_raw(ids, skip_special_tokens)

    def decode_generated(self, ids: Iterable[int]) -> str:
        """Text of generated ids, where ids past the tokenizer's vocabulary (a model's padded vocabulary, or an
        untrained model's guesses) show as `<id:N>` instead of raising."""
        parts, run = [], []
        for t in [*map(int, ids), None]:
            if t is not None and 0 <= t < self.vocab_size:
                run.append(t)
                continue
            if run:
                parts.append(self.decode(run))
                run = []
            if t is not None:
                parts.append(f"<id:{t}>")
        return "".join(parts)

    def _require(self, role: str) -> int:
        token_id = self._roles[role]
        if token_id is None:
            msg = f"add_{role}=True but {self.path} has no {role.upper()} token; pass {role}_id="
            raise ValueError(msg)
        return token_id

    def __repr__(self) -> str:
        ids = ", ".join(f"{r}_id={self._roles[r]}" for r in _ROLES)
        return f"{type(self).__name__}({str(self.path)!r}, vocab_size={self.vocab_size}, {ids})"


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model`; control pieces and `<unk>` count as special tokens."""

    kind = TokenizerKind.SENTENCEPIECE

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Loads `path`; raises TokenizerError if it is not a SentencePiece model."""
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            msg = f"could not read {path} as a SentencePiece model ({e}); {EXPECTED}"
            raise TokenizerError(msg) from None
        sp, ids = self._sp, range(self._sp.get_piece_size())
        roles = {"bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id()}
        special = [sp.id_to_piece(i) for i in ids if sp.is_control(i) or sp.is_unknown(i)]
        super().__init__(path, {k: (v if v >= 0 else None) for k, v in roles.items()}, special)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def token_to_id(self, token: str) -> int | None:
        token_id = self._sp.piece_to_id(token)  # Unknown pieces map to unk_id.
        return token_id if self._sp.id_to_piece(token_id) == token else None

    def id_to_token(self, token_id: int) -> str | None:
        return self._sp.id_to_piece(token_id) if 0 <= token_id < self.vocab_size else None

    def _encode_raw(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, out_type=int)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        pieces = self._sp.encode(text, return_type="proto").pieces  # begin: a byte offset in the UTF-8 text
        byte_to_char = [i for i, ch in enumerate(text) for _ in range(len(ch.encode("utf-8")))] + [len(text)]
        return [p.id for p in pieces], [byte_to_char[p.begin] for p in pieces]

    def _piece_text(self, token_id: int) -> str:
        if self._sp.is_byte(token_id):
            return "\0"  # <0xAB>: one byte
        return self._sp.id_to_piece(token_id).replace("\u2581", " ")  # "▁" is the space it stands for

    def _decode_raw(self, ids: list[int], skip_special_tokens: bool) -> str:
        if skip_special_tokens:
            return self._sp.decode(ids)
        # SentencePiece decodes control pieces to "": write special ids as their pieces and
        # decode the runs between them. As in SentencePiece, only the first text run loses
        # the space its leading "▁" stands for.
        special, out, run, seen_text = set(self._special.values()), [], [], False
        for i in [*ids, None]:
            if i is not None and i not in special:
                run.append(i)
                continue
            if run:
                text = self._sp.decode(run)
                space = seen_text and self._sp.id_to_piece(run[0]).startswith("▁")
                out.append(" " + text if space else text)
                run, seen_text = [], True
            if i is not None:
                out.append(self._sp.id_to_piece(i))
        return "".join(out)


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` `tokenizer.json`; added tokens marked special are special."""

    kind = TokenizerKind.HF

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Loads `path`; raises TokenizerError if it is not a `tokenizer.json`."""
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for any parse error.
            msg = f"could not read {path} as a Hugging Face tokenizer.json ({e}); {EXPECTED}"
            raise TokenizerError(msg) from None
        padding, added = self._tok.padding, self._tok.get_added_tokens_decoder().values()
        self._tok.no_padding()
        self._tok.no_truncation()
        roles = {"pad": padding["pad_id"]} if padding else {}
        super().__init__(path, roles, [t.content for t in added if t.special])

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id) if token_id >= 0 else None

    def _encode_raw(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        encoding = self._tok.encode(text, add_special_tokens=False)  # offsets: character (start, end)
        return list(encoding.ids), [start for start, _ in encoding.offsets]

    def _decode_raw(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} if the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"could not parse {path}: {e}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_content(path: pathlib.Path, key: str, value: Any) -> str | None:
    """A token given as a string, an AddedToken dict (`{"content": ...}`) or null."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is None or isinstance(value, str):
        return value
    msg = f'{path}: {key} must be a string or an object with a string "content", got {value!r}'
    raise TokenizerError(msg)


def _token_id(path: pathlib.Path, key: str, value: Any) -> int | None:
    """An id given as an int, a list of ints (the first is used) or null."""
    if isinstance(value, list) and value:
        value = value[0]
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise TokenizerError(f"{path}: {key} must be an integer or a list of integers, got {value!r}")


def _declare_directory(tok: Tokenizer, directory: pathlib.Path, wanted: set[str]) -> None:
    """Applies the special tokens the files in `directory` declare (only the `wanted` roles)."""
    for name in ("generation_config.json", "config.json"):
        path = directory / name
        data = _read_json(path)
        keys = {r: f"{r}_token_id" for r in wanted if f"{r}_token_id" in data}
        tok.declare(str(path), {r: _token_id(path, k, data[k]) for r, k in keys.items()})
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = directory / name
        data = _read_json(path)
        roles, extra = {}, []
        for key, value in data.items():
            role = key.removesuffix("_token")
            if key == "additional_special_tokens":
                if not isinstance(value, list):
                    raise TokenizerError(f"{path}: {key} must be a list, got {value!r}")
                extra += [_token_content(path, key, v) for v in value]
            elif role != key and role in _ROLES:
                if role in wanted:
                    roles[role] = _token_content(path, key, value)
            elif role != key and isinstance(value, str | dict):  # cls_token, gmask_token, ...
                extra.append(_token_content(path, key, value))
        added = data.get("added_tokens_decoder") or {}
        added = added.values() if isinstance(added, dict) else []
        extra += [v.get("content") for v in added if isinstance(v, dict) and v.get("special")]
        tok.declare(str(path), roles, [t for t in extra if isinstance(t, str)])


_DIRECTORY_FILES = {"tokenizer.json": HFTokenizer, "tokenizer.model": SentencePieceTokenizer}


def _find_file(path: pathlib.Path) -> tuple[pathlib.Path, type[Tokenizer]]:
    """The tokenizer file at or in `path` and the class that reads it."""
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path {path} does not exist; {EXPECTED}")
    if path.is_dir():
        for name, cls in _DIRECTORY_FILES.items():
            if (path / name).is_file():
                return path / name, cls
        models = sorted(p for p in path.glob("*.model") if p.is_file())
        if len(models) == 1:
            return models[0], SentencePieceTokenizer
        found = f" (several .model files: {[p.name for p in models]})" if models else ""
        msg = f"no tokenizer.json or tokenizer.model in directory {path}{found}; {EXPECTED}"
        raise FileNotFoundError(msg)
    if path.suffix == ".model":
        return path, SentencePieceTokenizer
    if path.suffix == ".json":
        return path, HFTokenizer
    raise TokenizerError(f"{path} is neither a .model nor a .json file; {EXPECTED}")


def load_tokenizer(
    path: str | os.PathLike[str],
    *,
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
) -> Tokenizer:
    """Loads a `SentencePieceTokenizer` or an `HFTokenizer` from a file or checkpoint directory.

    Args:
      path: A SentencePiece `.model`, a `tokenizer.json` (any `.json` name), or a directory
        with `tokenizer.json`, `tokenizer.model` or a single `*.model` (`tokenizer.json` wins).
        For a directory the special tokens its config files declare are applied too.
      bos_id: Overrides the BOS id (None: keep what the files say).
      eos_id: Overrides the EOS id.
      pad_id: Overrides the PAD id.

    Raises:
      FileNotFoundError: `path` does not exist, or a directory holds no tokenizer file.
      TokenizerError: (a ValueError) an unreadable tokenizer or config file, a BOS / EOS /
        PAD token the configs name that is not in the vocabulary, or an override outside it.
    """
    path = pathlib.Path(path).expanduser()
    file, cls = _find_file(path)
    tok = cls(file)
    given = {"bos": bos_id, "eos": eos_id, "pad": pad_id}
    overrides = {k: v for k, v in given.items() if v is not None}
    if path.is_dir():
        _declare_directory(tok, path, set(_ROLES) - overrides.keys())
    tok.declare("keyword arguments", overrides)
    return tok


def train_sentencepiece(
    texts: Iterable[str],
    path: str | os.PathLike[str],
    vocab_size: int,
    *,
    user_defined_symbols: Sequence[str] = (),
    max_sentences: int = 300_000,
) -> SentencePieceTokenizer:
    """Trains a byte-fallback BPE SentencePiece model on `texts` and writes it to `path` atomically.

    Ids: 0 `<pad>`, 1 `<unk>`, 2 `<s>` (bos), 3 `</s>` (eos); `user_defined_symbols`
    (e.g. FIM sentinels) are single tokens. Whitespace is kept as is (code), and no
    dummy-prefix space is added, so encoding is lossless piece by piece:
    `decode(encode(a) + encode(b)) == a + b`, which FIM relies on (its prefix,
    middle and suffix are encoded separately, and a dummy prefix would put a space
    the text does not have at the start of each).

    Args:
      texts: documents; each is split into lines for training.
      path: where to write the `.model` file.
      vocab_size: the number of pieces.
      user_defined_symbols: strings that must stay single tokens.
      max_sentences: at most this many lines are sampled for training.
    """
    path = pathlib.Path(path)
    lines = (line for text in texts for line in text.splitlines() if line.strip())
    tmp_prefix = path.with_name(f".{path.stem}.tmp{os.getpid()}")
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_prefix=str(tmp_prefix), vocab_size=vocab_size, model_type="bpe",
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, byte_fallback=True, character_coverage=0.9995,
        user_defined_symbols=list(user_defined_symbols), normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True,
        input_sentence_size=max_sentences, shuffle_input_sentence=True, train_extremely_large_corpus=False,
        minloglevel=2)
    os.replace(f"{tmp_prefix}.model", path)
    os.remove(f"{tmp_prefix}.vocab")
    return SentencePieceTokenizer(path)
