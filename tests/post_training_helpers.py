"""Shared by the post-training tests: tiny tokenizers that know the Ling chat template, generated data."""

from __future__ import annotations

import json
import pathlib
import random
import string

import tokenizers

ROLE_TOKENS = ("<role>SYSTEM</role>", "<role>HUMAN</role>", "<role>ASSISTANT</role>")
EOT = "<|endoftext|>"
CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"


def char_tokenizer_json(path: pathlib.Path) -> pathlib.Path:
    """A character-level Hugging Face `tokenizer.json`: ids 0 <pad>, 1 <unk>, 2..5 the template's strings
    (special tokens), then one token per printable ASCII character (vocab 103)."""
    specials = ["<pad>", "<unk>", *ROLE_TOKENS, EOT]
    vocab = {t: i for i, t in enumerate(specials + list(CHARS))}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in specials])
    tok.decoder = tokenizers.decoders.Fuse()
    tok.save(str(path))
    return path


WORDS = ["apple", "river", "stone", "cloud", "green", "seven", "light", "table", "music", "ocean", "tiger",
         "paper", "bread", "glass", "house", "night"]


def chat_records(n: int, seed: int = 0) -> list[dict]:
    """SFT records: a mix of `messages` (with and without system, one or two turns) and prompt/response."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = rng.sample(WORDS, 3)
        q, a = f"repeat {' '.join(words)}", " ".join(words)
        if i % 3 == 0:
            out.append({"prompt": q, "response": a})
        elif i % 3 == 1:
            out.append({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q},
                                     {"role": "assistant", "content": a}]})
        else:
            w2 = rng.sample(WORDS, 2)
            out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a},
                                     {"role": "user", "content": f"repeat {' '.join(w2)}"},
                                     {"role": "assistant", "content": " ".join(w2)}]})
    return out


def preference_records(n: int, seed: int = 0) -> list[dict]:
    """DPO records: chosen repeats the prompt's words, rejected says other words."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = rng.sample(WORDS, 3)
        other = rng.sample([w for w in WORDS if w not in words], 3)
        prompt = f"repeat {' '.join(words)}"
        if i % 2:
            out.append({"prompt": [{"role": "user", "content": prompt}],
                        "chosen": [{"role": "assistant", "content": " ".join(words)}],
                        "rejected": [{"role": "assistant", "content": " ".join(other)}]})
        else:
            out.append({"prompt": prompt, "chosen": " ".join(words), "rejected": " ".join(other)})
    return out


def write_jsonl(path: pathlib.Path, records: list) -> pathlib.Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def small_recipe(c, *, init_from, data, tokenizer, steps=3):
    """A recipe shrunk to a few CPU steps on the fixture model."""
    c.init_from, c.data.path, c.data.tokenizer = str(init_from), str(data), str(tokenizer)
    c.compute_dtype, c.gmm_impl = "float32", "reference"
    c.batch_size, c.seq_len, c.steps = 4, 64, steps
    c.schedule.warmup_steps, c.schedule.decay_steps = 1, steps
    c.checkpoint_every, c.log_every, c.eval_every = steps, 1, 0
    c.peak_flops_per_device, c.sample_prompts = 1e11, ()
    return c
