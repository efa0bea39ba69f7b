"""One precision per run: every process reports its choice; all run the least capable one."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from multiprocess import ONE_THREAD, tiny_flags
from trainer_harness import REPO, trainer_command, trainer_env

from trainer import run_precision
from trainer.config import ConfigError
from trainer.hardware import PrecisionChoice

BF16 = PrecisionChoice("bf16", "auto on a CPU with avx512_bf16")
FP32 = PrecisionChoice("fp32", "auto on a CPU without amx_bf16 or avx512_bf16")


def test_the_least_capable_choice_wins_and_names_its_process():
    for mine, local in ((0, BF16), (1, FP32)):
        run = run_precision.combine(["auto", "auto"], ["bf16", "fp32"], mine, local)
        assert run.precision == "fp32"
        assert run.decided_by == "worker 1"
    # fp16 (loss scaling) and bf16 in one run: fp16, which bf16 tensor cores also run.
    assert run_precision.combine(["auto"] * 3, ["bf16", "fp16", "bf16"], 0, BF16).precision == (
        "fp16"
    )
    same = run_precision.combine(["auto", "auto"], ["bf16", "bf16"], 0, BF16)
    assert (same.precision, same.decided_by) == ("bf16", "every process")


def test_processes_given_different_flags_are_refused_with_one_line():
    with pytest.raises(ConfigError, match="worker 0 auto, worker 1 bf16"):
        run_precision.combine(["auto", "bf16"], ["bf16", "bf16"], 0, BF16)


CPUINFO = "processor\t: 0\nmodel name\t: {model}\nflags\t\t: fpu sse sse2 avx avx2 {extra}\n\n"


def test_two_workers_on_different_cpus_agree_on_the_weaker_one(tiny_mnist, tmp_path):
    from launch.local_cluster import pick_free_ports, tf_configs

    cpus = []
    for i, extra in enumerate(("avx512f avx512_bf16 amx_bf16", "")):
        path = tmp_path / f"cpuinfo-{i}"
        path.write_text(CPUINFO.format(model=f"Test CPU {i}", extra=extra))
        cpus.append(str(path))
    workdir = str(tmp_path / "run")
    flags = [f for f in tiny_flags(tiny_mnist, workdir) if not f.startswith("--precision")]
    configs = tf_configs([f"127.0.0.1:{p}" for p in pick_free_ports(2)])
    workers = [
        subprocess.Popen(
            trainer_command("--strategy=multi_worker", "--precision=auto", *flags),
            cwd=REPO,
            env=trainer_env({**ONE_THREAD, "TF_CONFIG": config, "CONVOY_CPUINFO": cpu}),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for config, cpu in zip(configs, cpus)
    ]
    try:
        outputs = [w.communicate(timeout=300)[0] for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    assert [w.returncode for w in workers] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    # Worker 0 alone would run bf16; worker 1's CPU has no native bf16.
    assert "this process would choose bf16" in outputs[0], outputs[0][-3000:]
    for output in outputs:
        assert "precision fp32 (" in output and "decided by worker 1)" in output, output[-3000:]
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    assert (summary["precision"], summary["precision_decided_by"]) == ("fp32", "worker 1")
