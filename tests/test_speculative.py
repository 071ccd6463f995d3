"""Self-speculative decoding with the MTP layer: exactly the tokens of plain greedy decoding."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURE

import ling_jax
from ling_jax.inference.decoding import GenerationError, left_pad
from ling_jax.inference.speculative import generate_mtp

FIXTURE2 = FIXTURE.parent / "ling2-tiny-a"


@pytest.fixture(scope="module")
def tiny2():
    return ling_jax.from_pretrained(str(FIXTURE2))


@pytest.mark.slow  # compiles the two-token verify step (about 30 s on a quiet machine)
def test_speculative_equals_greedy_on_the_fixture_golden(tiny2):
    model, params = tiny2
    golden = dict(np.load(FIXTURE2 / "golden.npz"))
    out = ling_jax.generate(model, params, jnp.asarray(golden["greedy_prompt"]), max_new_tokens=12, eos_token_id=-1,
                            speculative="mtp")
    np.testing.assert_array_equal(np.asarray(out), golden["greedy_output"])


@pytest.mark.slow
def test_speculative_equals_greedy_with_left_padding_and_eos(tiny2):
    model, params = tiny2
    ids, mask = left_pad([[5, 77, 301, 12, 9, 250, 3], [400, 2], [33, 44, 55, 66]], pad=0)
    plain = np.asarray(ling_jax.generate(model, params, ids, attention_mask=mask, max_new_tokens=16, eos_token_id=-1))
    eos = int(plain[1, 7 + 3])  # a token row 1 produces mid-way: that row stops there, the others go on
    greedy = ling_jax.generate(model, params, ids, attention_mask=mask, max_new_tokens=16, eos_token_id=eos)
    spec, accepted, steps = generate_mtp(model, params, jnp.asarray(ids), jnp.asarray(mask), jnp.int32(eos),
                                         jnp.int32(0), max_new_tokens=16)
    np.testing.assert_array_equal(np.asarray(spec), np.asarray(greedy))
    assert np.any(np.asarray(greedy)[1, 7:] == 0)  # row 1 did stop at eos
    assert 0 <= int(accepted) <= int(steps) and int(steps) >= 1


def test_speculative_needs_mtp_layers_and_greedy(tiny, tiny2):
    model, params = tiny
    with pytest.raises(GenerationError, match="needs a model with MTP layers"):
        ling_jax.generate(model, params, jnp.ones((1, 3), jnp.int32), max_new_tokens=2, speculative="mtp")
    model2, params2 = tiny2
    with pytest.raises(GenerationError, match="is greedy decoding"):
        ling_jax.generate(model2, params2, jnp.ones((1, 3), jnp.int32), max_new_tokens=2, speculative="mtp",
                          temperature=0.7)
    with pytest.raises(GenerationError, match="is not a scheme"):
        ling_jax.generate(model2, params2, jnp.ones((1, 3), jnp.int32), max_new_tokens=2, speculative="medusa")
