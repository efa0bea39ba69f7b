"""`python -m trainer.report WORKDIR [--data_dir=DIR]`: write WORKDIR/report/ for a finished run.

Exit codes: 0 written; 2 not a run directory, no weights, bad flags or dataset; 3 a corrupt
shard. Errors are one `error:` line.
"""

from __future__ import annotations

import argparse
import os
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message} (usage: python -m trainer.report WORKDIR)", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str]) -> int:
    parser = _Parser(
        prog="python -m trainer.report",
        description="Writes WORKDIR/report/ (curves, confusion matrix, mistakes, filters, "
        "activations, report.json, index.html) for a convoy run.",
    )
    parser.add_argument("workdir", help="The run's --workdir.")
    parser.add_argument(
        "--data_dir", default="", help="The dataset to evaluate on (default: the run's own)."
    )
    args = parser.parse_args(argv)
    if not os.path.isdir(args.workdir):
        print(
            f"error: {args.workdir}: no such directory; expected a run's --workdir", file=sys.stderr
        )
        return 2
    # TensorFlow loads only now: a bad command line fails at once.
    from datasets.errors import DataError
    from trainer import console, errors
    from trainer.report import ReportError, write_report

    console.quiet_library_info()
    try:
        report = write_report(args.workdir, args.data_dir or None)
    except (ReportError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return errors.exit_code(e)
    ev = report["eval"]
    if ev is None:
        print(
            f"{os.path.join(args.workdir, 'report', 'index.html')}: curves and settings only; "
            f"no model could be loaded ({report['model_unavailable']})"
        )
        return 0
    print(
        f"{os.path.join(args.workdir, 'report', 'index.html')}: {report['eval_split']} accuracy "
        f"{ev['accuracy']:.4f} ({ev['correct']}/{ev['num_examples']}) with {report['weights']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
