"""Curates code for training: filters, metrics, deduplication, repository ordering, pairs, quality scores.

    python -m ling_jax.curation --config configs/curate_code.py --config.input=REPOS --config.output=OUT

Writes OUT/documents/*.array_record (train with data.kind=array_record, data.record_format=json,
data.path=OUT/documents), OUT/pairs/*.array_record, OUT/report.json, OUT/report.md, OUT/histograms.png.
"""

from __future__ import annotations

import logging
import sys

from absl import app
from absl import logging as absl_logging
from ml_collections import config_flags

from ling_jax.command_line import parse_flags
from ling_jax.config import UserError

try:
    from ling_jax.curation.pipeline import run, settings_from_config
except ModuleNotFoundError as e:  # the core install has no Beam, tree-sitter or fastText
    print(f"error: {e.name} is not installed; install the curation extra: pip install 'ling_jax[curation]'",
          file=sys.stderr)
    sys.exit(2)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Curation config file (configs/curate_code.py).",
                                          lock_config=True)


def main(argv: list[str]) -> int:
    """Validates the config, runs the pipeline and prints where the output is."""
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
        return 2
    if _CONFIG.value is None:
        print("error: --config is required (e.g. --config configs/curate_code.py)", file=sys.stderr)
        return 2
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
    try:
        settings = settings_from_config(_CONFIG.value)
        report = run(settings)
    except (UserError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write = report["stages"].get("write", {})
    print(f"curated {write.get('docs_out', 0)} documents ({write.get('bytes_out', 0) / 1e6:.1f} MB) into "
          f"{settings.output} in {report['seconds']:.1f} s; see {settings.output}/report.md")
    return 0


def entry() -> None:
    """The command (`python -m ling_jax.curation`, `ling-curate`): absl flags, then `main`."""
    app.run(lambda argv: sys.exit(main(argv)),
            flags_parser=lambda argv: parse_flags(argv, _CONFIG, __doc__, example="configs/curate_code.py"))


if __name__ == "__main__":
    entry()
