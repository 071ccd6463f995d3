"""The curation pipeline: the config read and validated into `CurationSettings`, the stages composed into one
Beam pipeline, and `run`, which executes it and writes the output and the report atomically.

Stages for source code (inputs `repositories` and `stack`): read -> language -> rules -> metrics ->
exact_dedup -> near_dedup -> quality -> (pairs from the surviving files) -> repository -> write. For
code-related text (`text`): read -> rules (text rules) -> exact_dedup -> near_dedup -> quality -> write.

Runners: `local` is Beam's FnApiRunner, in this process (`running_mode` in_memory) or with
`num_workers` worker processes or threads; it is named explicitly because Beam's DirectRunner may route a
pipeline to the Prism runner, which downloads a binary. `dataflow`, `flink`, `spark` and `portable` pass
`pipeline_options` (standard Beam flags) to that runner; nothing else changes.
"""

from __future__ import annotations

import dataclasses
import enum
import glob
import os
import shlex
import tempfile
import time

import apache_beam as beam
import ml_collections
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from ling_jax.curation import report as report_lib
from ling_jax.curation.dedup import DedupSettings, ExactDedup, NearDedup
from ling_jax.curation.languages import BY_NAME
from ling_jax.curation.ordering import OrderingSettings, RepositoryDocuments
from ling_jax.curation.pairs import CodeCommentPairs, PairSettings
from ling_jax.curation.quality import QualityScore, QualitySettings, train_classifier
from ling_jax.curation.reading import ReadRepositories, ReadSettings, ReadStack, ReadText, repositories
from ling_jax.curation.records import Stage
from ling_jax.curation.rules import CodeRules
from ling_jax.curation.settings import CurationConfigError, choice, section
from ling_jax.curation.stages import (
    CodeMetricsFilter,
    CodeRuleFilter,
    IdentifyLanguage,
    MetricsSettings,
    TextRuleFilter,
)
from ling_jax.curation.text_rules import TextRules
from ling_jax.curation.writing import WriteShards, is_remote, publish, remote_output_dir
from ling_jax.io.atomic import OutputDirError, atomic_output_dir, check_output_dir


class InputKind(enum.Enum):
    """What `input` is (`input_kind`)."""

    REPOSITORIES = "repositories"  # A directory whose subfolders are repositories.
    STACK = "stack"  # jsonl / parquet files of The Stack v2 records {repo_name, path, content, ...}.
    TEXT = "text"  # jsonl of code-related text documents.


class Runner(enum.Enum):
    """Where the pipeline runs (`runner`)."""

    LOCAL = "local"  # Beam's FnApiRunner on this machine.
    DATAFLOW = "dataflow"
    FLINK = "flink"
    SPARK = "spark"
    PORTABLE = "portable"  # Any portable job server (--job_endpoint in pipeline_options).


class RunningMode(enum.Enum):
    """How the local runner uses the machine (`running_mode`)."""

    IN_MEMORY = "in_memory"  # One process, no workers.
    MULTI_THREADING = "multi_threading"
    MULTI_PROCESSING = "multi_processing"


_BEAM_RUNNERS = {Runner.LOCAL: "FnApiRunner", Runner.DATAFLOW: "DataflowRunner", Runner.FLINK: "FlinkRunner",
                 Runner.SPARK: "SparkRunner", Runner.PORTABLE: "PortableRunner"}


@dataclasses.dataclass(frozen=True)
class CurationSettings:
    """The whole validated config."""

    input: str
    input_kind: InputKind
    output: str
    overwrite: bool
    languages: frozenset[str]
    runner: Runner
    running_mode: RunningMode
    num_workers: int
    pipeline_options: tuple[str, ...]
    num_shards: int
    write_jsonl: bool
    read: ReadSettings
    code_rules: CodeRules
    text_rules: TextRules
    metrics: MetricsSettings
    dedup: DedupSettings
    quality: QualitySettings
    pairs: PairSettings
    repository: OrderingSettings

    def beam_options(self) -> PipelineOptions:
        """The Beam pipeline options (the runner pinned explicitly)."""
        args = [f"--runner={_BEAM_RUNNERS[self.runner]}", *self.pipeline_options]
        if self.runner is Runner.LOCAL and self.running_mode is not RunningMode.IN_MEMORY:
            args += [f"--direct_num_workers={self.num_workers}", f"--direct_running_mode={self.running_mode.value}"]
        return PipelineOptions(args)


def _input_files(path: str, kind: InputKind) -> list[str]:
    if kind is InputKind.REPOSITORIES:
        if not os.path.isdir(path):
            raise CurationConfigError(f"input={path!r} is not a directory: point it at a folder of repositories")
        if not repositories(path):
            raise CurationConfigError(f"input={path!r} holds no repository folders: it is empty")
        return [path]
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.jsonl")) + glob.glob(os.path.join(path, "*.parquet")))
    else:
        files = sorted(glob.glob(path)) if "://" not in path else [path]
    if not files:
        raise CurationConfigError(f"input={path!r} matches no jsonl or parquet file: set input to existing data")
    if "://" not in path and all(os.path.getsize(f) == 0 for f in files):
        raise CurationConfigError(f"input={path!r}: all {len(files)} files are empty")
    return files


def settings_from_config(cfg: ml_collections.ConfigDict) -> CurationSettings:
    """Validates the whole config (before any work).

    Raises:
      CurationConfigError: A missing or empty input, an unknown language or choice, a value out of range.
      OutputDirError: The output exists (without overwrite) or would replace the input.
    """
    if not cfg.get("input"):
        raise CurationConfigError("input is empty: set --config.input to a directory of repositories or to data")
    if not cfg.get("output"):
        raise CurationConfigError("output is empty: set --config.output to a new directory")
    kind = choice(cfg.get("input_kind", "repositories"), "input_kind", InputKind)
    inputs = _input_files(cfg.input, kind)
    languages = frozenset(x.strip() for x in cfg.get("languages", "").split(",") if x.strip())
    unknown = sorted(languages - set(BY_NAME))
    if unknown:
        raise CurationConfigError(f"languages: unknown language {unknown[0]!r}; use names of the language table "
                                  f"(ling_jax.curation.languages), e.g. {', '.join(sorted(BY_NAME)[:8])}")
    num_workers, num_shards = cfg.get("num_workers", 2), cfg.get("num_shards", 4)
    for name, value in (("num_workers", num_workers), ("num_shards", num_shards)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CurationConfigError(f"{name}={value!r} is out of range: set it to an integer >= 1")
    quality = section(QualitySettings, cfg.get("quality"), "quality")
    for name in ("model", "train_data"):
        if getattr(quality, name) and not os.path.isfile(getattr(quality, name)):
            raise CurationConfigError(f"quality.{name}={getattr(quality, name)!r} does not exist: point it at a file")
    if not is_remote(cfg.output):
        if os.path.lexists(cfg.output) and not cfg.get("overwrite", False):
            raise OutputDirError(f"output={cfg.output!r} already exists: set --config.overwrite=True to replace it "
                                 "or choose another --config.output")
        check_output_dir(cfg.output, cfg.get("overwrite", False), inputs if not is_remote(cfg.input) else ())
    return CurationSettings(
        input=cfg.input, input_kind=kind, output=cfg.output, overwrite=cfg.get("overwrite", False),
        languages=languages, runner=choice(cfg.get("runner", "local"), "runner", Runner),
        running_mode=choice(cfg.get("running_mode", "multi_processing"), "running_mode", RunningMode),
        num_workers=num_workers, pipeline_options=tuple(shlex.split(cfg.get("pipeline_options", ""))),
        num_shards=num_shards, write_jsonl=cfg.get("write_jsonl", False),
        read=section(ReadSettings, cfg.get("read"), "read"),
        code_rules=section(CodeRules, cfg.get("code_rules"), "code_rules"),
        text_rules=section(TextRules, cfg.get("text_rules"), "text_rules"),
        metrics=section(MetricsSettings, cfg.get("metrics"), "metrics"),
        dedup=section(DedupSettings, cfg.get("dedup"), "dedup"), quality=quality,
        pairs=section(PairSettings, cfg.get("pairs"), "pairs"),
        repository=section(OrderingSettings, cfg.get("repository"), "repository"))


def _read(p: beam.Pipeline, s: CurationSettings):
    if s.input_kind is InputKind.REPOSITORIES:
        return p | "Read" >> ReadRepositories(s.input, s.read)
    pattern = s.input if not os.path.isdir(s.input) else None
    if s.input_kind is InputKind.TEXT:
        return p | "Read" >> ReadText(pattern or os.path.join(s.input, "*.jsonl"), s.read)
    files = _input_files(s.input, s.input_kind)
    parquet = files[0].endswith(".parquet")
    return p | "Read" >> ReadStack(pattern or os.path.join(s.input, "*.parquet" if parquet else "*.jsonl"),
                                   parquet, s.read)


def build(p: beam.Pipeline, s: CurationSettings, out: str, quality_model: str | None) -> None:
    """Adds the whole pipeline of `s` to `p`, writing into the directory `out`."""
    records = _read(p, s)
    if s.input_kind is InputKind.TEXT:
        records = records | "TextRules" >> TextRuleFilter(s.text_rules)
    else:
        records = (records | "Language" >> IdentifyLanguage(s.languages)
                   | "CodeRules" >> CodeRuleFilter(s.code_rules)
                   | "Metrics" >> CodeMetricsFilter(s.metrics))
    if s.dedup.exact:
        records = records | "ExactDedup" >> ExactDedup()
    if s.dedup.near:
        records = records | "NearDedup" >> NearDedup(s.dedup)
    if quality_model:
        records = records | "Quality" >> QualityScore(quality_model, s.quality)
    if s.input_kind is not InputKind.TEXT:
        if s.pairs.enabled:
            _ = (records | "Pairs" >> CodeCommentPairs(s.pairs)
                 | "WritePairs" >> WriteShards(FileSystems.join(out, "pairs"), "pairs", s.num_shards, s.write_jsonl,
                                               Stage.PAIRS_WRITE))
        if s.repository.enabled:
            records = records | "Repository" >> RepositoryDocuments(s.repository)
    _ = records | "Write" >> WriteShards(FileSystems.join(out, "documents"), "documents", s.num_shards,
                                         s.write_jsonl)


def run(s: CurationSettings) -> dict:
    """Runs the pipeline; the output directory appears complete (documents/, pairs/, report.*) or not at all.

    A local output is written under a temporary name and renamed (`atomic_output_dir`); a remote one (gs://
    and other Beam filesystems, for Dataflow / Flink / Spark) through `remote_output_dir`.
    """
    start = time.time()
    remote = is_remote(s.output)
    output = remote_output_dir(s.output, s.overwrite) if remote else atomic_output_dir(s.output, s.overwrite)
    with output as tmp, tempfile.TemporaryDirectory() as local:
        if not remote:
            for sub in ("documents", "pairs"):
                os.makedirs(os.path.join(tmp, sub))
        model = s.quality.model or None
        if s.quality.train_data:
            model = FileSystems.join(tmp, "quality_model.bin")
            publish(train_classifier(s.quality, os.path.join(local, "quality_model.bin")), model)
        with beam.Pipeline(options=s.beam_options()) as p:
            build(p, s, tmp, model)
        config = {k: (v.value if isinstance(v, enum.Enum) else sorted(v) if isinstance(v, frozenset) else v)
                  for k, v in dataclasses.asdict(s).items()}
        report = report_lib.build(report_lib.counters(p.result), config, time.time() - start)
        report_lib.check_conservation(report)
        report_lib.write(report, local)
        for name in ("histograms.png", "report.md", "report.json"):
            publish(os.path.join(local, name), FileSystems.join(tmp, name))
    return report
