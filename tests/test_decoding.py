"""KV-cache generation (`ling_jax.inference.decoding`) against the reference and against full forwards."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ling_jax
from ling_jax.inference.decoding import GenerationError, Sampling, sample


def test_greedy_generation_matches_reference(tiny, golden):
    model, params = tiny
    out = ling_jax.generate(model, params, jnp.asarray(golden["greedy_prompt"]), max_new_tokens=12,
                            eos_token_id=-1)
    assert out.dtype == jnp.int32
    np.testing.assert_array_equal(out, golden["greedy_output"])


def _cached_logits(model, params, ids, mask, n_prefill):
    """Logits of every position, prefilling `n_prefill` tokens then decoding one at a time."""
    B, T = ids.shape
    cache = ling_jax.init_cache(model.config, B, T, jnp.float32)
    positions = jnp.where(mask == 1, jnp.cumsum(mask, 1) - 1, 1)
    logits, cache = model.apply({"params": params}, ids[:, :n_prefill], mask, positions[:, :n_prefill],
                                cache=cache, mode=ling_jax.ModelMode.PREFILL)
    out = [logits]
    step = jax.jit(lambda c, t, p: model.apply({"params": params}, t, mask, p, cache=c))
    for t in range(n_prefill, T):
        logits, cache = step(cache, ids[:, t:t + 1], positions[:, t:t + 1])
        out.append(logits)
    assert int(cache.index) == T
    return jnp.concatenate(out, axis=1)


def test_kv_cache_decoding_equals_full_forward_left_padded(tiny, golden):
    model, params = tiny
    ids = jnp.asarray(golden["padded_input_ids"])
    mask = jnp.asarray(golden["padded_attention_mask"], jnp.int32)
    full = model.apply({"params": params}, ids, mask)
    cached = _cached_logits(model, params, ids, mask, n_prefill=7)
    real = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(np.asarray(cached)[real], np.asarray(full)[real], atol=1e-5)
    np.testing.assert_allclose(np.asarray(full)[real], golden["padded_logits"][real], atol=2e-4)


def test_left_padded_generation_equals_unpadded_rows(tiny, golden):
    model, params = tiny
    prompt = golden["greedy_prompt"]
    short = prompt[1, 3:]
    batch = np.stack([prompt[0], np.concatenate([[0, 0, 0], short])])
    mask = np.stack([np.ones(7, np.int32), np.array([0, 0, 0, 1, 1, 1, 1], np.int32)])
    out = ling_jax.generate(model, params, jnp.asarray(batch), attention_mask=jnp.asarray(mask),
                            max_new_tokens=6, eos_token_id=-1)
    alone = ling_jax.generate(model, params, jnp.asarray(short[None]), max_new_tokens=6, eos_token_id=-1)
    np.testing.assert_array_equal(out[0], golden["greedy_output"][0, :13])
    np.testing.assert_array_equal(out[1, 7:], alone[0, 4:])


def test_generation_stops_at_eos_and_pads(tiny, golden):
    model, params = tiny
    prompt = jnp.asarray(golden["greedy_prompt"])
    eos = int(golden["greedy_output"][0, 9])  # the third generated token of row 0
    out = np.asarray(ling_jax.generate(model, params, prompt, max_new_tokens=12, eos_token_id=eos,
                                       pad_token_id=7))
    np.testing.assert_array_equal(out[0, :10], golden["greedy_output"][0, :10])
    assert (out[0, 10:] == 7).all()
    row1 = golden["greedy_output"][1]
    hits = np.flatnonzero(row1[7:] == eos)  # row 1 stops after its own first eos, if it makes one
    stop = 7 + (int(hits[0]) + 1 if hits.size else 12)
    np.testing.assert_array_equal(out[1], np.concatenate([row1[:stop], np.full(19 - stop, 7)]))


def test_sampling_filters():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 64))
    keys = jax.random.split(jax.random.key(0), 64)
    draw = lambda s: np.asarray(jax.vmap(lambda k, l: sample(l[None], k, s)[0])(keys, logits))  # noqa: E731
    assert set(draw(Sampling(1.0, top_k=1))) == {0}
    assert set(draw(Sampling(1.0, top_k=2))) <= {0, 1}
    assert set(draw(Sampling(1.0, top_p=0.75))) <= {0, 1}
    assert set(draw(Sampling(1.0, top_p=0.4))) == {0}
    assert len(set(draw(Sampling(1.0)))) >= 3
    with pytest.raises(GenerationError, match="top_p"):
        Sampling(1.0, top_p=1.5)


def test_generate_rejects_bad_input(tiny):
    model, params = tiny
    with pytest.raises(GenerationError, match="max_position_embeddings"):
        ling_jax.generate(model, params, jnp.ones((1, 100), jnp.int32), max_new_tokens=50)
    with pytest.raises(GenerationError, match="left-padded"):
        ling_jax.generate(model, params, jnp.ones((1, 4), jnp.int32), max_new_tokens=2,
                          attention_mask=jnp.asarray([[1, 1, 1, 0]]))


@pytest.mark.slow  # three generate compiles
def test_chunked_prefill_gives_the_same_greedy_tokens(tiny, golden):
    model, params = tiny
    prompt = golden["greedy_prompt"]  # [2, 7]
    out = ling_jax.generate(model, params, jnp.asarray(prompt), max_new_tokens=12, eos_token_id=-1, prefill_chunk=3)
    np.testing.assert_array_equal(out, golden["greedy_output"])
    short = prompt[1, 3:]  # a left-padded batch, prefilled in chunks of 2 (the first chunk is all padding in row 1)
    batch = np.stack([prompt[0], np.concatenate([[0, 0, 0], short])])
    mask = np.stack([np.ones(7, np.int32), np.array([0, 0, 0, 1, 1, 1, 1], np.int32)])
    chunked = ling_jax.generate(model, params, jnp.asarray(batch), attention_mask=jnp.asarray(mask),
                                max_new_tokens=6, eos_token_id=-1, prefill_chunk=2)
    whole = ling_jax.generate(model, params, jnp.asarray(batch), attention_mask=jnp.asarray(mask),
                              max_new_tokens=6, eos_token_id=-1)
    np.testing.assert_array_equal(chunked, whole)
    np.testing.assert_array_equal(chunked[0], golden["greedy_output"][0, :13])


def test_decoding_over_a_cache_of_several_blocks_keeps_the_tokens(tiny, golden, monkeypatch):
    """Attention over the filled part of the cache, in blocks of 4 (19 slots: the last block shifted back),
    gives the golden greedy tokens and the left-padded batch's."""
    from ling_jax.model import attention

    model, params = tiny
    jax.clear_caches()  # the generate traces cached above used one block
    monkeypatch.setattr(attention, "CACHE_BLOCK", 4)
    out = ling_jax.generate(model, params, jnp.asarray(golden["greedy_prompt"]), max_new_tokens=12, eos_token_id=-1)
    np.testing.assert_array_equal(out, golden["greedy_output"])
    prompt = golden["greedy_prompt"]
    batch = np.stack([prompt[0], np.concatenate([[0, 0, 0, 0, 0], prompt[1, 5:]])])  # row 1: a padding block
    mask = np.stack([np.ones(7), np.arange(7) >= 5])
    blocked = ling_jax.generate(model, params, jnp.asarray(batch), attention_mask=jnp.asarray(mask, jnp.int32),
                                max_new_tokens=6, eos_token_id=-1)
    alone = ling_jax.generate(model, params, jnp.asarray(prompt[1:, 5:]), max_new_tokens=6, eos_token_id=-1)
    jax.clear_caches()
    np.testing.assert_array_equal(blocked[0], golden["greedy_output"][0, :13])
    np.testing.assert_array_equal(blocked[1, 7:], alone[0, 2:])
