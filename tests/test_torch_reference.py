"""The PyTorch reference of the benchmarks (`benchmarks/torch_reference*.py`) equals the original on the goldens."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import torch_reference as ref  # noqa: E402
from benchmarks import torch_reference_model as model_ref  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the shapes are tiny, and spinning OpenMP threads stall on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(fixture_dir):
    """The fixture checkpoint in float32, eval mode."""
    return ref.from_pretrained(fixture_dir)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a))


def test_loads_every_checkpoint_tensor(reference, fixture_dir):
    import json

    with open(fixture_dir / "model.safetensors.index.json") as f:
        names = set(json.load(f)["weight_map"])
    assert set(reference.state_dict()) == names
    assert len(reference.model.layers[1].mlp.experts) == 8
    assert isinstance(reference.model.layers[0].mlp, model_ref.BailingMoeMLP)  # first_k_dense_replace: 1


def test_forward_logits_and_last_hidden(reference, golden):
    with torch.no_grad():
        out = reference(_t(golden["forward_input_ids"]))
    assert np.abs(out.logits.numpy() - golden["forward_logits"]).max() <= 2e-4
    assert np.abs(out.last_hidden_state.numpy() - golden["forward_last_hidden"]).max() <= 2e-4


def test_bf16_forward_within_the_originals_bound(fixture_dir, golden):
    model = ref.from_pretrained(fixture_dir, dtype=torch.bfloat16)
    with torch.no_grad():
        logits = model(_t(golden["forward_input_ids"])).logits
    assert logits.dtype == torch.float32
    err = np.abs(logits.numpy() - golden["forward_logits"]).max()
    assert err <= 2 * np.abs(golden["forward_logits_bf16"] - golden["forward_logits"]).max() + 0.02


def test_left_padded_batch(reference, golden):
    mask = golden["padded_attention_mask"]
    with torch.no_grad():
        out = reference(_t(golden["padded_input_ids"]), _t(mask), _t(golden["padded_position_ids"]))
    err = np.abs(out.logits.numpy() - golden["padded_logits"])
    assert err[mask == 1].max() <= 2e-4
    assert err.max() <= 2e-4  # the padded slots too: the same additive mask as the original


def test_greedy_generate(reference, golden):
    out = ref.generate(reference, _t(golden["greedy_prompt"]), max_new_tokens=12)
    np.testing.assert_array_equal(out.numpy(), golden["greedy_output"])


def test_kv_cache_generate_equals_recompute(reference, golden):
    ids, mask = _t(golden["padded_input_ids"]), _t(golden["padded_attention_mask"])
    cached = ref.generate(reference, ids, attention_mask=mask, max_new_tokens=6)
    recomputed = ref.generate(reference, ids, attention_mask=mask, max_new_tokens=6, use_cache=False)
    np.testing.assert_array_equal(cached.numpy(), recomputed.numpy())
    kwargs = dict(attention_mask=mask, max_new_tokens=6, temperature=0.8, top_k=50, top_p=0.9)
    sampled = [ref.generate(reference, ids, generator=torch.Generator().manual_seed(3), use_cache=c, **kwargs)
               for c in (True, False)]
    np.testing.assert_array_equal(sampled[0].numpy(), sampled[1].numpy())
    # the cached decode's last logits equal the full forward's over the grown sequence
    cache, full_mask = model_ref.KVCache(), torch.cat([mask, torch.ones_like(cached[:, :6])], 1)
    positions = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 1)
    with torch.no_grad():
        reference(cached[:, :13], full_mask[:, :13], positions[:, :13], cache)  # the prefill
        step = [reference(cached[:, 13 + i:14 + i], full_mask[:, :14 + i], positions[:, 13 + i:14 + i], cache).logits
                for i in range(5)]
        full = reference(cached[:, :-1], full_mask[:, :-1], positions[:, :-1]).logits
    np.testing.assert_allclose(torch.cat(step, 1).numpy(), full[:, 13:].numpy(), atol=1e-5)


def test_train_loss_and_gradients(fixture_dir, golden, golden_grads):
    model = ref.from_pretrained(fixture_dir).train()
    ids = _t(golden["train_input_ids"])
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert abs(float(loss.detach()) - float(golden["train_loss"])) <= 1e-5
    grads = {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(golden_grads)
    worst = max(np.linalg.norm(grads[n] - g) / np.linalg.norm(g) for n, g in golden_grads.items())
    assert worst <= 1e-4


def test_same_weights_through_a_ling_jax_pytree(reference, fixture_dir):
    """`from_ling` rebuilds every checkpoint tensor from ling_jax's (stacked, transposed) parameter tree."""
    from ling_jax.io.hf_names import from_hf_state_dict
    from ling_jax.io.loading import read_config
    from ling_jax.io.safetensors import SafetensorsCheckpoint

    config = read_config(fixture_dir / "config.json")
    params = from_hf_state_dict(SafetensorsCheckpoint(str(fixture_dir)), config, dtype=np.float32)
    rebuilt = ref.from_ling(config, params).state_dict()
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(rebuilt[name], tensor, rtol=0, atol=0, msg=name)


def test_random_config_and_train_step():
    """`from_config` builds the HF structure at other shapes; one AdamW step lowers the loss on its batch."""
    cfg = dict(model_type="bailing_moe", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=1, head_dim=8, moe_intermediate_size=16, num_experts=4,
               num_experts_per_tok=2, num_shared_experts=1, first_k_dense_replace=1, norm_head=True,
               rope_theta=600000.0, pad_token_id=0)
    model = ref.from_config(cfg, seed=1)
    assert model.lm_head.weight.shape == (64, 32)
    assert model.model.layers[1].mlp.shared_experts.up_proj.weight.shape == (16, 32)
    ids = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    opt = ref.adamw(model, lr=1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
    assert [len(g["params"]) for g in opt.param_groups] == [len(list(model.parameters())) - 5, 5]
    first = ref.train_step(model, opt, ids, clip_norm=1.0)
    second = ref.train_step(model, opt, ids, clip_norm=1.0)
    # NormHead makes every lm_head column unit-norm: logits of std ~0.7 at init, a loss a little above log(V)
    assert np.log(64) < first < np.log(64) + 0.6
    assert second < first
    with pytest.raises(ValueError, match="bailing_moe"):
        model_ref.BailingMoeConfig.from_dict({**cfg, "model_type": "bailing_moe_v2"})
