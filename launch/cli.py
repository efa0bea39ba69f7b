"""Command-line plumbing shared by the launchers: `<launcher flags> -- <trainer flags>` and --help."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags


def require_strategy(trainer_args: Sequence[str], strategy: str, launcher: str) -> None:
    """Raises ValueError when the trainer flags ask for another strategy than the launcher runs."""
    for arg in trainer_args:
        if arg.startswith("--strategy=") and arg != f"--strategy={strategy}":
            raise ValueError(f"{launcher} always runs --strategy={strategy}, not {arg!r}")


def print_help_if_asked(argv: Sequence[str], doc: str, flag_values: flags.FlagValues) -> bool:
    """Prints the launcher's usage when its own flags (before `--`) ask for help; says whether.

    Only the launcher's part counts: a `--help` after `--` belongs to the trainer.
    """
    own_args = argv[1 : argv.index("--")] if "--" in argv else argv[1:]
    if not any(a in ("-h", "-help", "--help") for a in own_args):
        return False
    print(doc + "\nflags:\n" + flag_values.get_help(), file=sys.stderr)
    return True
