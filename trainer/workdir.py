"""The run directory: who may write it, whether a new run fits it, and atomic output.

- `WorkdirLock`: an advisory lock (flock on WORKDIR/.convoy.lock, holding pid, host and start
  time) taken by the chief before it writes anything; a second run on the same workdir refuses
  at start naming the holder. The kernel drops a dead process's lock, so a lock left by a killed
  run on this host is simply taken over (and the log says whose it was).
- `check_compatible`: a workdir trained with another model, input shape or class count is refused
  before anything is written (config.json and plan.json stay as they were).
- `remove_stale_temporaries`: `*_temp*` checkpoint directories that killed saves leave behind.
- `atomic_directory`: output written under a temporary name and renamed into place when complete,
  so a SIGTERM or a full disk never leaves a half-written export where the old one was.

Whether the directory can be written at all is checked with the other flags, before TensorFlow
starts (`trainer.config.validated`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import shutil
import socket
import time

from absl import logging

from trainer.config import ConfigError

LOCK_FILE = ".convoy.lock"
PLAN_FILE = "plan.json"


class WorkdirLock:
    """Held for the whole run by the process that writes the workdir (the chief)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self._file = None

    def acquire(self) -> WorkdirLock:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._file = open(self.path, "a+")  # noqa: SIM115 - held open for the run
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = self._read()
            self._file.close()
            raise ConfigError(
                f"--workdir={os.path.dirname(self.path)}: in use by another run ("
                f"{_describe(holder)}); wait for it, stop it, or choose another --workdir"
            ) from None
        previous = self._read()
        if previous:
            logging.warning(
                "took over %s from a run that is gone (%s)", self.path, _describe(previous)
            )
        self._file.seek(0)
        self._file.truncate()
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        self._file.write(json.dumps(holder))
        self._file.flush()
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()  # An empty file: nobody to take over from.
            self._file.close()  # Closing drops the flock.
            self._file = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()

    def _read(self) -> dict:
        self._file.seek(0)
        try:
            return json.loads(self._file.read() or "{}")
        except json.JSONDecodeError:
            return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"pid {holder.get('pid')} on host {holder.get('host')} since {since}"


def check_compatible(
    workdir: str, model: str, input_shape, num_classes: int, global_batch: int | None = None
) -> None:
    """Raises ConfigError when WORKDIR holds a run whose weights cannot be this run's, or whose
    checkpoint cannot be resumed with these settings (the saved input position holds batches of
    the run's global batch size, and its step count and schedule follow from it)."""
    path = os.path.join(workdir, PLAN_FILE)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        previous = json.load(f)
    now = {"model": model, "input_shape": list(input_shape), "num_classes": num_classes}
    if global_batch is not None and glob.glob(
        os.path.join(glob.escape(workdir), "checkpoints", "*.index")
    ):
        now["global_batch"] = global_batch
    changed = [k for k in now if k in previous and previous[k] != now[k]]
    if changed:
        was = ", ".join(f"{k}={previous[k]}" for k in changed)
        new = ", ".join(f"{k}={now[k]}" for k in changed)
        hint = ""
        if "global_batch" in changed:
            hint = f" (--global_batch_size={previous['global_batch']} resumes it)"
        raise ConfigError(
            f"--workdir={workdir}: holds a run with {was}, not {new}; resume it with its own "
            f"settings{hint} or choose another --workdir"
        )


def write_run_files(workdir: str, config_json: str, plan_fields: dict) -> None:
    """config.json (the settings) and plan.json (what they resolved to), each replaced whole."""
    for name, text in (("config.json", config_json), (PLAN_FILE, json.dumps(plan_fields))):
        path = os.path.join(workdir, name)
        with open(f"{path}.tmp-{os.getpid()}", "w") as f:
            f.write(text)
        os.replace(f"{path}.tmp-{os.getpid()}", path)


def remove_stale_temporaries(checkpoint_dir: str) -> list[str]:
    """Deletes the `*_temp*` directories interrupted checkpoint saves leave; returns them."""
    stale = sorted(
        glob.glob(os.path.join(glob.escape(checkpoint_dir), "**", "*_temp*"), recursive=True)
    )
    stale = [p for p in stale if os.path.isdir(p)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    if stale:
        logging.info("removed %d unfinished checkpoint save(s): %s", len(stale), stale)
    return stale


@contextlib.contextmanager
def atomic_directory(final: str):
    """Yields a temporary sibling of `final` to write into; renames it to `final` on success.

    A previous `final` is replaced only once the new one is complete; on any error (or a signal
    raised as an exception) the temporary directory is removed and `final` is left as it was.
    """
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    temporary = os.path.join(parent, f".{os.path.basename(final)}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    old = os.path.join(parent, f".{os.path.basename(final)}.old-{os.getpid()}")
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(temporary, final)
    shutil.rmtree(old, ignore_errors=True)
