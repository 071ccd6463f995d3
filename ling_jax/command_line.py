"""Command lines with ml_collections configs (`--config FILE --config.KEY=VALUE`): user errors in one line.

`parse_flags` is absl's flag parsing (`app.run(main, flags_parser=...)`) for `train.py` and
`python -m ling_jax.curation`: a `--config` file that is missing or fails to load, an unknown
`--config.` key (with the nearest real keys), a value of the wrong type, or a missing required
flag is one `error:` line on stderr and exit status 2, with no traceback; `--help` exits 0.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
import sys
from typing import Any

import ml_collections
from absl import flags

__all__ = ["parse_flags"]



def _config_keys(config_arg: str) -> list[str]:
    """Every dotted field of the run config `config_arg` (`path.py[:arg]`), or [] if it does not load."""
    path, _, arg = config_arg.partition(":")
    try:
        spec = importlib.util.spec_from_file_location("_run_config_keys", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        cfg = module.get_config(arg or None)
    except Exception:  # only used to suggest a spelling; the real error is reported
        return []

    def walk(node: Any, prefix: str) -> list[str]:
        out = []
        for k, v in node.items():
            out += walk(v, f"{prefix}{k}.") if isinstance(v, ml_collections.ConfigDict) else [f"{prefix}{k}"]
        return out

    return walk(cfg, "")


def _flag_message(error: Exception, argv: list[str], example: str) -> str:
    """One line for a command-line error: the flag, the value, the fix."""
    config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if config_arg is None and "--config" in argv[:-1]:
        config_arg = argv[argv.index("--config") + 1]
    if isinstance(error, OSError):
        return (f"--config {config_arg}: cannot load it ({str(error).strip().splitlines()[-1].strip()}); give a run "
                f"config file such as {example}")
    if isinstance(error, AttributeError) and config_arg:
        found = re.search(r"[A-Za-z_]\w*", str(error))  # AttributeError("'key'\nDid you mean ...")
        key = found.group(0) if found else str(error)
        given = [a.split("=", 1)[0][len("--config."):] for a in argv if a.startswith("--config.")]
        field = next((g for g in given if key in g.split(".")), key)
        near = difflib.get_close_matches(field, _config_keys(config_arg), n=3)
        hint = f"did you mean {', '.join('--config.' + n for n in near)}?" if near else "check the spelling"
        return f"--config.{field}: {config_arg} has no such field; {hint}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "Traceback (most recent call last):" in lines:  # a config file's get_config raised: its last line says why
        return f"{lines[0]} {lines[-1]}"
    return lines[0] if lines else type(error).__name__


def parse_flags(argv: list[str], config_flag: Any, usage: str, example: str = "configs/demo.py") -> list[str]:
    """absl's flag parsing with user errors as one line on stderr and exit status 2.

    `--help` prints `usage` and the flags, and exits 0. `example` is a config file the messages suggest.
    Use as `app.run(main, flags_parser=lambda argv: parse_flags(argv, CONFIG_FLAG, __doc__))`.
    """
    if any(a in ("-h", "--help", "--helpshort", "-?") for a in argv[1:]):
        module = flags.FLAGS.find_module_defining_flag(config_flag.name)  # not __main__ under an entry point
        print(usage.rstrip() + "\n\nflags:\n" + flags.FLAGS.module_help(module))
        sys.exit(0)
    try:
        rest = flags.FLAGS(argv)
        if config_flag.value is None:
            raise flags.Error(f"--config is required: give a run config such as --config {example}")
        config_flag.value.keys()  # a config file that failed to load raises here (ml_collections defers it)
    except (flags.Error, OSError, AttributeError, KeyError, TypeError, ValueError) as e:
        print(f"error: {_flag_message(e, argv, example)}", file=sys.stderr)
        sys.exit(2)
    return rest
