"""One precision per run: each process's own choice, then the least capable one for all.

`--precision=auto` resolves on each process from its own GPUs or CPU flags
(`hardware.resolve_precision`). On a mixed node pool that could give bf16 on some ranks and fp16
with loss scaling on others, adding scaled and unscaled gradients into one sum. So every process
reports what it asked for and what it would choose (one `Backend.agree`), and all take the least
capable choice (fp32 < fp16 < bf16: a GPU with bf16 tensor cores also has fp16 ones, and fp32
runs everywhere). Processes given different `--precision` flags are refused with one line.
`combine` is the pure rule; `agree` is the collective around it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from trainer.backends.base import Backend
from trainer.config import ConfigError
from trainer.hardware import PrecisionChoice

# Least capable first: the minimum over the processes is what all of them can run.
ORDER = ("fp32", "fp16", "bf16")
REQUESTS = ("auto", *ORDER)


def combine(
    requested: list[str], chosen: list[str], mine: int, local: PrecisionChoice
) -> PrecisionChoice:
    """The run's precision from every process's request and own choice (index = worker)."""
    if len(set(requested)) > 1:
        listed = ", ".join(f"worker {i} {r}" for i, r in enumerate(requested))
        raise ConfigError(
            f"--precision differs between the processes of the run ({listed}); give every "
            "process the same --precision"
        )
    run = min(chosen, key=ORDER.index)
    decider = chosen.index(run)
    if len(set(chosen)) == 1:
        return dataclasses.replace(local, decided_by="every process")
    if decider == mine:
        return dataclasses.replace(
            local, decided_by=f"worker {decider}", reason=f"{local.reason}; the run's least capable"
        )
    return PrecisionChoice(
        run,
        f"worker {decider} can run only {run} (this process would choose {local.precision}: "
        f"{local.reason}); every process runs the least capable choice",
        decided_by=f"worker {decider}",
    )


def agree(backend: Backend, requested: str, local: PrecisionChoice) -> PrecisionChoice:
    """`combine` over all workers (every worker calls it at start-up, before the model)."""
    if backend.num_workers == 1:
        return dataclasses.replace(local, decided_by="this process")
    table = np.zeros([2, backend.num_workers], np.float32)
    # 1-based codes: a zero left in a row would mean a worker that did not report.
    table[0, backend.worker_index] = REQUESTS.index(requested) + 1
    table[1, backend.worker_index] = ORDER.index(local.precision) + 1
    everyone = np.rint(backend.agree(table.reshape(-1))).astype(int).reshape(table.shape)
    return combine(
        [REQUESTS[c - 1] for c in everyone[0]],
        [ORDER[c - 1] for c in everyone[1]],
        backend.worker_index,
        local,
    )
