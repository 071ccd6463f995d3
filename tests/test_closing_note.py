"""The end-of-run closing note (`config.closing_note`, on in the demo): the PNG report, locations, next commands."""

from __future__ import annotations

import json

import ml_collections

from ling_jax.cli.train import closing_note


def test_closing_note_writes_the_report_and_names_what_to_run(tmp_path, capsys):
    rows = [{"step": s, "loss": 6.0 - s / 100, "learning_rate": 1e-3, "tokens_per_second": 100.0, "mfu": 0.1}
            for s in (10, 20)] + [{"step": 20, "eval_loss": 5.5, "eval_bits_per_byte": 2.4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    closing_note(str(tmp_path), 20, ml_collections.ConfigDict({"sample_prompts": ("def fibonacci(n):\n    ",),
                                                                "sample_temperature": 0.5, "sample_top_k": 20}))
    out = capsys.readouterr().out
    assert (tmp_path / "report.png").stat().st_size > 1000
    for line in (f"checkpoint   {tmp_path}/checkpoints/20", f"TensorBoard  tensorboard --logdir {tmp_path}/tensorboard",
                 f"report       {tmp_path}/report.png",
                 f"python -m ling_jax.cli.generate --model {tmp_path} --prompt 'def fibonacci(n):' --max-new-tokens 64 "
                 "--temperature 0.5 --top-k 20\n",
                 f"python -m ling_jax.evaluation --model {tmp_path} --tasks humaneval",
                 f"python convert_weights.py jax-to-hf --ckpt {tmp_path} --out {tmp_path}/hf"):
        assert line in out, (line, out)
