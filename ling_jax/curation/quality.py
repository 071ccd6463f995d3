"""Quality scoring with a fastText classifier, as the paper's code-quality score.

`train_classifier(settings, out)` trains a supervised fastText model from labelled jsonl lines
`{"text", "label"}` (one thread, seed 0). fastText's training is not bit-reproducible, so a model is
trained once, on the driver, in a fresh interpreter, and its file is applied everywhere. A run that ends
in NaN is tried again with half the learning rate (down to 1/16 of it), up to 8 runs in all.
`QualityScore` applies the model on the workers as the record's `score` (the probability of
`positive_label`) and drops records below `threshold`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile

import apache_beam as beam

from ling_jax.curation.records import Reason, Record, Stage, count_drop, count_in, count_out, timed
from ling_jax.curation.report import HISTOGRAMS
from ling_jax.curation.settings import CurationConfigError, bounded

_NAN_TRIES = 8  # fastText runs before a NaN is an error (see train_classifier)
# One training run in a fresh interpreter: argv[1] is the JSON of train_supervised's arguments and "out".
_TRAIN = ("import json, sys, fasttext; a = json.loads(sys.argv[1]); out = a.pop('out'); "
          "fasttext.train_supervised(**a).save_model(out)")


def _fit(out: str, **kwargs) -> bool:
    """Trains a supervised fastText model into `out` in a fresh interpreter; False when it ended in NaN.

    A fresh process each time: after other native libraries have run in a process (Beam, JAX), fastText on
    small data can end in "Encountered NaN" on every try in it, while a new process trains normally.
    """
    done = subprocess.run([sys.executable, "-c", _TRAIN, json.dumps({**kwargs, "out": out})], capture_output=True,
                          text=True, check=False)
    if done.returncode == 0:
        return True
    if "Encountered NaN" in done.stderr:
        return False
    raise RuntimeError(f"fastText training failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")


@dataclasses.dataclass(frozen=True)
class QualitySettings:
    """The fastText quality score (config section `quality`; off when neither model nor train_data is set)."""

    model: str = bounded("")  # A trained fastText model (.bin) to apply.
    train_data: str = bounded("")  # Or: labelled jsonl {"text", "label"} to train one (saved in OUTPUT).
    positive_label: str = bounded("high")  # The label whose probability is the score.
    threshold: float = bounded(0.0, 0.0, 1.0)  # Records scoring below this are dropped (0: keep all).
    epoch: int = bounded(25, 1, 1000)  # fastText training epochs.
    lr: float = bounded(0.1, 0.0, 10.0)  # fastText learning rate.
    word_ngrams: int = bounded(2, 1, 5)  # fastText word n-grams.
    dim: int = bounded(64, 1, 1000)  # fastText vector size.
    bucket: int = bounded(100_000, 1000)  # fastText hash buckets of the word n-grams (model size ~ bucket * dim).

    @property
    def enabled(self) -> bool:
        """Whether records are scored."""
        return bool(self.model or self.train_data)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def train_classifier(settings: QualitySettings, out: str) -> str:
    """Trains the classifier on `settings.train_data` into the file `out`; returns `out`.

    Raises:
      CurationConfigError: The data has no valid `{"text", "label"}` line or only one label.
    """
    import fasttext  # noqa: F401  (the curation extra: missing, it fails here rather than in the child)

    labels, lines = set(), []
    with open(settings.train_data, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line) if line.strip() else {}
            if isinstance(row.get("text"), str) and row.get("label") is not None:
                labels.add(str(row["label"]))
                lines.append(f"__label__{row['label']} {_one_line(row['text'])}\n")
    if len(labels) < 2 or settings.positive_label not in labels:
        raise CurationConfigError(f"quality.train_data={settings.train_data!r} has labels {sorted(labels)}: it "
                                  f"needs at least two, including quality.positive_label="
                                  f"{settings.positive_label!r}")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as tmp:
        tmp.writelines(lines)
    try:
        lr, part = settings.lr, f"{out}.tmp{os.getpid()}"
        for _ in range(_NAN_TRIES):
            if _fit(part, input=tmp.name, epoch=settings.epoch, lr=lr, wordNgrams=settings.word_ngrams,
                    dim=settings.dim, bucket=settings.bucket, thread=1, minCount=1, verbose=0, seed=0):
                break
            lr = max(lr / 2, settings.lr / 16)
        else:
            raise RuntimeError(f"fastText training on quality.train_data={settings.train_data!r} ended in NaN "
                               f"{_NAN_TRIES} times; lower quality.lr or give it more labelled lines")
        os.replace(part, out)
    finally:
        os.unlink(tmp.name)
    return out


class _Score(beam.DoFn):
    def __init__(self, model_path: str, settings: QualitySettings):
        self.model_path, self.settings, self.model = model_path, settings, None

    def setup(self):
        import fasttext
        from apache_beam.io.filesystems import FileSystems

        path = self.model_path
        if "://" in path:  # On a cluster: copy the model from the output filesystem first.
            fd, path = tempfile.mkstemp(suffix=".bin")
            with os.fdopen(fd, "wb") as out, FileSystems.open(self.model_path) as src:
                out.write(src.read())
        self.model = fasttext.load_model(path)
        self.run = timed(Stage.QUALITY, self._score)

    def process(self, rec: Record):
        return self.run(rec)

    def _score(self, rec: Record):
        count_in(Stage.QUALITY, rec)
        labels, probs = self.model.predict(_one_line(rec["text"]), k=-1)
        scores = dict(zip(labels, probs, strict=True))
        rec = {**rec, "score": round(float(scores.get(f"__label__{self.settings.positive_label}", 0.0)), 6)}
        HISTOGRAMS["quality_score"].add(Stage.QUALITY, rec["score"])
        if rec["score"] < self.settings.threshold:
            count_drop(Stage.QUALITY, Reason.LOW_QUALITY, rec)
            return
        count_out(Stage.QUALITY, rec)
        yield rec


class QualityScore(beam.PTransform):
    """Attaches the fastText score of `model_path` and drops records under the threshold."""

    def __init__(self, model_path: str, settings: QualitySettings):
        super().__init__()
        self.model_path, self.settings = model_path, settings

    def expand(self, records):
        return records | "Score" >> beam.ParDo(_Score(self.model_path, self.settings))
