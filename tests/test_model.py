"""Parity of `ling_jax.model` with the PyTorch reference (golden fixtures) and model invariants."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ling_jax
from ling_jax.train.losses import next_token_loss


def test_forward_logits_and_hidden_match_reference(tiny, golden):
    model, params = tiny
    ids = jnp.asarray(golden["forward_input_ids"])
    logits = model.apply({"params": params}, ids)
    assert logits.dtype == jnp.float32 and logits.shape == (2, 17, 512)
    np.testing.assert_allclose(logits, golden["forward_logits"], atol=2e-4, rtol=0)
    hidden, cache = model.apply({"params": params}, ids, method="hidden_states")
    assert cache is None
    np.testing.assert_allclose(hidden, golden["forward_last_hidden"], atol=2e-4, rtol=0)


def test_left_padded_batch_matches_reference(tiny, golden):
    model, params = tiny
    mask = golden["padded_attention_mask"]
    args = (jnp.asarray(golden["padded_input_ids"]), jnp.asarray(mask))
    real = mask.astype(bool)
    explicit = model.apply({"params": params}, *args, jnp.asarray(golden["padded_position_ids"]))
    derived = model.apply({"params": params}, *args)  # positions from the mask
    for logits in (explicit, derived):
        err = np.abs(np.asarray(logits) - golden["padded_logits"])[real].max()
        assert err <= 2e-4, err


def _loss_and_grads(model, params, ids):
    def loss_fn(p):
        return next_token_loss(model.apply({"params": p}, ids, deterministic=False), ids)

    return jax.jit(jax.value_and_grad(loss_fn))(params)


def test_training_loss_and_every_gradient_match_reference(tiny, golden, golden_grads):
    model, params = tiny
    loss, grads = _loss_and_grads(model, params, jnp.asarray(golden["train_input_ids"]))
    assert abs(float(loss) - float(golden["train_loss"])) <= 1e-5
    hf = ling_jax.to_hf_state_dict(grads, model.config)
    assert set(hf) == set(golden_grads)
    for name, ref in golden_grads.items():
        rel = np.linalg.norm(hf[name] - ref) / np.linalg.norm(ref)
        assert rel <= 1e-4, (name, rel)


def test_bf16_forward_within_reference_bf16_error(fixture_dir, golden):
    model, params = ling_jax.from_pretrained(str(fixture_dir), dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
    logits = model.apply({"params": params}, jnp.asarray(golden["forward_input_ids"]))
    ours = np.abs(np.asarray(logits) - golden["forward_logits"]).max()
    ref = np.abs(golden["forward_logits_bf16"] - golden["forward_logits"]).max()
    assert ours <= 2 * ref + 0.02, (ours, ref)


@pytest.mark.slow  # 30 s
def test_packed_documents_do_not_attend_across_segments(tiny):
    model, params = tiny
    rng = np.random.default_rng(0)
    a, b = rng.integers(2, 512, 9), rng.integers(2, 512, 6)
    packed = jnp.asarray(np.concatenate([a, b])[None])
    segments = jnp.asarray([[1] * 9 + [2] * 6])
    logits = model.apply({"params": params}, packed, segment_ids=segments)
    alone_a = model.apply({"params": params}, jnp.asarray(a[None]))
    alone_b = model.apply({"params": params}, jnp.asarray(b[None]))
    np.testing.assert_allclose(logits[0, :9], alone_a[0], atol=2e-5)
    np.testing.assert_allclose(logits[0, 9:], alone_b[0], atol=2e-5)


@pytest.mark.slow  # 25 s per policy: loss and gradients compiled twice
@pytest.mark.parametrize("remat", [ling_jax.Remat.FULL, ling_jax.Remat.DOTS])
def test_remat_gives_identical_loss_and_grads(tiny, golden, remat):
    model, params = tiny
    ids = jnp.asarray(golden["train_input_ids"])
    loss, grads = _loss_and_grads(model, params, ids)
    remat_model = model.clone(config=model.config.replace(remat=remat))
    loss_r, grads_r = _loss_and_grads(remat_model, params, ids)
    assert float(loss_r) == pytest.approx(float(loss), abs=1e-6)
    for g, gr in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r), strict=True):
        np.testing.assert_allclose(gr, g, atol=1e-6)


def test_router_statistics_are_sown_per_layer(tiny, golden):
    model, params = tiny
    mask = jnp.asarray(golden["padded_attention_mask"])
    _, state = model.apply({"params": params}, jnp.asarray(golden["padded_input_ids"]), mask,
                           mutable=["intermediates"])
    stats = state["intermediates"]["moe_layers"]["mlp"]
    cfg = model.config
    (counts,) = stats["tokens_per_expert"]
    (probs,) = stats["router_prob_mean"]
    (z,) = stats["router_z_loss"]
    assert counts.shape == (cfg.num_moe_layers, cfg.num_experts)
    # Only real tokens count: each routes to top-k experts.
    np.testing.assert_allclose(counts.sum(-1), int(mask.sum()) * cfg.num_experts_per_tok)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    assert z.shape == (cfg.num_moe_layers,) and bool(jnp.all(z > 0))


def test_init_gives_logical_axes_for_every_parameter():
    model = ling_jax.LingForCausalLM(ling_jax.get_config("tiny"))
    specs = ling_jax.logical_axes(model)
    leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert leaves and all(isinstance(s, jax.sharding.PartitionSpec) and None not in s for s in leaves)
    assert specs["moe_layers"]["mlp"]["gate_proj"] == jax.sharding.PartitionSpec(
        "layers", "expert", "expert_embed", "expert_mlp")


@pytest.mark.slow  # 30 s: two models initialised and differentiated
def test_tied_embeddings_project_with_the_embedding_and_biases_take_effect():
    cfg = ling_jax.get_config("tiny", tie_word_embeddings=True, use_bias=True, use_qkv_bias=True,
                              first_k_dense_replace=0, norm_head=False)
    model = ling_jax.LingForCausalLM(cfg)
    ids = jnp.arange(10)[None] % cfg.vocab_size
    params = ling_jax.init_params(model, jax.random.key(1))
    assert "lm_head" not in params and "dense_layers" not in params
    assert params["moe_layers"]["attention"]["q_bias"].shape == (3, 4, 16)
    logits = model.apply({"params": params}, ids)
    hidden, _ = model.apply({"params": params}, ids, method="hidden_states")
    embedding = params["embed"]["embedding"]  # [V, D]
    np.testing.assert_allclose(logits, jnp.einsum("BTD,VD->BTV", hidden, embedding), atol=1e-5, rtol=1e-5)
    # NormHead on a tied embedding divides by the norm of each hidden unit over the vocabulary.
    normed = model.clone(config=cfg.replace(norm_head=True)).apply({"params": params}, ids)
    unit = embedding / jnp.linalg.norm(embedding, axis=0, keepdims=True)
    np.testing.assert_allclose(normed, jnp.einsum("BTD,VD->BTV", hidden, unit), atol=1e-5, rtol=1e-5)
    # The biases are used: a nonzero output bias moves the logits, and every bias gets a gradient.
    shifted = jax.tree.map(lambda a: a, params)
    shifted["moe_layers"]["attention"]["o_bias"] = jnp.full_like(params["moe_layers"]["attention"]["o_bias"], 0.5)
    assert float(jnp.abs(model.apply({"params": shifted}, ids) - logits).max()) > 1e-3
    loss, grads = _loss_and_grads(model, params, ids)
    assert np.isfinite(float(loss))
    for name in ("q_bias", "k_bias", "v_bias", "o_bias"):
        g = np.asarray(grads["moe_layers"]["attention"][name])
        assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0, name
    # The tied embedding's gradient has the output projection's part: nonzero rows for tokens never input.
    unseen = np.setdiff1d(np.arange(cfg.vocab_size), np.asarray(ids))
    assert float(jnp.abs(grads["embed"]["embedding"][unseen]).sum()) > 0


def test_fixture_parity_with_pallas_gmm_in_interpret_mode(fixture_dir, golden):
    """The model through the Pallas grouped-matmul kernels (interpreted on CPU)."""
    model, params = ling_jax.from_pretrained(str(fixture_dir), gmm_impl=ling_jax.GmmImpl.PALLAS)
    logits = model.apply({"params": params}, jnp.asarray(golden["forward_input_ids"][:1, :9]))
    np.testing.assert_allclose(logits, golden["forward_logits"][:1, :9], atol=2e-4, rtol=0)
