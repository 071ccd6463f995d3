"""`python -m ling_jax.cli.generate`: the command line, its output and its input checks."""

from __future__ import annotations

import pytest

from ling_jax.cli.generate import main


def test_prompt_ids_batch(fixture_dir, golden, capsys):
    prompt = ",".join(map(str, golden["greedy_prompt"][0]))
    assert main(["--model", str(fixture_dir), "--prompt-ids", prompt, "--prompt-ids", "451,28,499",
                 "--max-new-tokens", "12", "--dtype", "float32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = ",".join(map(str, golden["greedy_output"][0, 7:]))
    assert lines[0] == f"[0] {expected}"
    assert lines[1].startswith("[1] ")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt-ids", "1,2,999"], "outside the model vocabulary [0, 512): [999]"),
        (["--prompt-ids", "1,2,3", "--max-new-tokens", "200"], "exceeds max_position_embeddings 128"),
        (["--prompt-ids", "1,x"], "comma-separated integers"),
    ],
)
def test_bad_prompts_rejected_before_loading(fixture_dir, capsys, args, message, monkeypatch):
    import ling_jax.cli.generate as cli

    monkeypatch.setattr(cli, "from_pretrained", lambda *a, **k: pytest.fail("weights were loaded"))
    assert main(["--model", str(fixture_dir), *args]) == 2
    assert message in capsys.readouterr().err


def test_missing_model_dir(tmp_path, capsys):
    assert main(["--model", str(tmp_path), "--prompt-ids", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path} has no config.json") and "Traceback" not in err
    assert main(["--model", str(tmp_path / "nope"), "--prompt-ids", "1"]) == 2
    assert f"{tmp_path / 'nope'} does not exist: point --model at a Hugging Face directory" in capsys.readouterr().err


def test_dtype_choices_come_from_the_dtype_table(fixture_dir, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--model", str(fixture_dir), "--prompt-ids", "1", "--dtype", "float16"])
    assert info.value.code == 2
    assert "argument --dtype: invalid choice: 'float16' (choose from 'float32', 'bfloat16')" in capsys.readouterr().err


def test_importing_the_command_leaves_the_package_function_alone():
    import ling_jax
    import ling_jax.cli.generate
    from ling_jax.inference import decoding

    assert ling_jax.generate is decoding.generate  # the command is ling_jax.cli.generate, no alias in ling_jax


def test_text_prompt_through_a_sentencepiece_tokenizer(tmp_path, fixture_dir, capsys):
    import sentencepiece as spm

    corpus = ["def add(x, y): return x + y", "for i in range(10): print(i)", "import numpy as np"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(tmp_path / "tok"),
                                   vocab_size=60, model_type="bpe", minloglevel=2)
    args = ["--model", str(fixture_dir), "--tokenizer", str(tmp_path / "tok.model"), "--max-new-tokens", "5"]
    assert main([*args, "--prompt", "def add(x, y):", "--prompt", "import"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line[:4] for line in lines] == ["[0] ", "[1] "]
