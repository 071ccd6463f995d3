"""ling_jax.curation.quality: a fastText classifier trained from labelled jsonl scores and filters records."""

from __future__ import annotations

import json
import random

import fasttext
import pytest

from ling_jax.curation.quality import QualitySettings, _Score, train_classifier
from ling_jax.curation.records import record
from ling_jax.curation.settings import CurationConfigError

GOOD = ["def {0}(items):\n    \"\"\"Return the sorted {0}.\"\"\"\n    return sorted(items, key=len)\n",
        "class {0}:\n    def __init__(self, value):\n        self.value = value\n"]
BAD = ["x{0}=1;y=2;z=3;;;;;;;;;;;;;;;", "aaaa{0} bbbb cccc $$$$ %%%% ^^^^ &&&&"]


def labelled(path, n=60):
    rng = random.Random(0)
    with open(path, "w") as fh:
        for i in range(n):
            name = f"name{rng.randrange(1000)}"
            fh.write(json.dumps({"text": GOOD[i % 2].format(name), "label": "high"}) + "\n")
            fh.write(json.dumps({"text": BAD[i % 2].format(name), "label": "low"}) + "\n")


def test_train_apply_and_filter(tmp_path):
    labelled(tmp_path / "train.jsonl")
    settings = QualitySettings(train_data=str(tmp_path / "train.jsonl"), threshold=0.5, dim=16, bucket=5000)
    model_path = train_classifier(settings, str(tmp_path / "q.bin"))
    assert sorted(fasttext.load_model(model_path).get_labels()) == ["__label__high", "__label__low"]
    scorer = _Score(model_path, settings)
    scorer.setup()
    good = list(scorer.process(record("r", "a.py", GOOD[0].format("things"))))
    bad = list(scorer.process(record("r", "b.py", BAD[0].format("q"))))
    assert len(good) == 1 and good[0]["score"] > 0.5
    assert bad == []  # scored under the threshold: dropped
    again = fasttext.load_model(train_classifier(settings, str(tmp_path / "q2.bin")))
    assert again.predict(GOOD[1].format("x").replace("\n", " "))[0] == ("__label__high",)


def test_training_data_needs_the_positive_label(tmp_path):
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": "x", "label": "low"}) + "\n")
    with pytest.raises(CurationConfigError, match=r"quality\.positive_label='high'"):
        train_classifier(QualitySettings(train_data=str(tmp_path / "one.jsonl")), str(tmp_path / "m.bin"))
