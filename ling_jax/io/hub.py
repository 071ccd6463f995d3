"""Hugging Face Hub ids (`org/name[@revision]`) as model paths, through `huggingface_hub.snapshot_download`.

`local_path` is what every loader calls on a model path before looking at it: a
path that exists on disk is returned as it is (a local directory always wins);
a Hub id is resolved to its snapshot in the Hub cache, downloading only what a
model needs (`HUB_PATTERNS`: config, safetensors and index, tokenizer files,
generation config, `*.py` model code). The Hub client's own settings apply, as
in `transformers`: `HF_HOME` / `HF_HUB_CACHE` (where the cache is),
`HF_HUB_OFFLINE=1` (the cache only, no network), `HF_TOKEN` or
`hf auth login` (private and gated repositories). A cache laid out by the
client (`models--org--name/snapshots/<commit>/` plus `refs/<branch>`) works
offline. Failures are `CheckpointNotFoundError`s that name the id and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from ling_jax.io.hf_names import CheckpointNotFoundError

# What a model needs from its repository (not the PyTorch .bin / .pt copies, nor the README's images).
# The files of a tokenizer (fetched, and copied by `ling_jax.io.loading.copy_tokenizer_files`, when present).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
TOKENIZER_GLOBS = ("*.tiktoken",)
TOKENIZER_PATTERNS = (*TOKENIZER_FILES, *TOKENIZER_GLOBS, "generation_config.json")
HUB_PATTERNS = ("config.json", "*.safetensors", "model.safetensors.index.json", *TOKENIZER_PATTERNS, "*.py")
_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?")
_INDEX = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class HubId:
    """A Hub model id and the revision (branch, tag or commit; None = the default branch)."""

    repo_id: str
    revision: str | None = None

    @classmethod
    def parse(cls, text: str) -> HubId | None:
        """The id `text` spells (`org/name` or `org/name@revision`), or None when it is not one."""
        m = _ID.fullmatch(text)
        return cls(m["repo"], m["revision"]) if m else None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def _hub_id(path: str) -> HubId | None:
    """The Hub id `path` spells when it is no file or directory here, else None."""
    return None if os.path.exists(os.path.expanduser(path)) else HubId.parse(path)


def is_hub_id(path: str | os.PathLike) -> bool:
    """Whether `path` would be resolved on the Hub: it is no file or directory here and spells a Hub id."""
    return _hub_id(os.fspath(path)) is not None


def local_path(path: str | os.PathLike, what: str = "the path", *, tokenizer_only: bool = False) -> str:
    """`path` itself when it exists (or is no Hub id), else the local snapshot of the Hub id it spells.

    Args:
      path: a local file or directory, or `org/name[@revision]`.
      what: how messages name the path (`"--model"`, `"config.init_from"`).
      tokenizer_only: fetch only the tokenizer files and generation config (`TOKENIZER_PATTERNS`).

    Raises:
      CheckpointNotFoundError: the repository or revision is unknown, not in the local cache when offline,
        not reachable, or its cached snapshot lacks a file the model needs (the message names the id and the fix).
    """
    path = os.fspath(path)
    hub_id = _hub_id(path)
    if hub_id is None:
        return path
    try:
        patterns = TOKENIZER_PATTERNS if tokenizer_only else HUB_PATTERNS
        snapshot = snapshot_download(hub_id.repo_id, revision=hub_id.revision, allow_patterns=list(patterns))
    except RevisionNotFoundError:
        raise CheckpointNotFoundError(
            f"{what} {hub_id}: the repository has no revision {hub_id.revision!r}: name a branch, tag or commit of "
            f"it, e.g. {hub_id.repo_id}@main") from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise CheckpointNotFoundError(
            f"{what} {hub_id}: no such repository on the Hub, or it is private or gated: check the id, and for a "
            "private or gated one log in (`hf auth login`) or set HF_TOKEN") from None
    except LocalEntryNotFoundError:
        fix = ("download it once online (unset HF_HUB_OFFLINE, or run `hf download "
               f"{hub_id.repo_id}{f' --revision {hub_id.revision}' if hub_id.revision else ''}`)")
        why = "the Hub is offline (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise CheckpointNotFoundError(
            f"{what} {hub_id} is not in the local cache ({constants.HF_HUB_CACHE}) and {why}: {fix}, set HF_HOME "
            "to the cache that holds it, or point at a local directory") from None
    except HfHubHTTPError as e:
        raise CheckpointNotFoundError(f"{what} {hub_id}: the Hub answered {e}; try again, or point at a local "
                                      "directory") from None
    if not tokenizer_only:
        _check_complete(snapshot, hub_id, what)
    return snapshot


def _check_complete(snapshot: str, hub_id: HubId, what: str) -> None:
    """A cached snapshot must hold config.json and every shard its index lists (a download cut short may not)."""
    missing = [] if os.path.isfile(os.path.join(snapshot, "config.json")) else ["config.json"]
    index = os.path.join(snapshot, _INDEX)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f).get("weight_map", {}).values()))
        except (OSError, ValueError, AttributeError):
            shards = []  # the safetensors reader reports a damaged index by name
        missing += [s for s in shards if not os.path.isfile(os.path.join(snapshot, s))]
    if missing:
        raise CheckpointNotFoundError(
            f"{what} {hub_id}: the cached snapshot {snapshot} lacks {', '.join(missing)} (a download cut short?): "
            f"download it again online (`hf download {hub_id.repo_id}`; unset HF_HUB_OFFLINE), or point at a local "
            "directory")
