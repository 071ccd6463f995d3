"""`ling_jax.model.sharding`: the mesh, the logical-axis rules, their validation, and the mesh context.

Meshes larger than this process's one device are `AbstractMesh`es: validation
only reads axis names and sizes. Multi-device numerics are in
`test_expert_parallel.py`.
"""

from __future__ import annotations

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

import ling_jax
from ling_jax.model import expert_parallel
from ling_jax.model.moe import MoE
from ling_jax.model.sharding import (
    ACTIVATION_SPECS,
    LOGICAL_RULES,
    MESH_AXES,
    ShardingError,
    batch_sharding,
    like_params,
    logical_shardings,
    make_mesh,
    mesh_axes_of,
    mesh_is_parallel,
    use_mesh,
    validate_config,
    validate_shardings,
    with_mesh,
)
from ling_jax.train.optim import default_optimizer_config, make_optimizer


def _mesh(**sizes: int) -> AbstractMesh:
    return AbstractMesh(tuple(sizes.get(a, 1) for a in MESH_AXES), MESH_AXES)


def _abstract(name: str):
    model = ling_jax.LingForCausalLM(ling_jax.get_config(name))
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), ids)["params"]), ling_jax.logical_axes(model)


def test_rules_name_every_logical_axis_of_the_model():
    _, specs = _abstract("tiny")
    used = {name for spec in jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, PartitionSpec)) for name in spec}
    used |= {name for spec in ACTIVATION_SPECS for name in spec}
    assert used <= {name for name, _ in LOGICAL_RULES}
    assert mesh_axes_of("activation_batch") == ("data", "fsdp", "expert")
    assert mesh_axes_of("expert") == ("expert",)
    assert mesh_axes_of("kv_heads") == ("tensor",)
    assert mesh_axes_of("head_dim") == () and mesh_axes_of("not_a_rule") == ()


def test_make_mesh_sizes_and_errors():
    mesh = make_mesh({"data": -1})
    assert mesh.axis_names == MESH_AXES and mesh.devices.shape == (1, 1, 1, 1)
    with pytest.raises(ShardingError) as e:
        make_mesh({"data": 2, "expert": 4})
    assert str(e.value) == ("mesh {'data': 2, 'fsdp': 1, 'expert': 4, 'tensor': 1} needs 8 devices, but 1 are "
                            "available; make the product of the axis sizes match")
    with pytest.raises(ShardingError, match=r"unknown mesh axes \['experts'\]"):
        make_mesh({"experts": 1})
    with pytest.raises(ShardingError, match="at most one mesh axis may be -1"):
        make_mesh({"data": -1, "fsdp": -1})
    assert isinstance(e.value, ValueError)  # `train.py` reports ValueErrors as user errors


def test_config_errors_name_the_field_and_the_mesh_axis():
    lite = ling_jax.get_config("ling_lite")
    validate_config(lite, _mesh(fsdp=4, expert=8), batch_size=64)  # the pretraining mesh of the recipe
    with pytest.raises(ShardingError) as e:
        validate_config(lite, _mesh(expert=12))
    assert str(e.value) == ("config: num_experts (64), logical axis 'expert', is not divisible by mesh axis "
                            "'expert' (size 12)")
    with pytest.raises(ShardingError) as e:
        validate_config(lite, _mesh(tensor=8))
    assert str(e.value) == ("config: num_key_value_heads (4), logical axis 'kv_heads', is not divisible by mesh "
                            "axis 'tensor' (size 8)")
    with pytest.raises(ShardingError) as e:
        validate_config(lite, _mesh(data=2, expert=2), batch_size=6)
    assert str(e.value) == ("config: batch_size (6), logical axis 'activation_batch', is not divisible by mesh "
                            "axes ('data', 'fsdp', 'expert') (size 4 together)")


def test_parameter_errors_name_the_parameter_and_both_axes():
    params, specs = _abstract("tiny")
    validate_shardings(params, specs, _mesh(fsdp=2, expert=2, tensor=2))
    validate_shardings(params, specs, _mesh(expert=8))
    with pytest.raises(ShardingError) as e:
        validate_shardings(params, specs, _mesh(expert=3))
    assert str(e.value) == ("parameter moe_layers/mlp/down_proj: dimension 1 (size 8), logical axis 'expert', "
                            "is not divisible by mesh axis 'expert' (size 3)")
    with pytest.raises(ShardingError) as e:  # tiny has 2 kv heads
        validate_shardings(params, specs, _mesh(tensor=4))
    assert str(e.value) == ("parameter dense_layers/attention/k_proj: dimension 2 (size 2), logical axis "
                            "'kv_heads', is not divisible by mesh axis 'tensor' (size 4)")


def test_two_logical_axes_on_one_mesh_axis_is_an_error():
    params, specs = _abstract("tiny")
    rules = tuple((n, "tensor") if n == "embed" else (n, m) for n, m in LOGICAL_RULES)
    with pytest.raises(ShardingError) as e:
        validate_shardings(params, specs, _mesh(), rules)
    assert str(e.value) == ("parameter dense_layers/attention/k_proj: logical axes 'embed' and 'kv_heads' both map "
                            "to mesh axis 'tensor'; change the rules so that each mesh axis shards one dimension")
    rules = (("activation_length", "tensor"), *LOGICAL_RULES)  # only activations are affected
    with pytest.raises(ShardingError, match="logical axes 'activation_length' and 'activation_heads' both map "
                                            "to mesh axis 'tensor'"):
        validate_shardings(params, specs, _mesh(), rules)
    with pytest.raises(ShardingError, match="maps to mesh axis 'model', which the mesh"):
        validate_shardings(params, specs, _mesh(), (("embed", "model"), *LOGICAL_RULES))


def test_expert_parallel_rejects_sizes_the_mesh_does_not_divide():
    E, D, F = 8, 64, 32
    w = jnp.zeros((E, D, F))
    x, ids = jnp.zeros((12, D)), jnp.zeros((12, 2), jnp.int32)
    with pytest.raises(ShardingError, match=r"num_experts \(8\) is not divisible by mesh axis 'expert' \(size 3\)"):
        expert_parallel.expert_parallel_ffn(x, ids.astype(jnp.float32), ids, w, w, w.transpose(0, 2, 1),
                                            mesh=_mesh(expert=3))
    with pytest.raises(ShardingError, match=r"needs a mesh with axes among .* also has \['model'\]"):
        expert_parallel.expert_parallel_ffn(x, ids.astype(jnp.float32), ids, w, w, w.transpose(0, 2, 1),
                                            mesh=AbstractMesh((2,), ("model",)))


def test_use_mesh_activates_the_rules_and_constraints():
    mesh = make_mesh({})
    f = lambda x: nn.with_logical_constraint(x, ("activation_batch", "activation_embed"))  # noqa: E731
    x = jnp.ones((2, 4))
    assert "sharding_constraint" not in str(jax.make_jaxpr(f)(x))  # no rules, no mesh: a no-op
    with use_mesh(mesh):
        assert jax.sharding.get_abstract_mesh().axis_names == MESH_AXES
        assert tuple(nn.get_logical_axis_rules()) == LOGICAL_RULES
        assert "sharding_constraint" in str(jax.make_jaxpr(f)(x))
    assert jax.sharding.get_abstract_mesh().empty and not nn.get_logical_axis_rules()
    seen = with_mesh(lambda: jax.sharding.get_abstract_mesh().axis_names, mesh)()
    assert seen == MESH_AXES
    assert not mesh_is_parallel(jax.sharding.get_abstract_mesh())
    assert not mesh_is_parallel(mesh)  # one device: the MoE keeps the single-device path
    assert mesh_is_parallel(_mesh(expert=2))


def test_shardings_of_params_and_batch():
    _, specs = _abstract("tiny")
    mesh = make_mesh({})
    shardings = logical_shardings(specs, mesh)
    assert shardings["moe_layers"]["mlp"]["gate_proj"].spec == PartitionSpec(None, "expert", "fsdp", "tensor")
    assert shardings["embed"]["embedding"].spec == PartitionSpec("tensor", "fsdp")
    assert batch_sharding(mesh).spec == PartitionSpec(("data", "fsdp", "expert"))


def test_optimizer_moments_take_their_parameters_shardings_in_any_dtype():
    params, specs = _abstract("tiny")
    mesh = make_mesh({})
    param_sh = logical_shardings(specs, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    cfg = default_optimizer_config()
    cfg.mu_dtype = "bfloat16"  # the first moment no longer has the parameter's dtype
    opt_state = jax.eval_shape(make_optimizer(cfg, optax.constant_schedule(1e-3)).init, params)
    opt_sh = like_params(opt_state, params, param_sh, replicated)
    moments = [(path, leaf, sh) for (path, leaf), sh in zip(jax.tree_util.tree_leaves_with_path(opt_state),
                                                            jax.tree.leaves(opt_sh), strict=True)
               if "['moe_layers']['mlp']['gate_proj']" in jax.tree_util.keystr(path)]
    assert {leaf.dtype for _, leaf, _ in moments} == {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}  # mu, nu
    for _, _, sh in moments:
        assert sh.spec == PartitionSpec(None, "expert", "fsdp", "tensor")
    counts = [sh for (path, leaf), sh in zip(jax.tree_util.tree_leaves_with_path(opt_state), jax.tree.leaves(opt_sh),
                                             strict=True) if leaf.ndim == 0]
    assert counts and all(sh == replicated for sh in counts)


def test_moe_under_a_one_device_mesh_matches_no_mesh():
    cfg = ling_jax.get_config("tiny")
    layer = MoE(cfg)
    x = jax.random.normal(jax.random.key(0), (2, 5, cfg.hidden_size))
    params = nn.unbox(layer.init(jax.random.key(1), x)["params"])
    plain = jax.jit(layer.apply)({"params": params}, x)
    with use_mesh(make_mesh({})):
        meshed = jax.jit(layer.apply)({"params": params}, x)
    assert float(jnp.max(jnp.abs(plain - meshed))) == 0.0


def test_train_refuses_a_mesh_that_does_not_fit_the_devices(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[1]))
    import train
    from configs import default

    cfg = default.get_config()
    cfg.mesh.data = 2
    with pytest.raises(ShardingError, match=r"needs 2 devices, but 1 are available"):
        train.run(cfg, str(tmp_path))
