"""Expert parallelism for Ling 2.0 on 8 fake CPU devices: group-limited routing, the expert bias and the MTP layer
give the single-device logits, loss and gradients on every mesh.

As `tests/test_expert_parallel.py`: one subprocess with 8 host devices prints its measurements as JSON.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
from test_expert_parallel import _batch, _rel, _worst, run_on_mesh

ROOT = pathlib.Path(__file__).resolve().parents[1]
MESHES = {"expert8": {"expert": 8}, "fsdp2_expert2_tensor2": {"fsdp": 2, "expert": 2, "tensor": 2}}
TOL = 1e-5


@pytest.fixture(scope="module")
def results(fixture_dir) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    proc = subprocess.run([sys.executable, __file__, str(fixture_dir.parent / "ling2-tiny-a")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # compiles the v2 model with its MTP layer three times (about 2 minutes)
@pytest.mark.parametrize("name", list(MESHES))
def test_v2_logits_loss_and_every_gradient_match_single_device(results, name):
    r = results[name]
    assert r["devices"] == 8 and r["all_to_all"]
    assert r["logits"] < TOL and r["mtp_logits"] < TOL and r["loss"] < TOL, r
    assert r["grads"] < TOL, r  # worst parameter named in r["worst"]; expert_bias gradients are 0 on both sides
    assert r["num_grads"] > 10


def _worker(fixture: str) -> dict:
    import jax
    import jax.numpy as jnp

    import ling_jax
    from ling_jax.train.losses import mtp_losses, next_token_loss

    assert jax.device_count() == 8
    model, params = ling_jax.from_pretrained(fixture, gmm_impl=ling_jax.GmmImpl.REFERENCE)
    batch = _batch(model.config.vocab_size)
    ids, mask = jnp.asarray(batch["ids"]), jnp.asarray(batch["mask"])

    def loss_fn(p, ids, mask):
        logits, mtp_logits = model.apply({"params": p}, ids, mask, deterministic=False, method="mtp_logits")
        labels = jnp.where(mask > 0, ids, -100)
        loss = next_token_loss(logits, labels) + 0.3 * jnp.sum(mtp_losses(mtp_logits, labels))
        return loss, (logits, mtp_logits)

    step = jax.value_and_grad(loss_fn, has_aux=True)
    (loss0, (logits0, mtp0)), grads0 = jax.jit(step)(params, ids, mask)
    specs = ling_jax.logical_axes(model)
    out = {}
    for name, shape in MESHES.items():
        ((loss, (logits, mtp)), grads), hlo, mesh = run_on_mesh(step, params, specs, shape, ids, mask)
        g, worst, n = _worst(grads, grads0)
        out[name] = {"devices": mesh.size, "all_to_all": "all-to-all" in hlo, "logits": _rel(logits, logits0),
                     "mtp_logits": _rel(mtp, mtp0), "loss": _rel(loss, loss0), "grads": g, "worst": worst,
                     "num_grads": n}
    return out


if __name__ == "__main__":
    print(json.dumps(_worker(sys.argv[1])))
