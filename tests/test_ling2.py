"""Ling 2.0 (BailingMoeV2) against the reference outputs of ../shared/fixtures/ling2-tiny-a.

Tolerances as the fixture README: logits 2e-4, loss 1e-5, gradients 1e-4 relative L2,
greedy tokens identical, bf16 within twice the reference's own bf16 error plus 0.02.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURE

import ling_jax
from ling_jax.train.losses import causal_lm_loss_parts

FIXTURE2 = FIXTURE.parent / "ling2-tiny-a"


@pytest.fixture(scope="module")
def golden2():
    return dict(np.load(FIXTURE2 / "golden.npz"))


@pytest.fixture(scope="module")
def tiny2():
    return ling_jax.from_pretrained(str(FIXTURE2))


def test_v2_config_round_trips_and_has_the_v2_fields():
    d = json.loads((FIXTURE2 / "config.json").read_text())
    cfg = ling_jax.LingConfig.from_hf_dict(d)
    assert cfg.to_hf_dict() == d
    assert (cfg.model_type, cfg.score_function, cfg.n_group, cfg.topk_group) == (
        "bailing_moe_v2", ling_jax.ScoreFunction.SIGMOID, 4, 2)
    assert (cfg.rotary_dim, cfg.num_mtp_layers, cfg.routed_scaling_factor, cfg.use_qk_norm) == (8, 1, 2.5, True)


def test_logits_and_hidden_match_reference(tiny2, golden2):
    model, params = tiny2
    ids = jnp.asarray(golden2["forward_input_ids"])
    logits = model.apply({"params": params}, ids)
    np.testing.assert_allclose(logits, golden2["forward_logits"], atol=2e-4, rtol=0)
    hidden, _ = model.apply({"params": params}, ids, method="hidden_states")
    np.testing.assert_allclose(hidden, golden2["forward_last_hidden"], atol=2e-4, rtol=0)


def test_left_padded_batch_matches_reference(tiny2, golden2):
    model, params = tiny2
    mask = golden2["padded_attention_mask"]
    logits = model.apply({"params": params}, jnp.asarray(golden2["padded_input_ids"]), jnp.asarray(mask))
    err = np.abs(np.asarray(logits) - golden2["padded_logits"])[mask.astype(bool)].max()
    assert err <= 2e-4, err


def test_greedy_generation_through_the_kv_cache_is_identical(tiny2, golden2):
    model, params = tiny2
    out = ling_jax.generate(model, params, jnp.asarray(golden2["greedy_prompt"]), max_new_tokens=12,
                            eos_token_id=-1)
    np.testing.assert_array_equal(np.asarray(out), golden2["greedy_output"])


@pytest.mark.slow
def test_bf16_forward_within_reference_bf16_error(golden2):
    model, params = ling_jax.from_pretrained(str(FIXTURE2), dtype=jnp.bfloat16)
    logits = model.apply({"params": params}, jnp.asarray(golden2["forward_input_ids"]))
    ours = np.abs(np.asarray(logits) - golden2["forward_logits"]).max()
    ref = np.abs(golden2["forward_logits_bf16"] - golden2["forward_logits"]).max()
    assert ours <= 2 * ref + 0.02, (ours, ref)


def test_causal_lm_loss_and_its_parts_match_reference(tiny2, golden2):
    model, params = tiny2
    ids = jnp.asarray(golden2["train_input_ids"])
    parts = jax.jit(lambda p: causal_lm_loss_parts(model, p, ids))(params)
    assert abs(float(parts["loss"]) - float(golden2["train_loss"])) <= 1e-5
    assert abs(float(parts["lm_loss"]) - float(golden2["train_lm_loss"])) <= 1e-5
    assert abs(float(parts["mtp_loss"]) - float(golden2["train_mtp_loss"])) <= 1e-5


@pytest.mark.slow
def test_every_gradient_including_the_mtp_layer_matches_reference(tiny2, golden2):
    model, params = tiny2
    ids = jnp.asarray(golden2["train_input_ids"])
    loss, grads = jax.jit(jax.value_and_grad(lambda p: ling_jax.causal_lm_loss(model, p, ids)))(params)
    assert abs(float(loss) - float(golden2["train_loss"])) <= 1e-5
    golden_grads = dict(np.load(FIXTURE2 / "golden_grads.npz"))
    hf = ling_jax.to_hf_state_dict(grads, model.config)
    bias = {n for n in hf if n.endswith("gate.expert_bias")}
    assert len(bias) == 3 and all(not np.any(hf[n]) for n in bias)  # a buffer: no gradient
    assert set(hf) - bias == set(golden_grads)
    assert any(n.startswith("model.layers.3.") for n in golden_grads)  # the MTP layer's
    for name, ref in golden_grads.items():
        if not np.any(ref):  # an expert no token was routed to
            assert not np.any(hf[name]), name
            continue
        rel = np.linalg.norm(hf[name] - ref) / np.linalg.norm(ref)
        assert rel <= 1e-4, (name, rel)


def test_v1_causal_lm_loss_is_the_reference_loss(tiny, golden):
    model, params = tiny
    loss = ling_jax.causal_lm_loss(model, params, jnp.asarray(golden["train_input_ids"]))
    assert abs(float(loss) - float(golden["train_loss"])) <= 1e-5


@pytest.mark.slow
def test_round_trip_is_bit_exact_and_loads_back(tmp_path, tiny2, golden2):
    from safetensors.numpy import load_file

    conv = ling_jax.convert_hf_to_orbax(FIXTURE2, tmp_path / "conv")
    out = ling_jax.convert_orbax_to_hf(conv, tmp_path / "hf")
    src = load_file(str(FIXTURE2 / "model.safetensors"))
    back = {}
    for f in sorted((tmp_path / "hf").glob("*.safetensors")):
        back.update(load_file(str(f)))
    assert set(back) == set(src) and sum(n.endswith("gate.expert_bias") for n in src) == 3
    for name, arr in src.items():
        assert back[name].dtype == arr.dtype and np.array_equal(back[name].view(np.uint16), arr.view(np.uint16)), name
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    source = json.loads((FIXTURE2 / "config.json").read_text())
    # The dtype keys name the exported tensors' dtype (the fixture's own disagree: dtype float32, torch_dtype bf16).
    assert exported["dtype"] == exported["torch_dtype"] == "bfloat16"
    assert {k: v for k, v in exported.items() if k not in ("dtype", "torch_dtype")} == {
        k: v for k, v in source.items() if k not in ("dtype", "torch_dtype")}
    ids = jnp.asarray(golden2["forward_input_ids"])
    model, params = tiny2
    expected = np.asarray(model.apply({"params": params}, ids))
    for path in (conv, out):
        m, p = ling_jax.from_pretrained(str(path))
        np.testing.assert_array_equal(np.asarray(m.apply({"params": p}, ids)), expected)


def _v2_dict(**changes):
    d = json.loads((FIXTURE2 / "config.json").read_text())
    return {**d, **changes}


@pytest.mark.parametrize(("changes", "message"), [
    (dict(n_group=3), "num_experts (16) must be divisible by n_group (3)"),
    (dict(topk_group=5), "topk_group (5) must be in [1, n_group=4]"),
    (dict(topk_group=1, num_experts_per_tok=5), "num_experts_per_tok (5) is larger than the 4 experts of the kept "
                                                 "groups (topk_group=1 groups of num_experts/n_group=4)"),
    (dict(partial_rotary_factor=1.5), "partial_rotary_factor (1.5) must be in (0, 1]"),
    (dict(partial_rotary_factor=0.0), "partial_rotary_factor (0.0) must be in (0, 1]"),
    (dict(partial_rotary_factor=0.3125), "partial_rotary_factor (0.3125) x head_dim (16) gives a rotary width of 5"),
])
def test_bad_v2_configs_name_the_keys_and_values(changes, message):
    with pytest.raises(ling_jax.ConfigError) as info:
        ling_jax.LingConfig.from_hf_dict(_v2_dict(**changes))
    assert message in str(info.value)


@pytest.mark.parametrize("dropped", ["model.layers.2.mlp.gate.expert_bias", "model.layers.3.eh_proj.weight"])
def test_checkpoint_missing_declared_v2_tensors_is_refused_before_compute(tmp_path, dropped):
    import shutil

    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(FIXTURE2 / "model.safetensors"))
    del tensors[dropped]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(FIXTURE2 / "config.json", tmp_path / "config.json")
    with pytest.raises(ling_jax.CheckpointError) as info:
        ling_jax.from_pretrained(str(tmp_path))
    assert f"missing {dropped} (expected shape" in str(info.value)


@pytest.mark.slow  # 40 s: three loss-and-gradient compiles of the v2 fixture with its MTP layer
@pytest.mark.parametrize("remat", [ling_jax.Remat.FULL, ling_jax.Remat.DOTS])
def test_remat_gives_the_v2_loss_and_gradients(tiny2, golden2, remat):
    model, params = tiny2
    ids = jnp.asarray(golden2["train_input_ids"])

    def loss_and_grads(m):
        return jax.jit(jax.value_and_grad(lambda p: ling_jax.causal_lm_loss(m, p, ids)))(params)

    loss, grads = loss_and_grads(model)
    loss_r, grads_r = loss_and_grads(model.clone(config=model.config.replace(remat=remat)))
    assert abs(float(loss_r) - float(golden2["train_loss"])) <= 1e-5
    assert abs(float(loss_r) - float(loss)) <= 1e-6
    for g, gr in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r), strict=True):
        np.testing.assert_allclose(gr, g, atol=1e-6)


@pytest.mark.slow  # 20 s: the Pallas kernels interpreted on the CPU
def test_v2_through_the_pallas_grouped_matmul_in_interpret_mode(golden2):
    model, params = ling_jax.from_pretrained(str(FIXTURE2), gmm_impl=ling_jax.GmmImpl.PALLAS)
    ids = jnp.asarray(golden2["forward_input_ids"][:1, :9])
    logits = model.apply({"params": params}, ids)
    np.testing.assert_allclose(logits, golden2["forward_logits"][:1, :9], atol=2e-4, rtol=0)
