"""Benchmark of `convert_weights.py`: wall time and peak memory of both directions on a >= 2 GB checkpoint.

    python benchmarks/bench_convert.py [--workdir /tmp] [--layers 8] [--experts 64] [--keep]

Generates a synthetic checkpoint in the published layout (a scaled-down Ling
config, random bf16 weights, sharded safetensors with an index) in a temporary
directory, then runs as separate processes: a baseline (imports plus building
the parameter shapes, no conversion), `hf-to-jax`, and `jax-to-hf`. Peak
resident memory comes from `os.wait4` per process. Finally every exported
tensor is compared byte for byte with the original. Prints one table.

The driver imports only the standard library: a child's `ru_maxrss` includes
the parent's resident set at fork time, so generation and verification run in
child processes too (`_generate`, `_verify`).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
INDEX_FILE = "model.safetensors.index.json"
MiB = 2**20


def bench_config(layers: int, experts: int) -> dict:
    """A scaled-down Ling-lite config.json (hidden 1024, moe ffn 704, vocab 32000)."""
    return {
        "architectures": ["BailingMoeForCausalLM"], "model_type": "bailing_moe", "torch_dtype": "bfloat16",
        "vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816, "moe_intermediate_size": 704,
        "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64,
        "num_experts": experts, "num_experts_per_tok": 6, "num_shared_experts": 2, "first_k_dense_replace": 1,
        "norm_topk_prob": True, "norm_head": True, "use_bias": False, "use_qkv_bias": False,
        "rms_norm_eps": 1e-5, "rope_theta": 600000.0, "max_position_embeddings": 16384,
        "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1,
    }


def generate(directory: pathlib.Path, cfg_dict: dict, shard_bytes: int, seed: int = 0) -> dict:
    """Writes config.json, sharded random bf16 safetensors and the index; returns sizes for the report."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    sys.path.insert(0, str(REPO))
    from ling_jax.config import LingConfig
    from ling_jax.io.hf_names import leaf_sources, tensor_specs
    from ling_jax.model.params import abstract_params

    cfg = LingConfig.from_hf_dict(cfg_dict)
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(cfg_dict, indent=2, sort_keys=True) + "\n")
    specs = tensor_specs(cfg)
    shards, size = [[]], 0
    for s in specs:
        nbytes = int(np.prod(s.hf_shape)) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += nbytes
    rng = np.random.default_rng(seed)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for s in shard:  # random bf16 bit patterns with |x| < 2 (bit 14 clear: no inf / nan)
            bits = rng.integers(0, 2**16, size=s.hf_shape, dtype=np.uint16) & np.uint16(0xBFFF)
            tensors[s.hf_name] = bits.view(ml_dtypes.bfloat16)
            weight_map[s.hf_name] = name
            total += bits.nbytes
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    shapes = abstract_params(cfg)
    leaves = {}
    for path in leaf_sources(cfg):
        node = shapes
        for k in path:
            node = node[k]
        leaves["/".join(path)] = int(np.prod(node.shape)) * 2
    largest = max(leaves, key=leaves.get)
    return {"total": total, "tensors": len(specs), "shards": len(shards), "largest_name": largest,
            "largest": leaves[largest]}


def run(cmd: list[str], log: pathlib.Path) -> tuple[float, int]:
    """Runs `cmd`; returns (wall seconds, peak RSS bytes) of that process alone."""
    start = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    return wall, usage.ru_maxrss * 1024  # Linux reports KiB


def child(cmd: list[str]) -> str:
    """Runs a helper process; returns its stdout, or exits with its output."""
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[:3])} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return proc.stdout.strip()


def verify(a: pathlib.Path, b: pathlib.Path) -> int:
    """Compares every tensor of two sharded checkpoints byte for byte, one at a time; returns the count."""
    import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy)
    from safetensors import safe_open

    maps = [json.loads((d / INDEX_FILE).read_text())["weight_map"] for d in (a, b)]
    if set(maps[0]) != set(maps[1]):
        sys.exit(f"tensor names differ: {sorted(set(maps[0]) ^ set(maps[1]))[:5]}")
    for name in maps[0]:
        with safe_open(a / maps[0][name], "np") as fa, safe_open(b / maps[1][name], "np") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            sys.exit(f"tensor {name} differs after the round trip")
    return len(maps[0])


def du(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_generate":  # child: python bench_convert.py _generate DIR JSON SHARD
        info = generate(pathlib.Path(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4]))
        print(json.dumps(info))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_verify":  # child: python bench_convert.py _verify A B
        print(verify(pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=tempfile.gettempdir(), help="where the temporary directory goes")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--gen-shard-mb", type=int, default=500, help="shard size of the generated checkpoint")
    parser.add_argument("--keep", action="store_true", help="keep the generated and converted directories")
    args = parser.parse_args()

    cfg_dict = bench_config(args.layers, args.experts)
    free = shutil.disk_usage(args.workdir).free
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_convert-", dir=args.workdir))
    py, me, script = sys.executable, str(pathlib.Path(__file__).resolve()), str(REPO / "convert_weights.py")
    try:
        hf, jx, back = work / "hf", work / "jax", work / "hf_back"
        t0 = time.perf_counter()
        out = child([py, me, "_generate", str(hf), json.dumps(cfg_dict), str(args.gen_shard_mb * 10**6)])
        info = json.loads(out.splitlines()[-1])
        total, largest = info["total"], info["largest"]
        print(f"generated {total / 1e9:.2f} GB in {info['shards']} shards ({time.perf_counter() - t0:.0f} s) "
              f"at {hf}")
        if free < 3.5 * total:
            sys.exit(f"need {3.5 * total / 2**30:.1f} GiB free in {args.workdir}, have {free / 2**30:.1f} GiB: "
                     "pass --workdir")
        baseline_code = ("import jax, orbax.checkpoint, tensorstore, safetensors, tqdm; "
                         "from ling_jax.io.loading import load_config; from ling_jax.model.params import "
                         f"abstract_params; abstract_params(load_config({str(hf)!r}))")
        rows = [("baseline (imports + param shapes)", *run([py, "-c", baseline_code], work / "baseline.log"))]
        rows.append(("hf-to-jax", *run([py, script, "hf-to-jax", "--hf-dir", str(hf), "--out", str(jx)],
                                       work / "hf_to_jax.log")))
        rows.append(("jax-to-hf", *run([py, script, "jax-to-hf", "--ckpt", str(jx), "--out", str(back),
                                        "--max-shard-size", f"{args.gen_shard_mb}MB"], work / "jax_to_hf.log")))
        checked = child([py, me, "_verify", str(hf), str(back)])
        base = rows[0][2]
        print(f"\ncheckpoint: {total / MiB:,.0f} MiB ({info['tensors']} tensors, {info['shards']} shards); "
              f"largest stacked parameter: {info['largest_name']} {largest / MiB:,.0f} MiB; "
              f"Orbax directory on disk: {du(jx) / MiB:,.0f} MiB; round trip bit-exact: {checked} tensors\n")
        print("| step | wall (s) | peak RSS (MiB) | RSS - baseline (MiB) | peak / largest stacked "
              "| (peak - baseline) / largest stacked | peak / checkpoint |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for name, wall, rss in rows:
            extra = "-" if name.startswith("baseline") else f"{(rss - base) / MiB:,.0f}"
            above = "-" if name.startswith("baseline") else f"{(rss - base) / largest:.2f}"
            print(f"| {name} | {wall:.1f} | {rss / MiB:,.0f} | {extra} | {rss / largest:.2f} | {above} "
                  f"| {rss / total:.2f} |")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
