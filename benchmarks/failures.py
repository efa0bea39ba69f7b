"""How a benchmark reports a contender that cannot run: one line from the failed command's output.

The benchmarks run contenders as subprocesses (the real trainer CLI, horovodrun, a Keras recipe)
and put this line in their JSON instead of crashing, so one missing piece (e.g. Horovod) does not
lose the other figures.
"""

from __future__ import annotations

import subprocess


def failure_line(result: subprocess.CompletedProcess, limit: int = 300) -> str:
    """`exit N: <the most telling line>`: the last `error:` line, else the last line naming an
    error, else the last line of output."""
    lines = [line.strip() for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    telling = [line for line in lines if "error:" in line] or [
        line for line in lines if "error" in line.lower()
    ]
    return f"exit {result.returncode}: {(telling or lines or ['no output'])[-1][:limit]}"
