"""The pre-training Grain pipeline that feeds `train.py`, and the record pipeline that SFT and DPO share.

Pipeline (one per process; `make_train_iterator`):

    documents of this process's shard, minus the held-out ones (`document_indices`)
    -> global shuffle by seed (reshuffled every epoch) -> repeat `num_epochs`  (`Shard`)
    -> read + decode + tokenize + FIM (threads; `worker_count` Grain worker processes)
    -> drop and count unusable documents (`ling_jax.data.counting`)
    -> pack into rows of `seq_len` (`ling_jax.data.packing`) -> batch -> totals of the counts

Each batch is a dict of `[batch_size, seq_len]` int32 arrays: `inputs`, `targets` (next token within the same
document segment, -100 where there is none), `segment_ids` (1, 2, ... per packed document, 0 on padding) and
`positions` (restarting at 0 per segment). Iterators have `get_state` / `set_state` (exact resume,
JSON-serializable state) and `stats()` (what was dropped, by `Count`; see `ling_jax.data.counting`).

Documents are numbered 0..N-1 in a fixed order (`ling_jax.data.sources`). Document `i` is held out for
evaluation when a hash of `i` falls below `eval_fraction`, independent of the seed, so train and eval never
overlap. Process `p` of `P` trains on the held-in documents of the index range `[p*N//P, (p+1)*N//P)`.
`build_pipeline` is the part SFT and DPO share (`ling_jax.data.sft`, `ling_jax.data.dpo`): they bring
their own record map and batching.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags as absl_flags

from ling_jax.config import ConfigError
from ling_jax.data import fim
from ling_jax.data.counting import Count, CountedIterator, CountedStage, CountStage, DataError, dropped
from ling_jax.data.mixture import parse_sources
from ling_jax.data.packing import pack_and_batch
from ling_jax.data.settings import PackingKind, SourceKind, default_data_config, option
from ling_jax.data.sources import LazyFiles, Source, make_source
from ling_jax.data.tokenizer import Tokenizer

# Re-exported for callers of the old flat module: PackingKind, SourceKind, default_data_config (settings), make_source.
__all__ = ["PackingKind", "Shard", "SourceKind", "build_pipeline", "default_data_config", "document_indices",
           "document_stream", "held_out", "held_out_batches", "iter_documents", "make_eval_batches", "make_source",
           "make_train_iterator", "pretraining_documents", "training_batches"]

_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)


def iter_documents(data_cfg: ml_collections.ConfigDict, *, limit: int) -> Iterator[str]:
    """Up to `limit` training texts, evenly spread over the dataset (e.g. to train a tokenizer).

    For a mixture (`data.sources`), up to `limit` split evenly over its text sources.
    """
    root = parse_sources(data_cfg)
    if root is not None:
        texts = [leaf.data for leaf in root.leaves()
                 if option(leaf.data, "kind", SourceKind) is not SourceKind.SYNTHETIC]
        for leaf_cfg in texts:
            yield from iter_documents(leaf_cfg, limit=max(1, limit // len(texts)))
        return
    source = make_source(data_cfg, seq_len=1)
    indices = document_indices(len(source), option(data_cfg, "eval_fraction"), train=True)
    for i in indices[:: max(1, len(indices) // limit)][:limit]:
        doc = source.document(int(i))
        if isinstance(doc, str):
            yield doc


def held_out(indices: np.ndarray, eval_fraction: float) -> np.ndarray:
    """Whether each document index is held out for evaluation (a seed-independent hash of the index)."""
    z = indices.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)  # splitmix64
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53 < eval_fraction


def forced_held_out(num_docs: int, eval_fraction: float) -> int | None:
    """The document held out when the hash holds out none although `eval_fraction > 0`: the last one.

    A small fine-tuning file (64 records at `eval_fraction` 0.001) would otherwise have no held-out
    record at all; with at least 2 documents one is always held out. Only small datasets are hashed
    whole for this (with 64 or more expected held-out documents, none held out is beyond chance).
    """
    if eval_fraction <= 0.0 or num_docs < 2 or eval_fraction * num_docs >= 64:
        return None
    return None if held_out(np.arange(num_docs), eval_fraction).any() else num_docs - 1


def document_indices(num_docs: int, eval_fraction: float, *, train: bool, shard: tuple[int, int] = (0, 1),
                     ) -> np.ndarray:
    """Indices of the train (or eval) documents in shard `(process_index, process_count)`, ascending.

    The held-out documents are those `held_out` picks, or `forced_held_out`'s one when it picks none.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction={eval_fraction} must be in [0, 1)")
    p, count = shard
    lo, hi, out = p * num_docs // count, (p + 1) * num_docs // count, []
    forced = forced_held_out(num_docs, eval_fraction)
    for start in range(lo, hi, 1 << 22):
        idx = np.arange(start, min(hi, start + (1 << 22)), dtype=np.int64)
        out.append(idx[(held_out(idx, eval_fraction) | (idx == forced)) != train])
    return np.concatenate(out) if out else np.zeros(0, np.int64)


class Shard(LazyFiles):
    """The documents of one process, shuffled per epoch and repeated: item `k` is `(epoch, index, document)`.

    Grain's `shuffle` takes milliseconds per element on small datasets (< ~1000 documents), so shards of up to
    2**20 documents use a cached NumPy permutation per epoch, larger ones Grain's `index_shuffle`.
    """

    def __init__(self, source: Source, indices: np.ndarray, *, seed: int, shuffle: bool, num_epochs: int | None):
        self.source, self.indices, self.seed, self.shuffle = source, indices, seed, shuffle
        self.length = sys.maxsize if num_epochs is None else len(indices) * int(num_epochs)
        self.__setstate__({})

    def __len__(self) -> int:
        return self.length

    def _position(self, epoch: int, j: int) -> int:
        n = len(self.indices)
        if not self.shuffle:
            return j
        if n > 1 << 20:
            return int(grain.experimental.index_shuffle(j, max_index=n - 1, seed=(self.seed + epoch) % 2**32, rounds=4))
        with self._lock:
            if epoch not in self._open:  # Keep this epoch's and the previous one's (threads may straddle them).
                self._open = {e: p for e, p in self._open.items() if e == epoch - 1}
                self._open[epoch] = np.random.default_rng([self.seed, epoch]).permutation(n)
            return int(self._open[epoch][j])

    def __getitem__(self, k: int) -> tuple[int, int, Any]:
        epoch, j = divmod(int(k), len(self.indices))
        index = int(self.indices[self._position(epoch, j)])
        return epoch, index, self.source.document(index)


def build_pipeline(data_cfg: ml_collections.ConfigDict, source: Source, indices: np.ndarray,
                   example: Callable[[tuple[int, int, Any]], dict[str, Any]], *,
                   batch: Callable[[grain.IterDataset], grain.IterDataset], seed: int, num_epochs: int | None,
                   workers: int, what: str, fix: str) -> CountedIterator:
    """Shuffled, repeated documents -> `example` -> drop and count -> `batch` -> (workers) -> totals.

    Args:
      data_cfg: The data config (`shuffle`).
      source: The documents.
      indices: The documents of this process, ascending.
      example: A picklable map of `(epoch, index, document)` to a kept element or `counting.dropped(...)`.
      batch: Turns the kept elements (with `counts`) into batches (with `counts`).
      seed: Shuffle seed, in [0, 2**32).
      num_epochs: Passes over `indices` (None: forever).
      workers: Grain worker processes (0: in this process).
      what: Which documents (e.g. "training documents"), for the error when there are none.
      fix: What to check when nothing is usable, for that error.
    """
    ds = document_stream(data_cfg, source, indices, example, batch=batch, seed=seed, num_epochs=num_epochs,
                         workers=workers, what=what, fix=fix)
    return iter(CountedStage(ds, dataset=f"{len(source)} documents"))  # a move of the data keeps it valid


def document_stream(data_cfg: ml_collections.ConfigDict, source: Source, indices: np.ndarray,
                    example: Callable[[tuple[int, int, Any]], dict[str, Any]], *,
                    batch: Callable[[grain.IterDataset], grain.IterDataset], seed: int, num_epochs: int | None,
                    workers: int, what: str, fix: str) -> grain.IterDataset:
    """`build_pipeline` without its last stage: the elements still carry their `counts` (args as there).

    A mixture (`ling_jax.data.stages`) mixes such streams, one per source, and packs and totals after mixing.
    """
    if len(indices) == 0:
        raise DataError(f"no {what} in {source.where} ({len(source)} in all); use more data, fewer processes, "
                        "or change data.eval_fraction")
    if not 0 <= seed < 2**32:
        raise ConfigError(f"seed={seed} must be in [0, 2**32)")
    shard = Shard(source, indices, seed=seed, shuffle=bool(option(data_cfg, "shuffle")), num_epochs=num_epochs)
    ds = grain.MapDataset.source(shard).map(example).to_iter_dataset(_READ_OPTIONS)
    # Drops in a row that mean "no usable data": with one good document a run spans at most one epoch boundary
    # (< 2n) in one process; Grain workers each see a slice of every epoch, hence the factor and the floor.
    max_drops = max(2 * len(indices) * max(1, workers), 1000)
    ds = batch(CountStage(ds, max_consecutive_drops=max_drops, where=source.where, fix=fix))
    if workers > 0:
        if not absl_flags.FLAGS.is_parsed():  # Grain's worker processes read absl flags (defaults are fine).
            absl_flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return ds


class _Tokenize:
    """`(epoch, index, document)` -> `{"inputs": int32 ids}`, or `dropped(Count)`."""

    def __init__(self, encoder: fim.DocumentEncoder | None):
        self.encoder = encoder

    def __call__(self, item: tuple[int, int, str | np.ndarray | Count]) -> dict[str, Any]:
        epoch, index, doc = item
        if isinstance(doc, Count):
            return dropped(doc)
        if isinstance(doc, np.ndarray):
            return {"inputs": doc}  # Synthetic token ids.
        assert self.encoder is not None
        ids = self.encoder(doc, epoch=epoch, index=index) if doc else []
        return {"inputs": np.asarray(ids, np.int32)} if len(ids) >= 2 else dropped(Count.DROPPED_EMPTY)


def _document_encoder(data_cfg: ml_collections.ConfigDict, tokenizer: Tokenizer | None,
                      seed: int) -> fim.DocumentEncoder | None:
    """Text -> token ids (FIM, BOS, EOS as configured); None for synthetic data (already token ids)."""
    kind = option(data_cfg, "kind", SourceKind)
    if kind is SourceKind.SYNTHETIC:
        if float(option(data_cfg, "fim_rate")) > 0:
            raise ConfigError("data.fim_rate > 0 needs text; synthetic data has none: set data.fim_rate=0")
        return None
    if tokenizer is None:
        raise ConfigError(f"data.kind={kind.value} needs a tokenizer; set data.tokenizer (or pass "
                          "tokenizer=load_tokenizer(...))")
    tokens = tuple(option(data_cfg, f"fim_{p}_token") for p in ("prefix", "middle", "suffix"))
    return fim.DocumentEncoder(tokenizer, seed=seed, fim_rate=float(option(data_cfg, "fim_rate")),
                               spm_rate=float(option(data_cfg, "fim_spm_rate")), sentinel_tokens=tokens,
                               add_bos=bool(option(data_cfg, "add_bos")), add_eos=bool(option(data_cfg, "add_eos")))


def row_packer(data_cfg: ml_collections.ConfigDict, *, tokenizer: Tokenizer | None, seq_len: int, batch_size: int,
               seed: int, train: bool) -> Callable[[grain.IterDataset], grain.IterDataset]:
    """`pack_and_batch` with the data config's packing, the tokenizer's padding id and, for training, the row
    shuffle (`data.row_shuffle_window`); shared by this pipeline and the mixture's (`ling_jax.data.stages`)."""
    return functools.partial(pack_and_batch, kind=option(data_cfg, "packing", PackingKind), seq_len=seq_len,
                             batch_size=batch_size, pad_id=0 if tokenizer is None else tokenizer.padding_id,
                             shuffle_window=option(data_cfg, "row_shuffle_window") if train else 0, seed=seed)


def _pretraining_pipeline(data_cfg: ml_collections.ConfigDict, *, tokenizer: Tokenizer | None, seq_len: int,
                          batch_size: int, seed: int, train: bool, shard: tuple[int, int], num_epochs: int | None,
                          workers: int) -> CountedIterator:
    """The pre-training pipeline over the train (or held-out) documents of `shard` (module docstring)."""
    if seq_len < 2 or batch_size < 1:
        raise ConfigError(f"need seq_len >= 2 and batch_size >= 1; got seq_len={seq_len}, batch_size={batch_size}")
    batch = row_packer(data_cfg, tokenizer=tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed, train=train)
    ds, source = pretraining_documents(data_cfg, tokenizer=tokenizer, seq_len=seq_len, seed=seed, train=train,
                                       shard=shard, num_epochs=num_epochs, workers=workers, then=batch)
    return iter(CountedStage(ds, dataset=f"{len(source)} documents"))  # a move of the data keeps it valid


def pretraining_documents(data_cfg: ml_collections.ConfigDict, *, tokenizer: Tokenizer | None, seq_len: int,
                          seed: int, train: bool, shard: tuple[int, int], num_epochs: int | None, workers: int,
                          then: Callable[[grain.IterDataset], grain.IterDataset]) -> tuple[grain.IterDataset, Source]:
    """The tokenized, counted documents of one source's `shard` with `then` applied (packing, or for a mixture
    splitting into rows), before the last stage; and the source."""
    source = make_source(data_cfg, seq_len)
    indices = document_indices(len(source), float(option(data_cfg, "eval_fraction")), train=train, shard=shard)
    encoder = _document_encoder(data_cfg, tokenizer, seed)
    what = f"training documents (shard {shard[0]} of {shard[1]})" if train else "held-out documents"
    ds = document_stream(data_cfg, source, indices, _Tokenize(encoder), batch=then, seed=seed, num_epochs=num_epochs,
                         workers=workers, what=what,
                         fix="check that the files hold UTF-8 text and that data.text_field is right")
    return ds, source


def training_batches(pipeline: Callable[..., CountedIterator], data_cfg: ml_collections.ConfigDict, *,
                     tokenizer: Tokenizer | None, seq_len: int, batch_size: int, seed: int, process_index: int = 0,
                     process_count: int = 1) -> CountedIterator:
    """The training batches of one process (`make_train_iterator`, `make_sft_iterator`, `make_dpo_iterator`).

    Args:
      pipeline: The task's pipeline: `pipeline(data_cfg, *, tokenizer, seq_len, batch_size, seed, train, shard,
        num_epochs, workers)`.
      data_cfg: `settings.default_data_config()` (pre-training) or `default_post_training_data_config()`.
      tokenizer: The tokenizer (None for synthetic data).
      seq_len: Tokens per row.
      batch_size: Rows (pairs, for DPO) per batch of this process.
      seed: Shuffle and FIM seed, in [0, 2**32).
      process_index: This process, in [0, process_count).
      process_count: Number of processes; each reads a disjoint contiguous shard of the documents.

    Returns:
      An iterator of batches (dicts of `[batch_size, seq_len]` int32 arrays) with `get_state`, `set_state`,
      `stats` and `close`; with `num_epochs` set it stops after the last full batch.

    Raises:
      ConfigError: A bad config or no files (`ChatFormatError`, `TokenizerError`: a tokenizer without the
        chat template's end-of-text token).
      DataError: No documents, or (on a `next`) a long run of unusable ones.
      ChatFormatError: SFT / DPO, on a `next`: an unusable record under `bad_records=error`.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    return pipeline(data_cfg, tokenizer=tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed, train=True,
                    shard=(process_index, process_count), num_epochs=option(data_cfg, "num_epochs"),
                    workers=int(option(data_cfg, "worker_count")))


def held_out_batches(pipeline: Callable[..., CountedIterator], data_cfg: ml_collections.ConfigDict, *,
                     tokenizer: Tokenizer | None, seq_len: int, batch_size: int, num_batches: int, seed: int,
                     ) -> list[dict[str, np.ndarray]]:
    """A fixed list of batches of the held-out documents, the same in every process; args as `training_batches`.

    The held-out documents are shuffled by `seed` and repeated if they do not fill `num_batches`.

    Raises:
      ConfigError: `data.eval_fraction` is not in (0, 1), or as for `training_batches`.
      DataError: No document is held out.
    """
    eval_fraction = float(option(data_cfg, "eval_fraction"))
    if not 0.0 < eval_fraction < 1.0:
        raise ConfigError(f"evaluation needs data.eval_fraction in (0, 1), got {eval_fraction}; set it, or "
                          "set eval_every=0")
    it = pipeline(data_cfg, tokenizer=tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed, train=False,
                  shard=(0, 1), num_epochs=None, workers=0)
    batches = [next(it) for _ in range(num_batches)]
    it.close()
    return batches


# Pre-training batches of one process: `make_train_iterator(data_cfg, *, tokenizer, seq_len, batch_size, seed,
# process_index=0, process_count=1)`; see `training_batches`.
make_train_iterator = functools.partial(training_batches, _pretraining_pipeline)
# Held-out pre-training batches: `make_eval_batches(data_cfg, *, tokenizer, seq_len, batch_size, num_batches,
# seed)`; see `held_out_batches`.
make_eval_batches = functools.partial(held_out_batches, _pretraining_pipeline)
