"""`python -m trainer`: parse flags into a Config, run train_and_evaluate, report.

Exit codes are a contract with schedulers (trainer/exit_codes.py): 0 done; permanent 1 training
failed (non-finite loss, a checkpoint that could not be written), 2 invalid flags, paths or data,
3 a shard found corrupt mid-run; retryable 128+signal when the run stopped on SIGTERM/SIGINT after
saving a checkpoint, and 138 for a lost or missing peer, a stall, or any error convoy does not
recognise (its traceback goes to WORKDIR/crashes/). Every failure is one `error:` line.
"""

import os
import shlex
import sys

from absl import app, logging

# TensorFlow's C++ INFO lines (CPU feature notes, TFRecord buffer defaults) are nothing a user acts
# on; its warnings and errors still show. Set before TensorFlow loads; an explicit value wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

_HELP_ARGS = ("-h", "-help", "--help", "--helpshort")


def _parse(argv):
    from trainer.config import ConfigError
    from trainer.flags import config_from_argv, help_text

    if any(arg in _HELP_ARGS for arg in argv[1:]):
        print(help_text())
        sys.exit(0)
    try:
        return config_from_argv(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main(config) -> int:
    from trainer.interrupts import Interrupted, block_stop_signals

    # Before TensorFlow starts its threads, so that they all leave SIGTERM/SIGINT to the one
    # thread that receives them (trainer/interrupts.py).
    block_stop_signals()
    # Imported here so a bad command line fails before TensorFlow loads.
    from datasets.errors import DataError
    from trainer import errors
    from trainer.config import ConfigError
    from trainer.exit_codes import EXIT_RETRYABLE
    from trainer.loop import train_and_evaluate

    try:
        summary = train_and_evaluate(config)
    except (
        ConfigError,
        DataError,
        errors.NonFiniteLossError,
        errors.ReplicasDifferError,
        errors.CheckpointWriteError,
        errors.ExportError,
        errors.PeerError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return errors.exit_code(e)
    except Interrupted as e:
        # Every process of the run agreed and the checkpoint is complete: leave at once, so the
        # scheduler's grace period is spent on the save, not on interpreter teardown.
        logging.warning("%s", e)
        _exit_now(128 + e.signum)
    except Exception as e:  # noqa: BLE001 - the contract: one line, a file, a retryable code
        peer = errors.as_peer_error(e)
        if peer is not None:
            print(f"error: {peer}", file=sys.stderr)
            return EXIT_RETRYABLE
        report = errors.write_crash_report(config.workdir, e)
        what = errors.first_line(str(e))
        if not what.startswith(type(e).__name__):
            what = f"{type(e).__name__}: {what}"
        print(
            f"error: {what} (traceback in {report}); exiting with code {EXIT_RETRYABLE} "
            "(retryable)",
            file=sys.stderr,
        )
        return EXIT_RETRYABLE
    ev = summary["eval"]
    print(
        f"{ev['split']} accuracy {ev['accuracy']:.4f} ({ev['num_examples']} examples), "
        f"loss {ev['loss']:.4f}; {summary['images_per_sec']:,.0f} img/s over "
        f"{summary['train_seconds']:.1f} s of training"
    )
    if summary["is_chief"]:
        # A command to paste: quoted, since a workdir may hold spaces.
        logdir = shlex.quote(os.path.join(summary["workdir"], "tensorboard"))
        print(f"TensorBoard: tensorboard --logdir {logdir}")
        if config.report:
            print(f"Report: {summary['workdir']}/report/index.html")
    elif summary["strategy"] == "multi_worker":
        # The chief hosts TensorFlow's coordination service; a worker still tearing down when
        # the chief exits logs "Failed to send RPC to coordination service" although the run
        # succeeded. All workers left the run together (a final barrier); this makes the others
        # gone in milliseconds. Nothing is lost: a non-chief writes no files.
        _exit_now(0)
    return 0


def _exit_now(code: int) -> None:
    """Ends the process at once, skipping interpreter and TensorFlow teardown (seconds)."""
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    app.run(lambda config: sys.exit(main(config)), flags_parser=_parse)
