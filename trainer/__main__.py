"""`python -m trainer`: parse flags into a Config, run train_and_evaluate, report.

Exit codes (trainer/errors.py): 0 done; 1 training failed (non-finite loss, a checkpoint that
could not be written); 2 invalid flags, paths or data; 3 a shard found corrupt mid-run; 124
stalled; 128+signal when stopped by SIGTERM/SIGINT after saving a checkpoint (so Kubernetes and
horovodrun treat it as retryable and the next attempt resumes).
"""

import os
import sys

from absl import app, logging

# TensorFlow's C++ INFO lines (CPU feature notes, TFRecord buffer defaults) are nothing a user acts
# on; its warnings and errors still show. Set before TensorFlow loads; an explicit value wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

_HELP_ARGS = ("-h", "-help", "--help", "--helpshort")


def _parse(argv):
    from trainer.config import ConfigError, config_from_argv

    if any(arg in _HELP_ARGS for arg in argv[1:]):
        from trainer.flags import help_text

        print(help_text())
        sys.exit(0)
    try:
        return config_from_argv(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main(config) -> int:
    # Imported here so a bad command line fails before TensorFlow loads.
    from datasets.errors import DataError
    from trainer import errors
    from trainer.config import ConfigError
    from trainer.interrupts import Interrupted
    from trainer.loop import train_and_evaluate

    try:
        summary = train_and_evaluate(config)
    except (
        ConfigError,
        DataError,
        errors.NonFiniteLossError,
        errors.CheckpointWriteError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return errors.exit_code(e)
    except Interrupted as e:
        logging.warning("%s", e)
        return 128 + e.signum
    ev = summary["eval"]
    print(
        f"{ev['split']} accuracy {ev['accuracy']:.4f} ({ev['num_examples']} examples), "
        f"loss {ev['loss']:.4f}; {summary['images_per_sec']:,.0f} img/s over "
        f"{summary['train_seconds']:.1f} s of training"
    )
    if summary["is_chief"]:
        print(f"TensorBoard: tensorboard --logdir {summary['workdir']}/tensorboard")
        if config.report:
            print(f"Report: {summary['workdir']}/report/index.html")
    elif summary["strategy"] == "multi_worker":
        _leave_before_the_chief()
    return 0


def _leave_before_the_chief() -> None:
    """Ends a finished non-chief MultiWorkerMirrored worker at once, skipping interpreter teardown.

    The chief hosts TensorFlow's coordination service; a worker still tearing down when the chief
    exits logs "Failed to send RPC to coordination service" although the run succeeded. All
    workers leave the run together (a final barrier); this makes the others gone in milliseconds
    while the chief's own teardown takes seconds. Nothing is lost: a non-chief writes no files.
    """
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    app.run(lambda config: sys.exit(main(config)), flags_parser=_parse)
