"""launch.plan: the scaling planner's formulas, its flags and errors, --from_run, and no TensorFlow.

Pure Python: the formulas are checked against hand-computed values, the CLI in-process through
`main` (one `error:` line, exit 2) and in two subprocesses that check that neither `--help` nor a
flag-only plan imports TensorFlow.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from launch import plan  # noqa: E402

MB = 1e6
GB_PER_S = 1e9 / 1000  # bytes per ms in one GB/s


def inputs(**overrides) -> plan.Inputs:
    base = dict(
        ms_per_image=1.0,  # 1000 img/s on one GPU
        gradient_bytes=100 * MB,
        per_gpu_batch=100,  # 100 ms of compute per step
        gpus_per_node=8,
        intra_node_gbps=800.0,  # 100 GB/s nominal
        inter_node_gbps=80.0,  # 10 GB/s nominal
        intra_node_efficiency=1.0,
        inter_node_efficiency=1.0,
        intra_node_alpha_us=0.0,
        inter_node_alpha_us=0.0,
        allreduce_base_us=0.0,
        fusion_mb=1024.0,  # one buffer
    )
    base.update(overrides)
    return plan.Inputs(**base)


# --- formulas ---------------------------------------------------------------------------------


def test_ring_is_nccl_bus_bandwidth_convention():
    bw, lat = plan.ring_ms(100 * MB, 8, 100 * GB_PER_S, alpha_us=5.0)
    assert bw == pytest.approx(2 * 7 / 8 * 1.0)  # 2(n-1)/n * S/B: 100 MB at 100 GB/s = 1 ms
    assert lat == pytest.approx(2 * 7 * 5.0 / 1000)
    assert plan.ring_ms(100 * MB, 1, 1.0, 5.0) == (0.0, 0.0)


def test_one_node_is_a_ring_over_nvlink():
    parts = plan.allreduce_parts(inputs(), 8)
    assert parts["intra"] == pytest.approx(1.75)
    assert parts["inter"] == 0.0
    assert parts["calls"] == 1


def test_hierarchical_adds_a_ring_over_the_nodes_nics():
    parts = plan.allreduce_parts(inputs(), 32)  # 4 nodes of 8
    assert parts["intra"] == pytest.approx(1.75)
    # 2(k-1)/k * S / B_node: 100 MB over 10 GB/s of NICs, k = 4.
    assert parts["inter"] == pytest.approx(2 * 3 / 4 * 10.0)


def test_latency_terms_follow_nccl_steps_and_calls():
    i = inputs(
        intra_node_alpha_us=3.0, inter_node_alpha_us=10.0, allreduce_base_us=8.0, fusion_mb=25.0
    )
    parts = plan.allreduce_parts(i, 16)  # 2 nodes
    calls = math.ceil(100 * MB / (25 * plan.MIB))
    assert parts["calls"] == calls == 4
    assert parts["latency"] == pytest.approx(calls * (8.0 + 2 * 7 * 3.0 + 2 * 1 * 10.0) / 1000)
    # Fusion splits the bytes, not the bandwidth time.
    assert parts["intra"] == pytest.approx(1.75)


def test_efficiencies_scale_the_nominal_links():
    parts = plan.allreduce_parts(inputs(intra_node_efficiency=0.5), 8)
    assert parts["intra"] == pytest.approx(3.5)


def test_measured_bandwidth_is_one_flat_ring():
    i = inputs(allreduce_gbps=8.0, allreduce_alpha_us=100.0)  # 1 GB/s
    parts = plan.allreduce_parts(i, 2)
    assert parts["intra"] == pytest.approx(2 * 1 / 2 * 100.0)
    assert parts["latency"] == pytest.approx(2 * 100.0 / 1000)


def test_overlap_hides_all_but_the_last_buffer_or_what_backward_cannot_cover():
    assert plan.exposed_ms(10.0, 4, 60.0, overlap=False) == 10.0
    assert plan.exposed_ms(10.0, 1, 60.0, overlap=True) == 10.0  # one buffer: nothing to overlap
    assert plan.exposed_ms(10.0, 4, 60.0, overlap=True) == pytest.approx(2.5)  # t/m
    # Backward too short: t - t_bwd (1 - 1/m) = 100 - 40 * 3/4.
    assert plan.exposed_ms(100.0, 4, 40.0, overlap=True) == pytest.approx(70.0)


def test_rows_efficiency_epoch_and_bound():
    rows = plan.plan(inputs(epoch_images=1000), [1, 8, 32])
    one, eight, many = rows
    assert one.images_per_sec == pytest.approx(1000.0)
    assert one.efficiency == pytest.approx(1.0)
    assert one.seconds_per_epoch == pytest.approx(1.0)
    assert eight.step_ms == pytest.approx(100 + 1.75)
    assert eight.images_per_sec == pytest.approx(8 * 100 / 101.75 * 1000)
    assert eight.efficiency == pytest.approx(100 / 101.75)
    assert many.nodes == 4 and many.exposed_allreduce_ms == pytest.approx(1.75 + 15.0)
    assert {r.bound for r in rows} == {"compute"}
    assert [r.loss for r in rows] == ["none", "intra_node_allreduce", "inter_node_allreduce"]
    slow_net = plan.plan(inputs(inter_node_gbps=0.8), [64])[0]
    assert slow_net.bound == slow_net.loss == "inter_node_allreduce"


def test_input_limit_per_node():
    rows = plan.plan(inputs(input_images_per_sec_per_node=4000.0), [1, 8])
    assert rows[0].bound == "compute"
    # 8 GPUs x 100 images from a node that reads 4000/s: 200 ms per step.
    assert rows[1].step_ms == pytest.approx(200.0) and rows[1].bound == rows[1].loss == "input"
    assert rows[1].efficiency == pytest.approx(0.5)


def test_strong_scaling_divides_the_global_batch():
    rows = plan.plan(inputs(per_gpu_batch=None, global_batch=800), [1, 8])
    assert [r.per_gpu_batch for r in rows] == [800, 100]
    with pytest.raises(plan.PlanError, match="smaller than the 16 replicas"):
        plan.plan(inputs(per_gpu_batch=None, global_batch=8), [1, 16])


def test_presets_carry_their_sources():
    assert set(plan.NODES) == {"dgx1-p100", "dgx-a100", "hgx-h100", "hgx-h200"}
    assert plan.NODES["dgx-a100"].intra_node_gbps == 2400  # 300 GB/s per direction
    assert plan.NODES["hgx-h100"].inter_node_gbps == 3200  # 8 x 400 Gb/s
    assert all(n.source for n in plan.NODES.values())


# --- the command line -------------------------------------------------------------------------


def run_main(capsys, *args):
    status = plan.main(["launch.plan", *args])
    out, err = capsys.readouterr()
    return status, out, err


FLAGS = ["--per_gpu_images_per_sec=1000", "--params=25e6", "--per_gpu_batch=100"]


def test_json_is_one_line_with_rows(capsys):
    status, out, _ = run_main(capsys, *FLAGS, "--node=dgx-a100", "--gpus=1,8,64", "--json")
    assert status == 0
    assert len(out.strip().splitlines()) == 1
    doc = json.loads(out)
    assert [r["gpus"] for r in doc["rows"]] == [1, 8, 64]
    assert {"images_per_sec", "efficiency", "bound", "seconds_per_epoch"} <= set(doc["rows"][0])
    assert doc["rows"][0]["efficiency"] == 1.0
    assert doc["inputs"]["inter_node_gbps"] == 1600


def test_nodes_flag_and_table(capsys):
    status, out, _ = run_main(capsys, *FLAGS, "--node=hgx-h100", "--nodes=4", "--overlap")
    assert status == 0
    gpus = [line.split()[0] for line in out.splitlines()[2:]]
    assert gpus == ["1", "8", "32"]


def test_fp16_allreduce_halves_the_gradient_bytes(capsys):
    status, out, _ = run_main(
        capsys, *FLAGS, "--node=dgx-a100", "--grad_bytes_per_param=2", "--json"
    )
    assert status == 0 and json.loads(out)["inputs"]["gradient_bytes"] == 50e6


@pytest.mark.parametrize(
    "args, says",
    [
        (["--gpus=0,8", "--node=dgx-a100"], "--gpus=0,8: every size must be >= 1 GPU"),
        (["--node=dgx-a100", "--inter_node_gbps=-5"], "--inter_node_gbps=-5: expected a positive"),
        (["--intra_node_gbps=0"], "--intra_node_gbps=0: expected a positive"),
        (["--gpus=12", "--node=dgx-a100"], "12 GPUs is not a multiple of --gpus_per_node=8"),
        (["--gpus=16"], "16 GPUs share a node: give --intra_node_gbps"),
        (["--node=dgx-z"], "--node=dgx-z: unknown; expected one of dgx1-p100"),
        (["--grad_bytes_per_param=3"], "--grad_bytes_per_param=3: expected 4 (fp32)"),
        (["--gpus_per_node=0"], "--gpus_per_node=0: expected an integer >= 1"),
        (["--intra_node_efficiency=1.5"], "--intra_node_efficiency=1.5: expected a fraction"),
        (["--compute_ms=10"], "--per_gpu_images_per_sec and --compute_ms: give only one"),
        (["--gpus=a,b"], "--gpus=a,b: expected integers"),
        (["--nodes=2", "--gpus=8"], "--nodes and --gpus: give only one"),
    ],
)
def test_impossible_input_is_one_error_line_and_exit_2(capsys, args, says):
    status, out, err = run_main(capsys, *FLAGS, *args)
    assert status == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: launch.plan: ") and says in err, err


def test_a_global_batch_smaller_than_the_replicas_is_an_error(capsys):
    status, out, err = run_main(
        capsys, *FLAGS[:2], "--global_batch=4", "--gpus=1,8", "--node=dgx-a100"
    )
    assert status == 2 and out == ""
    assert err == (
        "error: launch.plan: --global_batch=4 is smaller than the 8 replicas of the 8-GPU row: "
        "every replica needs at least one image\n"
    )


@pytest.mark.parametrize(
    "args, says",
    [
        (["--params=1e6", "--per_gpu_batch=8"], "the one-GPU step is missing"),
        (["--per_gpu_images_per_sec=10", "--per_gpu_batch=8"], "the gradient size is missing"),
        (["--per_gpu_images_per_sec=10", "--params=1e6"], "give --per_gpu_batch"),
        (["--compute_ms=10", "--params=1e6", "--global_batch=8"], "--compute_ms needs"),
        (["--per_gpu_images_per_sec=1", "--model=resnet50", "--per_gpu_batch=8"], "--model needs"),
    ],
)
def test_missing_input_names_what_to_give(capsys, args, says):
    status, _, err = run_main(capsys, *args)
    assert status == 2 and says in err, err


def test_plot_draws_a_png(capsys, tmp_path):
    path = tmp_path / "plan.png"
    status, out, _ = run_main(capsys, *FLAGS, "--node=dgx-a100", "--gpus=1,8,64", f"--plot={path}")
    assert status == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- --from_run -------------------------------------------------------------------------------


def write_run(tmp_path, **overrides):
    summary = {
        "per_replica_batch": 64,
        "num_replicas": 2,
        "gradient_bytes": 4 * 1_000_000,
        "time_breakdown": {
            "compute_ms": 32.0,  # 0.5 ms per image
            "optimizer_ms": 2.0,
            "allreduce_ms": 6.0,
            "step_ms": 41.0,
            "input_images_per_sec": 20000.0,
        },
    }
    summary.update(overrides)
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    return str(tmp_path)


def test_from_run_takes_compute_batch_gradients_and_input(capsys, tmp_path):
    workdir = write_run(tmp_path)
    status, out, err = run_main(
        capsys,
        f"--from_run={workdir}",
        "--gpus_per_node=2",
        "--allreduce_gbps=8",  # 1 GB/s
        "--allreduce_alpha_us=500",
        "--gpus=1,2",
        "--json",
    )
    assert status == 0, err
    doc = json.loads(out)
    assert doc["inputs"]["ms_per_image"] == 0.5
    assert doc["inputs"]["optimizer_ms"] == 2.0
    assert doc["inputs"]["gradient_bytes"] == 4e6
    assert doc["inputs"]["input_images_per_sec_per_node"] == 20000.0
    one, two = doc["rows"]
    assert one["step_ms"] == pytest.approx(34.0)
    # 32 + 2 + (4 MB at 1 GB/s, halved by 2(n-1)/n = 4 ms) + 2 hops x 0.5 ms + NCCL base 8.4 us.
    assert two["allreduce_ms"] == pytest.approx(4.0 + 1.0 + 0.0084)
    run = doc["run"]
    assert run["num_replicas"] == 2
    assert run["measured"]["images_per_sec"] == pytest.approx(2 * 64 / 0.041, rel=1e-4)
    assert run["predicted"]["step_ms"] == pytest.approx(34 + 5.0084)
    assert run["error"]["allreduce_ms"] == pytest.approx((5.0084 - 6.0) / 6.0, abs=1e-4)


def test_from_run_missing_key_names_it(capsys, tmp_path):
    workdir = write_run(tmp_path, time_breakdown={"compute_ms": 3.0})
    status, _, err = run_main(capsys, f"--from_run={workdir}", "--allreduce_gbps=8")
    assert status == 2 and "'time_breakdown.optimizer_ms'" in err, err
    status, _, err = run_main(capsys, f"--from_run={tmp_path / 'nowhere'}")
    assert status == 2 and "no summary.json" in err


def test_from_run_conflicts_with_flags_that_it_replaces(capsys, tmp_path):
    status, _, err = run_main(capsys, f"--from_run={write_run(tmp_path)}", "--params=1e6")
    assert status == 2 and "--params and --from_run: give only one" in err


# --- no TensorFlow ----------------------------------------------------------------------------

NO_TF = (
    "import runpy, sys; sys.argv = ['launch.plan'] + sys.argv[1:]\n"
    "try:\n    runpy.run_module('launch.plan', run_name='__main__')\n"
    "except SystemExit as e:\n    code = e.code\n"
    "bad = [m for m in ('tensorflow', 'keras', 'matplotlib') if m in sys.modules]\n"
    "print('IMPORTED', bad)\nsys.exit(code)\n"
)


@pytest.mark.parametrize(
    "args", [["--help"], FLAGS + ["--node=dgx-a100", "--gpus=1,8,64,512", "--json"]]
)
def test_no_tensorflow_on_help_or_flag_only_plans(args):
    result = subprocess.run(
        [sys.executable, "-c", NO_TF, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "IMPORTED []" in result.stdout


def test_model_zoo_params_count_trainable_weights(capsys, monkeypatch):
    # The real path builds the model with Keras (~6 s to import); a stand-in trainer.models keeps
    # this test pure while checking the flags, the shape parsing and the count.
    import types

    class Weight:
        def __init__(self, *shape):
            self.shape = shape

    built = {}

    def build_model(model, input_shape, num_classes):
        built.update(model=model, input_shape=input_shape, num_classes=num_classes)
        return types.SimpleNamespace(trainable_weights=[Weight(784, 10), Weight(10)])

    monkeypatch.setitem(
        sys.modules, "trainer.models", types.SimpleNamespace(build_model=build_model)
    )
    status, out, err = run_main(
        capsys,
        "--model=softmax",
        "--input_shape=28,28,1",
        "--num_classes=10",
        "--per_gpu_images_per_sec=1000",
        "--per_gpu_batch=128",
        "--grad_bytes_per_param=2",
        "--node=dgx-a100",
        "--json",
    )
    assert status == 0, err
    assert built == {"model": "softmax", "input_shape": (28, 28, 1), "num_classes": 10}
    assert json.loads(out)["inputs"]["gradient_bytes"] == 7850 * 2
    status, _, err = run_main(
        capsys, "--model=softmax", "--input_shape=28,28", "--num_classes=10", *FLAGS[::2]
    )
    assert status == 2 and "--input_shape=28,28: expected H,W,C" in err, err


def test_published_figures_within_target():
    # benchmarks/plan_check.py: one set of constants for every row, no per-row tuning.
    from benchmarks import plan_check

    rows = [plan_check.check_row(r) for r in plan_check.ROWS]
    assert [r["name"] for r in rows if not r["within_target"]] == []
    for r in rows:
        assert r["predicted_efficiency"] >= r["efficiency_without_overlap"]


def test_readme_worked_example_is_what_the_planner_prints(capsys):
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    section = readme.split("### Planning a cluster run", 1)[1]
    command, rest = section.split("```sh\n", 1)[1].split("```\n", 1)
    shown = rest.split("```\n", 1)[1].split("```", 1)[0]
    args = command.replace("\\\n", " ").split()[3:]  # after `python -m launch.plan`
    args = [a for a in args if not a.startswith("--plot=")]
    status, out, err = run_main(capsys, *args)
    assert status == 0, err
    assert out == shown


def test_fit_ring_recovers_bandwidth_and_latency_from_a_sweep():
    # Two ranks at 1 GB/s (8 Gb/s) with 250 us per hop: t = S / B + 2 alpha.
    sweep = {s: s / (1e9 / 1000) + 0.5 for s in (4096, 65536, 1 << 20, 16 << 20)}
    assert plan.fit_ring(sweep) == {"bus_gbps": pytest.approx(8.0), "alpha_us": pytest.approx(250)}
    four = {s: 2 * 3 / 4 * s / 1e6 + 6 * 0.1 for s in (1 << 16, 1 << 24)}
    assert plan.fit_ring(four, ranks=4) == {"bus_gbps": 8.0, "alpha_us": 100.0}
    assert plan.fit_ring({4096: 1.0}) == {"bus_gbps": None, "alpha_us": None}
    assert plan.fit_ring({4096: 2.0, 65536: 1.0})["bus_gbps"] is None
